#!/usr/bin/env python
"""Training-step speed and memory of the multiway backbone: MoE variants against the dense one.

Every variant of one preset (from mmmoe.models.registry: dense, smoe, fine-grained, mhmoe-h2,
mhmoe-h3, all with the dense model's active FLOPs) runs the same image-text training step
(forward, MoE aux loss, backward, AdamW step) on the same batch. Variants are interleaved round by
round, alternating who goes first, and the table reports medians of the per-round time ratios to
dense, tokens/s, and memory:

  step ms    one whole training step (forward, backward, fused AdamW step as in tasks.base): the
             optimiser step grows with the total parameter count, which MoE variants multiply.
  peak MiB   bytes allocated during one forward + backward beyond what existed before it (the
             CUDA allocator's peak on a GPU; on CPU the peak of live tensor storages created by
             the ops; parameters, gradients and optimiser state excluded; RSS is too noisy on a
             shared machine).
  params M   all parameters; "active M" those one token uses (one way, top-k experts).

Examples:
    python scripts/benchmark_model.py                       # small preset, batch 32, 128 px
    python scripts/benchmark_model.py --preset base --image-size 224 --batch 32 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from benchmark_moe import _PeakTensorMemory  # noqa: E402

from mmmoe.models import VARIANTS, count_costs, create_model, get_config  # noqa: E402


def make_batch(cfg, batch: int, text_len: int, device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(5, cfg.vocab_size, (batch, text_len), generator=g)
    return {"image": img.to(device), "text_ids": ids.to(device)}


def forward_backward(model, batch, dtype) -> None:
    with torch.autocast(batch["image"].device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model.forward_features(batch["image"], batch["text_ids"])
        loss = out.hidden.float().square().mean() + out.aux_loss
    loss.backward()


def train_step(model, opt, batch, dtype) -> None:
    forward_backward(model, batch, dtype)
    opt.step()
    opt.zero_grad(set_to_none=False)


def peak_bytes(model, opt, batch, dtype) -> float:
    """Peak of one forward + backward (activations and temporaries; gradients and optimiser state
    already exist before it, so the MoE's larger parameter count is not what is measured)."""
    device = batch["image"].device
    train_step(model, opt, batch, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward(model, batch, dtype)
        torch.cuda.synchronize()
        peak = float(torch.cuda.max_memory_allocated() - base)
    else:
        tracker = _PeakTensorMemory()
        with tracker:
            forward_backward(model, batch, dtype)
        peak = float(tracker.peak)
    opt.zero_grad(set_to_none=False)
    return peak


def bench(args: argparse.Namespace) -> List[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    names = [v for v in args.variants]
    over = dict(image_size=args.image_size, vocab_size=args.vocab, max_text_len=max(args.text_len, 2))
    if args.depth:
        over["depth"] = args.depth
    models, opts, costs = [], [], []
    for v in names:
        torch.manual_seed(0)
        cfg = get_config(args.preset, v, **over)
        m = create_model(args.preset, v, **over).to(device).train()
        models.append(m)
        opts.append(torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True))  # as tasks.base trains
        costs.append(count_costs(cfg))
    batch = make_batch(models[0].config, args.batch, args.text_len, device)
    tokens = args.batch * (models[0].num_image_tokens + args.text_len)
    for m, o in zip(models, opts):
        for _ in range(args.warmup):
            train_step(m, o, batch, dtype)
    times: List[List[float]] = [[] for _ in names]
    rounds = range(args.repeats)
    try:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc="rounds", leave=False, file=sys.stderr)
    except ImportError:  # pragma: no cover
        pass
    for r in rounds:
        order = list(range(len(names)))[:: -1 if r % 2 else 1]
        for i in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(models[i], opts[i], batch, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - t0)
    peaks = [peak_bytes(m, o, batch, dtype) for m, o in zip(models, opts)]
    base = names.index("dense") if "dense" in names else 0
    rows = []
    for i, v in enumerate(names):
        ratios = [t / b for t, b in zip(times[i], times[base])]
        med = statistics.median(times[i])
        rows.append(dict(
            variant=v, params_m=costs[i]["params"] / 1e6, active_m=costs[i]["active_params"] / 1e6,
            macs_per_token=costs[i]["macs_per_token"], step_ms=1e3 * med, tokens_per_s=tokens / med,
            time_ratio=statistics.median(ratios), peak_mib=peaks[i] / 2**20,
            peak_ratio=peaks[i] / peaks[base] if peaks[base] else float("nan"),
        ))
    return rows


def print_table(rows: List[dict], args: argparse.Namespace) -> None:
    print(f"preset={args.preset} device={args.device} dtype={args.dtype} batch={args.batch} image={args.image_size} "
          f"text_len={args.text_len} repeats={args.repeats} threads={torch.get_num_threads()} "
          "(medians of per-round ratios to dense)")
    hdr = (f"{'variant':<14} {'params M':>9} {'active M':>9} {'MACs/tok':>12} {'step ms':>9} {'tokens/s':>9} "
           f"{'time x':>7} {'peak MiB':>9} {'peak x':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['variant']:<14} {r['params_m']:>9.2f} {r['active_m']:>9.2f} {r['macs_per_token']:>12,.0f} "
              f"{r['step_ms']:>9.1f} {r['tokens_per_s']:>9.0f} {r['time_ratio']:>7.2f} {r['peak_mib']:>9.1f} "
              f"{r['peak_ratio']:>7.2f}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset (default small)")
    p.add_argument("--variants", nargs="+", default=["dense", "smoe", "mhmoe-h2", "mhmoe-h3"],
                   choices=list(VARIANTS), help="variants to compare (default: dense smoe mhmoe-h2 mhmoe-h3)")
    p.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32; at 8 the per-expert matmuls get too small for the CPU)")
    p.add_argument("--image-size", type=int, default=128, help="image side (default 128)")
    p.add_argument("--text-len", type=int, default=32, help="text tokens per sample (default 32)")
    p.add_argument("--vocab", type=int, default=8000, help="vocabulary size (default 8000)")
    p.add_argument("--repeats", type=int, default=9, help="interleaved timing rounds (default 9)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (default 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="autocast dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    a = p.parse_args(argv)
    if a.dtype is None:
        a.dtype = "bfloat16" if a.device.startswith("cuda") else "float32"
    for name in ("batch", "image_size", "text_len", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench(args)
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
