"""Dense feed-forward layers (the dense baseline and the shared expert)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mmmoe.layers.bitlinear import BitLinear


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
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        else:
            h = F.gelu(h)
        return self.fc_out(h)
