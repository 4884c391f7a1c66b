"""``mmmoe evaluate`` / ``mmmoe predict``, and the evaluation protocol every task module follows.

THE PROTOCOL (a task ``LightningModule`` class, e.g. ``tasks.vqa.VQAModule``):

``TASK: str``
    class attribute, the short task name (``vqa``, ``nlvr2``, ``caption``, ``lm``, ``mlm``,
    ``retrieval``).
``evaluate_split(self, datamodule, split: str, out_dir: str) -> Dict[str, float]``
    runs the model (eval mode, no grad, on the module's device) over ``datamodule``'s ``split``
    loader (``"val"`` or ``"test"``; :func:`split_loader` calls ``datamodule.setup()`` when needed),
    writes the official result file(s) into ``out_dir`` (VQA ``vqa_results.json``, NLVR2
    ``nlvr2_predictions.json``, captions ``caption_results.json``), scores them with
    ``tasks/metrics`` when the ground truth is known, and returns a flat dict of floats that
    includes the task's trivial baseline on the same split (``vqa_majority_baseline``,
    ``nlvr2_majority_baseline``, ...).
``predict_one(self, image_path, **kwargs) -> dict`` (image tasks)
    one prediction for one image file, JSON-serialisable. ``mmmoe predict`` passes the keyword
    arguments given on its command line (``--question`` -> ``question``, ``--sentence`` ->
    ``sentence``, ``--right-image`` -> ``right_image``, ``--top-k`` -> ``top_k``, any
    ``--kw NAME=VALUE`` -> ``NAME``), only those the method's signature accepts. A class may
    instead define ``predict_cli(self, args: argparse.Namespace) -> dict`` (or its Python module a
    function ``predict_cli(module, args) -> dict``) to read the parsed command line itself; that
    takes precedence. ``mmmoe predict`` prints the dict as JSON (VQA: the answer and top-k lines).

``eval_data_overrides(self) -> dict`` (optional)
    data module init args the module needs at evaluation (VQA: its own ``answer_vocab`` list, so
    the data module and the checkpoint agree without the vocabulary file).

GROUND TRUTH (eval inputs) lives in the module's init args, read from ``self.hparams`` when
``evaluate_split`` runs (so it can be changed on a loaded module):

    vqa      eval_questions, eval_annotations   (split "val"; test_questions / test_annotations for "test")
    nlvr2    eval_data                          (split "val"; test_data for "test")
    caption  eval_coco, eval_split              (the other helper's module)

``mmmoe evaluate`` takes them, in increasing priority, from the checkpoint's hyperparameters, from
the config's ``model.init_args`` (every key named ``eval_*`` / ``test_*``), and from the command
line: ``--questions`` / ``--annotations`` (vqa) and ``--eval-data`` (nlvr2) set the ``eval_*`` name
for ``--split val`` and the ``test_*`` name for ``--split test``; ``--set NAME=VALUE`` sets any
hyperparameter by name.

HELPERS for implementations: :func:`split_loader` (the split's loader, setup on demand, a clear
error when the data module has no such split), :func:`prepare_batch` (device move +
``on_after_batch_transfer``, i.e. what a Trainer does), :func:`write_json` (atomic; ``data_pipelines.formats.io.write_json``),
:func:`load_image` (one file -> 1 x 3 x S x S, the data modules' eval transform and ImageNet
normalisation), :func:`encode_text_batch` / :func:`module_tokenizer` (text with the checkpoint's
tokenizer).

CHECKPOINTS are only read weights-only (:func:`tasks.base.load_state_file`): a file that needs
unpickling is refused (exit status 2) and nothing in it runs. :func:`load_task_module` rebuilds the
module from the checkpoint's plain-typed ``hyper_parameters`` (``init_from`` dropped: the checkpoint
holds the fine-tuned weights) and loads its ``state_dict`` strictly.

Commands::

    mmmoe evaluate vqa --config configs/finetune/vqa.yaml --ckpt runs/finetune-vqa/checkpoints/last.ckpt
    mmmoe evaluate nlvr2 --config configs/finetune/nlvr2.yaml --ckpt CKPT --split test [--out DIR]
    mmmoe evaluate vqa --config C.yaml --ckpt CKPT --questions Q.json --annotations A.json --data num_workers=0
    mmmoe predict vqa --ckpt CKPT --image photo.jpg --question "what color is the cat?" [--top-k 5] [--json]
    mmmoe predict nlvr2 --ckpt CKPT --image left.png --right-image right.png --sentence "..."
    mmmoe predict caption --ckpt CKPT --image photo.jpg [--kw beam_size=3]
    mmmoe predict retrieval --model DIR --image photo.jpg --texts "a red circle" "two squares"
    mmmoe evaluate retrieval --config configs/finetune/retrieval.yaml --ckpt CKPT --split test

``--ckpt`` (and ``--model`` of ``predict``) also take a model folder written by ``mmmoe export``
(``tasks.export.load_task_module_from_folder``: verified safetensors, no unpickling).

Exit status: 0 on success, 2 on a refused checkpoint, a missing file or a wrong argument (one line
on stderr naming the problem).
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

from data_pipelines.formats.io import write_json  # noqa: F401 - the one atomic JSON writer, used below

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
SPLITS = ("val", "test")
TEXT_EMBEDDING = "backbone.text_embed.token_embed.weight"
RESULT_NAME = "metrics.json"


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
    from tasks.base import extract_state_dict, load_state_file
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
    args = {k: v for k, v in hp.items() if not str(k).startswith("_")}
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(args) - set(params))
        if unknown:
            raise ValueError(f"checkpoint {str(ckpt_path)!r} hyper_parameters {unknown} are not arguments of "
                             f"{cls.__name__}: is it a checkpoint of another task?")
    if "init_from" in params:
        args["init_from"] = None
    state = extract_state_dict(obj)
    tok = args.get("tokenizer")
    emb = state.get(TEXT_EMBEDDING)
    if tok and not Path(tok).is_file() and emb is not None and "model_args" in params:
        # the tokenizer only sets vocab_size at construction: take it from the weights instead, so a
        # checkpoint whose tokenizer moved still loads (text inputs then need --tokenizer / --set)
        margs = dict(args.get("model_args") or {})
        margs.setdefault("vocab_size", int(emb.shape[0]))
        args["model_args"] = margs
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


def build_datamodule(cfg: Mapping[str, Any], overrides: Optional[Mapping[str, Any]] = None, where: str = "config",
                     module_overrides: Optional[Mapping[str, Any]] = None) -> Any:
    """Instantiate the config's ``data:`` section (``class_path`` + ``init_args``), with ``overrides``
    of init args (e.g. ``num_workers``; unknown names are errors) and ``module_overrides`` (what the
    task module's optional ``eval_data_overrides()`` asks for; applied where the class takes them)."""
    class_path, init = _section(cfg, "data", where)
    if class_path is None:
        raise ValueError(f"{where}: no 'data:' section with a class_path (the data module to evaluate on)")
    cls = _import_class(class_path)
    params = inspect.signature(cls.__init__).parameters
    init.update({k: v for k, v in (module_overrides or {}).items() if k in params})
    init.update(overrides or {})
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(init) - set(params))
        if unknown:
            raise ValueError(f"{where}: {class_path} has no argument(s) {unknown}")
    return cls(**init)


def split_loader(datamodule: Any, split: str) -> Any:
    """The ``split`` ("val" or "test") loader of ``datamodule``, calling ``setup()`` first when needed."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: allowed {', '.join(SPLITS)}")
    if not getattr(datamodule, "_mmmoe_setup_done", False):
        datamodule.setup("validate" if split == "val" else "test")
        try:
            datamodule._mmmoe_setup_done = True
        except AttributeError:
            pass
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    if loader is None or (isinstance(loader, (list, tuple)) and len(loader) == 0):
        raise ValueError(f"the data module has no {split} split: set data.init_args.{split} (its shards) in the config")
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    return loader


def move_to(batch: Any, device: Any) -> Any:
    """Tensors of a (nested) batch moved to ``device``; everything else as is."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [move_to(v, device) for v in batch]
    return batch


def prepare_batch(module: Any, batch: Any) -> Any:
    """A loader's batch as the module's ``*_step`` sees it under a Trainer: moved to the module's
    device, then its ``on_after_batch_transfer`` hook (uint8 images of ``normalize=False`` data
    modules become normalised float32 there)."""
    batch = move_to(batch, module.device)
    hook = getattr(module, "on_after_batch_transfer", None)
    return hook(batch, 0) if callable(hook) else batch


# ------------------------------------------------------------------------------ single inputs
def load_image(path: PathLike, image_size: int) -> Any:
    """One image file -> 1 x 3 x size x size float tensor: the datamodules' eval transform (resize the
    short side, centre crop) and ImageNet normalisation. Hostile files give a clear error and bounded
    memory: ``FileNotFoundError`` when missing, ``ValueError`` naming the file for a folder, FIFO or
    device, an empty or oversized file (``MAX_IMAGE_FILE_BYTES``), bytes that are no supported image,
    a truncated image or a decompression bomb (more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels,
    refused before decoding)."""
    from data_pipelines.transforms import decode_image, eval_transform, read_image_file

    data = read_image_file(path)
    try:
        img = decode_image(data, target_size=image_size)
    except Exception as exc:  # PIL raises several types for undecodable data
        raise ValueError(f"image {str(path)!r} could not be decoded: {type(exc).__name__}: {exc}") from None
    return eval_transform(image_size)(img).unsqueeze(0)


def module_tokenizer(module: Any) -> Any:
    """The tokenizer named by the module's ``tokenizer`` hyperparameter (cached on the module)."""
    tok = getattr(module, "_predict_tokenizer", None)
    if tok is None:
        path = module.hparams.get("tokenizer")
        if not path:
            raise ValueError("the checkpoint names no tokenizer (hyperparameter 'tokenizer'); cannot encode text")
        from data_pipelines.tokenizer import Tokenizer

        tok = Tokenizer(path)
        module._predict_tokenizer = tok
    return tok


def encode_text_batch(module: Any, texts: Sequence[str], max_len: Optional[int] = None) -> Tuple[Any, Any]:
    """``[bos] + tokens + [eos]`` ids (B x L, right-padded) and padding mask (True = padding) on the
    module's device, cut to the model's ``max_text_len``."""
    from data_pipelines.readers import encode_text, pad_text

    tok = module_tokenizer(module)
    max_len = max_len or module.config.max_text_len
    ids, pad = pad_text([encode_text(tok, t, max_len) for t in texts], tok.pad_id)
    return ids.to(module.device), pad.to(module.device)


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
    p.add_argument("--config", required=True, metavar="YAML",
                   help="the fine-tuning config (its data: section builds the data module)")
    p.add_argument("--ckpt", required=True, metavar="CKPT",
                   help="fine-tuned checkpoint (read weights-only) or model folder of 'mmmoe export'")
    p.add_argument("--split", choices=SPLITS, default="val", help="split to evaluate (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder for result files and metrics.json (default: <ckpt folder>/eval-<task>-<split>)")
    gt = p.add_argument_group("ground truth (override the config / checkpoint)")
    gt.add_argument("--questions", metavar="JSON", help="vqa: the split's official questions file")
    gt.add_argument("--annotations", metavar="JSON", help="vqa: the split's official annotations file")
    gt.add_argument("--eval-data", metavar="JSONL", help="nlvr2: the split's labelled JSON-lines file")
    gt.add_argument("--set", dest="sets", action="append", default=[], type=_key_value, metavar="NAME=VALUE",
                    help="set a module hyperparameter read at evaluation (e.g. eval_coco=PATH); repeatable")
    run = p.add_argument_group("running")
    run.add_argument("--data", dest="data_sets", action="append", default=[], type=_key_value, metavar="NAME=VALUE",
                     help="override a data module init arg (e.g. num_workers=0, batch_size=64); repeatable")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _gt_overrides(ns: argparse.Namespace, prefix: str) -> Dict[str, Any]:
    flags = {"questions": ("vqa", "questions"), "annotations": ("vqa", "annotations"), "eval_data": ("nlvr2", "data")}
    out: Dict[str, Any] = {}
    for flag, (task, suffix) in flags.items():
        value = getattr(ns, flag, None)
        if value is None:
            continue
        if ns.task != task:
            raise ValueError(f"--{flag.replace('_', '-')} applies to the {task} task, not {ns.task} "
                             "(use --set NAME=VALUE)")
        out[f"{prefix}_{suffix}"] = value
    return out


def set_eval_inputs(module: Any, values: Mapping[str, Any]) -> None:
    """Set hyperparameters that ``evaluate_split`` reads (and a same-named plain attribute, if any)."""
    for name, value in values.items():
        if name not in module.hparams:
            known = sorted(k for k in module.hparams if k.startswith(("eval_", "test_")))
            raise ValueError(f"{type(module).__name__} has no hyperparameter {name!r}"
                             + (f" (eval inputs: {', '.join(known)})" if known else ""))
        module.hparams[name] = value
        if name in vars(module):  # a module that copied the init arg into a plain attribute
            setattr(module, name, value)


def evaluate(task: str, config: PathLike, ckpt: PathLike, split: str = "val", out_dir: Optional[PathLike] = None,
             eval_inputs: Optional[Mapping[str, Any]] = None, data_overrides: Optional[Mapping[str, Any]] = None,
             device: Optional[str] = None) -> Dict[str, float]:
    """What ``mmmoe evaluate`` does, callable from Python. Returns the metrics (also in metrics.json)."""
    cfg = read_config(config)
    cls = resolve_task(task)
    model_path, model_init = _section(cfg, "model", str(config))
    if model_path is not None and model_path.split(".")[-1].split(":")[-1] != cls.__name__:
        raise ValueError(f"{config}: model.class_path is {model_path}, but task {task!r} is {_class_path(cls)}")
    module = load_task_module(cls, ckpt, map_location=_device(device))
    inputs = {k: v for k, v in model_init.items() if k.startswith(("eval_", "test_")) and k in module.hparams}
    inputs.update(eval_inputs or {})
    set_eval_inputs(module, inputs)
    hook = getattr(module, "eval_data_overrides", None)
    dm = build_datamodule(cfg, data_overrides, where=str(config), module_overrides=hook() if callable(hook) else None)
    out = Path(out_dir) if out_dir is not None else Path(ckpt).resolve().parent / f"eval-{task}-{split}"
    out.mkdir(parents=True, exist_ok=True)
    metrics = module.evaluate_split(dm, split, str(out))
    metrics = {k: float(v) for k, v in metrics.items()}
    write_json(out / RESULT_NAME, metrics)
    return metrics


def run_evaluate(ns: argparse.Namespace) -> int:
    from tasks.base import UnsafeCheckpointError

    try:
        prefix = "eval" if ns.split == "val" else "test"
        inputs = _gt_overrides(ns, prefix)
        inputs.update(dict(ns.sets))
        out = ns.out
        metrics = evaluate(ns.task, ns.config, ns.ckpt, ns.split, out, inputs, dict(ns.data_sets), ns.device)
    except UnsafeCheckpointError as exc:
        print(f"mmmoe evaluate: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError, TaskUnavailableError) as exc:
        print(f"mmmoe evaluate: error: {exc}", file=sys.stderr)
        return 2
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
