"""BitNet b1.58 (arXiv 2402.17764): ternary weights, 8-bit activations, straight-through gradients.

- Weights: W_q = gamma * RoundClip(W / (gamma + eps), -1, 1), gamma = mean |W| over the tensor (or
  over the given dims, e.g. per expert matrix of a 3-D expert weight).
- Activations: per-token (last dim) absmax scaling to the int8 range [-128, 127], no zero point.
- Straight-through estimator: forward uses the quantised value, backward the identity, so the
  optimiser updates the full-precision latent weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-5


def _ste(x: Tensor, q: Tensor) -> Tensor:
    return x + (q - x).detach()


def weight_quant_ternary(w: Tensor, dims: Sequence[int] | None = None) -> Tensor:
    """Absmean ternary quantisation, dequantised (values in gamma * {-1, 0, 1}), with STE."""
    if dims is None:
        gamma = w.abs().mean()
    else:
        gamma = w.abs().mean(dim=tuple(dims), keepdim=True)
    gamma = gamma.clamp(min=EPS)
    q = (w / gamma).round().clamp(-1, 1) * gamma
    return _ste(w, q)


def act_quant_8bit(x: Tensor) -> Tensor:
    """Per-token absmax 8-bit quantisation of the last dim, dequantised, with STE."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    q = (x * scale).round().clamp(-128, 127) / scale
    return _ste(x, q)


class BitLinear(nn.Linear):
    """nn.Linear with b1.58 weights and 8-bit activations, preceded by an RMS norm of the input."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, norm: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.norm = nn.RMSNorm(in_features, eps=EPS) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        xq = act_quant_8bit(self.norm(x))
        return F.linear(xq, weight_quant_ternary(self.weight), self.bias)
