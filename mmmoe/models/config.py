"""``ModelConfig``: everything that decides the shape of a multiway MH-MoE backbone.

A validated dataclass (a wrong value raises ``ValueError`` naming the field and what is allowed).
The FFN of every ``moe_every``-th block is an MH-MoE layer per way (vision, language, and in the
top ``vl_layers`` blocks vision-language); the other blocks have dense FFNs. ``moe=None`` gives the
dense baseline everywhere. ``bitnet`` makes the model (or only its experts) BitNet b1.58.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Optional

from mmmoe.moe import MoEConfig

ATTN_MODES = ("bidirectional", "prefix_causal")
BITNET = ("none", "experts", "all")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"ModelConfig.{name}={value!r} is invalid: {allowed}")


@dataclass
class ModelConfig:
    """Shape of a multiway transformer. Sizes count tokens and channels, not bytes."""

    dim: int = 768
    """Model width D."""
    depth: int = 12
    """Number of transformer blocks."""
    num_heads: int = 12
    """Attention heads (must divide dim)."""
    ffn_hidden: int = 3072
    """Hidden width of the dense FFNs (the dense blocks, and every block when moe is None)."""
    activation: str = "swiglu"
    """Dense FFN activation: swiglu or gelu."""
    vl_layers: int = 3
    """How many top blocks hold a vision-language FFN way (used by tokens of image-text input).
    BEiT-3 uses the top three blocks (the default; the tiny and small presets use 1 and 2)."""
    moe: Optional[MoEConfig] = None
    """MH-MoE config of the MoE blocks (d_model must equal dim); None = dense everywhere."""
    moe_every: int = 2
    """Every moe_every-th block (blocks moe_every-1, 2*moe_every-1, ...) is an MoE block."""
    image_size: int = 224
    """Square input image side in pixels."""
    patch_size: int = 16
    """Patch side in pixels (must divide image_size)."""
    in_chans: int = 3
    """Image channels."""
    vocab_size: int = 32000
    """Text vocabulary (the tokenizer's vocab_size)."""
    max_text_len: int = 64
    """Learned text positions (BOS + tokens + EOS)."""
    qkv_bias: bool = True
    """Bias in the fused qkv projection."""
    drop_path: float = 0.0
    """Stochastic depth rate of the last block (linearly increasing from 0)."""
    dropout: float = 0.0
    """Dropout after attention and FFN projections."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon."""
    grad_checkpointing: bool = False
    """Recompute each block in backward (activation checkpointing) to save memory."""
    bitnet: str = "none"
    """BitNet b1.58 (ternary weights, 8-bit activations, straight-through gradients): 'none';
    'experts' (routed and shared experts only, = ``moe.bitnet``; a dense model has none); 'all'
    (2411 Table 3: every linear layer of the blocks -- attention qkv and output projections, dense
    FFNs, MH-MoE head and merge layers, experts -- the dense baseline included). Routers,
    embeddings, norms and task heads stay full precision. Sets ``moe.bitnet`` /
    ``moe.bitnet_head_merge``; MACs and FLOP parity are unchanged."""

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "num_heads", "ffn_hidden", "image_size", "patch_size", "in_chans",
                     "vocab_size", "max_text_len", "moe_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(name, v, "must be a positive integer")
        if self.dim % self.num_heads:
            _fail("num_heads", self.num_heads, f"must divide dim={self.dim}")
        if self.activation not in ("swiglu", "gelu"):
            _fail("activation", self.activation, "allowed: swiglu, gelu")
        if isinstance(self.vl_layers, bool) or not isinstance(self.vl_layers, int) or not 0 <= self.vl_layers <= self.depth:
            _fail("vl_layers", self.vl_layers, f"must be an integer in 0..depth ({self.depth})")
        if self.image_size % self.patch_size:
            _fail("patch_size", self.patch_size, f"must divide image_size={self.image_size}")
        if self.max_text_len < 2:
            _fail("max_text_len", self.max_text_len, "must be >= 2 (bos + eos)")
        for name in ("drop_path", "dropout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1.0:
                _fail(name, v, "must be a number in [0, 1)")
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict({"d_model": self.dim, **self.moe})
        if self.bitnet not in BITNET:
            _fail("bitnet", self.bitnet, f"allowed: {', '.join(BITNET)}")
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                _fail("moe", self.moe, "must be a MoEConfig, a dict of MoEConfig fields, or None")
            if self.moe.d_model != self.dim:
                _fail("moe", f"d_model={self.moe.d_model}", f"moe.d_model must equal dim={self.dim}")
            self._sync_moe_bitnet()

    def _sync_moe_bitnet(self) -> None:
        """``bitnet`` decides the MoE layers' BitNet fields. ``moe.bitnet=True`` alone (the layer-level
        switch) reads as bitnet='experts'; a MoE field asking for more than ``bitnet`` is an error."""
        m = self.moe
        if self.bitnet == "none" and m.bitnet and not m.bitnet_head_merge:
            self.bitnet = "experts"
        experts, head_merge = self.bitnet != "none", self.bitnet == "all"
        if (m.bitnet and not experts) or (m.bitnet_head_merge and not head_merge):
            _fail("bitnet", self.bitnet, f"contradicts moe.bitnet={m.bitnet}, moe.bitnet_head_merge="
                  f"{m.bitnet_head_merge}: set ModelConfig.bitnet ('experts' or 'all') instead")
        if (m.bitnet, m.bitnet_head_merge) != (experts, head_merge):
            self.moe = replace(m, bitnet=experts, bitnet_head_merge=head_merge)

    # ------------------------------------------------------------------ derived
    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and (i + 1) % self.moe_every == 0

    def has_vl_way(self, i: int) -> bool:
        return i >= self.depth - self.vl_layers

    @property
    def bitnet_all(self) -> bool:
        """Attention projections and dense FFNs are BitLinear too."""
        return self.bitnet == "all"

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        """Plain types only (safe in a weights-only checkpoint)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["moe"] = None if self.moe is None else self.moe.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; valid: {sorted(known)}")
        d = dict(d)
        moe = d.get("moe")
        if isinstance(moe, dict):
            d["moe"] = MoEConfig.from_dict({"d_model": d.get("dim", cls.dim), **moe})
        return cls(**d)

