"""Models: the multiway MH-MoE backbone, its heads, presets and the registry, and ``BackboneSpec``
(a preset + variant + typed overrides: what task modules and configs name a backbone by)."""

from mmmoe.models.config import ModelConfig
from mmmoe.models.heads import MIMHead, NLVR2Head, Pooler, TokenHead, VQAHead, mim_targets, patchify
from mmmoe.models.multiway_transformer import BackboneOutput, KVCache, MultiwayTransformer
from mmmoe.models.pretrained import PretrainedFolderError, PretrainedModel, from_pretrained
from mmmoe.models.registry import (
    ABLATION_VARIANTS,
    ALL_VARIANTS,
    PRESETS,
    VARIANTS,
    count_costs,
    create_model,
    get_config,
    list_models,
    list_variants,
    moe_variant,
    parse_variant,
)
from mmmoe.models.spec import BackboneSpec, MoESpec

__all__ = [
    "ModelConfig", "MultiwayTransformer", "BackboneOutput", "KVCache", "TokenHead", "MIMHead", "Pooler",
    "VQAHead", "NLVR2Head", "mim_targets", "patchify", "PRESETS", "VARIANTS", "ABLATION_VARIANTS", "ALL_VARIANTS", "create_model", "get_config",
    "list_models", "list_variants", "parse_variant", "moe_variant", "count_costs", "from_pretrained", "PretrainedModel",
    "PretrainedFolderError", "BackboneSpec", "MoESpec",
]
