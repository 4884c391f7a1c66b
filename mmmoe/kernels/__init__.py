"""Fused CPU kernels, compiled on first use with the machine's C++ compiler.

PyTorch's CPU build has no elementwise fusion without a compiler, so a SwiGLU activation costs two
passes over memory in forward and four or five in backward (silu, mul; silu_backward, the muls and,
where the activation is recomputed, silu again). ``swiglu_cpu.cpp`` does each direction in one
pass (in the routed experts with the gate applied, and its gradient taken, in the same pass). The
routed experts (both paths), the dense FFN and the shared expert use it. ``route_cpu.cpp`` does the
router's softmax, top-k, gates and log-sum-exp in one pass over the logits and their gradient in one
pass back (ATen: about a dozen ops each way), and sorts the assignments by expert with a counting
sort. ``scatter_cpu.cpp`` adds the experts' output rows into their sub-tokens' rows without
zero-filling the result first (:class:`RowScatter`). They are compiled once per machine with
``torch.utils.cpp_extension`` (needs a C++ compiler and ninja; the build is cached under
``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and loaded as the
``torch.ops.mmmoe_cpu`` operators.

The SwiGLU kernels compute every value with the same operations in the same order as ATen's silu,
silu_backward and mul kernels for the CPU capability ATen dispatches to, and the router kernel its
probabilities as ATen's softmax does, so on the machines tested these results are bitwise those of
the unfused path; sums the kernels take in their own order (the gate gradient, the router's
gradient, the log-sum-exp) match ATen's to float32 rounding. No result depends on the thread count.

``MMMOE_CPU_KERNELS`` chooses: ``auto`` (default: build on first use, fall back to the ATen ops
with one warning when the build fails), ``off`` (always the ATen ops), ``require`` (a failed build
raises). :func:`enabled` / :func:`set_enabled` switch them at run time (tests, A/B benchmarks).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from typing import Optional

import torch

log = logging.getLogger(__name__)

ENV = "MMMOE_CPU_KERNELS"
_MODES = ("auto", "off", "require")
_DIR = os.path.dirname(os.path.abspath(__file__))
_SOURCES = [os.path.join(_DIR, name) for name in ("swiglu_cpu.cpp", "route_cpu.cpp", "scatter_cpu.cpp")]
_LOCK = threading.Lock()
_state = {"loaded": None, "error": None, "enabled": None}

# compiler flags per ATen CPU capability: the kernels must use the vector width and math
# (Sleef) of the ATen kernels they replace
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(_MODES)}")
    return value


def _capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - very old torch
        return "DEFAULT"


def _build() -> None:
    cap = _capability()
    # -O3 for the vector loops; GCC's default floating-point contraction is kept: ATen's kernels
    # are built with it, and the results match theirs bit for bit only with the same contractions
    flags = ["-O3"] + _CAPABILITY_FLAGS.get(cap, [])
    name = "mmmoe_cpu_kernels_" + "".join(c for c in cap.lower() if c.isalnum())
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level, path = quiet.level, os.environ.get("PATH", "")
    quiet.setLevel(logging.ERROR)  # its import warns "No CUDA runtime is found" on CPU machines
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:
            try:  # the pip package's binary: not on PATH when the venv is not activated
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
            except ImportError:
                pass
        cpp_extension.load(name=name, sources=_SOURCES, extra_cflags=flags, is_python_module=False,
                           verbose=False)
    finally:
        quiet.setLevel(level)
        os.environ["PATH"] = path


def _summary(message: str) -> str:
    """The first line of a build error and its last lines (a compiler error ends the log)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if len(lines) <= 3:
        return " | ".join(lines)
    return f"{lines[0][:160]} ... {' | '.join(ln[:200] for ln in lines[-2:])}"


def load() -> bool:
    """Builds (first time on this machine) and loads the kernels; True when they are usable.
    In ``auto`` mode a failure is logged once and remembered; in ``require`` mode it raises."""
    if _state["loaded"] is None:
        with _LOCK:
            if _state["loaded"] is None:
                if mode() == "off":
                    _state["loaded"] = False
                    _state["error"] = f"{ENV}=off"
                else:
                    try:
                        _build()
                        torch.ops.mmmoe_cpu.swiglu_forward  # noqa: B018 - raises if not registered
                        torch.ops.mmmoe_cpu.route_forward  # noqa: B018
                        torch.ops.mmmoe_cpu.scatter_rows  # noqa: B018
                        _state["loaded"] = True
                    except Exception as exc:  # compiler, ninja or headers missing
                        _state["loaded"] = False
                        _state["error"] = f"{type(exc).__name__}: {exc}".strip()
                        if mode() != "require":
                            log.warning("fused CPU kernels unavailable, using the ATen ops "
                                        "(slower on CPU; set %s=off to silence): %s", ENV, _summary(_state["error"]))
    if not _state["loaded"] and mode() == "require":
        raise RuntimeError(f"{ENV}=require but the fused CPU kernels could not be built: {_state['error']}")
    return bool(_state["loaded"])


def error() -> Optional[str]:
    """Why the kernels are not in use (None when they are, or were not tried yet)."""
    return _state["error"]


def enabled() -> bool:
    """Whether the fused kernels are used (builds them on the first call)."""
    if _state["enabled"] is None:
        _state["enabled"] = load()
    return bool(_state["enabled"])


def set_enabled(flag: bool) -> bool:
    """Turns the fused kernels on or off for this process; returns the previous setting. Turning
    them on builds them if needed (and raises if they cannot be built)."""
    before = enabled()
    if flag and not load():
        raise RuntimeError(f"fused CPU kernels cannot be enabled: {_state['error']}")
    _state["enabled"] = bool(flag)
    return before


def applies(t: torch.Tensor, dtype: Optional[torch.dtype] = torch.float32) -> bool:
    """True when the fused kernels handle ``t``: a CPU tensor of ``dtype`` (any dtype for
    ``None``), outside torch.compile, with the kernels enabled."""
    if t.device.type != "cpu" or (dtype is not None and t.dtype != dtype):
        return False
    try:
        if torch.compiler.is_compiling():
            return False
    except AttributeError:  # pragma: no cover
        pass
    return enabled()


def swiglu_forward(h: torch.Tensor, out: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out := silu(a) * b for h = [a | b] (m x 2F, unit column stride), times ``gate`` (m, one
    factor per row) when given; returns out."""
    torch.ops.mmmoe_cpu.swiglu_forward(h, out, gate)
    return out


def swiglu_backward(h: torch.Tensor, dp: torch.Tensor, p: Optional[torch.Tensor] = None,
                    dh: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                    dgate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient [da | db] of silu(a) * b for h = [a | b], given its gradient ``dp``, written
    into ``dh`` (m x 2F) or, without it, over ``h``; when ``p`` is given it receives silu(a) * b.
    Returns the gradient.

    With ``gate`` (m) the function is gate * silu(a) * b (the routed experts): ``dp`` is the
    gradient of that, ``p`` receives gate * silu(a) * b, and ``dgate`` (m, when given) the gate's
    gradient, the row-wise dot product of ``dp`` and silu(a) * b."""
    torch.ops.mmmoe_cpu.swiglu_backward(h, dp, p, dh, gate, dgate)
    return h if dh is None else dh


def route_forward(logits: torch.Tensor, bias: Optional[torch.Tensor], k: int):
    """Softmax over the experts (bitwise ATen's), top-k of the probabilities plus ``bias`` (ties:
    the lower expert index), the chosen probabilities renormalised to sum to 1 when k > 1, and
    the log-sum-exp of each row: (probs S x E, idx S x k int64, gates S x k, lse S)."""
    S, E = logits.shape
    probs = logits.new_empty(S, E)
    idx = torch.empty(S, k, dtype=torch.long)
    gates = logits.new_empty(S, k)
    lse = logits.new_empty(S)
    torch.ops.mmmoe_cpu.route_forward(logits, bias, k, probs, idx, gates, lse)
    return probs, idx, gates, lse


def route_backward(probs: torch.Tensor, idx: torch.Tensor, dprobs: Optional[torch.Tensor],
                   dgates: Optional[torch.Tensor], dlse: Optional[torch.Tensor]) -> torch.Tensor:
    """The logits' gradient given those of :func:`route_forward`'s probs, gates and lse (each
    optional)."""
    out = torch.empty_like(probs)
    torch.ops.mmmoe_cpu.route_backward(probs, idx, dprobs, dgates, dlse, out)
    return out


def dispatch_order(idx: torch.Tensor, num_experts: int):
    """Choice-major assignment positions (k * S + s) of ``idx`` (S x k) sorted by expert, stably,
    their sub-tokens, and the assignments per expert: a counting sort, the same result as a stable
    argsort and a bincount."""
    A = idx.numel()
    order = torch.empty(A, dtype=torch.long)
    token = torch.empty(A, dtype=torch.long)
    counts = torch.empty(num_experts, dtype=torch.long)
    torch.ops.mmmoe_cpu.dispatch_order(idx, num_experts, order, token, counts)
    return order, token, counts


class RowScatter:
    """Sums rows into ``out`` (n x D float32 on CPU, unit column stride; its contents are ignored)
    over several :meth:`add` calls without zero-filling it first: a row's first contribution is
    copied, later ones added (in call order, and in index order within a call), and
    :meth:`finish` zeroes the rows nothing was added to. The result equals
    ``zeros.index_add_(0, index, src)`` over the same calls (except that a first contribution of
    -0.0 stays -0.0). A per-row int32 stamp records which rows have a contribution."""

    def __init__(self, out: torch.Tensor):
        self.out = out
        self.stamp = torch.full((out.shape[0],), -1, dtype=torch.int32)
        self.calls = 0

    def add(self, index: torch.Tensor, src: torch.Tensor) -> None:
        """``out[index[i]] += src[i]`` for every i (``index`` int64, ``src`` len(index) x D)."""
        torch.ops.mmmoe_cpu.scatter_rows(self.out, index, src, self.stamp, self.calls)
        self.calls += 1

    def finish(self) -> torch.Tensor:
        """Zeroes the rows without a contribution and returns ``out``."""
        torch.ops.mmmoe_cpu.zero_untouched_rows(self.out, self.stamp)
        return self.out
