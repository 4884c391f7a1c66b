"""Non-finite steps, damaged checkpoints and random states (tasks/robust.py, tasks/base.py)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from tasks.base import AtomicCheckpointIO, load_state_file
from tasks.pretrain import PretrainModule
from tasks.robust import (NonFiniteGuard, NonFiniteTrainingError, RESUME_KEYS, newest_loadable_checkpoint,
                          rng_states, set_rng_states)

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(backbone=dict(depth=2, vocab_size=50, moe={"balancing": "aux_free"}),
             optim=dict(warmup_steps=0, min_lr_ratio=1.0))  # a constant learning rate


# ------------------------------------------------------------------------------ non-finite steps
def image_batch(seed: int, nan: bool = False):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 3, 64, 64, generator=g)
    if nan:
        image[0, :, :16, :16] = float("nan")
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2, :2] = True
    return {"image": image, "image_mask": mask}


class Snapshots(pl.Callback):
    """{steps done: module state} taken when the next batch starts (after every end-of-step hook,
    the module's aux-free bias update included)."""

    def __init__(self):
        self.states = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def train(batches, tmp: Path, guard: NonFiniteGuard):
    torch.manual_seed(0)
    module = PretrainModule(**SMALL)
    snaps = Snapshots()
    trainer = pl.Trainer(max_steps=len(batches), accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp),
                         callbacks=[guard, snaps], plugins=[AtomicCheckpointIO()], gradient_clip_val=1.0)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    return module, trainer, snaps, lambda: trainer.fit(module, train_dataloaders=loader)


def optimizer_state(trainer):
    return [{k: v.clone() for k, v in s.items()} for s in trainer.optimizers[0].state_dict()["state"].values()]


def test_nan_step_is_skipped_and_counted(tmp_path):
    good = [image_batch(i) for i in range(3)]
    m_ref, t_ref, _, run_ref = train(good, tmp_path / "ref", NonFiniteGuard())
    run_ref()
    m, t, snaps, run = train(good[:2] + [image_batch(9, nan=True)] + good[2:], tmp_path / "nan", NonFiniteGuard())
    run()
    assert t.global_step == 4 and t.logged_metrics["train/nonfinite_steps"] == 1
    # the NaN step changed nothing: parameters, aux-free expert biases, AdamW moments and step counts
    before, after = snaps.states[2], snaps.states[3]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(k.endswith("expert_bias") and before[k].abs().sum() > 0 for k in before)  # biases do move
    # ... and the run continues as if it had never seen that batch (constant learning rate)
    for k, v in m_ref.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k
    for a, b in zip(optimizer_state(t_ref), optimizer_state(t)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_consecutive_nan_steps_stop_with_last_good_checkpoint(tmp_path):
    batches = [image_batch(0), image_batch(1)] + [image_batch(9 + i, nan=True) for i in range(5)]
    m, t, snaps, run = train(batches, tmp_path, NonFiniteGuard(max_consecutive=3))
    with pytest.raises(NonFiniteTrainingError, match=r"3 consecutive steps .* non-finite.*nonfinite-step000004\.ckpt"):
        run()
    saved = load_state_file(tmp_path / "checkpoints" / "nonfinite-step000004.ckpt")
    good = snaps.states[2]  # after the last good step
    assert set(RESUME_KEYS) <= saved.keys()
    assert all(torch.equal(saved["state_dict"][k], good[k]) for k in good)
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=-1)


# ------------------------------------------------------------------------------ checkpoints
def write(path: Path, value: float = 1.0, **extra):
    ck = {"state_dict": {"w": torch.full((4096,), value), "b": torch.arange(7.0)}, "optimizer_states": [],
          "loops": {}, "global_step": int(value), **extra}
    AtomicCheckpointIO().save_checkpoint(ck, path)
    return ck


def test_truncated_checkpoint_names_file_and_problem(tmp_path):
    path = tmp_path / "last.ckpt"
    write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"last\.ckpt.* is truncated"):
        load_state_file(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"last\.ckpt"):
        load_state_file(path)


def test_corrupt_tensor_bytes_are_caught_by_the_checksum(tmp_path):
    path = tmp_path / "step.ckpt"
    write(path, value=3.0)
    data = bytearray(path.read_bytes())
    at = data.find(torch.full((4096,), 3.0).numpy().tobytes()[:64])  # inside the stored tensor
    assert at > 0
    data[at + 100] ^= 0x40
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["state_dict"]["w"][25] != 3.0  # torch alone loads it silently
    with pytest.raises(ValueError, match=r"step\.ckpt.* is corrupt: the CRC32"):
        load_state_file(path)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    write(path, value=1.0)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_disk_full(obj, f, *args, **kwargs):
        import io

        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: buf.tell() // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tasks.base.torch.save", half_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        write(path, value=2.0)
    assert path.read_bytes() == before and load_state_file(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_process_killed_mid_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    write(path, value=1.0)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import io, os, signal, torch
        import tasks.base as base
        real = torch.save
        def half_then_die(obj, f, *a, **k):
            buf = io.BytesIO(); real(obj, buf); f.write(buf.getvalue()[: buf.tell() // 2]); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        base.torch.save = half_then_die
        base.AtomicCheckpointIO().save_checkpoint({{"state_dict": {{"w": torch.zeros(4096)}}}}, {str(path)!r})
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=120, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.glob(".last.ckpt.*.tmp")]  # the half-written temporary file
    assert newest_loadable_checkpoint([tmp_path]) == path.resolve()


def test_last_resolves_to_newest_checkpoint_that_loads(tmp_path):
    write(tmp_path / "step2.ckpt", value=2.0)
    write(tmp_path / "step4.ckpt", value=4.0)
    write(tmp_path / "last.ckpt", value=4.0)
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "weights-only.ckpt")
    assert newest_loadable_checkpoint([tmp_path]) == (tmp_path / "last.ckpt").resolve()
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[:1000])
    t = (tmp_path / "last.ckpt").stat().st_mtime_ns
    for i, name in enumerate(("step2.ckpt", "step4.ckpt", "weights-only.ckpt")):  # oldest to newest
        os.utime(tmp_path / name, ns=(t + i + 1, t + i + 1))
    assert newest_loadable_checkpoint([tmp_path]) == (tmp_path / "step4.ckpt").resolve()
    assert newest_loadable_checkpoint([tmp_path / "missing"]) is None


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    AtomicCheckpointIO().save_checkpoint({"rng": rng_states()}, tmp_path / "rng.ckpt")
    first = (random.random(), np.random.rand(), float(torch.rand(())), np.random.randn())
    set_rng_states(load_state_file(tmp_path / "rng.ckpt")["rng"])
    assert (random.random(), np.random.rand(), float(torch.rand(())), np.random.randn()) == first
