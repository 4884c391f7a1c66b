"""``mmmoe evaluate`` / ``mmmoe predict``: the task registry, checkpoint loading for prediction,
and single-input helpers.

``mmmoe evaluate <task> --ckpt CKPT [--split val|test] [--out DIR] [--config YAML ...] [overrides]``
is LightningCLI ``test`` (``tasks.fit_cli``) on the run's saved ``config.yaml`` (``mmmoe fit``
writes it into the checkpoint folder, with every command-line override of the fit), followed by
any ``--config`` files and LightningCLI overrides given here (``--trainer.devices 2 --trainer.strategy
ddp``, ``--model.init_args.eval_questions Q.json``, ``--data.init_args.num_workers 0``). The
Trainer's test loop evaluates (``tasks/evaluation.py``: the protocol every task module follows):
official result files of the split and ``metrics.json`` in ``--out`` (default
``<ckpt folder>/eval-<task>-<split>``), one file also on several processes; the metrics are printed
as JSON on stdout (progress and logs go to stderr).

``mmmoe predict <task> --ckpt CKPT --image IMG ...`` rebuilds the module from the checkpoint's
plain-typed ``hyper_parameters`` (:func:`load_task_module`, ``init_from`` dropped: the checkpoint
holds the fine-tuned weights) and runs its ``predict_one(image_path, **kwargs)``: ``--question`` ->
``question``, ``--sentence`` -> ``sentence``, ``--right-image`` -> ``right_image``, ``--top-k`` ->
``top_k``, ``--texts`` -> ``texts``, any ``--kw NAME=VALUE`` -> ``NAME`` (only those the method
accepts). A class may instead define ``predict_cli(self, args)`` (or its Python module a function
``predict_cli(module, args)``) to read the parsed command line itself.

Helpers for task modules: :func:`load_image` (one file -> 1 x 3 x S x S, the data modules' eval
transform and ImageNet normalisation, hostile files refused clearly), :func:`encode_text_batch` /
:func:`module_tokenizer` (text with the checkpoint's tokenizer), :func:`write_json` (atomic; ``data_pipelines.formats.io``).

CHECKPOINTS are only read weights-only (:func:`tasks.base.load_state_file`, also inside the
Trainer through ``tasks.base.AtomicCheckpointIO``): a file that needs unpickling is refused (exit
status 2) and nothing in it runs. ``--ckpt`` also takes a model folder written by ``mmmoe export``
(``evaluate`` then needs ``--config``; the folder's verified safetensors initialise the module).

Commands::

    mmmoe evaluate vqa --ckpt runs/finetune-vqa/checkpoints/last.ckpt
    mmmoe evaluate nlvr2 --ckpt CKPT --split test --out DIR
    mmmoe evaluate vqa --ckpt CKPT --trainer.devices 2 --trainer.strategy ddp --trainer.accelerator cpu
    mmmoe evaluate vqa --ckpt CKPT --model.init_args.eval_questions Q.json --model.init_args.eval_annotations A.json
    mmmoe predict vqa --ckpt CKPT --image photo.jpg --question "what color is the cat?" [--top-k 5] [--json]
    mmmoe predict nlvr2 --ckpt CKPT --image left.png --right-image right.png --sentence "..."
    mmmoe predict caption --ckpt CKPT --image photo.jpg [--kw beam_size=3]
    mmmoe predict retrieval --model DIR --image photo.jpg --texts "a red circle" "two squares"

Exit status: 0 on success, 2 on a refused checkpoint, a missing file or a wrong argument (one line
on stderr naming the problem; LightningCLI's own message for a wrong override).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from data_pipelines.formats.io import write_json  # noqa: F401 - the one atomic JSON writer (re-exported)

PathLike = Union[str, os.PathLike]

#: task name -> "python.module:Class"
TASKS: Dict[str, str] = {
    "vqa": "tasks.vqa:VQAModule",
    "nlvr2": "tasks.nlvr2:NLVR2Module",
    "caption": "tasks.captioning:CaptionModule",
    "lm": "tasks.lm:CausalLMModule",
    "mlm": "tasks.lm:MaskedLMModule",
    "retrieval": "tasks.retrieval:RetrievalModule",
}
SPLITS = ("val", "test")  # = tasks.evaluation.SPLITS (not imported: ``mmmoe --help`` stays free of Lightning)
TEXT_EMBEDDING = "backbone.text_embed.token_embed.weight"


class TaskUnavailableError(ImportError):
    """The module implementing a task cannot be imported."""


# ------------------------------------------------------------------------------ resolving tasks
def _import_class(spec: str) -> type:
    """``"package.module:Class"`` or ``"package.module.Class"`` -> the class."""
    if ":" in spec:
        mod_name, _, cls_name = spec.partition(":")
    else:
        mod_name, _, cls_name = spec.rpartition(".")
    if not mod_name or not cls_name:
        raise ValueError(f"{spec!r} is not a class path ('package.module.Class')")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name and mod_name.startswith(exc.name):
            raise TaskUnavailableError(f"{mod_name} is not available (module {exc.name!r} not found)") from None
        raise
    cls = getattr(mod, cls_name, None)
    if not isinstance(cls, type):
        raise TaskUnavailableError(f"{mod_name} has no class {cls_name!r}")
    return cls


def resolve_task(task_or_cls: Union[str, type]) -> type:
    """A task name (``vqa``, ...), a class path, or a class -> the module class."""
    if isinstance(task_or_cls, type):
        return task_or_cls
    if task_or_cls in TASKS:
        try:
            return _import_class(TASKS[task_or_cls])
        except TaskUnavailableError as exc:
            raise TaskUnavailableError(f"task {task_or_cls!r} is not available: {exc}") from None
    if "." in task_or_cls or ":" in task_or_cls:
        return _import_class(task_or_cls)
    raise ValueError(f"unknown task {task_or_cls!r}: choose one of {', '.join(TASKS)} or give a class path")


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ------------------------------------------------------------------------------ checkpoints
def load_task_module(task_or_cls: Union[str, type], ckpt_path: PathLike, map_location: str = "cpu") -> Any:
    """Rebuild a fine-tuned task module from a Lightning checkpoint, weights-only.

    Reads ``ckpt_path`` with ``tasks.base.load_state_file`` (never unpickles: a pickled file raises
    ``UnsafeCheckpointError``), builds the class from the checkpoint's ``hyper_parameters`` (plain
    types; ``init_from`` is dropped) and loads ``state_dict`` strictly. Returns the module in eval mode.
    """
    from tasks.base import extract_state_dict, init_parameters, load_state_file, upgrade_hparams
    from tasks.export import is_model_folder, load_task_module_from_folder

    if is_model_folder(ckpt_path):  # a folder written by ``mmmoe export``
        return load_task_module_from_folder(ckpt_path, task_or_cls, map_location)
    cls = resolve_task(task_or_cls)
    obj = load_state_file(ckpt_path)
    hp = obj.get("hyper_parameters")
    if not isinstance(hp, Mapping):
        raise ValueError(
            f"checkpoint {str(ckpt_path)!r} has no 'hyper_parameters', so the {cls.__name__} cannot be "
            "rebuilt from it; evaluate a checkpoint written by 'mmmoe fit', or fine-tune from this one "
            "with model.init_args.init_from"
        )
    saved_class = hp.get("_class_path")
    if isinstance(saved_class, str) and saved_class.split(".")[-1] != cls.__name__:
        try:
            same = issubclass(_import_class(saved_class), cls)
        except (ImportError, ValueError):
            same = False
        if not same:
            raise ValueError(f"checkpoint {str(ckpt_path)!r} was written by {saved_class}, not {_class_path(cls)}: "
                             "wrong task?")
    args = upgrade_hparams({k: v for k, v in hp.items() if not str(k).startswith("_")})
    params = init_parameters(cls)
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise ValueError(f"checkpoint {str(ckpt_path)!r} hyper_parameters {unknown} are not arguments of "
                         f"{cls.__name__}: is it a checkpoint of another task?")
    if "init_from" in params:
        args["init_from"] = None
    state = extract_state_dict(obj)
    tok = args.get("tokenizer")
    emb = state.get(TEXT_EMBEDDING)
    if tok and not Path(tok).is_file() and emb is not None and "backbone" in params:
        # the tokenizer only sets vocab_size at construction: take it from the weights instead, so a
        # checkpoint whose tokenizer moved still loads (text inputs then need --tokenizer / --set)
        backbone = dict(args.get("backbone") or {})
        if backbone.get("vocab_size") is None:
            backbone["vocab_size"] = int(emb.shape[0])
        args["backbone"] = backbone
    module = cls(**args)
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        def show(keys: List[str]) -> str:
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

        raise ValueError(
            f"checkpoint {str(ckpt_path)!r} does not match {cls.__name__}"
            + (f"; missing: {show(result.missing_keys)}" if result.missing_keys else "")
            + (f"; unexpected: {show(result.unexpected_keys)}" if result.unexpected_keys else "")
        )
    module.to(map_location)
    return module.eval()


# ------------------------------------------------------------------------------ configs / data
def read_config(path: PathLike) -> Dict[str, Any]:
    """A LightningCLI YAML config as a dict (``model:``, ``data:``, ``trainer:`` sections)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config {str(p)!r} does not exist")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"config {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config {str(p)!r} must be a mapping with model: / data: / trainer: sections")
    return cfg


def _section(cfg: Mapping[str, Any], name: str, where: str) -> Tuple[Optional[str], Dict[str, Any]]:
    sec = cfg.get(name)
    if sec is None:
        return None, {}
    if not isinstance(sec, Mapping):
        raise ValueError(f"{where}: '{name}:' must be a mapping with class_path and init_args")
    init = sec.get("init_args") or {}
    if not isinstance(init, Mapping):
        raise ValueError(f"{where}: '{name}.init_args' must be a mapping")
    return sec.get("class_path"), dict(init)


# ------------------------------------------------------------------------------ mmmoe evaluate
def _key_value(text: str) -> Tuple[str, Any]:
    """``NAME=VALUE``; VALUE parsed as JSON when it is valid JSON (numbers, true, null, lists), else a string."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return name.strip(), parsed


def _device(name: Optional[str]) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=sorted(TASKS), help="task of the checkpoint")
    p.add_argument("--ckpt", required=True, metavar="CKPT",
                   help="checkpoint of 'mmmoe fit' (read weights-only; the run's config.yaml is found next to it) "
                        "or model folder of 'mmmoe export' (then --config is needed)")
    p.add_argument("--split", choices=SPLITS, default="val",
                   help="val: the data module's val loader and the module's eval_* ground truth; test: its test "
                        "loader and test_* (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="folder of the official result files and metrics.json (default: <ckpt folder>/eval-<task>-<split>)")
    p.add_argument("--config", dest="configs", action="append", default=[], metavar="YAML",
                   help="config file(s) merged after the run's saved config (required when there is none); repeatable")
    p.epilog = ("Any other option is a LightningCLI override of the run's config, e.g. --trainer.devices 2 "
                "--trainer.strategy ddp (evaluation on several processes: one official file), "
                "--model.init_args.eval_questions Q.json, --data.init_args.num_workers 0.")


def evaluate(task: str, ckpt: PathLike, split: str = "val", out_dir: Optional[PathLike] = None,
             configs: Sequence[PathLike] = (), overrides: Sequence[str] = ()) -> Dict[str, float]:
    """What ``mmmoe evaluate`` does, callable from Python: LightningCLI ``test`` on the run's saved
    config (``config.yaml`` next to the checkpoint, written by ``mmmoe fit``) plus ``configs`` and
    ``overrides``, with ``tasks.evaluation.OfficialEvaluation(split, out_dir)``. Returns the
    metrics (also in ``out_dir/metrics.json``)."""
    from tasks.evaluation import OfficialEvaluation
    from tasks.export import find_run_config, is_model_folder
    from tasks.fit_cli import run_cli

    cls = resolve_task(task)
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {str(ckpt)!r} does not exist")
    folder = is_model_folder(ckpt)
    for c in configs:
        if not Path(c).is_file():
            raise FileNotFoundError(f"config {str(c)!r} does not exist")
    saved = None if folder else find_run_config(ckpt)
    files = ([saved] if saved is not None else []) + [Path(c) for c in configs]
    if not files:
        raise ValueError(f"no config.yaml of the run next to {str(ckpt)!r} ('mmmoe fit' writes one into the checkpoint "
                         "folder): give the run's config with --config")
    model_path = None
    for f in files:
        model_path = _section(read_config(f), "model", str(f))[0] or model_path
    if model_path is not None and model_path.split(".")[-1].split(":")[-1] != cls.__name__:
        raise ValueError(f"{files[-1]}: model.class_path is {model_path}, but task {task!r} is {_class_path(cls)}")
    if overrides and not str(overrides[0]).startswith("--"):
        raise ValueError(f"unexpected argument {overrides[0]!r}: overrides look like --trainer.devices 2")
    out = Path(out_dir) if out_dir is not None else (ckpt.resolve() if folder else ckpt.resolve().parent) / f"eval-{task}-{split}"
    args = ["test", "--verbose", "false"]  # the metrics are printed as JSON instead of Lightning's table
    for f in files:
        args += ["--config", str(f)]
    if folder:  # the exported weights initialise the module built from the config
        from mmmoe.models.pretrained import WEIGHTS_NAME

        args += ["--model.init_args.init_from", str(ckpt / WEIGHTS_NAME)]
    else:
        args += ["--model.init_args.init_from", "null", "--ckpt_path", str(ckpt)]
    args += [str(o) for o in overrides]
    cli = run_cli(args, evaluation=OfficialEvaluation(split, str(out)))
    return {k: float(v) for k, v in cli.model.eval_metrics.items()}


def run_evaluate(ns: argparse.Namespace) -> int:
    from tasks.base import UnsafeCheckpointError
    from tasks.fit_cli import MissingDataError

    import contextlib

    try:
        # progress bars and logs to stderr: stdout carries the metrics JSON only
        with contextlib.redirect_stdout(sys.stderr):
            metrics = evaluate(ns.task, ns.ckpt, ns.split, ns.out, ns.configs, getattr(ns, "extra_args", []))
    except SystemExit as exc:  # LightningCLI rejected the config or an override (its message is on stderr)
        return int(exc.code or 0) if isinstance(exc.code, int) else 2
    except (UnsafeCheckpointError, MissingDataError, FileNotFoundError, ValueError, KeyError, TaskUnavailableError) as exc:
        print(f"mmmoe evaluate: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if "state_dict" not in str(exc):
            raise
        # a checkpoint of another model than the config builds (Lightning's strict load)
        first = str(exc).strip().splitlines()[0]
        print(f"mmmoe evaluate: error: {ns.ckpt} does not match the model of the config: {first} "
              "(is it a checkpoint of this run?)", file=sys.stderr)
        return 2
    from data_pipelines.readers import is_rank_zero

    if is_rank_zero():  # the other processes of a multi-process evaluation print nothing
        print(json.dumps(metrics, indent=1))
    return 0


# ------------------------------------------------------------------------------ mmmoe predict
PREDICT_FLAGS = {"question": "question", "sentence": "sentence", "right_image": "right_image", "top_k": "top_k",
                 "texts": "texts"}


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=sorted(TASKS), help="task of the checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", metavar="CKPT", help="fine-tuned checkpoint (read weights-only)")
    src.add_argument("--model", metavar="DIR", help="model folder written by 'mmmoe export'")
    p.add_argument("--image", required=True, metavar="IMAGE", help="image file (any format PIL reads)")
    p.add_argument("--question", default=None, help="vqa: the question")
    p.add_argument("--sentence", default=None, help="nlvr2: the statement")
    p.add_argument("--right-image", default=None, metavar="IMAGE", help="nlvr2: the right image (--image is the left)")
    p.add_argument("--texts", nargs="+", default=None, metavar="TEXT", help="retrieval: the texts to rank for the image")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="vqa: how many answers to list (default 5)")
    p.add_argument("--kw", action="append", default=[], type=_key_value, metavar="NAME=VALUE",
                   help="any other keyword argument of the task's predict_one (e.g. beam_size=3); repeatable")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="SentencePiece model to use instead of the one the checkpoint names")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line only")


def predict(task: str, ckpt: PathLike, image: PathLike, kwargs: Mapping[str, Any], device: Optional[str] = None,
            args: Optional[argparse.Namespace] = None) -> Dict[str, Any]:
    """Load the checkpoint and run the module's ``predict_cli(args)`` or ``predict_one(image, **kwargs)``."""
    module = load_task_module(task, ckpt, map_location=_device(device))
    if args is not None and getattr(args, "tokenizer", None):
        if not Path(args.tokenizer).is_file():
            raise FileNotFoundError(f"tokenizer {args.tokenizer!r} does not exist")
        module.hparams["tokenizer"] = args.tokenizer
    if args is not None:
        if callable(getattr(module, "predict_cli", None)):  # a method: predict_cli(self, args)
            return module.predict_cli(args)
        fn = getattr(sys.modules.get(type(module).__module__), "predict_cli", None)
        if callable(fn):  # a function next to the class: predict_cli(module, args)
            return fn(module, args)
    fn = getattr(module, "predict_one", None)
    if not callable(fn):
        raise ValueError(f"task {task!r} ({type(module).__name__}) has no predict_one: "
                         "it does not predict from an image")
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        bad = sorted(set(kwargs) - set(params))
        if bad:
            raise ValueError(f"predict {task} does not take {', '.join(bad)}; it takes "
                             f"{', '.join(n for n in params if n != 'image_path')}")
    return fn(image, **kwargs)


def run_predict(ns: argparse.Namespace) -> int:
    from tasks.base import UnsafeCheckpointError

    kwargs = {name: getattr(ns, flag) for flag, name in PREDICT_FLAGS.items() if getattr(ns, flag) is not None}
    kwargs.update(dict(ns.kw))
    try:
        result = predict(ns.task, ns.ckpt or ns.model, ns.image, kwargs, ns.device, args=ns)
    except UnsafeCheckpointError as exc:
        print(f"mmmoe predict: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, TypeError, TaskUnavailableError) as exc:
        print(f"mmmoe predict: error: {exc}", file=sys.stderr)
        return 2
    if not ns.json and isinstance(result, Mapping) and "answer" in result and "top" in result:
        print(f"answer: {result['answer']}")
        for row in result["top"]:
            print(f"  {row['score']:.4f}  {row['answer']}")
    else:
        print(json.dumps(result, ensure_ascii=False))
    return 0
