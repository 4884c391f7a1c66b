"""What every task's LightningModule shares: the backbone from the registry, AdamW parameter groups,
warmup + cosine schedule, MoE loss and routing-statistics logging, aux-loss-free balancing updates,
safe loading of pretrained weights, and atomic checkpoint writes.

The backbone and the optimisation settings are typed dataclasses (``mmmoe.models.BackboneSpec``,
``OptimSpec``), so ``mmmoe fit --model.help <task class>`` lists and checks every field.
Hyperparameters are plain types only (strings, numbers, dicts: the specs as dicts), so checkpoints
load with ``torch.load(weights_only=True)`` and ``load_from_checkpoint`` rebuilds the module.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import Tensor, nn

from data_pipelines.formats.io import atomic_open
from mmmoe.models import BackboneOutput, BackboneSpec, MultiwayTransformer, create_model
from mmmoe.models.multiway_transformer import INPUT_KINDS

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------ safe loading
class UnsafeCheckpointError(ValueError):
    """A checkpoint that needs arbitrary unpickling (code could run): refused, nothing executed."""


#: key of the checksum that ``AtomicCheckpointIO`` adds to every checkpoint it writes
CHECKSUM_KEY = "mmmoe_checksum"


def tensor_checksum(obj: Any) -> int:
    """CRC32 over the names, dtypes, shapes and bytes of every tensor in a nested dict / list, in
    order (what a checkpoint's size is made of: a damaged byte in a tensor changes it)."""
    import zlib

    crc = 0

    def walk(x: Any, name: str) -> None:
        nonlocal crc
        if isinstance(x, Tensor) and x.layout == torch.strided:
            t = x.detach().cpu().contiguous().reshape(-1)
            crc = zlib.crc32(f"{name}:{t.dtype}:{tuple(x.shape)}".encode(), crc)
            if t.numel():
                crc = zlib.crc32(t.view(torch.uint8).numpy().data, crc)
        elif isinstance(x, dict):
            for k, v in x.items():
                if k != CHECKSUM_KEY:
                    walk(v, f"{name}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{name}/{i}")

    walk(obj, "")
    return crc


def load_state_file(path: PathLike) -> Dict[str, Any]:
    """Load a checkpoint without running any of its code.

    ``.safetensors`` files are read with safetensors; everything else with
    ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers. A file
    that needs more (a pickled class, a lambda) raises :class:`UnsafeCheckpointError`. A
    truncated or damaged file raises ValueError naming the file and what is wrong; checkpoints
    written by ``AtomicCheckpointIO`` carry a checksum of their tensors, verified here."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return {"state_dict": load_file(str(path))}
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"checkpoint {str(path)!r} is not a readable safetensors file: {exc}") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "Unpickler" in text:
            raise UnsafeCheckpointError(
                f"refusing to load {str(path)!r}: it needs arbitrary unpickling (objects beyond tensors "
                "and plain containers), which could run code. Nothing in it was executed. Re-save it "
                "as a plain state dict or as .safetensors."
            ) from None
        first = (text.splitlines()[0] if text else repr(exc)).split(". ")[0]
        import zipfile

        if not zipfile.is_zipfile(path):  # torch writes zip archives: the end-of-archive record is missing
            size = path.stat().st_size
            raise ValueError(
                f"checkpoint {str(path)!r} is truncated or not a checkpoint ({size} bytes; its zip directory is "
                f"missing or damaged: {first}). A write that was interrupted leaves the previous file in place "
                "(AtomicCheckpointIO), so this file was cut or damaged afterwards; use an earlier checkpoint."
            ) from None
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or unreadable: {type(exc).__name__}: {first}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict of tensors")
    stored = obj.pop(CHECKSUM_KEY, None)
    if isinstance(stored, dict) and "crc32" in stored:
        actual = tensor_checksum(obj)
        if actual != int(stored["crc32"]):
            raise ValueError(
                f"checkpoint {str(path)!r} is corrupt: the CRC32 of its tensors is {actual:08x}, the one written with "
                f"it {int(stored['crc32']):08x} (bytes were changed after the write); use an earlier checkpoint."
            )
    return obj


def extract_state_dict(obj: Dict[str, Any]) -> Dict[str, Tensor]:
    """The tensor state dict inside a Lightning checkpoint, a ``{"state_dict": ...}`` or a bare one."""
    sd = obj.get("state_dict", obj) if isinstance(obj.get("state_dict", None), dict) else obj
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}


def load_matching(module: nn.Module, state: Dict[str, Tensor], prefixes: Iterable[str] = ("", "model.", "backbone.")) -> Dict[str, List[str]]:
    """Copy the entries of ``state`` whose names (after stripping one of ``prefixes``) and shapes
    match ``module``'s. Returns ``{"loaded", "missing", "unexpected", "mismatched"}`` name lists."""
    own = module.state_dict()
    loaded, unexpected, mismatched = [], [], []
    new_state = {}
    for key, value in state.items():
        target = None
        for p in prefixes:
            if key.startswith(p) and key[len(p):] in own:
                target = key[len(p):]
                break
        if target is None:
            unexpected.append(key)
        elif own[target].shape != value.shape:
            mismatched.append(f"{target} {tuple(value.shape)} vs {tuple(own[target].shape)}")
        else:
            new_state[target] = value
            loaded.append(target)
    module.load_state_dict(new_state, strict=False)
    missing = sorted(set(own) - set(loaded))
    return {"loaded": loaded, "missing": missing, "unexpected": unexpected, "mismatched": mismatched}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, flushes it to disk and
    renames it into place, so an interrupted or failed save (killed process, full disk) never
    leaves a truncated checkpoint and never clobbers the previous one. Each checkpoint carries a
    CRC32 of its tensors (``CHECKSUM_KEY``), which ``load_state_file`` verifies."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: PathLike, storage_options: Optional[Any] = None) -> None:
        checkpoint = {**checkpoint, CHECKSUM_KEY: {"crc32": tensor_checksum(checkpoint)}}
        with atomic_open(path, fsync=True) as f:  # the file and the rename flushed to disk
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: PathLike, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> Dict[str, Any]:
        return load_state_file(path)


# ------------------------------------------------------------------------------ optimisation
@dataclass
class OptimSpec:
    """AdamW with linear warmup and cosine decay (``model.init_args.optim``)."""

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.05
    """AdamW weight decay (not on biases, norms, embeddings, positions and tokens)."""
    betas: Tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Linear warmup steps; then cosine decay to min_lr_ratio * lr at the last step (the Trainer's
    max_steps, or its estimated stepping batches)."""
    min_lr_ratio: float = 0.01
    """Final learning rate as a fraction of lr (1.0 = constant after warmup)."""

    def __post_init__(self) -> None:
        def fail(name: str, allowed: str) -> None:
            raise ValueError(f"OptimSpec.{name}={getattr(self, name)!r} is invalid: {allowed}")

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not number(self.lr) or self.lr <= 0:
            fail("lr", "must be a number > 0")
        if not number(self.weight_decay) or self.weight_decay < 0:
            fail("weight_decay", "must be a number >= 0")
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2 or not all(
                number(b) and 0 <= b < 1 for b in self.betas):
            fail("betas", "must be two numbers in [0, 1)")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not number(self.eps) or self.eps <= 0:
            fail("eps", "must be a number > 0")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            fail("warmup_steps", "must be an integer >= 0")
        if not number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            fail("min_lr_ratio", "must be a number in [0, 1]")

    def to_dict(self) -> Dict[str, Any]:
        """Plain types only (betas as a list), for checkpoints and YAML."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def coerce(cls, value: Union["OptimSpec", Mapping[str, Any], None]) -> "OptimSpec":
        """A new spec from a spec, a mapping of its fields (what checkpoints hold) or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            value = value.to_dict()
        if not isinstance(value, Mapping):
            raise ValueError(f"optim={value!r} is invalid: must be an OptimSpec or a mapping of its fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"OptimSpec: unknown field(s) {unknown}; valid: {', '.join(sorted(known))}")
        return cls(**value)


def param_groups(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> List[Dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms (1-D tensors), embeddings, positions and tokens."""
    skip = set(skip)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name in skip or name.endswith(".bias") or "embed" in name or name.endswith("_token"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _can_fuse(params: Iterable[Tensor]) -> bool:
    """The fused AdamW kernel (one pass over all tensors; on CPU about 5x faster than the default
    per-tensor loop, which matters for MoE models with many expert weights) takes floating-point
    tensors on CPU or CUDA."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# ------------------------------------------------------------------------------ routing statistics
class ExpertActivation:
    """Accumulates, per MoE layer and way, the expert loads and routed tokens; ``ratios()`` gives
    the paper's activation ratio (selections / tokens) per expert, for heatmaps."""

    def __init__(self) -> None:
        self.load: Dict[str, Tensor] = {}
        self.tokens: Dict[str, int] = {}

    def update(self, moe: Dict[str, Any]) -> None:
        for key, out in moe.items():
            load = out.expert_load.detach().float().cpu()
            self.load[key] = self.load.get(key, torch.zeros_like(load)) + load
            self.tokens[key] = self.tokens.get(key, 0) + int(out.num_tokens)

    def ratios(self) -> Dict[str, np.ndarray]:
        return {k: (self.load[k] / max(1, self.tokens[k])).numpy() for k in sorted(self.load, key=_layer_order)}

    def activated(self, threshold: float = 0.01) -> Dict[str, float]:
        return {k: float((r > threshold).mean()) for k, r in self.ratios().items()}

    def reset(self) -> None:
        self.load.clear()
        self.tokens.clear()


def _layer_order(key: str) -> Tuple[int, str]:
    layer, _, way = key.partition(".")
    return (int(layer) if layer.isdigit() else 0, way)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block, then back in the mode it had (predictions outside a
    Trainer loop: ``predict_one``, decoding)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


# ------------------------------------------------------------------------------ hyperparameters
def init_parameters(cls: type) -> Dict[str, inspect.Parameter]:
    """The keyword arguments ``cls(...)`` accepts: its ``__init__``'s and, while a class passes
    ``**kwargs`` on to ``super().__init__``, its base classes' (as LightningCLI resolves them)."""
    out: Dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        forwards = False
        for name, p in inspect.signature(init).parameters.items():
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            elif name != "self" and p.kind is not p.VAR_POSITIONAL:
                out.setdefault(name, p)
        if not forwards:
            break
    return out


def upgrade_hparams(hp: Mapping[str, Any]) -> Dict[str, Any]:
    """Hyperparameters of a checkpoint written before the typed specs (``model``, ``variant``,
    ``model_args``, ``lr``, ``warmup_steps`` ... as separate arguments) in today's layout
    (``backbone``, ``optim``); anything else is returned as it is."""
    hp = dict(hp)
    optim_keys = [f.name for f in fields(OptimSpec)]
    if "backbone" in hp or not ({"model_args", "variant", *optim_keys} & set(hp) or isinstance(hp.get("model"), str)):
        return hp
    backbone = dict(hp.pop("model_args", None) or {})
    if "moe" in backbone:
        if backbone["moe"] is None:  # dense
            backbone.pop("moe")
            hp["variant"] = "dense"
        else:
            backbone["moe"] = {k: v for k, v in dict(backbone["moe"]).items() if k != "d_model"}
    if "model" in hp:
        backbone["preset"] = hp.pop("model")
    if hp.get("variant") is not None:
        backbone["variant"] = hp["variant"]
    hp.pop("variant", None)
    hp["backbone"] = backbone
    hp["optim"] = {k: hp.pop(k) for k in optim_keys if k in hp}
    return hp


# ------------------------------------------------------------------------------ the base module
class MMMoEModule(pl.LightningModule):
    """Base LightningModule: builds ``self.backbone`` and owns optimisation and MoE logging.

    Subclasses declare only their own arguments and pass the rest on (``**kwargs`` to
    ``super().__init__``); LightningCLI follows that and lists and checks these arguments for every
    task (``mmmoe fit --model.help tasks.vqa.VQAModule``). The base records the arguments of the
    whole class chain as hyperparameters, the specs as plain dicts (``save_hyperparameters``), so
    checkpoints load weights-only and ``load_from_checkpoint`` rebuilds the module.

    Args:
        backbone: the backbone: preset, variant and overrides of any ModelConfig / MoEConfig field
            (``mmmoe.models.BackboneSpec``, or a dict of its fields).
        optim: AdamW and its warmup + cosine schedule (``OptimSpec``, or a dict of its fields).
        tokenizer: path of the SentencePiece model; sets the vocabulary size from it unless
            backbone.vocab_size is given.
        init_from: a checkpoint (Lightning .ckpt, state dict or .safetensors) whose matching
            weights initialise the module (fine-tuning); loaded weights-only.
    """

    #: The kinds of input this task feeds the backbone (``mmmoe.models.multiway_transformer.INPUT_KINDS``).
    #: Parameters that none of them reaches (e.g. the vision and language FFN ways of the top
    #: vision-language blocks for image-text tasks, the whole vision side for a language model)
    #: are frozen when fitting starts, so DDP expects a gradient for exactly what the loss uses.
    backbone_inputs: Tuple[str, ...] = INPUT_KINDS
    #: Whether image inputs carry a patch mask (masked image modelling uses the mask token).
    masked_images: bool = False
    #: Short task name (``mmmoe evaluate <TASK>``); None for modules without an official evaluation.
    TASK: Optional[str] = None
    #: Field of an evaluation record that names its sample: records are de-duplicated and sorted by
    #: it (one process and N processes then write the same file). None: records are aggregates.
    RECORD_KEY: Optional[str] = None
    #: Set by ``tasks.evaluation.OfficialEvaluation`` for a test run: the split, the result folder
    #: and the task's evaluation options.
    evaluated_split: str = "test"
    results_dir: Optional[str] = None
    eval_options: Dict[str, Any] = {}

    def __init__(
        self,
        backbone: BackboneSpec = BackboneSpec(),
        optim: OptimSpec = OptimSpec(),
        tokenizer: Optional[str] = None,
        init_from: Optional[str] = None,
    ):
        super().__init__()
        spec, optim = BackboneSpec.coerce(backbone), OptimSpec.coerce(optim)
        self.tokenizer_path = tokenizer
        extra = {}
        if tokenizer is not None and spec.vocab_size is None:
            from data_pipelines.tokenizer import Tokenizer

            extra["vocab_size"] = Tokenizer(tokenizer).vocab_size
        self.backbone: MultiwayTransformer = create_model(spec, **extra)
        self._base_hparams = dict(backbone=spec.to_dict(), optim=optim.to_dict(), tokenizer=tokenizer,
                                  init_from=init_from)
        self.save_hyperparameters(frame=inspect.currentframe())
        self.activation_stats = ExpertActivation()
        self._step_loads: Dict[str, Tensor] = {}
        self._step_tokens: Any = 0
        self._step_start: Optional[float] = None

    def save_hyperparameters(self, *args: Any, ignore: Optional[Union[List[str], str]] = None,
                             frame: Any = None, logger: bool = True) -> None:
        """Lightning's, plus: called without ``args`` it records the constructor arguments of every
        class in the chain (this one's included, defaults too, whichever ``__init__`` calls it),
        with ``backbone`` and ``optim`` as plain dicts. The base calls it, so subclasses need not.
        Built by LightningCLI, the module records the parsed config as Lightning does (with its
        ``_class_path``, which ``load_from_checkpoint`` uses)."""
        if args:
            return super().save_hyperparameters(*args, ignore=ignore, frame=frame, logger=logger)
        from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
        from pytorch_lightning.utilities.parsing import collect_init_args

        given = _given_hyperparameters.get()
        if given is not None:  # LightningCLI's instantiation: its config, defaults filled in
            hp: Dict[str, Any] = dict(given)
        else:
            frame = frame or inspect.currentframe().f_back
            hp = {}
            for local_args in collect_init_args(frame, [], classes=(MMMoEModule,)):
                hp.update(local_args)
        hp.update(self._base_hparams)
        for name in [ignore] if isinstance(ignore, str) else (ignore or []):
            hp.pop(name, None)
        super().save_hyperparameters(hp, logger=logger)
        self._hparams_name = None  # load_from_checkpoint passes the saved keys as keyword arguments

    @property
    def optim_spec(self) -> OptimSpec:
        """The optimisation settings (``hparams.optim``)."""
        return OptimSpec.coerce(self.hparams["optim"])

    # subclasses call this at the end of their __init__, after building their heads
    def _finish_init(self) -> None:
        if self.hparams.get("init_from"):
            self.load_pretrained(self.hparams["init_from"])

    @property
    def config(self):
        return self.backbone.config

    # ------------------------------------------------------------------ used parameters
    def input_kinds(self) -> Tuple[str, ...]:
        """The input kinds of this run (``backbone_inputs``; pretraining asks its data module)."""
        return tuple(self.backbone_inputs)

    def freeze_unused(self) -> List[str]:
        """Freeze (``requires_grad=False``) the backbone parameters that no forward of this run's
        input kinds reaches, and return their names. They stay in the state dict and in
        checkpoints; only the optimiser and DDP's gradient reduction leave them out."""
        names = self.backbone.unused_parameters(self.input_kinds(), self.masked_images)
        params = dict(self.backbone.named_parameters())
        for n in names:
            params[n].requires_grad_(False)
        if names:
            log.info("frozen %d backbone tensors that inputs %s never reach (e.g. %s)",
                     len(names), "/".join(self.input_kinds()), names[0])
        return names

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.freeze_unused()

    # ------------------------------------------------------------------ weights
    def load_pretrained(self, path: PathLike) -> Dict[str, List[str]]:
        """Initialise from ``path`` (weights-only); logs and returns missing / unexpected keys."""
        state = extract_state_dict(load_state_file(path))
        report = load_matching(self, state)
        log.info(
            "loaded %d tensors from %s; missing %d, unexpected %d, shape-mismatched %d",
            len(report["loaded"]), path, len(report["missing"]), len(report["unexpected"]), len(report["mismatched"]),
        )
        for kind in ("missing", "unexpected", "mismatched"):
            if report[kind]:
                log.info("%s keys: %s%s", kind, ", ".join(report[kind][:12]), " ..." if len(report[kind]) > 12 else "")
        if not report["loaded"]:
            raise ValueError(f"no tensor in {str(path)!r} matches this model (is it an mmmoe checkpoint?)")
        self.load_report = report
        return report

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        h = self.optim_spec
        groups = param_groups(self, h.weight_decay, skip={f"backbone.{n}" for n in self.backbone.no_weight_decay()})
        opt = torch.optim.AdamW(groups, lr=h.lr, betas=tuple(h.betas), eps=h.eps, fused=self._fused_adamw())
        total = self._total_steps()
        warm, min_ratio = int(h.warmup_steps), float(h.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warm, total, min_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _fused_adamw(self) -> bool:
        """Fused AdamW where it may be used: Lightning's mixed-precision plugin refuses gradient
        clipping with optimisers that unscale inside their step (fused ones), so under
        ``bf16-mixed`` / ``16-mixed`` the default (foreach) AdamW is used."""
        from pytorch_lightning.plugins.precision import MixedPrecision

        trainer = self._trainer
        if trainer is not None and isinstance(trainer.precision_plugin, MixedPrecision):
            return False
        return _can_fuse(self.parameters())

    def _total_steps(self) -> int:
        trainer = self._trainer
        if trainer is None:
            return 1
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            return max(1, int(trainer.estimated_stepping_batches))
        except Exception:  # infinite / unknown length
            return 100_000

    # ------------------------------------------------------------------ MoE bookkeeping
    def moe_loss_and_log(self, out: BackboneOutput, prefix: str, batch_size: int) -> Tensor:
        """Record routing statistics and the routed tokens of one forward; return its aux loss.

        Every task calls this once per backbone forward, so it is also where a training step's
        tokens are counted (non-padding positions) for ``train/tokens_per_s``."""
        if self.training:
            n = out.hidden.shape[0] * out.hidden.shape[1]
            if out.padding_mask is not None:
                n = out.padding_mask.numel() - out.padding_mask.sum()  # a tensor: no host sync here
            self._step_tokens = self._step_tokens + n
            for key, o in out.moe.items():  # aux-loss-free balancing: loads summed over the step's forwards
                self._step_loads[key] = o.expert_load + self._step_loads[key] if key in self._step_loads else o.expert_load
        if out.moe:
            if not self.training:
                self.activation_stats.update(out.moe)
            act = torch.stack([o.activation_ratio.float() for o in out.moe.values()]).mean()
            div = torch.stack([o.divergence.float() for o in out.moe.values()]).mean()
            stage = "train" if self.training else "val"
            # one key per forward kind (a pretraining step runs image-text, image and text forwards)
            tag = f"{stage}/{prefix}" if prefix else stage
            self.log(f"{tag}/moe_aux_loss", out.aux_loss.detach(), batch_size=batch_size)
            self.log(f"{tag}/expert_activation", act, batch_size=batch_size)
            self.log(f"{tag}/sub_token_divergence", div, batch_size=batch_size)
            if self.training and self.global_step % 10 == 0:
                for k, o in out.moe.items():
                    self.log(f"activation/{prefix}/{k}", o.activation_ratio.float(), batch_size=batch_size)
        return out.aux_loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_tokens = 0
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """``train/tokens_per_s`` over the whole batch (forward, backward and, on the last
        micro-batch, the optimiser step)."""
        if self._step_start is not None and self._step_tokens:
            dt = time.perf_counter() - self._step_start
            if dt > 0:
                self.log("train/tokens_per_s", float(self._step_tokens) / dt, on_step=True, on_epoch=False)
        self._step_tokens = 0

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimiser step, then the aux-loss-free bias update of each such MoE layer: once per
        optimiser step, with the expert load summed over the step's forwards, its micro-batches
        (gradient accumulation) and every data-parallel rank, so all ranks apply the same update."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.update_balancing()

    def update_balancing(self) -> None:
        """Apply and clear the loads gathered since the last optimiser step (see ``optimizer_step``)."""
        loads, self._step_loads = self._step_loads, {}
        if getattr(self, "_skip_step", False):  # tasks.robust.NonFiniteGuard dropped this step (on every rank)
            return
        layers = [(k, m) for k, m in self.backbone.moe_layers().items() if m.config.balancing == "aux_free"]
        if not layers:
            return
        # a fixed layout on every rank (a way that got no tokens here contributes zeros), so that
        # one all-reduce sums the loads of all layers
        flat = torch.cat([loads[k].float() if k in loads else m.expert_bias.new_zeros(m.config.num_experts)
                          for k, m in layers])
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            flat = trainer.strategy.reduce(flat, reduce_op="sum")
        for (k, m), load in zip(layers, flat.split([m.config.num_experts for _, m in layers])):
            m.update_balancing(load)

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Store the tokenizer path absolute, so ``mmmoe evaluate`` / ``predict`` find it from any
        working directory."""
        checkpoint["mmmoe_task_class"] = f"{type(self).__module__}:{type(self).__qualname__}"  # for mmmoe export
        hp = checkpoint.get("hyper_parameters")
        tok = hp.get("tokenizer") if isinstance(hp, dict) else None
        if isinstance(tok, str) and not os.path.isabs(tok) and os.path.exists(tok):
            hp["tokenizer"] = os.path.abspath(tok)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 images (data modules built with ``normalize=False``, the fast path: 4x less to
        move and normalisation on the device) become normalised float32 here; float images pass."""
        if isinstance(batch, dict):
            from data_pipelines.readers import normalize_images

            normalize_images(batch)
        return batch

    def on_validation_epoch_start(self) -> None:
        self.activation_stats.reset()

    # ------------------------------------------------------------------ official evaluation
    # (the Trainer's test loop; the protocol is described in tasks/evaluation.py)
    def check_eval_inputs(self, split: str) -> None:
        """Raise a clear error before the first batch when the ground truth of ``split`` is unusable."""

    def eval_records(self, batch: Any) -> List[Dict[str, Any]]:
        """JSON-able records of one test batch (official result entries, or partial sums)."""
        raise NotImplementedError(f"{type(self).__name__} has no official evaluation")

    def score_records(self, records: List[Dict[str, Any]], split: str, out: Any) -> Dict[str, float]:
        """Rank 0, once per evaluation: write the official file(s) of all ``records`` with ``out``
        (``tasks.evaluation.ResultFiles``) and return the flat metrics (with the task's baseline)."""
        raise NotImplementedError(f"{type(self).__name__} has no official evaluation")

    def _has_official_evaluation(self) -> bool:
        return type(self).eval_records is not MMMoEModule.eval_records

    def on_test_epoch_start(self) -> None:
        self.activation_stats.reset()
        self._eval_records: List[Dict[str, Any]] = []

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_records.extend(self.eval_records(batch))

    def on_test_epoch_end(self) -> None:
        if self._has_official_evaluation():
            from tasks.evaluation import finish_evaluation

            finish_evaluation(self)

    def evaluate_split(self, datamodule: Any, split: str, out_dir: PathLike, **options: Any) -> Dict[str, float]:
        """Evaluate on ``datamodule``'s ``split`` (``val`` or ``test``) in this process: the Trainer's
        test loop (``tasks.evaluation.run_test``); official files and metrics.json in ``out_dir``."""
        from tasks.evaluation import run_test

        return run_test(self, datamodule, split, out_dir, **options)
