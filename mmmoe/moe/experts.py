"""Routed experts: 3-D weight tensors and one grouped matmul per weight tensor.

Shape legend: A = routed assignments (sub-token, expert pairs) sorted by expert, E = experts,
D = sub-token width (d/h), F = expert hidden width, G = groups of the grouped matmul (= E).

Rows of ``x_AD`` are sorted by expert; ``offs_E`` holds the cumulative row counts (int32, the end
row of each expert), ``counts`` the same as a Python list (one host sync per layer call).

The fast path is ``torch._grouped_mm`` (CPU float32/bfloat16, CUDA bf16). It needs 16-byte aligned
row strides and, under ``torch.compile``, a dtype its tracing rule accepts (bf16/fp16), so a plain
per-expert loop over ``torch.mm`` stays as the correct fallback (float64 tests, odd widths, compile).

Training through the experts uses one fused autograd function: forward saves only the sorted input,
the first matmul's output and the expert outputs; the gated activation is recomputed in backward
(elementwise, cheap), so no A x F activation is stored twice.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmmoe.layers.bitlinear import act_quant_8bit, weight_quant_ternary

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
_BROKEN: set = set()  # (device type, dtype) pairs where the fast kernel raised once


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def _fast_path_ok(a: Tensor, b: Tensor) -> bool:
    if not _HAS_GROUPED_MM or a.dtype != b.dtype:
        return False
    if (a.device.type, a.dtype) in _BROKEN:
        return False
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if _is_compiling() and a.dtype == torch.float32:
        return False  # the tracing rule of _grouped_mm rejects float32
    if a.device.type == "cpu" and a.dtype == torch.float16:
        return False
    es = a.element_size()
    # every row stride handed to the kernel must be a multiple of 16 bytes
    return all((n * es) % 16 == 0 for n in (a.shape[-1], b.shape[-1], b.shape[-2]))


def _try_fast(fn, a: Tensor, *args):
    try:
        return fn()
    except RuntimeError:
        _BROKEN.add((a.device.type, a.dtype))
        return None


def grouped_mm(x_AD: Tensor, w_EDF: Tensor, offs_E: Tensor, counts: List[int]) -> Tensor:
    """Row-grouped matmul: rows of expert e (a contiguous block) times ``w_EDF[e]`` -> A x F.

    Differentiable (autograd of either path). ``w_EDF`` may be a transposed view.
    """
    if x_AD.shape[0] == 0:
        return x_AD.new_zeros(0, w_EDF.shape[-1])
    if _fast_path_ok(x_AD, w_EDF):
        out = _try_fast(lambda: torch._grouped_mm(x_AD, w_EDF, offs=offs_E), x_AD)
        if out is not None:
            return out
    parts = torch.split(x_AD, counts)
    return torch.cat([p @ w_EDF[e] for e, p in enumerate(parts)], dim=0)


def grouped_mm_wgrad(x_AD: Tensor, g_AF: Tensor, offs_E: Tensor, counts: List[int]) -> Tensor:
    """Per-expert ``x_e^T @ g_e`` -> E x D x F (the weight gradient of ``grouped_mm``)."""
    E = len(counts)
    if _fast_path_ok(x_AD, g_AF) and x_AD.shape[0] > 0 and (x_AD.shape[0] * x_AD.element_size()) % 16 == 0:
        out = _try_fast(lambda: torch._grouped_mm(x_AD.t(), g_AF, offs=offs_E), x_AD)
        if out is not None:
            return out
    out = x_AD.new_zeros(E, x_AD.shape[1], g_AF.shape[1])
    for e, (xp, gp) in enumerate(zip(torch.split(x_AD, counts), torch.split(g_AF, counts))):
        if xp.shape[0]:
            torch.mm(xp.t(), gp, out=out[e])
    return out


def _act_fwd(h_AH: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        a, b = h_AH.chunk(2, dim=-1)
        return F.silu(a) * b
    return F.gelu(h_AH)


class _FusedExperts(torch.autograd.Function):
    """y_A = gate_A * W2[e](act(W1[e] x_A)) for expert-sorted rows, with recomputed activations."""

    @staticmethod
    def forward(ctx, x_AD, gate_A, w_in, w_out, offs_E, counts, activation):
        h = grouped_mm(x_AD, w_in, offs_E, counts)  # A x F (gelu) or A x 2F (swiglu: [w1 | w3])
        p = _act_fwd(h, activation)  # A x F
        o = grouped_mm(p, w_out, offs_E, counts)  # A x D
        ctx.save_for_backward(x_AD, gate_A, w_in, w_out, offs_E, h, o)
        ctx.counts = counts
        ctx.activation = activation
        return o * gate_A.unsqueeze(-1).to(o.dtype)

    @staticmethod
    def backward(ctx, dy_AD):
        x, gate, w_in, w_out, offs, h, o = ctx.saved_tensors
        counts, activation = ctx.counts, ctx.activation
        dy_AD = dy_AD.contiguous()
        dgate = (dy_AD * o).sum(-1).to(gate.dtype) if ctx.needs_input_grad[1] else None
        do = dy_AD * gate.unsqueeze(-1).to(dy_AD.dtype)
        # recompute the activation (elementwise) instead of having stored it
        if activation == "swiglu":
            a, b = h.chunk(2, dim=-1)
            sig = torch.sigmoid(a)
            silu = a * sig
            p = silu * b
        else:
            p = F.gelu(h)
        dw_out = grouped_mm_wgrad(p, do, offs, counts) if ctx.needs_input_grad[3] else None
        dp = grouped_mm(do, w_out.transpose(-2, -1), offs, counts)
        if activation == "swiglu":
            da = dp * b * (sig * (1 + a * (1 - sig)))
            dh = torch.cat([da, dp * silu], dim=-1)
        else:
            k = math.sqrt(0.5)
            cdf = 0.5 * (1 + torch.erf(h * k))
            pdf = torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
            dh = dp * (cdf + h * pdf)
        dw_in = grouped_mm_wgrad(x, dh, offs, counts) if ctx.needs_input_grad[2] else None
        dx = grouped_mm(dh, w_in.transpose(-2, -1), offs, counts) if ctx.needs_input_grad[0] else None
        return dx, dgate, dw_in, dw_out, None, None, None


class GroupedExperts(nn.Module):
    """E expert FFNs of width ``dim -> hidden -> dim`` stored as two 3-D weight tensors.

    ``w_in``: E x dim x (2*hidden for SwiGLU, [w1 | w3] fused; hidden for GELU); ``w_out``:
    E x hidden x dim. With ``bitnet`` the weights are ternarised per expert (absmean) and the
    inputs of both matmuls RMS-normalised and quantised to 8 bits per row, with straight-through
    gradients into the full-precision latent weights.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, activation: str = "swiglu", bitnet: bool = False):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.activation, self.bitnet = activation, bitnet
        mult = 2 if activation == "swiglu" else 1
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, mult * hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the per-expert equivalent of nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.hidden), 1 / math.sqrt(self.hidden))

    def forward(self, x_AD: Tensor, gate_A: Tensor, offs_E: Tensor, counts: List[int]) -> Tensor:
        """Gate-weighted expert outputs for expert-sorted rows: A x dim."""
        if self.bitnet:
            return self._forward_bitnet(x_AD, gate_A, offs_E, counts)
        if _is_compiling():
            # plain differentiable ops: the compiler traces through them
            h = grouped_mm(x_AD, self.w_in, offs_E, counts)
            o = grouped_mm(_act_fwd(h, self.activation), self.w_out, offs_E, counts)
            return o * gate_A.unsqueeze(-1).to(o.dtype)
        return _FusedExperts.apply(x_AD, gate_A, self.w_in, self.w_out, offs_E, counts, self.activation)

    def _forward_bitnet(self, x_AD: Tensor, gate_A: Tensor, offs_E: Tensor, counts: List[int]) -> Tensor:
        w_in = weight_quant_ternary(self.w_in, dims=(-2, -1))
        w_out = weight_quant_ternary(self.w_out, dims=(-2, -1))
        h = grouped_mm(act_quant_8bit(F.rms_norm(x_AD, (x_AD.shape[-1],))), w_in, offs_E, counts)
        p = _act_fwd(h, self.activation)
        o = grouped_mm(act_quant_8bit(F.rms_norm(p, (p.shape[-1],))), w_out, offs_E, counts)
        return o * gate_A.unsqueeze(-1).to(o.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, activation={self.activation}, bitnet={self.bitnet}"


def expert_offsets(counts_E: Tensor) -> Tuple[Tensor, List[int]]:
    """Cumulative int32 end offsets for the grouped matmul, and the counts as a Python list."""
    return counts_E.cumsum(0).to(torch.int32), counts_E.tolist()
