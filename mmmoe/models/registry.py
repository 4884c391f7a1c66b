"""Named model presets and FFN variants: ``create_model("tiny", variant="smoe", depth=2)``.

Presets fix the backbone size; a *variant* fixes what the MoE blocks hold, derived with the parity
solver (arXiv 2411.16205) from one SMoE reference layer of ``num_experts`` (8) experts of width
``ffn_hidden``, top-1, so every variant of a preset has the same active FLOPs:

    dense          no MoE: every block a dense FFN of width ffn_hidden (= the SMoE's active FFN)
    smoe           8 experts x ffn_hidden, top-1, h = 1
    fine-grained   16 experts x ffn_hidden/2, top-2, h = 1
    mhmoe-h2       h = 2 with head and merge layers, top-2, expert count and width from the solver
    mhmoe-h3       h = 3, top-3 (the preset's dim must be divisible by 3)

For ``tiny`` (dim 96, ffn 256) the solver gives mhmoe-h2 = 40 x 96 and mhmoe-h3 = 96 x 64: the
paper's base configuration (dim 768, 8 x 2048) scaled down by 8.

Ablations of the head and merge layers (2411 Table 5), registered for mhmoe-h2 and mhmoe-h3:

    mhmoe-hH-nohead          no head layer    } at the same active FLOPs: the solver gives the
    mhmoe-hH-nomerge         no merge layer   } removed d x d MACs to wider experts (expert
    mhmoe-hH-nohead-nomerge  neither          } counts rounded to a multiple of 4)

(The same expert shapes without a layer, i.e. fewer FLOPs, are ``variant="mhmoe-h2"`` with
``moe={"head_layer": False}``.) Any variant name + ``-bitnet`` is the BitNet b1.58 model of 2411
Table 3 (``bitnet="all"``: attention, dense FFNs, head/merge layers and experts quantised).

Overrides are checked strictly: an unknown key raises ``ValueError`` listing the valid ones.
``create_model(BackboneSpec(...))`` builds from a typed spec (``mmmoe.models.spec``), the form
task modules and YAML configs use.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Dict, List, Optional, Tuple

import torch

from mmmoe.models.config import ModelConfig
from mmmoe.models.multiway_transformer import MultiwayTransformer
from mmmoe.moe import MHMoE, MoEConfig, solve_parity

PRESETS: Dict[str, Dict[str, Any]] = {
    # tests and the CPU quickstart: seconds per step on a laptop
    "tiny": dict(dim=96, depth=4, num_heads=4, ffn_hidden=256, vl_layers=1, image_size=64, patch_size=16,
                 max_text_len=40),
    "small": dict(dim=384, depth=6, num_heads=6, ffn_hidden=1024, vl_layers=2, image_size=224, patch_size=16,
                  max_text_len=64),
    # BEiT-3 base / large widths; SwiGLU FFNs of 2/3 the GELU width keep the parameter count; the
    # top three blocks hold the vision-language way, as in BEiT-3
    "base": dict(dim=768, depth=12, num_heads=12, ffn_hidden=2048, vl_layers=3, image_size=224, patch_size=16,
                 max_text_len=64),
    "large": dict(dim=1024, depth=24, num_heads=16, ffn_hidden=2736, vl_layers=3, image_size=224, patch_size=16,
                  max_text_len=64),
}
VARIANTS = ("dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3")
"""The 2411 Table 1 rows (at matched active FLOPs)."""
ABLATIONS = ("nohead", "nomerge", "nohead-nomerge")
"""Head / merge layer ablations of 2411 Table 5, as variant name suffixes of mhmoe-h2 / mhmoe-h3."""
ABLATION_VARIANTS = tuple(f"{v}-{a}" for v in ("mhmoe-h2", "mhmoe-h3") for a in ABLATIONS)
BITNET_SUFFIX = "-bitnet"
ALL_VARIANTS = VARIANTS + ABLATION_VARIANTS + tuple(v + BITNET_SUFFIX for v in VARIANTS + ABLATION_VARIANTS)
"""Every registered variant name: the Table 1 rows, the Table 5 ablations, each also with -bitnet."""
DEFAULT_VARIANT = "mhmoe-h2"
REFERENCE_EXPERTS = 8
ABLATION_EXPERT_MULTIPLE = 4
"""Expert counts of the ablation variants are rounded to a multiple of 4 (the main variants: 8, as
the paper): the exact parameter-parity counts there are whole multiples of 4 (36 and 32 for h=2)."""


def list_variants() -> List[str]:
    """Every registered variant name (``ALL_VARIANTS``)."""
    return list(ALL_VARIANTS)


def parse_variant(variant: str) -> Tuple[str, bool, bool, bool]:
    """``"mhmoe-h2-nohead-bitnet"`` -> (base variant, head layer, merge layer, BitNet everywhere).

    Head / merge are those of the base variant (True for mhmoe-h*, False otherwise) unless ablated."""
    if variant not in ALL_VARIANTS:
        raise ValueError(f"variant={variant!r} is invalid: allowed {', '.join(ALL_VARIANTS)}")
    bitnet = variant.endswith(BITNET_SUFFIX)
    name = variant[: -len(BITNET_SUFFIX)] if bitnet else variant
    base = name
    for a in sorted(ABLATIONS, key=len, reverse=True):
        if name.endswith("-" + a):
            base = name[: -len(a) - 1]
            break
    mh = base.startswith("mhmoe-")
    head = mh and "nohead" not in name[len(base):]
    merge = mh and "nomerge" not in name[len(base):]
    return base, head, merge, bitnet


def moe_variant(
    dim: int, ffn_hidden: int, variant: str, activation: str = "swiglu", num_experts: int = REFERENCE_EXPERTS
) -> Optional[Dict[str, Any]]:
    """MoE fields (a dict for ``MoEConfig``, without d_model) of one variant, or None for dense.

    A ``-bitnet`` suffix does not change the MoE shape (``get_config`` sets ``bitnet="all"``)."""
    base, head, merge, _ = parse_variant(variant)
    if base == "dense":
        return None
    heads = [h for h in (2, 3) if dim % h == 0]
    ablated = base.startswith("mhmoe-") and not (head and merge)
    rows = {r.name: r for r in solve_parity(
        dim, num_experts, ffn_hidden, 1, activation, heads=heads, head_layer=head or not ablated,
        merge_layer=merge or not ablated, expert_multiple=ABLATION_EXPERT_MULTIPLE if ablated else 8)}
    name = {"smoe": "smoe", "fine-grained": "fine-grained", "mhmoe-h2": "mh-moe h=2", "mhmoe-h3": "mh-moe h=3"}[base]
    if name not in rows:
        raise ValueError(f"variant={variant!r} needs dim divisible by {base[-1]}, got dim={dim}")
    r = rows[name]
    out = dict(num_experts=r.num_experts, expert_hidden=r.expert_hidden, top_k=r.top_k, num_heads=r.num_heads,
               activation=activation)
    if ablated:
        out.update(head_layer=head, merge_layer=merge)
    return out


def list_models() -> List[str]:
    return sorted(PRESETS)


def _valid_keys() -> List[str]:
    return sorted({f.name for f in fields(ModelConfig)})


def get_config(name: str = "tiny", variant: Optional[str] = None, **overrides: Any) -> ModelConfig:
    """The preset ``name`` with ``variant`` (default mhmoe-h2; any of ``list_variants()``) and strict
    overrides.

    ``moe`` in overrides may be a dict: it is merged into the variant's MoE fields (e.g.
    ``moe={"router": "xmoe"}``), or None for dense. A ``-bitnet`` variant sets ``bitnet="all"``
    (an explicit ``bitnet`` override must then agree)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}: available {', '.join(list_models())}")
    unknown = sorted(set(overrides) - set(_valid_keys()))
    if unknown:
        raise ValueError(f"unknown model override(s) {unknown}; valid: {', '.join(_valid_keys())}")
    args = {**PRESETS[name], **{k: v for k, v in overrides.items() if k != "moe"}}
    act = args.get("activation", "swiglu")
    variant = variant or DEFAULT_VARIANT
    moe = moe_variant(args["dim"], args["ffn_hidden"], variant, act)
    if parse_variant(variant)[3]:
        if args.setdefault("bitnet", "all") != "all":
            raise ValueError(f"variant={variant!r} is the all-BitNet model but bitnet={args['bitnet']!r} was given")
    if "moe" in overrides:
        extra = overrides["moe"]
        if extra is None:
            moe = None
        elif isinstance(extra, MoEConfig):
            moe = extra.to_dict()
        elif isinstance(extra, dict):
            moe = {**(moe or moe_variant(args["dim"], args["ffn_hidden"], "smoe", act)), **extra}
        else:
            raise ValueError(f"moe override must be a dict, a MoEConfig or None, got {type(extra).__name__}")
    if moe is not None:
        moe = MoEConfig.from_dict({**moe, "d_model": args["dim"]})
    return ModelConfig(**args, moe=moe)


def create_model(name: Any = "tiny", variant: Optional[str] = None, **overrides: Any) -> MultiwayTransformer:
    """Build the backbone of preset ``name`` (see ``get_config``), or of a ``BackboneSpec``
    (``create_model(spec)``; ``overrides`` then fill the fields the spec leaves unset)."""
    if not isinstance(name, str):
        if not callable(getattr(name, "config", None)):
            raise ValueError(f"create_model takes a preset name or a BackboneSpec, got {type(name).__name__}")
        if variant is not None:
            raise ValueError("create_model(spec): the variant is the spec's (BackboneSpec.variant)")
        return MultiwayTransformer(name.config(**overrides))
    return MultiwayTransformer(get_config(name, variant, **overrides))


# ---------------------------------------------------------------------------------- cost counts
def ffn_macs_per_token(cfg: ModelConfig, layer: int) -> int:
    """Multiply-adds per token of one block's FFN (router, norms and biases left out)."""
    c = 3 if cfg.activation == "swiglu" else 2
    if not cfg.is_moe_layer(layer):
        return c * cfg.dim * cfg.ffn_hidden
    m = cfg.moe
    cm = 3 if m.activation == "swiglu" else 2
    extra = cfg.dim * cfg.dim * (int(m.use_head_layer) + int(m.use_merge_layer))
    shared = cm * cfg.dim * m.shared_expert_hidden
    return extra + m.top_k * cm * cfg.dim * m.expert_hidden + shared


def count_costs(cfg: ModelConfig, seq_len: Optional[int] = None) -> Dict[str, float]:
    """Parameters (total, and active per token) and forward MACs per token of the backbone for a
    sequence of ``seq_len`` positions (default: one image plus max_text_len text)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = MultiwayTransformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    S = seq_len if seq_len is not None else 1 + cfg.num_patches + cfg.max_text_len
    D = cfg.dim
    attn = 4 * D * D + 2 * S * D  # qkv + proj, scores + weighted sum
    ffn = sum(ffn_macs_per_token(cfg, i) for i in range(cfg.depth))
    macs = cfg.depth * attn + ffn
    inactive = 0
    for blk in model.blocks:  # a token runs one way, and within an MoE way only its top-k experts
        ways = list(blk.ffn.ways.values())
        inactive += sum(sum(p.numel() for p in w.parameters()) for w in ways[1:])
        first = ways[0]
        if isinstance(first, MHMoE):
            m = first.config
            per_expert = sum(p.numel() for p in first.experts.parameters()) // m.num_experts
            inactive += per_expert * (m.num_experts - min(m.num_experts, m.top_k * m.num_heads))
    return dict(params=float(total), active_params=float(total - inactive), macs_per_token=float(macs),
                seq_len=float(S))
