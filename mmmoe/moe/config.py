"""Typed, validated configuration of one MH-MoE layer.

Every field is checked in ``__post_init__``; a wrong value raises ``ValueError`` naming the field and
what is allowed, so a typo in a YAML file fails at construction rather than deep inside forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

ACTIVATIONS = ("swiglu", "gelu")
ROUTERS = ("softmax", "xmoe")
BALANCING = ("aux_loss", "aux_free")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"MoEConfig.{field}={value!r} is invalid: {allowed}")


@dataclass
class MoEConfig:
    """One MH-MoE layer. ``num_heads=1`` with no head/merge layers is plain sparse MoE (SMoE)."""

    d_model: int
    """Token width d."""
    num_experts: int
    """Number of routed experts E."""
    expert_hidden: int
    """Hidden width of each routed expert FFN (d/h -> expert_hidden -> d/h)."""
    top_k: int = 1
    """Experts per sub-token; with top_k > 1 the k gate values are renormalised to sum to 1."""
    num_heads: int = 1
    """h: each token is split into h sub-tokens of width d/h (1 = no split)."""
    activation: str = "swiglu"
    """Expert FFN: 'swiglu' (three matrices, w1/w3 fused) or 'gelu' (two matrices)."""
    router: str = "softmax"
    """'softmax' (linear logits, softmax over all experts) or 'xmoe' (low-dim cosine router)."""
    head_layer: Optional[bool] = None
    """d x d projection before the split; None = on when num_heads > 1."""
    merge_layer: Optional[bool] = None
    """d x d projection after the merge; None = on when num_heads > 1."""
    shared_expert_hidden: int = 0
    """Width of an always-on SwiGLU/GELU FFN over the whole token, added to the output (0 = none)."""
    capacity_factor: Optional[float] = None
    """None = dropless. Otherwise each expert takes at most ceil(cf * k * ceil(S / E)) sub-tokens
    (S = routed sub-tokens); later choices overflow and are dropped and counted."""
    aux_loss_coef: float = 0.01
    """Weight of the Switch/GShard balance loss in ``MoEOutput.loss`` (balancing='aux_loss')."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss (mean squared logsumexp of router logits)."""
    balancing: str = "aux_loss"
    """'aux_loss' (balance loss) or 'aux_free' (per-expert selection bias, updated outside forward
    by ``MHMoE.update_balancing`` in training only; no balance loss)."""
    bias_update_rate: float = 1e-3
    """Step size of the aux-loss-free bias update (sign of the load error)."""
    xmoe_dim: int = 16
    """X-MoE router: width of the low-dimensional routing space."""
    xmoe_temperature: float = 0.3
    """X-MoE router: initial value of the learnable softmax temperature."""
    sub_token_residual: bool = False
    """2404 Eq. 6: add each sub-token to its expert mixture (the public code leaves it out)."""
    bitnet: bool = False
    """BitNet b1.58 experts (routed and shared): ternary absmean weights and 8-bit absmax
    activations (STE). Head, merge layers and router stay full precision (the public MH-MoE code)."""
    bitnet_head_merge: bool = False
    """BitNet b1.58 head and merge layers too (``ModelConfig.bitnet='all'`` sets it: the whole-model
    BitNet of 2411 Table 3). The router always stays full precision."""
    activation_threshold: float = 0.01
    """An expert counts as activated when (its selections / tokens) exceeds this."""

    def __post_init__(self) -> None:
        for name in ("d_model", "num_experts", "expert_hidden", "top_k", "num_heads", "xmoe_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(name, v, "must be a positive integer")
        if self.top_k > self.num_experts:
            _fail("top_k", self.top_k, f"must be <= num_experts ({self.num_experts})")
        if self.d_model % self.num_heads:
            _fail("num_heads", self.num_heads, f"must divide d_model ({self.d_model})")
        if self.activation not in ACTIVATIONS:
            _fail("activation", self.activation, f"allowed: {', '.join(ACTIVATIONS)}")
        if self.router not in ROUTERS:
            _fail("router", self.router, f"allowed: {', '.join(ROUTERS)}")
        if self.balancing not in BALANCING:
            _fail("balancing", self.balancing, f"allowed: {', '.join(BALANCING)}")
        for name in ("head_layer", "merge_layer"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                _fail(name, v, "must be true, false or null (null = on when num_heads > 1)")
        for name in ("sub_token_residual", "bitnet", "bitnet_head_merge"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")
        s = self.shared_expert_hidden
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            _fail("shared_expert_hidden", s, "must be an integer >= 0 (0 = no shared expert)")
        cf = self.capacity_factor
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or not cf > 0):
            _fail("capacity_factor", cf, "must be a number > 0, or null for dropless routing")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "activation_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                _fail(name, v, "must be a number >= 0")
        t = self.xmoe_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            _fail("xmoe_temperature", t, "must be a number > 0")

    @property
    def head_dim(self) -> int:
        """Sub-token width d/h."""
        return self.d_model // self.num_heads

    @property
    def use_head_layer(self) -> bool:
        return self.num_heads > 1 if self.head_layer is None else self.head_layer

    @property
    def use_merge_layer(self) -> bool:
        return self.num_heads > 1 if self.merge_layer is None else self.merge_layer

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"MoEConfig: unknown field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**d)
