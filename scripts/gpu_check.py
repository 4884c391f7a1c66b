#!/usr/bin/env python
"""The CUDA checks of mixed-precision training, in one run (a GPU machine's time is scarce):

1. host syncs: one dropless MH-MoE layer's forward + backward under bf16 autocast inside
   ``torch.cuda.set_sync_debug_mode("error")`` (any host-device synchronisation raises);
2. the fast path: the same step with the per-expert fallback loop disabled (it would raise);
3. a ``base``-preset pretraining step (MH-MoE h=2, image-text batch, bf16 autocast, fused AdamW):
   tokens/s, and MFU = 6 x active parameters x tokens/s ... counted from the model's MACs / the
   GPU's dense bf16 peak (``--peak-tflops``; looked up for H100/H200/A100 when not given);
4. ``scripts/benchmark_moe.py`` in bf16 at d 768 (MH-MoE h=2, 40 experts x 768, top-2, vs the
   dense FFN of equal active FLOPs; the other rows of its table come along).

    python scripts/gpu_check.py                       # all four; prints one JSON summary at the end
    python scripts/gpu_check.py --batch 64 --skip-benchmark
    python scripts/gpu_check.py --cpu-dry-run         # the same code on CPU (tiny preset, CPU
                                                      # autocast, no sync check, no benchmark)

Without CUDA (and without ``--cpu-dry-run``) it says so and exits with status 2. The dry run exists
so that a GPU session does not spend its scarce device time on a Python error: the test suite runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmmoe.models import create_model  # noqa: E402
from mmmoe.models.registry import count_costs, get_config  # noqa: E402
from mmmoe.moe import MHMoE, MoEConfig  # noqa: E402
from mmmoe.moe import experts as experts_mod  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def moe_step(layer: MHMoE, x: torch.Tensor) -> None:
    with torch.autocast(x.device.type, torch.bfloat16):
        y, out = layer(x)
        loss = y.float().square().mean() + out.loss
    loss.backward()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_syncs_and_fast_path(device: torch.device, d: int = 768, tokens: int = 4096) -> dict:
    torch.manual_seed(0)  # the same weights and inputs (hence routing) every run
    layer = MHMoE(MoEConfig(d_model=d, num_experts=40, expert_hidden=768, top_k=2, num_heads=2)).to(device)
    # the grouped path is the accelerator path; on CPU "auto" would take the blocked one
    layer.experts.impl = "grouped"
    x = torch.randn(8, tokens // 8, d, device=device)
    moe_step(layer, x)  # warm-up (kernel selection, allocator)
    synchronize(device)
    result = {}

    def attempt(key: str, error_key: str) -> None:
        """One step; result[key] says whether it ran, result[error_key] why not."""
        try:
            moe_step(layer, x)
            result[key] = True
        except RuntimeError as exc:
            result[key] = False
            result[error_key] = str(exc).splitlines()[0]

    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            attempt("host_sync_free", "host_sync_error")
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def no_loop(*args, **kwargs):
        raise RuntimeError("per-expert fallback loop taken")

    saved = experts_mod._loop_mm, experts_mod._loop_wgrad
    experts_mod._loop_mm = experts_mod._loop_wgrad = no_loop
    try:
        attempt("fast_grouped_path", "fast_path_error")
    finally:
        experts_mod._loop_mm, experts_mod._loop_wgrad = saved
    return result


def pretrain_step_throughput(device: torch.device, batch: int, steps: int, peak_tflops: float,
                             preset: str = "base") -> dict:
    torch.manual_seed(0)
    cfg = get_config(preset, "mhmoe-h2")
    model = create_model(preset, "mhmoe-h2").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    text_len = cfg.max_text_len
    image = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    ids = torch.randint(5, cfg.vocab_size, (batch, text_len), device=device)
    target = torch.randn(batch, 1 + cfg.num_patches + text_len, cfg.dim, device=device)

    def step():
        with torch.autocast(device.type, torch.bfloat16):
            out = model(image=image, text_ids=ids)
            loss = (out.hidden.float() - target).square().mean() + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3 if device.type == "cuda" else 1):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    dt = (time.perf_counter() - t0) / steps
    costs = count_costs(cfg, seq_len=1 + cfg.num_patches + text_len)
    tokens = batch * costs["seq_len"]
    flops = 3 * 2 * costs["macs_per_token"] * tokens  # forward + backward (2x) multiply-adds, 2 FLOPs each
    return {
        "preset": preset, "batch": batch, "seq_len": int(costs["seq_len"]), "step_s": dt, "tokens_per_s": tokens / dt,
        "model_tflops_per_s": flops / dt / 1e12, "peak_tflops": peak_tflops,
        "mfu": flops / dt / 1e12 / peak_tflops if peak_tflops else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="base-preset pretraining batch (default 32)")
    p.add_argument("--steps", type=int, default=10, help="timed pretraining steps (default 10)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    p.add_argument("--skip-benchmark", action="store_true", help="do not run scripts/benchmark_moe.py")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run checks 2 and 3 on CPU (tiny preset, batch 2, one step) to test this script")
    args = p.parse_args()
    if args.cpu_dry_run:
        device = torch.device("cpu")
        summary = {"device": "cpu (dry run)", "torch": torch.__version__}
        summary.update(check_syncs_and_fast_path(device, d=64, tokens=256))
        summary["pretrain"] = pretrain_step_throughput(device, 2, 1, None, preset="tiny")
        print("SUMMARY " + json.dumps(summary))
        return 0 if summary.get("fast_grouped_path") else 1
    if not torch.cuda.is_available():
        print("no CUDA device: these checks need a GPU (--cpu-dry-run tests the script on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    summary = {"device": name, "torch": torch.__version__}
    summary.update(check_syncs_and_fast_path(device))
    print(json.dumps(summary), flush=True)
    summary["pretrain"] = pretrain_step_throughput(device, args.batch, args.steps, peak)
    print(json.dumps(summary["pretrain"]), flush=True)
    if not args.skip_benchmark:
        # MH-MoE h=2 rows: 2 x 20 = 40 experts of 1536 / 2 = 768, top-2, at d 768
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark_moe.py")
        cmd = [sys.executable, script, "--d-model", "768", "--hidden", "1536", "--tokens", "16384", "--experts", "20",
               "--dtype", "bfloat16", "--device", "cuda"]
        summary["benchmark_moe_returncode"] = subprocess.run(cmd).returncode
    print("SUMMARY " + json.dumps(summary))
    return 0 if summary.get("host_sync_free") and summary.get("fast_grouped_path") else 1


if __name__ == "__main__":
    sys.exit(main())
