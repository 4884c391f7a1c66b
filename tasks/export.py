"""``mmmoe export``: a trained checkpoint -> a self-contained model folder; and the way back.

    mmmoe export --ckpt runs/finetune-vqa/checkpoints/last.ckpt --out models/vqa-tiny
    mmmoe predict vqa --model models/vqa-tiny --image photo.jpg --question "what colour is the square?"

    from mmmoe.models import from_pretrained                # pure PyTorch, no Lightning
    model = from_pretrained("models/vqa-tiny")

The folder (``mmmoe.models.pretrained``): ``model.safetensors`` (weights only), ``config.json`` (the
full ModelConfig, preset, variant, task, head specifications, labels, the task module's
hyperparameters, and the size + sha256 of every other file), ``tokenizer.model`` and a ``README.md``
model card with the run's metrics (``metrics.json`` files found next to the checkpoint, or
``--metrics``), the parity row of the variant, and the names of the training data manifests (from
the run's saved LightningCLI ``config.yaml``, or ``--config``).

The checkpoint is read weights-only (``tasks.base.load_state_file``); the folder is read with
safetensors and JSON only. Nothing is unpickled on either path.

:func:`load_task_module_from_folder` rebuilds the Lightning task module from a folder, so
``mmmoe predict`` and ``mmmoe evaluate`` accept a folder wherever they accept a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

#: checkpoint key where MMMoEModule.on_save_checkpoint records the module class
CLASS_KEY = "mmmoe_task_class"
#: task names of module classes without a TASK attribute
EXTRA_TASKS = {"pretrain": "tasks.pretrain:PretrainModule"}
PATH_SUFFIXES = (".json", ".jsonl", ".txt", ".model", ".yaml", ".ckpt", ".tar")


def all_tasks() -> Dict[str, str]:
    from tasks.evaluate_cli import TASKS

    return {**TASKS, **EXTRA_TASKS}


def task_name(cls: type) -> str:
    name = getattr(cls, "TASK", None)
    if name:
        return str(name)
    for task, spec in EXTRA_TASKS.items():
        if spec.split(":")[-1] == cls.__name__:
            return task
    raise ValueError(f"{cls.__name__} has no TASK name: it cannot be exported")


# ------------------------------------------------------------------------------ which task
def task_class_of(obj: Mapping[str, Any], task: Optional[str] = None, where: str = "checkpoint") -> type:
    """The task module class of a loaded checkpoint: ``task`` when given, else the class the
    checkpoint records (``mmmoe_task_class``, or LightningCLI's ``_class_path``), else the one task
    whose init arguments accept every saved hyperparameter and need a task-specific one."""
    from tasks.base import init_parameters, upgrade_hparams
    from tasks.evaluate_cli import _import_class, resolve_task

    if task:
        return resolve_task(all_tasks().get(task, task))
    hp = obj.get("hyper_parameters") if isinstance(obj.get("hyper_parameters"), Mapping) else {}
    for spec in (obj.get(CLASS_KEY), hp.get("_class_path")):
        if isinstance(spec, str) and spec:
            return _import_class(spec)
    keys = {k for k in upgrade_hparams(hp) if not str(k).startswith("_")}
    candidates = []
    for spec in all_tasks().values():
        try:
            cls = _import_class(spec)
        except ImportError:
            continue
        params = set(init_parameters(cls))
        if keys <= params:
            candidates.append((len(params - keys), cls))
    if not candidates:
        raise ValueError(f"{where}: cannot tell which task wrote it; pass --task")
    candidates.sort(key=lambda c: c[0])
    if len(candidates) > 1 and candidates[0][0] == candidates[1][0]:
        names = ", ".join(task_name(c) for _, c in candidates if _ == candidates[0][0])
        raise ValueError(f"{where}: could be any of {names}; pass --task")
    return candidates[0][1]


# ------------------------------------------------------------------------------ what goes in the card
def find_metrics(ckpt: PathLike, extra: Optional[List[PathLike]] = None) -> Dict[str, Dict[str, float]]:
    """``{source: metrics}`` from ``extra`` files, else every ``metrics.json`` (and
    ``eval-*/metrics.json``) in the checkpoint's folder and the two above it."""
    found: Dict[str, Dict[str, float]] = {}
    paths: List[Path] = [Path(p) for p in (extra or [])]
    if not paths:
        here = Path(ckpt).resolve().parent
        for d in (here, here.parent, here.parent.parent):
            paths += [d / "metrics.json", *sorted(d.glob("eval-*/metrics.json"))]
    for p in paths:
        if not p.is_file():
            if extra:
                raise FileNotFoundError(f"metrics file {str(p)!r} does not exist")
            continue
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"metrics file {p} is not valid JSON: {exc}") from None
        if isinstance(obj, dict):
            flat = {k: float(v) for k, v in obj.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if flat:
                found[str(p)] = flat
    return found


def find_run_config(ckpt: PathLike, config: Optional[PathLike] = None) -> Optional[Path]:
    """The run's LightningCLI ``config.yaml`` (``config`` when given): in the checkpoint's folder or
    the two above it, else the newest ``<run>/<logger>/version_N/config.yaml`` of the run folder
    above the checkpoint folder."""
    if config is not None:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config {str(config)!r} does not exist")
        return Path(config)
    here = Path(ckpt).resolve().parent
    for d in (here, here.parent, here.parent.parent):
        for name in ("config.yaml", "config.yml"):
            if (d / name).is_file():
                return d / name
    # LightningCLI saves it in the logger's folder: <run>/<logger name>/version_N/config.yaml
    saved = sorted(here.parent.glob("*/*/config.yaml"), key=lambda p: p.stat().st_mtime)
    return saved[-1] if saved else None


def data_manifests(config: Optional[Path]) -> List[str]:
    """``"<data argument>: <shard set>"`` for the manifests and shards in the config's ``data:``
    section (e.g. ``train: caption-train``, ``image_text.coco: coco-pretrain``)."""
    if config is None:
        return []
    import yaml

    try:
        cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{config} is not valid YAML: {exc}") from None
    names: List[str] = []

    def walk(x: Any, key: str) -> None:
        if isinstance(x, str):
            if x.endswith(".manifest.json"):
                names.append(f"{key}: {Path(x).name[: -len('.manifest.json')]}")
            elif x.endswith(".tar"):
                names.append(f"{key}: {Path(x).name}")
        elif isinstance(x, Mapping):
            for k, v in x.items():
                walk(v, k if key in ("", "init_args") else f"{key}.{k}")
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v, key)

    walk(cfg.get("data", {}) if isinstance(cfg, Mapping) else {}, "")
    return sorted(set(names))


def parity_row(model_config: Any, variant: Optional[str]) -> Optional[Dict[str, Any]]:
    """The parity solver's row of ``variant`` for this backbone's width (see ``mmmoe parity``)."""
    from mmmoe.models.registry import DEFAULT_VARIANT, REFERENCE_EXPERTS
    from mmmoe.moe import solve_parity

    variant = variant or DEFAULT_VARIANT
    name = {"dense": "dense", "smoe": "smoe", "fine-grained": "fine-grained", "mhmoe-h2": "mh-moe h=2",
            "mhmoe-h3": "mh-moe h=3"}.get(variant)
    c = model_config
    heads = [h for h in (2, 3) if c.dim % h == 0]
    try:
        rows = solve_parity(c.dim, REFERENCE_EXPERTS, c.ffn_hidden, 1, c.activation, heads=heads)
    except ValueError:
        return None
    for r in rows:
        if r.name == name:
            return {"variant": variant, **r.to_dict()}
    return None


def model_card(task: str, info: Mapping[str, Any]) -> str:
    mc, hp = info["model_config"], info["hyper_parameters"]
    lines = [f"# mmmoe {task} model ({info.get('preset')}, {info.get('variant')})", "",
             f"Exported by `mmmoe export` from `{info['source_checkpoint']}`.", "",
             "## Use", "", "```python", "from mmmoe.models import from_pretrained",
             "model = from_pretrained(\"THIS_FOLDER\")", "```", "",
             f"or `mmmoe predict {task} --model THIS_FOLDER ...`.", "", "## Model", "",
             f"- preset `{info.get('preset')}`, variant `{info.get('variant')}`: width {mc['dim']}, depth {mc['depth']}, "
             f"{mc['num_heads']} attention heads, image {mc['image_size']} px (patch {mc['patch_size']}), "
             f"vocabulary {mc['vocab_size']}, text length {mc['max_text_len']}",
             f"- parameters: {info['num_params']:,}", f"- heads: {', '.join(info['head_names']) or 'none'}"]
    moe = mc.get("moe")
    if moe:
        lines.append(f"- MoE: {moe['num_experts']} experts x {moe['expert_hidden']}, top-{moe['top_k']}, "
                     f"h = {moe['num_heads']}, every {mc['moe_every']} blocks")
    row = info.get("parity")
    if row:
        lines += ["", "## Parity row of the variant", "",
                  "| variant | h | experts | expert width | top-k | params / MoE layer | MACs / token | params vs SMoE | FLOPs vs SMoE |",
                  "|---|---|---|---|---|---|---|---|---|",
                  f"| {row['variant']} | {row['num_heads']} | {row['num_experts']} | {row['expert_hidden']} | {row['top_k']} "
                  f"| {row['params']:,} | {row['macs_per_token']:,} | {row['param_ratio']:.3f} | {row['flop_ratio']:.3f} |"]
    lines += ["", "## Metrics", ""]
    if info["metrics"]:
        for src, m in info["metrics"].items():
            lines += [f"From `{src}`:", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" for k, v in m.items()]
            lines.append("")
    else:
        lines += ["No metrics.json was found next to the checkpoint (run `mmmoe evaluate`, or pass --metrics).", ""]
    lines += ["## Training data", ""]
    lines += [f"- `{n}`" for n in info["data"]] or ["Unknown (no run config found; pass --config)."]
    lines += ["", "## Training hyperparameters", "", "```json", json.dumps(hp, indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ export
def _plain_hparams(hp: Mapping[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in hp.items():
        if str(k).startswith("_") or k == "init_from":
            continue
        try:
            json.dumps(v)
        except TypeError:
            raise ValueError(f"hyperparameter {k!r} is not plain JSON ({type(v).__name__}): cannot export") from None
        out[k] = v
    return out


def export(ckpt: PathLike, out_dir: PathLike, task: Optional[str] = None, metrics: Optional[List[PathLike]] = None,
           config: Optional[PathLike] = None, overwrite: bool = False) -> Path:
    """Write the model folder of ``ckpt`` into ``out_dir``. Returns the folder."""
    from mmmoe.models.pretrained import save_pretrained
    from tasks.base import load_state_file
    from tasks.evaluate_cli import load_task_module

    obj = load_state_file(ckpt)
    cls = task_class_of(obj, task, where=str(ckpt))
    name = task_name(cls)
    module = load_task_module(cls, ckpt)
    hp = _plain_hparams(module.hparams)
    tok = hp.get("tokenizer")
    if tok and not Path(tok).is_file():
        raise FileNotFoundError(f"the checkpoint's tokenizer {tok!r} does not exist; the folder must include it")
    heads = {n: m for n, m in module.named_children() if n != "backbone"}
    labels = list(getattr(module, "answers", None) or ([] if name != "nlvr2" else ["false", "true"]))
    run_config = find_run_config(ckpt, config)
    backbone = hp.get("backbone") or {}
    info = {
        "preset": backbone.get("preset"), "variant": backbone.get("variant") or "mhmoe-h2", "task_class":
            f"{cls.__module__}:{cls.__qualname__}", "source_checkpoint": Path(ckpt).name,
        "hyper_parameters": hp, "metrics": find_metrics(ckpt, metrics), "data": data_manifests(run_config),
        "parity": parity_row(module.config, backbone.get("variant")),
    }
    card = model_card(name, {**info, "model_config": module.config.to_dict(), "head_names": list(heads),
                             "num_params": sum(p.numel() for p in module.parameters())})
    return save_pretrained(out_dir, module.config, name, heads, module.state_dict(), module.backbone, tokenizer=tok,
                           card=card, extra=info, labels=labels, overwrite=overwrite)


# ------------------------------------------------------------------------------ folder -> task module
def is_model_folder(path: PathLike) -> bool:
    from mmmoe.models.pretrained import CONFIG_NAME

    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def load_task_module_from_folder(folder: PathLike, task: Optional[Union[str, type]] = None,
                                 map_location: str = "cpu") -> Any:
    """The Lightning task module of a model folder (for ``mmmoe predict`` / ``evaluate``): built
    from the recorded hyperparameters (tokenizer = the folder's; data paths that do not exist here
    dropped) and loaded with the verified weights of ``from_pretrained``."""
    from mmmoe.models.pretrained import TOKENIZER_NAME, PretrainedFolderError, from_pretrained
    from tasks.base import init_parameters, upgrade_hparams
    from tasks.evaluate_cli import _import_class, resolve_task

    pm = from_pretrained(folder)
    cfg = pm.metadata
    cls = _import_class(cfg.get("task_class") or all_tasks()[cfg["task"]])
    if task is not None:
        want = resolve_task(all_tasks().get(task, task) if isinstance(task, str) else task)
        if not issubclass(cls, want):
            raise ValueError(f"model folder {str(folder)!r} holds a {cfg['task']} model, not {task}")
    args = upgrade_hparams(cfg.get("hyper_parameters") or {})
    params = init_parameters(cls)
    for k, v in list(args.items()):
        if k not in params:
            raise PretrainedFolderError(f"{folder}: hyperparameter {k!r} is not an argument of {cls.__name__}")
        if k != "tokenizer" and isinstance(v, str) and v.endswith(PATH_SUFFIXES) and not Path(v).exists():
            args[k] = None  # a data path of the training machine (ground truth for evaluation)
    args["tokenizer"] = str((Path(folder) / TOKENIZER_NAME).resolve()) if pm.tokenizer is not None else None
    args["backbone"] = {**(args.get("backbone") or {}), "vocab_size": pm.config.vocab_size}
    if "init_from" in params:
        args["init_from"] = None
    module = cls(**args)
    if module.config.to_dict() != pm.config.to_dict():
        raise PretrainedFolderError(f"{folder}: the hyperparameters build a model that differs from model_config")
    result = module.load_state_dict(pm.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise PretrainedFolderError(f"{folder}: weights do not match {cls.__name__}: missing {result.missing_keys[:5]}, "
                                    f"unexpected {result.unexpected_keys[:5]}")
    return module.to(map_location).eval()


# ------------------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="CKPT", help="checkpoint to export (read weights-only)")
    p.add_argument("--out", required=True, metavar="DIR", help="the model folder to write (new or empty)")
    p.add_argument("--task", default=None, choices=sorted(all_tasks()),
                   help="task of the checkpoint (default: the one it records)")
    p.add_argument("--metrics", action="append", default=None, metavar="JSON",
                   help="metrics.json for the model card (repeatable; default: those next to the checkpoint)")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="the run's config, for the training data names (default: config.yaml next to the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")


def run(ns: argparse.Namespace) -> int:
    from mmmoe.models.pretrained import PretrainedFolderError
    from tasks.base import UnsafeCheckpointError
    from tasks.evaluate_cli import TaskUnavailableError

    try:
        out = export(ns.ckpt, ns.out, ns.task, ns.metrics, ns.config, ns.overwrite)
    except (UnsafeCheckpointError, PretrainedFolderError, FileNotFoundError, FileExistsError, ValueError,
            TaskUnavailableError) as exc:
        print(f"mmmoe export: error: {exc}", file=sys.stderr)
        return 2
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    print(f"wrote {out}: " + ", ".join(f"{n} ({m['size']:,} bytes)" for n, m in cfg["files"].items()) + ", config.json")
    return 0
