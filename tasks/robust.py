"""Runs that survive what goes wrong: exact resume, non-finite steps, damaged checkpoints.

* ``RNGStateCallback`` saves the global random states (Python, NumPy, torch CPU and CUDA) in every
  checkpoint and restores them on resume, so draws made by the model (dropout, drop path) continue
  where the interrupted run was. The data streams do not use these states: every reader draws from
  its own generators, seeded by (seed, reader, epoch, rank, worker), and the data module saves
  how many batches of the epoch the training loop took (``data_pipelines.datamodules``).
* ``NonFiniteGuard`` skips an optimiser step whose loss or gradients are NaN / Inf (no parameter
  update, no optimiser-state update, no aux-loss-free bias update), counts the skipped steps in the
  logs (``train/nonfinite_steps``), and after ``max_consecutive`` bad steps in a row saves the last
  good state and stops with ``NonFiniteTrainingError``.
* ``newest_loadable_checkpoint`` is what ``--ckpt_path last`` resolves to (``MMMoETrainer.fit``):
  the newest checkpoint that loads (``last*.ckpt`` first), skipping damaged ones with a warning.

``MMMoETrainer`` (tasks/fit_cli.py) adds the two callbacks to every run unless the config lists
them (e.g. to set ``max_consecutive``).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

#: the keys a checkpoint needs to resume training (not only to initialise weights)
RESUME_KEYS = ("state_dict", "optimizer_states", "loops", "global_step")


# ------------------------------------------------------------------------------ random states
def rng_states() -> Dict[str, Any]:
    """The global random states as plain types and tensors (``torch.load(weights_only=True)``)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: Dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(state: Dict[str, Any]) -> None:
    """Restore what ``rng_states`` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint has CUDA RNG states of %d devices, this machine %d: not restored",
                        len(cuda), torch.cuda.device_count())


class RNGStateCallback(pl.Callback):
    """Saves the global random states (Python, NumPy, torch, CUDA) in checkpoints and restores
    them when training resumes from one. Each process saves and restores its own states (rank 0's
    are what the checkpoint holds; with DDP the model's random draws are per rank anyway)."""

    def state_dict(self) -> Dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if "rng" in state_dict:
            set_rng_states(state_dict["rng"])


# ------------------------------------------------------------------------------ non-finite steps
class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss or gradients."""


class NonFiniteGuard(pl.Callback):
    """Skips optimiser steps whose loss or gradients are not finite.

    Before each optimiser step (after backward, and after the DDP gradient all-reduce), the loss
    of the step and every gradient are checked; if any is NaN or Inf, on any rank, the gradients
    are dropped (``grad = None``), so AdamW changes neither the parameters nor its moments and
    step counts, and ``pl_module._skip_step`` is set for the rest of the step: the base module
    then skips the aux-loss-free balancing bias update. The step still counts as a step
    (``global_step`` and the learning-rate schedule advance, the data stream moves on).

    ``train/nonfinite_steps`` (the total so far) is logged every step. After ``max_consecutive``
    bad steps in a row, the current state (the last good parameters, since nothing bad was
    applied) is saved to ``<checkpoint dir>/nonfinite-step<N>.ckpt`` and the run stops with
    ``NonFiniteTrainingError``. ``max_consecutive=0`` never stops.

    With ``16-mixed`` precision the GradScaler already skips steps with overflowing gradients
    (and lowers its scale), so only the loss is checked there.
    """

    def __init__(self, max_consecutive: int = 10):
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._loss_bad = False
        self._last_loss = float("nan")

    def state_dict(self) -> Dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._loss_bad = False
        pl_module._skip_step = False

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if not finite:
            self._loss_bad = True
            self._last_loss = float(loss.detach().float().sum())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = self._loss_bad
        if not bad and params and getattr(trainer.precision_plugin, "scaler", None) is None:
            norms = torch._foreach_norm([p.grad for p in params])  # one pass, one host sync
            bad = not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)  # any rank: skip on all
        if not bad:
            self.consecutive = 0
            return
        for p in params:
            p.grad = None
        pl_module._skip_step = True
        self.skipped += 1
        self.consecutive += 1
        what = f"loss {self._last_loss}" if self._loss_bad else "non-finite gradients"
        log.warning("step %d: %s; optimiser step skipped (%d skipped so far, %d in a row)",
                    trainer.global_step, what, self.skipped, self.consecutive)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            path = self._stop_checkpoint_path(trainer)
            trainer.save_checkpoint(path)
            raise NonFiniteTrainingError(
                f"stopping at step {trainer.global_step}: {self.consecutive} consecutive steps had a non-finite loss "
                f"or gradients (the last: {what}); none of them was applied. The last good state is saved in {path} "
                "(resume with --ckpt_path). Lower the learning rate, check the data, or raise "
                "NonFiniteGuard.max_consecutive."
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        pl_module.log("train/nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False, reduce_fx="max")

    @staticmethod
    def _stop_checkpoint_path(trainer: pl.Trainer) -> str:
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(folder, f"nonfinite-step{trainer.global_step:06d}.ckpt")


# ------------------------------------------------------------------------------ checkpoints
def checkpoint_candidates(folders: Iterable[PathLike]) -> List[Path]:
    """The ``*.ckpt`` files in ``folders``: ``last*.ckpt`` first, each group newest first."""
    files = {p.resolve() for f in folders if f and Path(f).is_dir() for p in Path(f).glob("*.ckpt") if p.is_file()}

    def key(p: Path):
        return (not p.name.startswith("last"), -p.stat().st_mtime_ns, p.name)

    return sorted(files, key=key)


def newest_loadable_checkpoint(folders: Iterable[PathLike], require: Iterable[str] = RESUME_KEYS) -> Optional[Path]:
    """The first of ``checkpoint_candidates(folders)`` that loads (weights-only, checksum
    verified) and has the ``require`` keys; damaged ones are logged as warnings and skipped.
    None when no file qualifies."""
    from tasks.base import load_state_file

    for path in checkpoint_candidates(folders):
        try:
            ck = load_state_file(path)
        except (ValueError, OSError) as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
            continue
        missing = [k for k in require if k not in ck]
        if missing:
            log.warning("skipping checkpoint %s: no %s (not a training checkpoint)", path, ", ".join(missing))
            continue
        return path
    return None
