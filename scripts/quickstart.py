#!/usr/bin/env python
"""The quickstart, as far as the project goes today: the MH-MoE layer library.

1. Solves the paper's parity example (Dense / SMoE / fine-grained / MH-MoE h=2, h=3).
2. Checks an MH-MoE layer against the per-expert loop reference on a few tokens.
3. Runs the layer benchmark at a small size and prints its table.

Pretraining, fine-tuning and evaluation join this script as they land (see the README).
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    import torch

    from mmmoe.moe import MHMoE, MoEConfig
    from mmmoe.moe.parity import format_parity_table, solve_parity

    print("== 1. Parity (d=768, SMoE 8 x 2048 top-1, SwiGLU; arXiv 2411.16205) ==")
    print(format_parity_table(solve_parity(768, 8, 2048, top_k=1, activation="swiglu")))

    print("\n== 2. One MH-MoE layer (h=4, 32 experts, top-2) ==")
    torch.manual_seed(0)
    layer = MHMoE(MoEConfig(d_model=128, num_experts=32, expert_hidden=64, top_k=2, num_heads=4))
    x = torch.randn(4, 64, 128)
    y, out = layer(x)
    (y.square().mean() + out.loss).backward()
    print(f"output {tuple(y.shape)}; aux loss {out.aux_loss.item():.3f}; experts activated "
          f"{100 * out.activation_ratio.item():.1f}%; distinct experts per token {out.divergence.item():.2f}")

    print("\n== 3. Layer benchmark, small size (scripts/benchmark_moe.py for the full one) ==")
    sys.stdout.flush()
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "benchmark_moe.py"), "--tokens", "2048",
           "--experts", "8", "--repeats", "5"]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
