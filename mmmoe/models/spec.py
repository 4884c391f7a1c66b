"""``BackboneSpec``: which backbone to build, as a preset, a variant and typed overrides.

What a task module takes (``model.init_args.backbone`` in a YAML config) and ``create_model``
builds: the preset name, the FFN variant, and every ``ModelConfig`` field (``moe``: every
``MoEConfig`` field, nested) as an optional override, where None keeps the preset's / the
variant's value::

    backbone:
      preset: tiny
      variant: smoe
      depth: 2              # a ModelConfig field
      moe:
        router: xmoe        # a MoEConfig field, merged into the variant's MoE layers

Plain typed dataclasses, so a config parser (jsonargparse / LightningCLI) lists every field with
its docstring and merges several config files field by field. Construction resolves the spec with
``get_config`` and so validates it: a wrong value raises ``ValueError`` naming the field.
``to_dict`` / ``from_dict`` give and take plain types (safe in a weights-only checkpoint); an
unknown key is an error naming it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Union

from mmmoe.models.config import ModelConfig
from mmmoe.models.registry import DEFAULT_VARIANT, PRESETS, get_config, parse_variant


def _from_mapping(cls: type, d: Mapping[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; valid: {', '.join(sorted(known))}")
    return cls(**d)


@dataclass
class MoESpec:
    """Overrides of the MoE layers' fields (``mmmoe.moe.MoEConfig``); null keeps the variant's value.
    ``d_model`` is always the model width."""

    num_experts: Optional[int] = None
    """Routed experts per MoE layer."""
    expert_hidden: Optional[int] = None
    """Hidden width of each routed expert."""
    top_k: Optional[int] = None
    """Experts per sub-token."""
    num_heads: Optional[int] = None
    """h: sub-tokens per token (must divide the model width)."""
    activation: Optional[str] = None
    """Expert FFN: swiglu or gelu."""
    router: Optional[str] = None
    """softmax or xmoe (low-dimensional cosine router)."""
    head_layer: Optional[bool] = None
    """d x d projection before the split (the variant's: on for mhmoe-h*)."""
    merge_layer: Optional[bool] = None
    """d x d projection after the merge (the variant's: on for mhmoe-h*)."""
    shared_expert_hidden: Optional[int] = None
    """Width of an always-on shared expert (0 = none)."""
    capacity_factor: Optional[float] = None
    """Expert capacity factor (the variants are dropless)."""
    aux_loss_coef: Optional[float] = None
    """Weight of the balance loss (balancing aux_loss)."""
    z_loss_coef: Optional[float] = None
    """Weight of the router z-loss."""
    balancing: Optional[str] = None
    """aux_loss (balance loss) or aux_free (per-expert selection bias)."""
    bias_update_rate: Optional[float] = None
    """Step size of the aux-loss-free bias update."""
    xmoe_dim: Optional[int] = None
    """X-MoE router: width of the routing space."""
    xmoe_temperature: Optional[float] = None
    """X-MoE router: initial softmax temperature."""
    sub_token_residual: Optional[bool] = None
    """Add each sub-token to its expert mixture (2404 Eq. 6)."""
    bitnet: Optional[bool] = None
    """BitNet b1.58 experts (prefer the backbone's bitnet field)."""
    bitnet_head_merge: Optional[bool] = None
    """BitNet b1.58 head and merge layers too (prefer the backbone's bitnet field)."""
    activation_threshold: Optional[float] = None
    """Selections / tokens above which an expert counts as activated."""

    def overrides(self) -> Dict[str, Any]:
        """The fields that are set (not None)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class BackboneSpec:
    """The backbone: a preset, an FFN variant and overrides of any ModelConfig field (null keeps the
    preset's value); see ``mmmoe.models.registry`` for the presets and variants."""

    preset: str = "tiny"
    """Model size: tiny, small, base or large (mmmoe.models.list_models())."""
    variant: str = DEFAULT_VARIANT
    """FFN variant: dense, smoe, fine-grained, mhmoe-h2, mhmoe-h3; the head/merge ablations
    mhmoe-hH-nohead, -nomerge, -nohead-nomerge; any of them + -bitnet (mmmoe.models.list_variants())."""
    dim: Optional[int] = None
    """Model width D."""
    depth: Optional[int] = None
    """Number of transformer blocks."""
    num_heads: Optional[int] = None
    """Attention heads (must divide dim)."""
    ffn_hidden: Optional[int] = None
    """Hidden width of the dense FFNs (and the reference width of the variants' experts)."""
    activation: Optional[str] = None
    """Dense FFN activation: swiglu or gelu."""
    vl_layers: Optional[int] = None
    """Top blocks with a vision-language FFN way."""
    moe_every: Optional[int] = None
    """Every moe_every-th block is an MoE block."""
    image_size: Optional[int] = None
    """Square input image side in pixels."""
    patch_size: Optional[int] = None
    """Patch side in pixels (must divide image_size)."""
    in_chans: Optional[int] = None
    """Image channels."""
    vocab_size: Optional[int] = None
    """Text vocabulary (null: the task's tokenizer's, else the preset's)."""
    max_text_len: Optional[int] = None
    """Learned text positions (BOS + tokens + EOS)."""
    qkv_bias: Optional[bool] = None
    """Bias in the fused qkv projection."""
    drop_path: Optional[float] = None
    """Stochastic depth rate of the last block."""
    dropout: Optional[float] = None
    """Dropout after attention and FFN projections."""
    norm_eps: Optional[float] = None
    """LayerNorm epsilon."""
    grad_checkpointing: Optional[bool] = None
    """Recompute each block in backward to save memory."""
    bitnet: Optional[str] = None
    """BitNet b1.58: none, experts (routed and shared experts) or all (every linear layer of the
    blocks, 2411 Table 3; what a -bitnet variant sets)."""
    moe: MoESpec = field(default_factory=MoESpec)
    """Overrides of the variant's MoE layer fields."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, Mapping):
            self.moe = _from_mapping(MoESpec, self.moe, "BackboneSpec.moe")
        elif self.moe is None:
            self.moe = MoESpec()
        elif not isinstance(self.moe, MoESpec):
            raise ValueError(f"BackboneSpec.moe={self.moe!r} is invalid: must be a MoESpec or a mapping of its fields")
        if not isinstance(self.preset, str):
            raise ValueError(f"BackboneSpec.preset={self.preset!r} is invalid: must be a preset name")
        if self.variant is None:
            self.variant = DEFAULT_VARIANT
        if not isinstance(self.variant, str):
            raise ValueError(f"BackboneSpec.variant={self.variant!r} is invalid: must be a variant name")
        if self.moe.overrides() and parse_variant(self.variant)[0] == "dense":
            raise ValueError(f"BackboneSpec.moe sets {sorted(self.moe.overrides())} but variant={self.variant!r} "
                             "has no MoE layers: choose an MoE variant (e.g. smoe)")
        if self.preset in PRESETS:  # the plain fields first, so an error names the field set (not a derived one)
            ModelConfig(**{**PRESETS[self.preset], **{k: v for k, v in self.overrides().items() if k != "moe"}})
        self.config()  # validates everything else (errors name the field)

    def overrides(self) -> Dict[str, Any]:
        """The ModelConfig fields that are set, ``moe`` as a dict of the MoE fields that are set."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("preset", "variant", "moe") and getattr(self, f.name) is not None}
        if self.moe.overrides():
            out["moe"] = self.moe.overrides()
        return out

    def config(self, **extra: Any) -> ModelConfig:
        """The validated ``ModelConfig``; ``extra`` fills fields the spec leaves at None (e.g. the
        tokenizer's ``vocab_size``)."""
        over = self.overrides()
        over.update({k: v for k, v in extra.items() if k not in over})
        return get_config(self.preset, self.variant, **over)

    def to_dict(self) -> Dict[str, Any]:
        """Plain types only (nested ``moe`` dict), for checkpoints and YAML."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BackboneSpec":
        return _from_mapping(cls, d, "BackboneSpec")

    @classmethod
    def coerce(cls, value: Union["BackboneSpec", Mapping[str, Any], None]) -> "BackboneSpec":
        """A new spec from a spec, a mapping of its fields (what checkpoints hold) or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return cls.from_dict(value.to_dict())
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise ValueError(f"backbone={value!r} is invalid: must be a BackboneSpec or a mapping of its fields")
