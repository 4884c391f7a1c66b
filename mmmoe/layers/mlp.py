"""Dense feed-forward layers (the dense baseline and the shared expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from mmmoe import kernels
from mmmoe.layers.bitlinear import BitLinear


class _FusedSwiGLU(torch.autograd.Function):
    """silu(a) * b for h = [a | b] with the fused CPU kernels (:mod:`mmmoe.kernels`): one pass over
    memory each way, and only h is kept for backward (ATen's ops keep a, silu(a) and b)."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        out = h.new_empty(*h.shape[:-1], h.shape[-1] // 2)
        kernels.swiglu_forward(h.reshape(-1, h.shape[-1]), out.view(-1, out.shape[-1]))
        return out

    @staticmethod
    @once_differentiable  # a second derivative (create_graph=True) raises instead of being wrong
    def backward(ctx, dp: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        rows = h.reshape(-1, h.shape[-1])
        dh = torch.empty_like(rows)
        kernels.swiglu_backward(rows, dp.reshape(-1, dp.shape[-1]).contiguous(), None, dh)
        return dh.view(h.shape)


def swiglu(h: Tensor) -> Tensor:
    """silu(a) * b on the halves [a | b] of the last dimension: the fused CPU kernels for float32
    CPU tensors when they are available, ATen's ops otherwise (same values)."""
    if h.shape[-1] % 2 == 0 and h.numel() and h.stride(-1) == 1 and kernels.applies(h):
        return _FusedSwiGLU.apply(h)
    a, b = h.chunk(2, dim=-1)
    return F.silu(a) * b


class FeedForward(nn.Module):
    """``dim -> hidden -> dim`` FFN. SwiGLU fuses w1 and w3 into one ``fc_in`` of width 2*hidden."""

    def __init__(self, dim: int, hidden: int, activation: str = "swiglu", bias: bool = False, bitnet: bool = False):
        super().__init__()
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"FeedForward.activation={activation!r}: allowed swiglu, gelu")
        linear = BitLinear if bitnet else nn.Linear
        self.activation = activation
        self.fc_in = linear(dim, (2 if activation == "swiglu" else 1) * hidden, bias=bias)
        self.fc_out = linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc_in(x)
        if self.activation == "swiglu":
            h = swiglu(h)
        else:
            h = F.gelu(h)
        return self.fc_out(h)
