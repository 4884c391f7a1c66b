"""Evaluation through the Trainer's test loop: official result files and metrics, on one or many
processes.

Every task module (``tasks.base.MMMoEModule`` subclass with a ``TASK`` name) evaluates the same way,
whether it is called as ``mmmoe evaluate <task> --ckpt CKPT`` (which is LightningCLI ``test`` on the
run's saved config), as ``mmmoe test --config ...``, or from Python
(``module.evaluate_split(datamodule, split, out_dir)``, a one-process ``Trainer.test``):

1. ``OfficialEvaluation`` (a callback that ``mmmoe test`` / ``evaluate`` always add) tells the module
   which split it evaluates (``val`` or ``test``: which ground truth the module reads, ``eval_*`` or
   ``test_*`` hyperparameters) and where the result files go; for ``val`` the test loop runs over
   the data module's val loader. The module checks its ground-truth files before the first batch
   (``check_eval_inputs``).
2. ``test_step`` turns each batch into JSON-able records (``eval_records``: VQA
   ``{"question_id", "answer"}``, NLVR2 ``{"identifier", "prediction"}``, ...).
3. At the end of the epoch the records of every rank are gathered (JSON over ``all_gather``, no
   pickling), de-duplicated and sorted by the task's ``RECORD_KEY``, so one process and N processes
   see the same records in the same order. Rank 0 writes the official file(s) and scores them
   (``score_records``, with the task's trivial baseline) and writes ``metrics.json``; the metrics
   are broadcast so that every rank logs the same values and ``module.eval_metrics`` holds them.

An error on rank 0 while scoring (a missing ground-truth entry ...) reaches every rank, so no
process waits forever.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import pytorch_lightning as pl
import torch

from data_pipelines.formats.io import write_json

#: the splits an evaluation reads (the choices of ``mmmoe evaluate --split``)
SPLITS = ("val", "test")
RESULT_NAME = "metrics.json"
PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------ collectives
def _world(module: pl.LightningModule) -> int:
    trainer = module._trainer
    return int(trainer.world_size) if trainer is not None else 1


def gather_json(obj: Any, module: pl.LightningModule) -> List[Any]:
    """``obj`` (JSON-able) of every rank, in rank order; ``[obj]`` on one process. The objects
    travel as UTF-8 JSON in uint8 tensors (the uneven all-gather of ``tasks.contrastive``):
    nothing is unpickled."""
    if _world(module) <= 1:
        return [obj]
    from tasks.contrastive import all_gather_no_grad, gathered_sizes

    data = torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8).to(module.device)
    sizes = gathered_sizes(data.numel(), module.device)
    rows = all_gather_no_grad(data, sizes).cpu().split(sizes)  # every rank's bytes, in rank order
    return [json.loads(r.numpy().tobytes().decode("utf-8")) for r in rows]


def broadcast_json(obj: Any, module: pl.LightningModule) -> Any:
    """Rank 0's ``obj`` on every rank (JSON, as ``gather_json``)."""
    return gather_json(obj if module.global_rank == 0 else None, module)[0]


# ------------------------------------------------------------------------------ result files
class ResultFiles:
    """Where a task writes its official files: atomic JSON writes into one folder (rank 0 only)."""

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        return self.folder / name

    def json(self, name: str, obj: Any, indent: Optional[int] = 1) -> Path:
        """Write ``obj`` as ``name``; long official result lists go on one line (``indent=None``)."""
        return write_json(self.folder / name, obj, indent=indent)


def unique_sorted(records: List[Dict[str, Any]], key: Optional[str]) -> List[Dict[str, Any]]:
    """Records de-duplicated by ``key`` (first kept: a sample seen twice is scored once) and sorted
    by it; unchanged when ``key`` is None (aggregate records)."""
    if key is None:
        return records
    seen: Dict[Any, Dict[str, Any]] = {}
    for r in records:
        seen.setdefault(r[key], r)
    return [seen[k] for k in sorted(seen)]


def finish_evaluation(module: Any) -> Dict[str, float]:
    """Gather the records of every rank, let rank 0 write + score them, share the metrics (see the
    module docstring). Sets ``module.eval_metrics`` and logs every metric."""
    parts = gather_json(module._eval_records, module)
    records = unique_sorted([r for part in parts for r in part], module.RECORD_KEY)
    module._eval_records = []
    payload: Dict[str, Any] = {}
    if module.global_rank == 0:
        try:
            if not records:
                raise ValueError(f"the {module.evaluated_split} split of the data module produced nothing to evaluate")
            out = ResultFiles(module.results_dir or ".")
            metrics = {k: float(v) for k, v in module.score_records(records, module.evaluated_split, out).items()}
            out.json(RESULT_NAME, metrics)
            payload = {"metrics": metrics}
        except Exception as exc:  # reaches every rank below, then raised everywhere
            if _world(module) <= 1:
                raise
            payload = {"error": f"{type(exc).__name__}: {exc}"}
    payload = broadcast_json(payload, module)
    if "error" in payload:
        raise RuntimeError(f"evaluation failed on rank 0: {payload['error']}")
    metrics = payload["metrics"]
    module.eval_metrics = metrics
    for name, value in metrics.items():
        module.log(name, value, sync_dist=False, rank_zero_only=False)
    return metrics


# ------------------------------------------------------------------------------ the callback
class OfficialEvaluation(pl.Callback):
    """Configures the test loop as an official evaluation (see the module docstring).

    Args:
        split: ``val`` (the data module's val loader; ground truth from the module's ``eval_*``
            hyperparameters) or ``test`` (its test loader; ``test_*``).
        out_dir: folder of the official result files and ``metrics.json`` (default: the trainer's
            ``default_root_dir``/eval-<task>-<split>).
        options: evaluation options of the task (caption: beam_size / max_len / length_penalty;
            language models: seed, baseline).
    """

    def __init__(self, split: str = "test", out_dir: Optional[str] = None, options: Optional[Dict[str, Any]] = None):
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is invalid: allowed {', '.join(SPLITS)}")
        self.split = split
        self.out_dir = out_dir
        self.options = dict(options or {})
        self._patched: Optional[Any] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "test":
            return
        task = getattr(pl_module, "TASK", None) or type(pl_module).__name__.lower()
        pl_module.evaluated_split = self.split
        pl_module.results_dir = self.out_dir or os.path.join(trainer.default_root_dir, f"eval-{task}-{self.split}")
        pl_module.eval_options = dict(self.options)
        check = getattr(pl_module, "check_eval_inputs", None)
        if callable(check):
            check(self.split)
        dm = trainer.datamodule
        if dm is None:
            return
        loader = (dm.val_dataloader if self.split == "val" else dm.test_dataloader)()
        if loader is None or (isinstance(loader, (list, tuple)) and len(loader) == 0):
            raise ValueError(f"the data module has no {self.split} split: set data.init_args.{self.split} (its shards)")
        if self.split == "val":
            # the test loop runs over the val loader (an instance attribute shadows the method)
            self._patched = dm
            dm.test_dataloader = dm.val_dataloader

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._patched is not None and "test_dataloader" in vars(self._patched):
            del self._patched.test_dataloader
        self._patched = None


def split_loader(datamodule: Any, split: str) -> Optional[Any]:
    """One pass over ``datamodule``'s ``split`` ("train", "val" or "test") outside the Trainer's
    loops (the training-data statistics of a baseline), set up on first use; None when the data
    module has no such split."""
    if split not in ("train", *SPLITS):
        raise ValueError(f"split={split!r} is invalid: allowed train, {', '.join(SPLITS)}")
    pipelines = getattr(datamodule, "pipelines", None)
    if pipelines is not None and split not in pipelines:
        datamodule.setup("fit" if split == "train" else "validate" if split == "val" else "test")
    if callable(getattr(datamodule, "_loader", None)):  # mmmoe data modules: the loader or None
        loader = datamodule._loader(split)
    else:
        loader = getattr(datamodule, f"{split}_dataloader")()
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    return loader


def run_test(module: Any, datamodule: Any, split: str, out_dir: PathLike, accelerator: Optional[str] = None,
             **options: Any) -> Dict[str, float]:
    """One-process evaluation from Python: ``Trainer.test`` with ``OfficialEvaluation`` on the
    module's device, no logger, no checkpoints. Returns the metrics (also in ``out_dir/metrics.json``)."""
    from tasks.fit_cli import MMMoETrainer

    if accelerator is None:
        accelerator = "gpu" if module.device.type == "cuda" else "cpu"
    trainer = MMMoETrainer(
        accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, callbacks=[OfficialEvaluation(split, str(out_dir), options)],
        precision="32-true" if accelerator == "cpu" else "auto", default_root_dir=str(out_dir),
    )
    from tasks.base import eval_mode

    with eval_mode(module):  # (the test loop leaves the module in eval mode)
        trainer.test(module, datamodule=datamodule, verbose=False)
    return dict(module.eval_metrics)
