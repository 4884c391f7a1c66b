"""Expert parallelism vs plain DDP on the same data: a tiny pretraining run with
``configs/trainer/cpu-ep.yaml`` (2 CPU processes, gloo, EP degree 2) and the same run with plain
DDP (2 CPU processes, gloo); prints both loss curves side by side, the largest difference, the
largest difference of the final weights, and validates the EP checkpoint in ONE process
(``mmmoe validate`` with ``configs/trainer/cpu.yaml``: the checkpoint holds the full experts, is
loaded weights-only and strictly), then checks that it loads at EP degree 1 with the same keys
and shapes as the DDP checkpoint.

    PYTHONPATH=$PWD python scripts/ep_vs_ddp.py [--steps 12] [--out /tmp/ep_vs_ddp] [--tol 1e-4]

Exit status 1 when a curve or weight difference exceeds ``--tol`` (float32 on CPU: the two runs
differ only by summation order in the gradient all-reduce and the all-to-all, ~1e-6 per step).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmmoe.parallel import free_port  # noqa: E402

from tasks.fit_cli import replace_in_config as swap  # noqa: E402

PRETRAIN_SETS = ("pretrain-image-text", "pretrain-image", "pretrain-text-en", "pretrain-image-text-val")


def tiny_pretrain_data(data: Path) -> None:
    """A small built-in dataset (40 images, vocabulary 300) in ``data`` for the 2-process scripts."""
    from tasks.fit_cli import prepare_builtin_data

    wanted = {"tok": str(data / "tokenizer.model"),
              "shards": [str(data / "shards" / f"{n}.manifest.json") for n in PRETRAIN_SETS]}
    prepare_builtin_data(wanted, data, log=print, num_images=40, image_size=64, vocab_size=300)


def small_config(data: Path, run_dir: Path, steps: int) -> dict:
    """configs/pretrain/tiny.yaml on ``data`` with a 2-block model, batches of 8, ``steps`` steps,
    the CSV logger only and no progress bar or model summary."""
    cfg = yaml.safe_load((REPO / "configs/pretrain/tiny.yaml").read_text())
    cfg = swap(swap(cfg, "data/synth", str(data)), "runs/pretrain-tiny", str(run_dir))
    cfg["builtin_data"] = str(data)
    cfg["model"]["init_args"]["backbone"]["depth"] = 2
    cfg["data"]["init_args"].update(batch_size=8, num_workers=0, epoch_samples=400, shuffle_buffer=50)
    t = cfg["trainer"]
    t.update(max_steps=steps, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False)
    t["logger"] = [lg for lg in t["logger"] if lg["class_path"].endswith("CSVLogger")]
    return cfg


def write_config(out: Path, data: Path, name: str, steps: int) -> Path:
    cfg = small_config(data, out / name, steps)
    cfg["model"]["init_args"]["optim"].update(lr=3e-3, warmup_steps=5)
    t = cfg["trainer"]
    # no validation in the 2-process runs: the small held-out set is one shard, which one rank would
    # not read (see configs/trainer/cpu-ep.yaml); the EP checkpoint is validated in one process below
    t.update(val_check_interval=steps, limit_val_batches=0 if name != "eval" else 2)
    t["callbacks"] = [c for c in t["callbacks"] if not c["class_path"].endswith("ProgressBar")]
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


DDP_FRAGMENT = dict(trainer=dict(accelerator="cpu", devices=2, num_nodes=1, use_distributed_sampler=False,
                                 strategy=dict(class_path="pytorch_lightning.strategies.DDPStrategy",
                                               init_args=dict(process_group_backend="gloo"))))


def run(cmd, timeout: float) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    t0 = time.perf_counter()
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=REPO, timeout=timeout, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
        raise SystemExit(f"command failed with status {proc.returncode}")
    return time.perf_counter() - t0


def losses(run_dir: Path):
    files = sorted((run_dir / "csv").glob("version_*/metrics.csv"))
    with open(files[-1]) as f:
        rows = list(csv.DictReader(f))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="/tmp/mmmoe-ep-vs-ddp")
    ap.add_argument("--reuse", action="store_true", help="keep a finished run found in --out instead of repeating it")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest allowed |loss difference| and |weight difference|")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "synth"
    tiny_pretrain_data(data)
    py = sys.executable
    ddp_frag = out / "ddp-cpu.yaml"
    ddp_frag.write_text(yaml.safe_dump(DDP_FRAGMENT))
    times = {}
    for name, frag in (("ep", REPO / "configs/trainer/cpu-ep.yaml"), ("ddp", ddp_frag)):
        cfg = write_config(out, data, name, args.steps)
        if args.reuse and (out / name / "checkpoints" / "last.ckpt").exists():
            times[name] = float("nan")
            continue
        for old in (out / name).glob("csv/version_*/metrics.csv"):
            old.unlink()
        times[name] = run([py, "-m", "tasks.cli", "fit", "--config", str(cfg), "--config", str(frag)], 900)
    ep, ep_rows = losses(out / "ep")
    ddp, _ = losses(out / "ddp")
    print("\nstep  train/loss EP-2        plain DDP          |diff|")
    worst = 0.0
    for step in sorted(set(ep) | set(ddp)):
        a, b = ep.get(step, float("nan")), ddp.get(step, float("nan"))
        d = abs(a - b)
        worst = max(worst, d) if d == d else float("inf")
        print(f"{step:4d}  {a:.7f}  {b:.7f}  {d:.2e}")
    print(f"largest loss difference over {len(ep)} steps: {worst:.3g} (tolerance {args.tol:g}); "
          f"wall time EP {times['ep']:.0f} s, DDP {times['ddp']:.0f} s")
    acts = [r for r in ep_rows if r.get("train/image_text/expert_activation")]
    if acts:
        print(f"group-wide expert activation logged by EP at step {acts[-1]['step']}: "
              f"{float(acts[-1]['train/image_text/expert_activation']):.3f}")

    from tasks.base import extract_state_dict, load_state_file

    ck_ep = out / "ep" / "checkpoints" / "last.ckpt"
    ck_ddp = out / "ddp" / "checkpoints" / "last.ckpt"
    sd_ep = extract_state_dict(load_state_file(ck_ep))
    sd_ddp = extract_state_dict(load_state_file(ck_ddp))
    assert sorted(sd_ep) == sorted(sd_ddp), "EP and DDP checkpoints hold different keys"
    shapes = [k for k in sd_ep if sd_ep[k].shape != sd_ddp[k].shape]
    assert not shapes, f"EP checkpoint shapes differ from the single-device model: {shapes[:4]}"
    wdiff = max(float((sd_ep[k].float() - sd_ddp[k].float()).abs().max()) for k in sd_ep if sd_ep[k].numel())
    print(f"largest |weight difference| EP vs DDP after {args.steps} steps: {wdiff:.3g}")

    # the EP checkpoint in one process: Lightning validate (strict, weights-only through AtomicCheckpointIO)
    cfg = write_config(out, data, "eval", args.steps)
    times["validate"] = run([py, "-m", "tasks.cli", "validate", "--config", str(cfg), "--config",
                             str(REPO / "configs/trainer/cpu.yaml"), "--ckpt_path", str(ck_ep)], 600)
    _, rows = losses(out / "eval") if (out / "eval" / "csv").exists() else (None, [])
    val = [r for r in rows if r.get("val/loss")]
    print(f"EP checkpoint validated in one process: val/loss {float(val[-1]['val/loss']):.4f}" if val
          else "EP checkpoint validated in one process")
    ok = worst <= args.tol and wdiff <= args.tol
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
