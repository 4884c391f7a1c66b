#!/usr/bin/env python
"""Forward+backward time and memory of MH-MoE / SMoE layers against a dense SwiGLU FFN.

All variants are measured in one run, interleaved round by round (the machine is noisy); each
round times every variant once, and each variant's ratio to the dense FFN of the same round is
kept. The table prints medians of those ratios.

Variants, for each base expert count E (default 8, 16, 32), at width d and dense hidden F:
  dense      SwiGLU FFN d -> F -> d
  smoe       E experts x F, top-1, no head/merge layers (= MH-MoE h=1)
  mh-moe h=2 2E experts x F/2, top-2, head + merge layers
  mh-moe h=4 4E experts x F/4, top-2, head + merge layers
The MACs/token column gives each variant's active multiply-adds, router excluded. The MH-MoE
variants do not have the dense FFN's MACs (h=2 more, h=4 fewer: head and merge layers counted), so
each also gets a FLOP-matched dense SwiGLU FFN (hidden = its MACs / 3d, rounded), timed in the same
rounds: "x matched" is the time ratio to that one, the equal-active-FLOPs comparison.

Memory: "saved" is the bytes autograd keeps for backward (distinct storages, parameters
excluded), from saved-tensor hooks; "peak" is the peak of memory allocated during one step beyond
what existed before it (parameter gradients included in "before" on CPU): the CUDA allocator's
peak, or on CPU the peak of live tensor storages created by the step's ops (tracked in a dispatch
mode; RSS is too noisy on a shared machine to compare variants). The CPU experts path keeps its
scratch buffers (a few times BLOCK_BYTES) between steps, so they exist before the step and are not
in its peak.
Page faults: with glibc's default malloc, a fresh tensor above 32 MiB is mmapped and its pages
faulted in on first touch, every step; the dense FFN pays this on its large activations, the CPU
experts path mostly avoids it. An allocator that keeps freed memory (e.g. MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=<large>, or jemalloc/tcmalloc) speeds up both and changes the ratios; run
both ways when comparing across machines; the header line names the allocator it ran under.
"time/MAC x" divides the time ratio by the MAC ratio: the cost per multiply-add against dense.
Fused CPU kernels: on CPU in float32 the SwiGLU of every variant (the dense FFNs too), the MoE
router and the CPU experts path's scatter-adds run through mmmoe.kernels when they are built;
MMMOE_CPU_KERNELS=off times the ATen ops instead. The header line says which ran.

Example (the issue's setting):
    python scripts/benchmark_moe.py --tokens 8192 --d-model 512 --hidden 1536 --experts 8 16 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmmoe import kernels  # noqa: E402
from mmmoe.layers.mlp import FeedForward  # noqa: E402
from mmmoe.moe import MHMoE, MoEConfig  # noqa: E402


@dataclass
class Variant:
    name: str
    build: Callable[[], torch.nn.Module]
    macs: int
    matched: Optional[str] = None  # name of the FLOP-matched dense variant (None: the dense itself)


def variants(d: int, hidden: int, base_experts: int, tokens: int, impls: Sequence[str] = ("auto",)) -> List[Variant]:
    def moe(h: int, k: int, e: int, f: int, impl: str) -> Callable[[], torch.nn.Module]:
        def build() -> torch.nn.Module:
            m = MHMoE(MoEConfig(d_model=d, num_experts=e, expert_hidden=f, top_k=k, num_heads=h))
            m.experts.impl = impl
            return m

        return build

    def dense(f: int) -> Callable[[], torch.nn.Module]:
        return lambda: FeedForward(d, f, "swiglu")

    out = [Variant("dense", dense(hidden), 3 * d * hidden)]
    for h, k in ((2, 2), (4, 2)):  # the FLOP-matched dense FFN of each MH-MoE shape
        f = max(1, round((2 * d * d + 3 * d * (hidden // h) * k) / (3 * d)))
        out.append(Variant(f"dense F={f} (= h={h} MACs)", dense(f), 3 * d * f))
    for impl in impls:
        tag = "" if impl == "auto" else f" [{impl}]"
        out.append(Variant(f"smoe {base_experts}x{hidden} k1{tag}", moe(1, 1, base_experts, hidden, impl), 3 * d * hidden,
                           "dense"))
        for h, k in ((2, 2), (4, 2)):
            e, f = base_experts * h, hidden // h
            out.append(Variant(f"mh-moe h={h} {e}x{f} k{k}{tag}", moe(h, k, e, f, impl), 2 * d * d + 3 * d * f * k,
                               out[h // 2].name))
    return out


def _run(module: torch.nn.Module, x: torch.Tensor) -> None:
    """One forward + backward. The output's gradient is a fixed random tensor (as a real loss gives
    one: dense, contiguous), not the ones of ``y.sum()``, whose expanded stride-0 gradient makes
    some backward matmuls copy it first; the MoE layer's own loss is added."""
    y = module(x)
    loss = None
    if isinstance(y, tuple):
        y, aux = y
        loss = aux.loss
    grad = _output_grad(y)
    if loss is None:
        y.backward(grad)
    else:
        torch.autograd.backward([y, loss], [grad, torch.ones_like(loss)])


_GRADS: Dict[tuple, torch.Tensor] = {}


def _output_grad(y: torch.Tensor) -> torch.Tensor:
    key = (tuple(y.shape), y.dtype, y.device)
    if key not in _GRADS:
        gen = torch.Generator(device="cpu").manual_seed(1)
        _GRADS[key] = torch.randn(y.shape, generator=gen).to(y.device, y.dtype) / y.numel() ** 0.5
    return _GRADS[key]


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    params = {p.data_ptr() for p in module.parameters()}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    y = y[0] if isinstance(y, tuple) else y
    y.backward(_output_grad(y))
    module.zero_grad(set_to_none=True)
    return sum(seen.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _PeakTensorMemory(TorchDispatchMode):
    """Tracks bytes of live tensor storages created by ops inside the mode (forward and backward),
    freeing them when their storage dies: a deterministic peak, unlike RSS on a shared machine."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set = set()

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self._seen or st.nbytes() == 0:
            return
        self._seen.add(key)
        n = st.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)

        def free(key=key, n=n):
            self.live -= n
            self._seen.discard(key)

        weakref.finalize(st, free)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t._is_view():
                self._track(t)
        return out


def peak_memory(v: Variant, x: torch.Tensor) -> float:
    """Peak bytes allocated during one forward+backward beyond what existed before it.
    CUDA: the allocator's peak. CPU: tensor storages created by the step (_PeakTensorMemory)."""
    m = v.build().to(x.device, x.dtype)
    _run(m, x)
    m.zero_grad(set_to_none=True)
    x.grad = None
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run(m, x)
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    # gradients of parameters and input exist before the tracked step (zeroed, not freed), so the
    # peak is the step's activations and temporaries, not E copies of weight gradients
    _run(m, x)
    m.zero_grad(set_to_none=False)
    x.grad.zero_()
    tracker = _PeakTensorMemory()
    with tracker:
        _run(m, x)
    m.zero_grad(set_to_none=True)
    x.grad = None
    return float(tracker.peak)


def bench(args: argparse.Namespace) -> List[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows = []
    for base in args.experts:
        torch.manual_seed(0)
        vs = variants(args.d_model, args.hidden, base, args.tokens, args.impl)
        mods = [v.build().to(device, dtype) for v in vs]
        x = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype, requires_grad=True)
        for m in mods:
            for _ in range(args.warmup):
                _run(m, x)
        times: List[List[float]] = [[] for _ in vs]
        rounds = range(args.repeats)
        try:
            from tqdm import tqdm

            rounds = tqdm(rounds, desc=f"E={base}", leave=False, file=sys.stderr)
        except ImportError:  # pragma: no cover
            pass
        for r in rounds:
            order = list(range(len(vs)))
            if r % 2:
                order.reverse()  # alternate who goes first
            for i in order:
                mods[i].zero_grad(set_to_none=True)
                x.grad = None
                sync(device)
                t0 = time.perf_counter()
                _run(mods[i], x)
                sync(device)
                times[i].append(time.perf_counter() - t0)
        saved = [saved_bytes(m, x) for m in mods]
        peaks = [peak_memory(v, x) for v in vs]
        index = {v.name: i for i, v in enumerate(vs)}
        for i, v in enumerate(vs):
            ratios = [t / d for t, d in zip(times[i], times[0])]
            ref = times[index[v.matched]] if v.matched else None
            rows.append(dict(
                experts=base, variant=v.name, macs_per_token=v.macs,
                time_ms=1e3 * statistics.median(times[i]), time_ratio=statistics.median(ratios),
                matched_ratio=statistics.median([t / m for t, m in zip(times[i], ref)]) if ref else None,
                time_per_mac_ratio=statistics.median(ratios) * vs[0].macs / v.macs,
                saved_mib=saved[i] / 2**20, saved_ratio=saved[i] / saved[0],
                peak_mib=peaks[i] / 2**20, peak_ratio=peaks[i] / peaks[0] if peaks[0] else float("nan"),
            ))
        del mods
    return rows


def allocator() -> str:
    """The host allocator, as far as the environment says (the ratios depend on it: see "Page
    faults" above)."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            return name
    tuned = sorted(k for k in os.environ if k.startswith("MALLOC_") and k.endswith("_"))
    return "glibc" + (f" ({', '.join(tuned)} set)" if tuned else " defaults")


def print_table(rows: List[dict], args: argparse.Namespace, env: dict) -> None:
    fused = "n/a"
    if args.device == "cpu" and args.dtype == "float32":
        fused = "on" if kernels.enabled() else f"off ({(kernels.error() or 'switched off').splitlines()[0][:80]})"
    print(f"device={args.device} dtype={args.dtype} tokens={args.tokens} d={args.d_model} "
          f"dense hidden={args.hidden} repeats={args.repeats} fused CPU kernels={fused} "
          f"threads={env['threads']} allocator={env['allocator']} (medians of per-round ratios to dense)")
    hdr = f"{'E':>3}  {'variant':<34} {'MACs/tok':>10} {'ms':>8} {'time x':>7} {'x matched':>9} {'time/MAC x':>10} {'saved MiB':>10} {'saved x':>8} {'peak MiB':>9} {'peak x':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        matched = "-" if r["matched_ratio"] is None else f"{r['matched_ratio']:.2f}"
        print(f"{r['experts']:>3}  {r['variant']:<34} {r['macs_per_token']:>10,} {r['time_ms']:>8.1f} {r['time_ratio']:>7.2f} {matched:>9} {r['time_per_mac_ratio']:>10.2f} "
              f"{r['saved_mib']:>10.1f} {r['saved_ratio']:>8.2f} {r['peak_mib']:>9.1f} {r['peak_ratio']:>7.2f}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per step (default 8192)")
    p.add_argument("--d-model", type=int, default=512, help="model width d (default 512)")
    p.add_argument("--hidden", type=int, default=1536, help="dense FFN hidden width = SMoE expert width (default 1536)")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32], help="base expert counts E (default 8 16 32)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (default 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--impl", nargs="+", default=["auto"], choices=["auto", "blocked", "grouped"],
                   help="how training runs through the experts (GroupedExperts.impl): auto (blocked on CPU, grouped "
                        "elsewhere), blocked, grouped; several values time each side by side (default auto)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    a = p.parse_args(argv)
    if a.dtype is None:
        a.dtype = "bfloat16" if a.device.startswith("cuda") else "float32"
    for name in ("tokens", "d_model", "hidden", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.hidden % 4 or a.d_model % 4:
        p.error("--hidden and --d-model must be multiples of 4 (h = 4 splits them)")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench(args)
    env = dict(allocator=allocator(), threads=torch.get_num_threads())
    print_table(rows, args, env)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args={k: v for k, v in vars(args).items() if not k.startswith("_")}, **env, rows=rows), f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
