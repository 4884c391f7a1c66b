"""``mmmoe fit | validate | test``: LightningCLI over YAML configs.

    mmmoe fit --config configs/pretrain/tiny.yaml
    mmmoe fit --config configs/pretrain/tiny.yaml --config configs/model/smoe.yaml --config configs/trainer/cpu.yaml
    mmmoe fit --config configs/pretrain/tiny.yaml --ckpt_path last        # resume
    mmmoe fit --config configs/pretrain/tiny.yaml --trainer.max_steps 50 --data.init_args.batch_size 8
    mmmoe fit --config configs/pretrain/tiny.yaml --model.init_args.backbone.depth 2 --model.init_args.optim.lr 5e-4
    mmmoe fit --help ;  mmmoe fit --model.help tasks.pretrain.PretrainModule   # every backbone / optim field

The CLI runs in subclass mode: ``model:`` and ``data:`` take ``class_path`` + ``init_args`` (any
``tasks.base.MMMoEModule`` subclass and any LightningDataModule); ``trainer:`` takes the options of
``pytorch_lightning.Trainer``. Several ``--config`` files are merged in order, so a model or
trainer fragment (``configs/model/*.yaml``, ``configs/trainer/*.yaml``) overrides what the
base config says. What this CLI adds to the stock LightningCLI:

* ``trainer.precision: auto`` (the default): ``bf16-mixed`` when the run uses a CUDA GPU that
  supports bfloat16 (``16-mixed`` on older GPUs), ``32-true`` otherwise (CPU, MPS).
  ``MMMoETrainer`` resolves it before the Trainer is built; any explicit precision is kept.
* ``tasks.fit_cli.ModelCheckpoint`` (used by the configs) also saves ``last.ckpt`` at the end of
  training, so ``--ckpt_path last`` resumes from the final step.
* Checkpoints are written atomically and loaded weights-only: ``tasks.base.AtomicCheckpointIO``
  is added as the checkpoint plugin unless the config names another CheckpointIO plugin.
* ``--ckpt_path last`` resumes from the newest checkpoint that loads (``last*.ckpt`` first; a
  truncated or corrupt one is skipped with a warning), see ``tasks.robust``.
* ``tasks.robust.RNGStateCallback`` (random states in checkpoints, for exact resume) and
  ``tasks.robust.NonFiniteGuard`` (NaN / Inf steps skipped and counted, the run stopped after
  10 in a row) are added to every run unless the config lists them.
* ``builtin_data`` (default ``data/synth``): configured model/data paths under that folder which
  do not exist yet are generated before anything is built (the built-in dataset of
  ``mmmoe data synth``, its tokenizer ``tokenizer.model``, and the held-out image-text set
  ``shards/pretrain-image-text-val``). Set it to null to switch this off.
* No ``--optimizer`` / ``--lr_scheduler`` options: the modules configure AdamW with warmup +
  cosine themselves (``model.init_args.optim``: lr, weight_decay, warmup_steps ...,
  ``tasks.base.OptimSpec``).
* The backbone is ``model.init_args.backbone`` (``mmmoe.models.BackboneSpec``: preset, variant and
  any ModelConfig field; ``backbone.moe``: any MoEConfig field); ``mmmoe fit --model.help
  tasks.vqa.VQAModule`` lists every field of a task. Config files merge field by field, so a
  fragment such as ``configs/model/smoe.yaml`` changes only the fields it names. A value that
  parses but is invalid (``--model.init_args.backbone.dim -3``) is reported before anything is
  built, naming the field.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, List, Literal, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning_fabric.plugins.precision.precision import _PRECISION_INPUT
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar
from pytorch_lightning.cli import SaveConfigCallback
from jsonargparse import Namespace, set_parsing_settings
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from tasks.base import AtomicCheckpointIO, MMMoEModule
from tasks.robust import NonFiniteGuard, RNGStateCallback, newest_loadable_checkpoint

# the field docstrings of dataclasses (BackboneSpec, OptimSpec) become their --help texts
set_parsing_settings(docstring_parse_attribute_docstrings=True)

BUILTIN_ROOT = "data/synth"
#: what ``mmmoe data synth --out DIR`` uses when run without options
BUILTIN_PARAMS = dict(num_images=300, seed=0, image_size=96)
BUILTIN_VOCAB_SIZE = 1000
TOKENIZER_NAME = "tokenizer.model"
VAL_IMAGE_TEXT = "pretrain-image-text-val"
#: paths in example configs (configs/pretrain/base.yaml) that the user must replace
PLACEHOLDER = "/path/to/"


def replace_in_config(obj: Any, old: str, new: str) -> Any:
    """A copy of a loaded YAML config (nested dicts / lists) with ``old`` replaced by ``new`` in
    every string: moves a config's paths (e.g. ``data/synth`` -> a temporary folder)."""
    if isinstance(obj, str):
        return obj.replace(old, new)
    if isinstance(obj, dict):
        return {k: replace_in_config(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [replace_in_config(v, old, new) for v in obj]
    return obj


# ------------------------------------------------------------------------------ precision
def resolve_precision(precision: Any, accelerator: Any = "auto") -> Any:
    """``"auto"`` -> ``"bf16-mixed"`` on a CUDA GPU with bfloat16 (``"16-mixed"`` without),
    ``"32-true"`` on anything else. Other values are returned unchanged."""
    if precision != "auto":
        return precision
    if isinstance(accelerator, str):
        name = accelerator.lower()
    else:  # an Accelerator object
        name = "cuda" if "cuda" in type(accelerator).__name__.lower() else "other"
    if name in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


class MMMoETrainer(pl.Trainer):
    """``pytorch_lightning.Trainer`` with ``precision="auto"`` (see ``resolve_precision``),
    ``tasks.base.AtomicCheckpointIO`` as the default checkpoint plugin, ``RNGStateCallback`` and
    ``NonFiniteGuard`` (tasks/robust.py) added unless given, and ``fit(ckpt_path="last")`` taking
    the newest checkpoint that loads. Every other argument is the Trainer's."""

    def __init__(
        self,
        *args: Any,
        precision: Optional[Union[_PRECISION_INPUT, Literal["auto"]]] = "auto",
        plugins: Optional[Any] = None,
        **kwargs: Any,
    ):
        """
        Args:
            precision: ``auto`` (bf16-mixed on CUDA GPUs, 32-true otherwise) or any Trainer precision.
            plugins: Trainer plugins; an AtomicCheckpointIO is added unless one CheckpointIO is given.

        With ``enable_progress_bar=False`` progress-bar callbacks in ``callbacks`` are dropped;
        otherwise the progress bar is a ``StepProgressBar`` (Lightning's ``TQDMProgressBar`` is
        replaced by it).
        """
        resolved = resolve_precision(precision, kwargs.get("accelerator", "auto"))
        callbacks = kwargs.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if kwargs.get("enable_progress_bar") is False:
            # so that --trainer.enable_progress_bar false works with a config that lists a progress bar
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        else:  # Lightning's default bar counts batches per epoch; ours counts steps when max_steps bounds the run
            callbacks = [StepProgressBar(c.refresh_rate, c.process_position, c._leave) if type(c) is TQDMProgressBar
                         else c for c in callbacks]
            if not any(isinstance(c, ProgressBar) for c in callbacks):
                callbacks.append(StepProgressBar())
        kwargs["callbacks"] = with_robust_callbacks(callbacks)
        super().__init__(*args, precision=resolved, plugins=with_atomic_checkpoints(plugins), **kwargs)

    def fit(self, *args: Any, ckpt_path: Optional[str] = None, **kwargs: Any) -> None:
        """``Trainer.fit``; ``ckpt_path="last"`` is the newest checkpoint in the checkpoint folders
        that loads and can resume (``tasks.robust.newest_loadable_checkpoint``); without one,
        training starts from scratch, as Lightning does."""
        if ckpt_path == "last":
            folders = [getattr(c, "dirpath", None) for c in self.checkpoint_callbacks]
            folders.append(os.path.join(self.default_root_dir, "checkpoints"))
            found = newest_loadable_checkpoint(folders)
            if found is not None:
                ckpt_path = str(found)
        return super().fit(*args, ckpt_path=ckpt_path, **kwargs)


def with_robust_callbacks(callbacks: List[Any]) -> List[Any]:
    """``callbacks`` plus a ``RNGStateCallback`` and a ``NonFiniteGuard`` where missing."""
    out = list(callbacks)
    for cls in (RNGStateCallback, NonFiniteGuard):
        if not any(isinstance(c, cls) for c in out):
            out.append(cls())
    return out


def with_atomic_checkpoints(plugins: Any) -> List[Any]:
    """``plugins`` as a list, with an ``AtomicCheckpointIO`` appended when it holds no CheckpointIO."""
    if plugins is None:
        plugins = []
    elif not isinstance(plugins, (list, tuple)):
        plugins = [plugins]
    plugins = list(plugins)
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


class ModelCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint; with ``save_last`` it also writes ``last.ckpt`` at the final
    step when training stops between two periodic saves. (The stock callback writes it at the end
    only when it has never saved before, so ``--ckpt_path last`` would go back to the last
    periodic save.) At ``max_steps`` the save happens in the last batch's hook, where a periodic
    save would, so a resumed run continues the logged step count exactly; other stops (max_epochs,
    max_time, early stopping) save when training ends."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 < trainer.max_steps <= trainer.global_step:
            self._save_last_now(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_last_now(trainer)

    def _save_last_now(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, except for runs bounded by ``max_steps``: one training bar for
    the whole run, optimiser steps done / ``max_steps`` (the epoch in its description), instead of
    a per-epoch bar whose total (an estimate for streaming data) changes every epoch. A resumed
    run starts the bar at its restored step. Runs bounded by epochs keep Lightning's bar."""

    def _by_steps(self, trainer: pl.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self._by_steps(trainer):
            return super().on_train_epoch_start(trainer, *args)
        bar = self._train_progress_bar
        if bar is None:
            bar = self.train_progress_bar = self.init_train_tqdm()
        if bar.total != trainer.max_steps:  # the first epoch of this run (or of a resumed one)
            bar.reset(total=trainer.max_steps)
            bar.initial = 0
            bar.n = trainer.global_step
        bar.set_description(f"Epoch {trainer.current_epoch}")
        bar.refresh()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._by_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, n = self.train_progress_bar, trainer.global_step
        if bar is not None and self.is_enabled and (n % self.refresh_rate == 0 or n >= trainer.max_steps) and bar.n != n:
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._by_steps(trainer):
            return super().on_train_epoch_end(trainer, pl_module)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class RunConfigSaver(SaveConfigCallback):
    """LightningCLI's config saving (``config.yaml`` in the logger's folder), plus, when fitting, a
    copy in every checkpoint folder: ``mmmoe evaluate <task> --ckpt DIR/last.ckpt`` finds the
    configuration of the run next to its checkpoints (overrides given on the command line included)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # (not in setup: ModelCheckpoint would then warn that its folder is not empty)
        if not trainer.is_global_zero:
            return
        for folder in sorted({cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}):
            os.makedirs(folder, exist_ok=True)
            self.parser.save(self.config, os.path.join(folder, self.config_filename), skip_none=False,
                             overwrite=True, multifile=False)


# ------------------------------------------------------------------------------ built-in data
class MissingDataError(FileNotFoundError):
    """A configured path under the built-in data folder that cannot be generated."""


class InvalidConfigError(ValueError):
    """A value that parses but is invalid (e.g. ``model.init_args.backbone.dim: -3``)."""


def check_model_specs(model: Any) -> None:
    """Build the ``backbone`` / ``optim`` specs of a parsed ``model:`` section (a Namespace or
    dict) so a wrong value is reported, naming its field, before anything is instantiated."""
    from mmmoe.models import BackboneSpec
    from tasks.base import OptimSpec

    init = model.get("init_args") if hasattr(model, "get") else None
    if init is None:
        return
    for key, spec in (("backbone", BackboneSpec), ("optim", OptimSpec)):
        value = init.get(key)
        if value is None:
            continue
        if isinstance(value, Namespace):
            value = value.as_dict()
        try:
            spec.coerce(value)
        except ValueError as exc:
            raise InvalidConfigError(f"model.init_args.{key}: {exc}") from None


def _strings(obj: Any) -> Iterable[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)
    elif hasattr(obj, "items"):  # a jsonargparse Namespace
        for _, v in obj.items():
            yield from _strings(v)


def _first_path(s: str) -> str:
    """A brace pattern's first expansion (``x-{000000..000003}.tar`` -> ``x-000000.tar``)."""
    if "{" not in s:
        return s
    from webdataset.shardlists import expand_urls

    return next(iter(expand_urls(s)), s)


def _under(path: str, root: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
        return True
    except ValueError:
        return False


def missing_builtin_paths(values: Any, root: Union[str, os.PathLike]) -> List[str]:
    """The strings inside ``values`` (nested dicts/lists/namespaces) that name a path under
    ``root`` which does not exist."""
    root = Path(root)
    out = []
    for s in _strings(values):
        if "://" in s or not s.strip():
            continue
        for part in s.split("::"):
            if _under(part, root) and not Path(_first_path(part)).exists():
                out.append(part)
    return sorted(set(out))


def prepare_builtin_data(
    values: Any,
    root: Union[str, os.PathLike] = BUILTIN_ROOT,
    log: Callable[[str], None] = print,
    wait_s: float = 1800.0,
    vocab_size: int = BUILTIN_VOCAB_SIZE,
    **builtin_params: Any,
) -> List[str]:
    """Make the configured paths under ``root`` that are missing: the built-in dataset
    (``data_pipelines.builtin.make_builtin_dataset``, parameters as ``mmmoe data synth``), the
    tokenizer ``root/tokenizer.model`` (``train_tokenizer`` on ``root/text`` and
    ``root/text/multilingual``, ``vocab_size`` 1000) and the held-out image-text shard set
    ``root/shards/pretrain-image-text-val`` (Karpathy val split). Prints what it does and returns
    the paths it made. ``builtin_params`` (num_images, seed, image_size, shard_size) go to
    make_builtin_dataset. Only rank 0 writes; other ranks wait for the files.

    Raises MissingDataError (a FileNotFoundError) naming the paths that are still missing afterwards (a path under
    ``root`` that none of these produce, e.g. a typo)."""
    root = Path(root)
    missing = missing_builtin_paths(values, root)
    if not missing:
        return []
    from data_pipelines.readers import is_rank_zero

    if not is_rank_zero():
        deadline = time.monotonic() + wait_s
        while missing_builtin_paths(values, root):
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {wait_s:.0f}s for rank 0 to make {missing}")
            time.sleep(2.0)
        time.sleep(2.0)
        return []
    params = {**BUILTIN_PARAMS, **builtin_params}
    shards = root / "shards"
    tok = root / TOKENIZER_NAME
    val_prefix = str(shards / VAL_IMAGE_TEXT)
    needs_tok = any(os.path.abspath(p) == os.path.abspath(tok) for p in missing)
    needs_val = any(os.path.abspath(p).startswith(os.path.abspath(val_prefix)) for p in missing)
    log(f"mmmoe: missing under {root}: {', '.join(missing)}")
    others = [p for p in missing if os.path.abspath(p) != os.path.abspath(tok)
              and not os.path.abspath(p).startswith(os.path.abspath(val_prefix))]
    index_path = shards / "index.json"
    index = None
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except ValueError:
            index = None
    if index is None:  # never made (or a broken index): make it
        remake = bool(others) or needs_val or needs_tok
    else:  # made: only remake when a shard set of its own went missing, with its own parameters
        params = {**params, **{k: v for k, v in index.get("params", {}).items() if k in params or k == "shard_size"}}
        own = [os.path.abspath(d.get("manifest", "")) for d in index.get("datasets", {}).values()]
        # a shard set of the current built-in layout that this (older) dataset lacks also remakes it
        remake = any(os.path.abspath(p) in own or (p.endswith(".manifest.json") and Path(p).parent == shards)
                     for p in others)
    if remake:
        from data_pipelines.builtin import make_builtin_dataset

        log(f"mmmoe: making the built-in dataset in {root} (as 'mmmoe data synth --out {root}': "
            f"{params['num_images']} images, seed {params['seed']}, image size {params['image_size']})")
        make_builtin_dataset(root, **params)
    if needs_tok:
        from data_pipelines.tokenizer import train_tokenizer

        inputs = [root / "text"] + ([root / "text" / "multilingual"] if (root / "text" / "multilingual").is_dir() else [])
        log(f"mmmoe: training the tokenizer {tok} on {', '.join(map(str, inputs))} (vocabulary {vocab_size})")
        train_tokenizer(inputs, root / "tokenizer", vocab_size=vocab_size)
    if needs_val:
        from data_pipelines.shards import write_karpathy_shards

        log(f"mmmoe: writing the held-out image-text shards {val_prefix}-*.tar (Karpathy val split)")
        write_karpathy_shards(root / "coco" / "dataset_coco.json", root / "coco", shards, splits=("val",),
                              kind="image_text", prefix=VAL_IMAGE_TEXT)
    still = missing_builtin_paths(values, root)
    if still:
        raise MissingDataError(
            f"configured path(s) {still} do not exist and are not part of the built-in dataset in {root} "
            f"(its shard sets are listed in {shards / 'index.json'})"
        )
    return missing


# ------------------------------------------------------------------------------ the CLI
class MMMoECLI(LightningCLI):
    """LightningCLI in subclass mode with ``MMMoETrainer`` and the ``builtin_data`` option."""

    def __init__(self, args: Optional[Sequence[str]] = None, run: bool = True, evaluation: Optional[Any] = None,
                 **kwargs: Any):
        """``evaluation``: the ``tasks.evaluation.OfficialEvaluation`` of a ``test`` run (``mmmoe
        evaluate`` passes one; without it ``test`` evaluates the test split into
        ``<ckpt folder>/eval-<task>-test``). A test run saves no config: it trains nothing."""
        self.evaluation = evaluation
        if args is not None and list(args[:1]) == ["test"]:
            kwargs.setdefault("save_config_callback", None)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        super().__init__(
            model_class=MMMoEModule,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_class=MMMoETrainer,
            auto_configure_optimizers=False,
            args=list(args) if args is not None else None,
            run=run,
            **kwargs,
        )

    def _parse_ckpt_path(self) -> None:
        """Lightning merges the hyperparameters stored in ``ckpt_path`` over the parsed config (with
        an unguarded ``torch.load``). Here the config alone builds the module, so command-line
        overrides keep their meaning (the run's saved config already holds the fit's values), and
        the checkpoint is read once, weights-only, by the Trainer (``AtomicCheckpointIO``)."""

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # the stock method warns whenever sys.argv is also set, which the mmmoe entry point always does
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.epilog = (
            "Model fields: --model.help CLASS (e.g. tasks.vqa.VQAModule) lists every argument of a task module, "
            "backbone.* (mmmoe.models.BackboneSpec: preset, variant, any ModelConfig field; backbone.moe.*: any "
            "MoEConfig field) and optim.* (tasks.base.OptimSpec: lr, weight_decay, betas, eps, warmup_steps, "
            "min_lr_ratio); set them as --model.init_args.backbone.depth 2 or in YAML.")
        parser.add_argument(
            "--builtin_data", type=Optional[str], default=BUILTIN_ROOT,
            help="Folder of the built-in dataset: configured model/data paths under it that are missing "
            "(shard manifests, tokenizer.model) are generated first. null switches this off.",
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        values = {"model": cfg.get("model"), "data": cfg.get("data")}
        if values["model"] is not None:
            check_model_specs(values["model"])
        placeholders = sorted({v for v in _strings(values) if PLACEHOLDER in v})
        if placeholders:
            raise MissingDataError(
                f"the config still has placeholder paths {placeholders}: replace them with your shard manifests / "
                "tokenizer (see the comments at the top of the config, or override with --data.init_args.<name>)"
            )
        root = cfg.get("builtin_data")
        if root:
            prepare_builtin_data(values, root)

    def before_test(self) -> None:
        """A test run is an official evaluation (``tasks.evaluation``): the ``OfficialEvaluation``
        given to the CLI, else one of the test split into ``<ckpt folder>/eval-<task>-test``."""
        from tasks.evaluation import OfficialEvaluation

        if any(isinstance(c, OfficialEvaluation) for c in self.trainer.callbacks):
            return
        evaluation = self.evaluation
        if evaluation is None:
            ckpt = self.config["test"].get("ckpt_path")
            task = getattr(self.model, "TASK", None) or type(self.model).__name__.lower()
            out = os.path.join(os.path.dirname(os.path.abspath(ckpt)), f"eval-{task}-test") if ckpt else None
            evaluation = OfficialEvaluation("test", out)
        self.trainer.callbacks.append(evaluation)


def run_cli(args: Sequence[str], evaluation: Optional[Any] = None) -> "MMMoECLI":
    """``MMMoECLI`` on ``args`` (``<fit|validate|test> ...``): what ``mmmoe fit`` / ``test`` /
    ``evaluate`` and the quickstart run, in this process. Returns the CLI (its trainer, model ...)."""
    return MMMoECLI(args=list(args), evaluation=evaluation)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``<fit|validate|test|predict> ...`` (argv starts with the subcommand); ``mmmoe fit``
    and ``python -m tasks.fit_cli fit`` (e.g. under torchrun) both end here."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        run_cli(args)
    except (MissingDataError, InvalidConfigError) as exc:
        print(f"mmmoe {args[0] if args else ''}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
