"""Helpers for end-to-end ``mmmoe fit`` runs in tests (test_resume.py): tiny pretraining and VQA
configs made from the shipped YAML files, with their paths moved to a temporary folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import yaml

from tasks.fit_cli import replace_in_config as _swap

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "configs" / "pretrain" / "tiny.yaml"
VQA = REPO / "configs" / "finetune" / "vqa.yaml"
DATA_SETS = ("pretrain-image-text", "pretrain-image", "pretrain-text-en", "pretrain-image-text-val",
             "vqa-train2014", "vqa-val2014")




def make_config(kind: str, out: Path, data: Path, max_steps: int, workers: int = 0, every: int = 4,
                extra_callbacks: Optional[List[Dict[str, Any]]] = None, name: str = "run") -> Path:
    """A tiny ``kind`` ("pretrain" or "vqa") config writing to ``out``: 2 blocks, batch 4, a
    checkpoint (and last.ckpt) every ``every`` steps, validation every 6 steps."""
    src = PRETRAIN if kind == "pretrain" else VQA
    cfg = yaml.safe_load(src.read_text())
    run_dir = "runs/pretrain-tiny" if kind == "pretrain" else "runs/finetune-vqa"
    cfg = _swap(_swap(cfg, "data/synth", str(data)), run_dir, str(out))
    cfg["model"]["init_args"]["backbone"]["depth"] = 2
    cfg["model"]["init_args"]["optim"]["warmup_steps"] = 3
    d = cfg["data"]["init_args"]
    d.update(batch_size=4, num_workers=workers, shuffle_buffer=20)
    if kind == "pretrain":
        d.update(epoch_samples=40)  # 10 steps per epoch: runs cross epoch boundaries
    t = cfg["trainer"]
    t.update(max_steps=max_steps, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
             logger=False, accelerator="cpu")
    t.pop("val_check_interval", None)
    if kind == "pretrain":
        t.update(val_check_interval=6, limit_val_batches=1)
    else:
        t.update(check_val_every_n_epoch=1, limit_val_batches=1)
    callbacks = [c for c in t["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    ck = callbacks[0]["init_args"]
    callbacks[0]["init_args"] = dict(dirpath=ck["dirpath"], filename="step{step:04d}", auto_insert_metric_name=False,
                                     every_n_train_steps=every, save_top_k=-1, save_last=True)
    t["callbacks"] = callbacks[:1] + list(extra_callbacks or [])
    path = out.parent / f"{out.name}-{name}.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def weights(path: Path) -> Dict[str, torch.Tensor]:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return ck["state_dict"]


def assert_bitwise_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    worst = max((float((a[k].float() - b[k].float()).abs().max()) for k in bad), default=0.0)
    assert not bad, f"{len(bad)} of {len(a)} tensors differ (max abs difference {worst:.3g}), e.g. {bad[:3]}"


import os as _os
import signal as _signal

import pytorch_lightning as _pl


class KillAtStepCallback(_pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            _os.kill(_os.getpid(), _signal.SIGKILL)


def kill_callback(step: int) -> Dict[str, Any]:
    return {"class_path": "tests.fitruns.KillAtStepCallback", "init_args": {"step": step}}
