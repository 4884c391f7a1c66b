"""Two "nodes" of one CPU process each on 127.0.0.1, started the way a cluster starts them:
``torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --master-addr ... --master-port ...`` once
per node, each running ``mmmoe fit`` (``python -m tasks.cli fit``) with
``configs/trainer/multi-node.yaml`` (accelerator, devices and num_nodes overridden for CPU), as
the README's scaling section and the fragment describe. Lightning reads the rank layout from torchrun's
environment; nothing here launches ranks itself. A few steps of the tiny pretraining on small
built-in data, then checks that exactly one checkpoint (last.ckpt) was written, that it loads
weights-only, and that both nodes logged the same number of steps.

    PYTHONPATH=$PWD python scripts/multinode_localhost.py [--steps 4] [--expert-parallel 2] [--out DIR]

``--expert-parallel 2`` swaps in ``tasks.parallel.ExpertParallelStrategy`` (experts sharded over
the two nodes, sub-tokens by all-to-all across them); 1 (default) keeps the fragment's DDP.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmmoe.parallel import free_port  # noqa: E402


def write_config(out: Path, data: Path, steps: int) -> Path:
    from scripts.ep_vs_ddp import small_config

    cfg = small_config(data, out / "run", steps)
    cfg["model"]["init_args"]["optim"]["warmup_steps"] = 2
    t = cfg["trainer"]
    t["limit_val_batches"] = 0
    # one checkpoint: last.ckpt at the end (no periodic save inside the run, no best-by-val)
    t["callbacks"] = [c for c in t["callbacks"]
                      if c["class_path"].endswith("ModelCheckpoint") and c["init_args"].get("every_n_train_steps")]
    path = out / "multinode.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--expert-parallel", type=int, default=1)
    ap.add_argument("--out", default="/tmp/mmmoe-multinode")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "synth"
    from scripts.ep_vs_ddp import tiny_pretrain_data

    tiny_pretrain_data(data)
    cfg = write_config(out, data, args.steps)
    ckpt_dir = out / "run" / "checkpoints"
    for old in ckpt_dir.glob("*.ckpt"):
        old.unlink()
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    fit = ["-m", "tasks.cli", "fit", "--config", str(cfg), "--config", str(REPO / "configs/trainer/multi-node.yaml"),
           "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2"]
    if args.expert_parallel > 1:
        fit += ["--trainer.strategy", "tasks.parallel.ExpertParallelStrategy",
                "--trainer.strategy.expert_parallel", str(args.expert_parallel),
                "--trainer.strategy.process_group_backend", "gloo"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = []
    t0 = time.perf_counter()
    for node in range(2):
        cmd = torchrun + ["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                          "--master-addr", "127.0.0.1", "--master-port", str(port)] + fit
        if node == 0:
            print("$", " ".join(cmd), flush=True)
        log = open(out / f"node{node}.log", "w")
        procs.append((subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log))
    status = []
    try:
        for p, log in procs:
            status.append(p.wait(timeout=max(1.0, args.timeout - (time.perf_counter() - t0))))
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    wall = time.perf_counter() - t0
    if any(status):
        for node in range(2):
            print(f"--- node {node} (exit {status[node] if node < len(status) else '?'}) ---")
            print((out / f"node{node}.log").read_text()[-3000:])
        return 1
    ckpts = sorted(ckpt_dir.glob("*.ckpt"))
    from tasks.base import extract_state_dict, load_state_file

    obj = load_state_file(ckpts[0]) if ckpts else {}
    steps = obj.get("global_step")
    ok = len(ckpts) == 1 and steps == args.steps and bool(extract_state_dict(obj))
    print(f"2 nodes x 1 CPU process, {'EP ' + str(args.expert_parallel) if args.expert_parallel > 1 else 'DDP'}: "
          f"{wall:.0f} s; checkpoints written: {[c.name for c in ckpts]}; global_step in it: {steps}")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
