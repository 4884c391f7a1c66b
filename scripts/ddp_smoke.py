#!/usr/bin/env python
"""Run every shipped training config a few steps with a trainer fragment (default: 2 CPU processes
over gloo, configs/trainer/cpu-ddp.yaml) and print one row per config: exit status, steps
reached, last training loss and wall time.

    python scripts/ddp_smoke.py                                   # all configs, cpu-ddp, 4 steps
    python scripts/ddp_smoke.py --precision bf16-mixed            # the same under CPU autocast
    python scripts/ddp_smoke.py --configs configs/finetune/vqa.yaml --steps 10

Each run is `python -m tasks.cli fit --config CONFIG --config FRAGMENT ...` in WORKDIR, so the
built-in dataset (data/synth) and the runs (runs/...) are made there, not in the checkout. Runs
validate on a couple of batches at the end, so the distributed validation path is exercised too.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    "configs/pretrain/tiny.yaml",
    "configs/finetune/vqa.yaml",
    "configs/finetune/nlvr2.yaml",
    "configs/finetune/caption.yaml",
    "configs/finetune/retrieval.yaml",
    "configs/lm/causal_en.yaml",
    "configs/lm/mlm_multilingual.yaml",
]


def last_metrics(run_dir: Path) -> dict:
    """Newest CSVLogger metrics.csv under run_dir: the last step and the last value of a train loss."""
    files = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    with open(files[-1]) as f:
        rows = list(csv.DictReader(f))
    out = {}
    for r in rows:
        if r.get("step"):
            out["step"] = int(r["step"]) + 1  # logged steps count from 0
        for k, v in r.items():  # the task loss (train/loss or train/<task>_loss), not the MoE aux loss
            if v and k.startswith("train/") and k.endswith("loss") and "moe" not in k:
                if k == "train/loss" or out.get("loss", ("",))[0] != "train/loss":
                    out["loss"] = (k, float(v))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=CONFIGS, help="configs to run (default: every shipped one)")
    p.add_argument("--trainer", default="configs/trainer/cpu-ddp.yaml", help="trainer fragment merged after each config")
    p.add_argument("--steps", type=int, default=4, help="training steps per run (default 4)")
    p.add_argument("--precision", default=None, help="override trainer.precision (e.g. bf16-mixed)")
    p.add_argument("--workdir", default="runs/ddp-smoke", help="where data/synth and runs/ are made")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run (default 900)")
    args = p.parse_args()

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows, failed = [], 0
    for i, cfg in enumerate(args.configs, 1):
        cmd = [sys.executable, "-m", "tasks.cli", "fit", "--config", str(ROOT / cfg), "--config", str(ROOT / args.trainer),
               f"--trainer.max_steps={args.steps}", "--trainer.limit_val_batches=2",
               f"--trainer.val_check_interval={args.steps}", "--trainer.check_val_every_n_epoch=null", "--trainer.enable_progress_bar=false",
               "--trainer.log_every_n_steps=1"]
        if args.precision:
            cmd.append(f"--trainer.precision={args.precision}")
        print(f"[{i}/{len(args.configs)}] {cfg} ...", flush=True)
        t0 = time.perf_counter()
        log_path = work / (Path(cfg).stem + ".log")
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        dt = time.perf_counter() - t0
        root_dir = (yaml.safe_load((ROOT / cfg).read_text()).get("trainer") or {}).get("default_root_dir") or "runs"
        m = last_metrics(work / root_dir)
        loss = f"{m['loss'][0]}={m['loss'][1]:.3f}" if "loss" in m else "-"
        rows.append((cfg, "ok" if rc == 0 else f"FAILED ({rc})", m.get("step", "-"), loss, f"{dt:.0f} s"))
        failed += rc != 0
        if rc != 0:
            print(f"    see {log_path}", flush=True)
    widths = [max(len(str(r[c])) for r in rows + [("config", "status", "step", "last train loss", "wall")]) for c in range(5)]
    for r in [("config", "status", "step", "last train loss", "wall")] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
