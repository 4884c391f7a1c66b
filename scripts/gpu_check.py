#!/usr/bin/env python
"""The CUDA checks of mixed-precision training, in one run (a GPU machine's time is scarce):

1. host syncs: one dropless MH-MoE layer's forward + backward under bf16 autocast inside
   ``torch.cuda.set_sync_debug_mode("error")`` (any host-device synchronisation raises);
2. the fast path: the same step with the per-expert fallback loop disabled (it would raise);
3. a ``base``-preset pretraining step (MH-MoE h=2, image-text batch, bf16 autocast, fused AdamW):
   tokens/s, and MFU = 6 x active parameters x tokens/s ... counted from the model's MACs / the
   GPU's dense bf16 peak (``--peak-tflops``; looked up for H100/H200/A100 when not given);
4. ``scripts/benchmark_moe.py`` in bf16 at d 768 (MH-MoE h=2 vs dense of equal active FLOPs).

    python scripts/gpu_check.py                       # all four; prints one JSON summary at the end
    python scripts/gpu_check.py --batch 64 --skip-benchmark

Without CUDA it says so and exits with status 2.
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
    with torch.autocast("cuda", torch.bfloat16):
        y, out = layer(x)
        loss = y.float().square().mean() + out.loss
    loss.backward()


def check_syncs_and_fast_path(d: int = 768) -> dict:
    torch.manual_seed(0)  # the same weights and inputs (hence routing) every run
    layer = MHMoE(MoEConfig(d_model=d, num_experts=40, expert_hidden=768, top_k=2, num_heads=2)).cuda()
    x = torch.randn(8, 512, d, device="cuda")
    moe_step(layer, x)  # warm-up (kernel selection, allocator)
    torch.cuda.synchronize()
    result = {}
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe_step(layer, x)
        result["host_sync_free"] = True
    except RuntimeError as exc:
        result["host_sync_free"] = False
        result["host_sync_error"] = str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")

    def no_loop(*args, **kwargs):
        raise RuntimeError("per-expert fallback loop taken")

    saved = experts_mod._loop_mm, experts_mod._loop_wgrad
    experts_mod._loop_mm = experts_mod._loop_wgrad = no_loop
    try:
        moe_step(layer, x)
        result["fast_grouped_path"] = True
    except RuntimeError as exc:
        result["fast_grouped_path"] = False
        result["fast_path_error"] = str(exc).splitlines()[0]
    finally:
        experts_mod._loop_mm, experts_mod._loop_wgrad = saved
    return result


def pretrain_step_throughput(batch: int, steps: int, peak_tflops: float) -> dict:
    torch.manual_seed(0)
    cfg = get_config("base", "mhmoe-h2")
    model = create_model("base", "mhmoe-h2").cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    text_len = cfg.max_text_len
    image = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device="cuda")
    ids = torch.randint(5, cfg.vocab_size, (batch, text_len), device="cuda")
    target = torch.randn(batch, 1 + cfg.num_patches + text_len, cfg.dim, device="cuda")

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            out = model(image=image, text_ids=ids)
            loss = (out.hidden.float() - target).square().mean() + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    costs = count_costs(cfg, seq_len=1 + cfg.num_patches + text_len)
    tokens = batch * costs["seq_len"]
    flops = 3 * 2 * costs["macs_per_token"] * tokens  # forward + backward (2x) multiply-adds, 2 FLOPs each
    return {
        "batch": batch, "seq_len": int(costs["seq_len"]), "step_s": dt, "tokens_per_s": tokens / dt,
        "model_tflops_per_s": flops / dt / 1e12, "peak_tflops": peak_tflops,
        "mfu": flops / dt / 1e12 / peak_tflops if peak_tflops else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="base-preset pretraining batch (default 32)")
    p.add_argument("--steps", type=int, default=10, help="timed pretraining steps (default 10)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    p.add_argument("--skip-benchmark", action="store_true", help="do not run scripts/benchmark_moe.py")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: these checks need a GPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    summary = {"device": name, "torch": torch.__version__}
    summary.update(check_syncs_and_fast_path())
    print(json.dumps(summary), flush=True)
    summary["pretrain_base"] = pretrain_step_throughput(args.batch, args.steps, peak)
    print(json.dumps(summary["pretrain_base"]), flush=True)
    if not args.skip_benchmark:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark_moe.py")
        cmd = [sys.executable, script, "--d-model", "768", "--hidden", "2048", "--tokens", "16384", "--experts", "8",
               "--dtype", "bfloat16", "--device", "cuda"]
        summary["benchmark_moe_returncode"] = subprocess.run(cmd).returncode
    print("SUMMARY " + json.dumps(summary))
    return 0 if summary.get("host_sync_free") and summary.get("fast_grouped_path") else 1


if __name__ == "__main__":
    sys.exit(main())
