"""Routed experts: 3-D weight tensors and one grouped matmul per weight tensor.

Shape legend: A = routed assignments (sub-token, expert pairs) sorted by expert, E = experts,
D = sub-token width (d/h), F = expert hidden width, G = groups of the grouped matmul (= E).

Rows of ``x_AD`` are sorted by expert; ``offs_E`` holds the cumulative row counts (int32, the end
row of each expert, on the device). The fast path needs nothing else, so it makes no host-device
synchronisation; the per-expert row counts as a Python list (``counts``, one sync) are only needed by
the fallback loop, which computes them from ``offs_E`` when it runs and is not handed them.

The fast path is ``torch._grouped_mm`` (CPU float32/bfloat16, CUDA bf16). It needs 16-byte aligned
row strides and, under ``torch.compile``, a dtype its tracing rule accepts (bf16/fp16), so a plain
per-expert loop over ``torch.mm`` stays as the correct fallback (float64 tests, odd widths, compile).
A fallback taken for a low-precision dtype (where users expect the fast kernel) is logged once.

Mixed precision: under ``torch.autocast`` the experts compute in the autocast dtype, like
``nn.Linear``: the float32 master weights are cast for the forward (their gradients flow back through
the cast in float32), the sub-tokens are cast too, and both grouped matmuls see one dtype, so the
fast kernel runs. With bf16 weights (``bf16-true``) nothing is cast.

Training through the experts uses one fused autograd function (gather -> first grouped matmul ->
gate times activation -> second grouped matmul -> scatter-add). The gate multiplies the activation
rather than the expert's output (the same function): its gradient is then a dot product taken in
the activation's backward pass, and no expert output has to be stored for it. The function comes in
two implementations, chosen by ``GroupedExperts.impl``: ``_FusedExperts`` (full-size gathers and
``torch._grouped_mm``, no host sync: the accelerator path) saves the sub-tokens and the first
matmul's output and recomputes the gated activation in backward (elementwise, cheap), so no A x F
activation is stored twice and the gathered A x D copy is not stored at all; ``_BlockedExperts``
(blocks of experts through small reused buffers: the CPU path, where fresh tensors of tens of MB
cost page faults and the A x 2F elementwise passes over DRAM, not the matmuls, dominated) stores
nothing of size A for narrow sub-tokens: it recomputes the first matmul block by block in backward.
Both give bitwise equal outputs and gradients.

On CPU in float32 both compute the SwiGLU activation and its gradient with the fused kernels of
:mod:`mmmoe.kernels` when they could be built (one pass each way instead of two and five); their
values are those of the ATen ops they replace, except the gate's gradient (a dot product summed in
the kernel's own order), which matches to float32 rounding.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmmoe import kernels
from mmmoe.layers.bitlinear import act_quant_8bit, weight_quant_ternary

log = logging.getLogger(__name__)

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
_BROKEN: set = set()  # (device type, dtype) pairs where the fast kernel raised once
_WARNED: set = set()  # fallback reasons already logged
Counts = Optional[List[int]]


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def _fast_path_ok(a: Tensor, b: Tensor, widths: Optional[Tuple[int, ...]] = None) -> bool:
    """Whether ``torch._grouped_mm`` can take ``a`` and ``b``: same supported dtype, and every
    stride handed to the kernel (``widths``; by default a's width and b's two last sizes) a
    multiple of 16 bytes."""
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
    widths = widths if widths is not None else (a.shape[-1], b.shape[-1], b.shape[-2])
    return all((n * es) % 16 == 0 for n in widths)


def _try_fast(fn, a: Tensor):
    try:
        return fn()
    except RuntimeError:
        _BROKEN.add((a.device.type, a.dtype))
        return None


def counts_from_offsets(offs_E: Tensor) -> List[int]:
    """Rows per expert as a Python list (a host sync: only the fallback loop needs it)."""
    ends = offs_E.tolist()
    return [b - a for a, b in zip([0] + ends[:-1], ends)]


def _note_fallback(a: Tensor, b: Tensor) -> None:
    """Log once per (device, dtype, widths) when a low-precision matmul takes the slow loop."""
    if a.dtype not in (torch.bfloat16, torch.float16):
        return  # float32/float64 on odd widths: the loop is the expected path
    key = (a.device.type, a.dtype, a.dtype == b.dtype, tuple(b.shape[-2:]))
    if key in _WARNED:
        return
    _WARNED.add(key)
    why = "dtypes differ" if a.dtype != b.dtype else (
        "kernel unavailable or failed" if not _HAS_GROUPED_MM or (a.device.type, a.dtype) in _BROKEN
        else "row strides not 16-byte aligned or dtype unsupported on this device")
    log.warning(
        "grouped matmul fell back to the per-expert loop on %s %s (%s; weight %s x %s): expect a slow MoE layer",
        a.device.type, a.dtype, why, *tuple(b.shape[-2:]),
    )


def _loop_mm(x_AD: Tensor, w_EDF: Tensor, counts: List[int]) -> Tensor:
    parts = torch.split(x_AD, counts)
    return torch.cat([p @ w_EDF[e] for e, p in enumerate(parts)], dim=0)


def grouped_mm(x_AD: Tensor, w_EDF: Tensor, offs_E: Tensor, counts: Counts = None) -> Tensor:
    """Row-grouped matmul: rows of expert e (a contiguous block) times ``w_EDF[e]`` -> A x F.

    Differentiable (autograd of either path). ``w_EDF`` may be a transposed view. ``counts`` (rows
    per expert as a list) is optional: the fallback loop derives it from ``offs_E`` when missing.
    """
    if x_AD.shape[0] == 0:
        return x_AD.new_zeros(0, w_EDF.shape[-1])
    if _fast_path_ok(x_AD, w_EDF):
        out = _try_fast(lambda: torch._grouped_mm(x_AD, w_EDF, offs=offs_E), x_AD)
        if out is not None:
            return out
    _note_fallback(x_AD, w_EDF)
    return _loop_mm(x_AD, w_EDF, counts if counts is not None else counts_from_offsets(offs_E))


def _loop_wgrad(x_AD: Tensor, g_AF: Tensor, counts: List[int]) -> Tensor:
    out = x_AD.new_zeros(len(counts), x_AD.shape[1], g_AF.shape[1])
    for e, (xp, gp) in enumerate(zip(torch.split(x_AD, counts), torch.split(g_AF, counts))):
        if xp.shape[0]:
            torch.mm(xp.t(), gp, out=out[e])
    return out


def grouped_mm_wgrad(x_AD: Tensor, g_AF: Tensor, offs_E: Tensor, counts: Counts = None) -> Tensor:
    """Per-expert ``x_e^T @ g_e`` -> E x D x F (the weight gradient of ``grouped_mm``)."""
    if x_AD.shape[0] == 0:
        return x_AD.new_zeros(offs_E.shape[0], x_AD.shape[1], g_AF.shape[1])
    # the operands are x^T (D x A, a transposed view) and g (A x F): their widths D and F must be
    # aligned; an unaligned row count A gets zero rows appended (they lie past the last offset and
    # add nothing), which costs one copy instead of the per-expert loop
    if _fast_path_ok(x_AD, g_AF, widths=(x_AD.shape[1], g_AF.shape[1])):
        pad = (-x_AD.shape[0]) % (16 // x_AD.element_size())
        if pad:
            x_AD = torch.cat([x_AD, x_AD.new_zeros(pad, x_AD.shape[1])])
            g_AF = torch.cat([g_AF, g_AF.new_zeros(pad, g_AF.shape[1])])
        out = _try_fast(lambda: torch._grouped_mm(x_AD.t(), g_AF, offs=offs_E), x_AD)
        if out is not None:
            return out
        if pad:
            x_AD, g_AF = x_AD[:-pad], g_AF[:-pad]
    _note_fallback(x_AD, g_AF)
    return _loop_wgrad(x_AD, g_AF, counts if counts is not None else counts_from_offsets(offs_E))


def _act_fwd(h_AH: Tensor, activation: str) -> Tensor:
    """SwiGLU (silu(a) * b on the halves [a | b]) or GELU, differentiable."""
    if activation == "swiglu":
        a, b = h_AH.chunk(2, dim=-1)
        return F.silu(a) * b
    return F.gelu(h_AH)


def _gated_act(h_AH: Tensor, activation: str, gate_A: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``gate * act(h)`` per row (the input of the second matmul), written into ``out`` (a new
    tensor without it); no autograd. On CPU in float32 one fused pass (:mod:`mmmoe.kernels`), else
    ATen's ops in the order the kernel follows: act, then the product with the gate."""
    width = h_AH.shape[1] // 2 if activation == "swiglu" else h_AH.shape[1]
    out = h_AH.new_empty(h_AH.shape[0], width) if out is None else out
    if activation == "swiglu":
        if kernels.applies(h_AH):
            return kernels.swiglu_forward(h_AH, out, gate_A)
        a, b = h_AH.chunk(2, dim=-1)
        torch.ops.aten.silu.out(a, out=out).mul_(b)
    else:
        torch.ops.aten.gelu.out(h_AH, out=out)
    return out.mul_(gate_A.unsqueeze(-1))


def _gated_act_backward(h_AH: Tensor, dq: Tensor, gate_A: Tensor, activation: str, dgate: Optional[Tensor],
                        q_out: Optional[Tensor], act_buf: Optional[Tensor] = None) -> None:
    """Backward of ``q = gate * act(h)`` given ``dq``, no autograd: ``h`` is overwritten with its
    gradient, ``dq`` is clobbered, ``q_out`` (when given) receives q, the input of the second
    matmul's weight gradient, and ``dgate`` (when given) the gate's gradient (accumulated in at
    least float32: it feeds the float32 router). ``act_buf`` (A x F) is scratch for ATen's SwiGLU."""
    if activation == "swiglu" and kernels.applies(h_AH):
        kernels.swiglu_backward(h_AH, dq, q_out, None, gate_A, dgate)
        return
    g = gate_A.unsqueeze(-1)
    p = None  # act(h), needed only for the gate's gradient and q
    if activation == "swiglu":
        a, b = h_AH.chunk(2, dim=-1)
        act = torch.ops.aten.silu.out(a, out=act_buf) if act_buf is not None else F.silu(a)
        if q_out is not None or dgate is not None:
            p = torch.mul(act, b, out=q_out) if q_out is not None else act * b
    elif q_out is not None or dgate is not None:
        p = torch.ops.aten.gelu.out(h_AH, out=q_out) if q_out is not None else F.gelu(h_AH)
    if dgate is not None:
        acc = torch.promote_types(h_AH.dtype, torch.float32)
        dgate.copy_(torch.linalg.vecdot(dq.to(acc), p.to(acc)))
    if q_out is not None:
        q_out.mul_(g)
    del p
    dp = dq.mul_(g)
    if activation == "swiglu":
        # h becomes its own gradient [d a | d b]: b := dp * b (the gradient reaching silu(a)),
        # a := silu'(a) * that, b := dp * silu(a)
        b.mul_(dp)
        torch.ops.aten.silu_backward.grad_input(b, a, grad_input=a)
        torch.mul(dp, act, out=b)
    else:
        torch.ops.aten.gelu_backward.grad_input(dp, h_AH, approximate="none", grad_input=h_AH)


def _experts_reference_ops(s_SD, token_A, gate_A, w_in, w_out, offs_E, counts, activation):
    """The same computation as ``_FusedExperts`` from plain differentiable ops (compile path)."""
    x_AD = s_SD[token_A]
    h = grouped_mm(x_AD, w_in, offs_E, counts)
    q = _act_fwd(h, activation) * gate_A.unsqueeze(-1).to(h.dtype)
    o = grouped_mm(q, w_out, offs_E, counts)
    return s_SD.new_zeros(s_SD.shape).index_add(0, token_A, o)


def _backward_once(ctx: Any, dy_SD: Tensor, backward: Callable[[Any, Tensor], Any]) -> Any:
    """The experts' backward, outside autocast, at most once per graph: the saved buffers are
    reused in place, so a second pass (``retain_graph=True``) would read overwritten values."""
    if ctx.consumed:
        raise RuntimeError(
            "MH-MoE fused experts: backward ran twice through one graph; its buffers are reused "
            "in place, so retain_graph=True double backward is not supported"
        )
    ctx.consumed = True
    with torch.autocast(dy_SD.device.type, enabled=False):
        return backward(ctx, dy_SD)


class _FusedExperts(torch.autograd.Function):
    """y_S = sum over the sub-token's assignments A of W2[e](gate_A * act(W1[e] s_S)).

    Gather, both grouped matmuls, gating and the scatter-add in one node. The gate multiplies the
    activation, before the second matmul (the same function as gating the expert's output), so
    its gradient comes from the activation's backward pass (a dot product over F per assignment)
    and no expert output has to be kept for it. Saved for backward: the sub-tokens (already kept by
    the router), the int routing tensors and the first matmul's output; the gated activation is
    recomputed, and its gradient (ATen's silu/gelu backward kernels, or one fused pass on CPU) is
    written straight into the halves of one buffer.
    """

    @staticmethod
    def forward(ctx, s_SD, token_A, gate_A, w_in, w_out, offs_E, counts, activation):
        # every operand already has the compute dtype (GroupedExperts.forward casts): autocast must
        # not re-cast anything in here, so the ops run exactly as written
        with torch.autocast(s_SD.device.type, enabled=False):
            x_AD = s_SD.index_select(0, token_A)
            h = grouped_mm(x_AD, w_in, offs_E, counts)  # A x F (gelu) or A x 2F (swiglu: [w1 | w3])
            o = grouped_mm(_gated_act(h, activation, gate_A), w_out, offs_E, counts)  # A x D
            y_SD = s_SD.new_zeros(s_SD.shape).index_add_(0, token_A, o)
        ctx.save_for_backward(s_SD, token_A, gate_A, w_in, w_out, offs_E, h)
        ctx.counts, ctx.activation, ctx.consumed = counts, activation, False
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD):
        return _backward_once(ctx, dy_SD, _FusedExperts._backward)

    @staticmethod
    def _backward(ctx, dy_SD):
        s_SD, token_A, gate, w_in, w_out, offs, h = ctx.saved_tensors
        counts, activation = ctx.counts, ctx.activation
        need_out = ctx.needs_input_grad[4]
        dy_AD = dy_SD.to(h.dtype).index_select(0, token_A)
        dq = grouped_mm(dy_AD, w_out.transpose(-2, -1), offs, counts)  # gradient of gate * act(h)
        # h (the first matmul's output) is overwritten with its own gradient dh
        q = h.new_empty(dq.shape) if need_out else None
        dgate = gate.new_empty(gate.shape) if ctx.needs_input_grad[2] else None
        _gated_act_backward(h, dq, gate, activation, dgate, q)
        del dq
        dw_out = grouped_mm_wgrad(q, dy_AD, offs, counts) if need_out else None
        del q, dy_AD
        dh = h
        x_AD = s_SD.index_select(0, token_A)
        dw_in = grouped_mm_wgrad(x_AD, dh, offs, counts) if ctx.needs_input_grad[3] else None
        ds = None
        if ctx.needs_input_grad[0]:
            dx_AD = grouped_mm(dh, w_in.transpose(-2, -1), offs, counts)
            ds = torch.zeros_like(s_SD).index_add_(0, token_A, dx_AD)
        return ds, None, dgate, dw_in, dw_out, None, None, None


BLOCK_BYTES = 4 * 2**20
"""Target size of the widest per-block buffer of ``_BlockedExperts`` (rows x first-matmul width):
consecutive experts are grouped into blocks of rows up to about this size (an expert is never
split, so an expert larger than this is a block of its own). Large enough that experts with few
rows share a block (each elementwise op covers many rows: few parallel regions, little per-op
overhead), small enough that a block's buffers stay mostly in cache and below glibc's 32 MiB mmap
threshold (reused heap pages, no page faults). Measured on a 2-core AVX-512 machine with the h=4
layer of ``scripts/benchmark_moe.py`` (32 experts of about 6 MB each): 4 MiB (one expert per block)
was 4-5% faster than 12 MiB (two experts per block); with 128 small experts 1-12 MiB were within
noise of each other."""


RECOMPUTE_MAX_WIDTH = 192
"""``_BlockedExperts`` recomputes the first matmul in backward instead of storing it when the
sub-token width (its inner dimension D) is at most this. The recomputation costs D x 2F
multiply-adds per row, storing costs a fixed price per stored element (page faults, DRAM passes),
so narrow sub-tokens (MH-MoE with many heads) gain and wide ones lose: measured with
the layers of ``scripts/benchmark_moe.py`` (d 512, 8192 tokens) on a 2-core AVX-512 machine, two
runs: h=4 (D 128) was 11-13% faster with recomputation, h=2 (D 256) 2% slower, h=1 (D 512) 8-10%
slower."""


def _expert_blocks(counts: List[int], row_bytes: int) -> List[Tuple[int, int, List[Tuple[int, int, int]]]]:
    """Groups consecutive experts into row blocks: (block start, block end, [(expert, start, end)])
    in assignment rows; experts without rows are left out, one expert is never split."""
    target = max(1, BLOCK_BYTES // max(row_bytes, 1))
    blocks, parts, lo, pos = [], [], 0, 0
    for e, n in enumerate(counts):
        if n:
            parts.append((e, pos, pos + n))
        pos += n
        if parts and (pos - lo >= target or e == len(counts) - 1):
            blocks.append((lo, pos, parts))
            parts, lo = [], pos
    if parts:
        blocks.append((lo, pos, parts))
    return blocks


_WORKSPACE = threading.local()


@contextlib.contextmanager
def _scratch(ref: Tensor, rows: int, widths: Sequence[int]) -> Iterator[List[Optional[Tensor]]]:
    """Scratch buffers (``rows`` x each width; ``None`` for width 0) of one blocked forward or
    backward, carved from one flat buffer kept per thread, device and dtype and reused by every
    call: fresh buffers of several MB cost page faults on every call (the allocator returns them to
    the OS on free). Only temporaries live here, never a saved or returned tensor. The buffer is
    taken out of the pool while in use, so a nested call allocates its own. Retained memory is the
    largest set of buffers one call needed (a few :data:`BLOCK_BYTES`); ``release_workspace()``
    frees it."""
    align = max(1, 64 // ref.element_size())  # 64-byte aligned starts
    sizes = [-(-rows * w // align) * align for w in widths]
    pool = _WORKSPACE.__dict__.setdefault("pool", {})
    key = (ref.device, ref.dtype)
    buf = pool.pop(key, None)
    if buf is None or buf.numel() < sum(sizes):
        buf = None  # the smaller one is freed before the larger one is allocated
        # a normal tensor even inside torch.inference_mode (Lightning's evaluation loops): an
        # inference tensor could not be written by a later training call
        with torch.inference_mode(False):
            buf = ref.new_empty(sum(sizes))
    views, off = [], 0
    for w, n in zip(widths, sizes):
        views.append(buf[off:off + rows * w].view(rows, w) if w else None)
        off += n
    try:
        yield views
    finally:
        kept = pool.get(key)
        if kept is None or kept.numel() < buf.numel():
            pool[key] = buf


def release_workspace() -> None:
    """Frees this thread's scratch buffers of the blocked CPU experts path (they are otherwise kept
    for the next call)."""
    _WORKSPACE.__dict__.pop("pool", None)


def _first_matmul(s_SD: Tensor, tok: Tensor, w_in: Tensor, parts, lo: int, x_buf: Tensor, h_buf: Tensor) -> Tuple[Tensor, Tensor]:
    """Gathers one block's sub-tokens into ``x_buf`` and multiplies each expert's rows by its
    ``w_in`` into ``h_buf``: (x block, h block), views of the two buffers."""
    m = tok.shape[0]
    x_b = torch.index_select(s_SD, 0, tok, out=x_buf[:m])
    h_b = h_buf[:m]
    for e, a, b in parts:
        torch.mm(x_b[a - lo:b - lo], w_in[e], out=h_b[a - lo:b - lo])
    return x_b, h_b


class _RowSum:
    """A new tensor like ``ref`` (contiguous) summed from row blocks: ``add(index, rows)`` adds
    ``rows[i]`` into row ``index[i]``, ``result()`` returns the sum (zero where nothing was added).
    ``zeros.index_add_`` per block, or on CPU in float32 :class:`mmmoe.kernels.RowScatter`, which
    copies each row's first contribution instead of zero-filling the tensor first (same values)."""

    def __init__(self, ref: Tensor):
        self.kernel = kernels.RowScatter(torch.empty_like(ref, memory_format=torch.contiguous_format)) \
            if kernels.applies(ref) else None
        self.out = torch.zeros_like(ref, memory_format=torch.contiguous_format) if self.kernel is None else None

    def add(self, index: Tensor, rows: Tensor) -> None:
        if self.kernel is not None:
            self.kernel.add(index, rows)
        else:
            self.out.index_add_(0, index, rows)

    def result(self) -> Tensor:
        return self.kernel.finish() if self.kernel is not None else self.out


class _BlockedExperts(torch.autograd.Function):
    """The same function as :class:`_FusedExperts`, computed block by block of experts: the CPU
    path.

    On CPU the layer's cost beyond its matmuls was memory: every fresh tensor of tens of MB costs
    page faults on first touch (glibc returns large blocks to the OS on free), and the A x 2F
    elementwise passes ran at DRAM speed over the full-size first-matmul output. Here forward
    computes the first matmul block by block (:data:`BLOCK_BYTES`), applies the gated activation
    and the second matmul while the block is in cache, and adds the block's outputs into the result:
    nothing of size A is kept (the gate's gradient comes from the activation's backward pass). For
    narrow sub-tokens (width <= :data:`RECOMPUTE_MAX_WIDTH`) the first matmul's output is not stored
    either: backward recomputes it block by block into a reused buffer (for those widths, cheaper
    than storing it) and every elementwise pass runs on cache-resident buffers; this also removes
    the largest activation of the layer (A x 2F). Wider sub-tokens store it full size.

    Matmuls are ``torch.mm(out=)`` per expert, which is what ``torch._grouped_mm`` does on CPU, so
    any dtype and width runs (no fallback). Needs the rows per expert as a Python list (derived from
    ``offs_E``: a sync, free on CPU). Recomputed rows are the same ``torch.mm`` calls on the same
    operands as in forward, and every sum accumulates in the order of ``_FusedExperts`` (assignments
    in expert order), so outputs and gradients are bitwise those of the grouped path and
    deterministic run to run.
    """

    @staticmethod
    def forward(ctx, s_SD, token_A, gate_A, w_in, w_out, offs_E, counts, activation):
        with torch.autocast(s_SD.device.type, enabled=False):
            counts = counts if counts is not None else counts_from_offsets(offs_E)
            D, H = s_SD.shape[1], w_in.shape[2]
            training = any(ctx.needs_input_grad)
            recompute = D <= RECOMPUTE_MAX_WIDTH
            y_SD = _RowSum(s_SD)
            blocks = _expert_blocks(counts, H * s_SD.element_size())
            m_max = max((hi - lo for lo, hi, _ in blocks), default=0)
            # the first matmul's output: one block's scratch buffer, or (stored for backward) full size
            h = s_SD.new_empty(token_A.shape[0], H) if training and not recompute else None
            widths = (D, H if h is None else 0, w_out.shape[1], D)
            with _scratch(s_SD, m_max, widths) as (x_buf, h_buf, q_buf, o_buf):
                for lo, hi, parts in blocks:
                    m, tok = hi - lo, token_A[lo:hi]
                    _, h_b = _first_matmul(s_SD, tok, w_in, parts, lo, x_buf, h_buf if h is None else h[lo:])
                    q_b = _gated_act(h_b, activation, gate_A[lo:hi], q_buf[:m])
                    o_b = o_buf[:m]
                    for e, a, b in parts:
                        torch.mm(q_b[a - lo:b - lo], w_out[e], out=o_b[a - lo:b - lo])
                    y_SD.add(tok, o_b)
            y_SD = y_SD.result()
        stored = () if h is None else (h,)
        ctx.save_for_backward(s_SD, token_A, gate_A, w_in, w_out, *stored)
        ctx.blocks, ctx.activation, ctx.consumed = blocks, activation, False
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD):
        return _backward_once(ctx, dy_SD, _BlockedExperts._backward)

    @staticmethod
    def _backward(ctx, dy_SD):
        s_SD, token_A, gate_A, w_in, w_out, *stored = ctx.saved_tensors
        h = stored[0] if stored else None
        blocks, activation = ctx.blocks, ctx.activation
        need_s, need_gate, need_in, need_out = (ctx.needs_input_grad[i] for i in (0, 2, 3, 4))
        dt = s_SD.dtype
        dy_SD = dy_SD.to(dt)
        D, Fh, H = s_SD.shape[1], w_out.shape[1], w_in.shape[2]
        ds = _RowSum(s_SD) if need_s else None
        dgate = gate_A.new_empty(gate_A.shape) if need_gate else None
        # every expert with rows writes its whole weight gradient; only the others are zeroed
        idle = sorted(set(range(w_in.shape[0])) - {e for _, _, parts in blocks for e, _, _ in parts})
        dw_in = _empty_but_zero(w_in, idle) if need_in else None
        dw_out = _empty_but_zero(w_out, idle) if need_out else None
        m_max = max((hi - lo for lo, hi, _ in blocks), default=0)
        aten_swiglu = activation == "swiglu" and not kernels.applies(s_SD)

        # scratch: d_buf dy rows -> the input gradient; x_buf the gathered sub-tokens; h_buf the
        # recomputed first matmul (unless stored) -> its own gradient; g_buf the gradient of the
        # gated activation q; q_buf q itself (w_out's gradient); a_buf silu(a) (ATen's SwiGLU)
        widths = (D, D, H if h is None else 0, Fh, Fh if need_out else 0, Fh if aten_swiglu else 0)
        with _scratch(s_SD, m_max, widths) as (d_buf, x_buf, h_buf, g_buf, q_buf, a_buf):
            for lo, hi, parts in blocks:
                m, tok = hi - lo, token_A[lo:hi]
                if h is None:
                    x_b, h_b = _first_matmul(s_SD, tok, w_in, parts, lo, x_buf, h_buf)
                else:
                    x_b, h_b = None, h[lo:hi]
                dy_b = torch.index_select(dy_SD, 0, tok, out=d_buf[:m])
                dq = g_buf[:m]
                for e, i, j in parts:
                    torch.mm(dy_b[i - lo:j - lo], w_out[e].t(), out=dq[i - lo:j - lo])
                q_b = q_buf[:m] if need_out else None
                _gated_act_backward(h_b, dq, gate_A[lo:hi], activation, None if dgate is None else dgate[lo:hi],
                                    q_b, a_buf[:m] if aten_swiglu else None)
                if need_out:
                    for e, i, j in parts:
                        torch.mm(q_b[i - lo:j - lo].t(), dy_b[i - lo:j - lo], out=dw_out[e])
                dh_b = h_b
                if need_in:
                    if x_b is None:
                        x_b = torch.index_select(s_SD, 0, tok, out=x_buf[:m])
                    for e, i, j in parts:
                        torch.mm(x_b[i - lo:j - lo].t(), dh_b[i - lo:j - lo], out=dw_in[e])
                if need_s:
                    for e, i, j in parts:
                        torch.mm(dh_b[i - lo:j - lo], w_in[e].t(), out=d_buf[i - lo:j - lo])
                    ds.add(tok, d_buf[:m])
        if ds is not None:
            ds = ds.result()
        return ds, None, dgate, dw_in, dw_out, None, None, None


def _empty_but_zero(w_EXY: Tensor, experts: List[int]) -> Tensor:
    """An uninitialised tensor like ``w_EXY`` whose slices ``experts`` are zero."""
    out = torch.empty_like(w_EXY)
    if len(experts) == w_EXY.shape[0]:
        return out.zero_()
    for e in experts:
        out[e].zero_()
    return out


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
        self.impl = "auto"
        """How training runs through the experts: ``"grouped"`` (``_FusedExperts``: full-size
        gathers and ``torch._grouped_mm``, no host sync; the accelerator path), ``"blocked"``
        (``_BlockedExperts``: blocks of experts through small reused buffers; the CPU path), or
        ``"auto"``: blocked on CPU, grouped elsewhere. Same function, bitwise the same results.
        Blocked makes a few times more parallel regions (elementwise ops per block), so on an
        oversubscribed CPU (more torch threads than free cores) each region waits for a descheduled
        thread and grouped degrades less (both far worse than with fewer threads); compare with
        ``scripts/benchmark_moe.py --impl grouped blocked``."""
        mult = 2 if activation == "swiglu" else 1
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, mult * hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the per-expert equivalent of nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.hidden), 1 / math.sqrt(self.hidden))

    def compute_dtype(self, s_SD: Tensor) -> torch.dtype:
        """The dtype both grouped matmuls run in: the autocast dtype inside an autocast region
        (float32 weights are cast per forward, as autocast does for ``nn.Linear``), else the
        weights' own dtype (the input is cast to it)."""
        dev = s_SD.device.type
        if self.w_in.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return self.w_in.dtype

    def forward(self, s_SD: Tensor, token_A: Tensor, gate_A: Tensor, offs_E: Tensor, counts: Counts = None) -> Tensor:
        """Sum of gate-weighted expert outputs per sub-token, S x dim, in :meth:`compute_dtype`.

        ``token_A``: sub-token of each assignment, sorted by expert; ``gate_A``: its gate;
        ``offs_E``: cumulative assignments per expert (int32, on the device); ``counts``: the same
        per expert as a Python list, optional (only the fallback loop needs it; see the module doc).
        """
        dt = self.compute_dtype(s_SD)
        if self.bitnet:
            return self._forward_bitnet(s_SD, token_A, gate_A, offs_E, counts, dt)
        args = (s_SD.to(dt), token_A, gate_A.to(dt), self.w_in.to(dt), self.w_out.to(dt), offs_E, counts, self.activation)
        if _is_compiling():
            return _experts_reference_ops(*args)  # the compiler traces plain ops
        if self.impl == "blocked" or (self.impl == "auto" and s_SD.device.type == "cpu"):
            return _BlockedExperts.apply(*args)
        return _FusedExperts.apply(*args)

    def _forward_bitnet(self, s_SD, token_A, gate_A, offs_E, counts, dt) -> Tensor:
        # quantisers run in float32 (exact ternary / int8 grids), the matmuls in the compute dtype
        with torch.autocast(s_SD.device.type, enabled=False):
            x_AD = s_SD[token_A].float()
            w_in = weight_quant_ternary(self.w_in.float(), dims=(-2, -1)).to(dt)
            w_out = weight_quant_ternary(self.w_out.float(), dims=(-2, -1)).to(dt)
            xq = act_quant_8bit(F.rms_norm(x_AD, (x_AD.shape[-1],))).to(dt)
            h = grouped_mm(xq, w_in, offs_E, counts)
            p = _act_fwd(h, self.activation).float()
            pq = act_quant_8bit(F.rms_norm(p, (p.shape[-1],))).to(dt)
            o = grouped_mm(pq, w_out, offs_E, counts)
            return o.new_zeros(s_SD.shape).index_add(0, token_A, o * gate_A.unsqueeze(-1).to(o.dtype))

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, activation={self.activation}, bitnet={self.bitnet}"


def expert_offsets(counts_E: Tensor, with_counts: bool = True) -> Tuple[Tensor, Counts]:
    """Cumulative int32 end offsets for the grouped matmul, and the counts as a Python list (a host
    sync) when ``with_counts``; ``None`` otherwise (the fast path does not need them)."""
    return counts_E.cumsum(0).to(torch.int32), (counts_E.tolist() if with_counts else None)
