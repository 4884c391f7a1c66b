"""Self-contained model folders: ``save_pretrained`` writes one, ``from_pretrained`` loads it back.

A folder (written by ``mmmoe export``) holds::

    model.safetensors   the weights (backbone + task heads), nothing else: no code, no pickle
    config.json         format, task, the full ModelConfig, preset / variant, the head
                        specifications, task labels (e.g. VQA answers), the task module's
                        hyperparameters, and the size + sha256 of every other file
    tokenizer.model     the SentencePiece model (when the model reads text)
    README.md           the model card

``from_pretrained(DIR)`` is pure PyTorch (+ safetensors, + sentencepiece for the tokenizer): it
checks every file against the sizes and hashes in config.json, checks the safetensors header
(names, shapes and dtypes) against the rebuilt model before reading any tensor, and loads strictly.
Any difference is a :class:`PretrainedFolderError` naming the file and what is wrong. Nothing is
unpickled on this path.

The returned :class:`PretrainedModel` has ``backbone`` and the task's heads under the names the
task module uses (``head``, ``mlm_head`` ...), so its state dict is the module's. Its ``forward``
computes the task's outputs (see ``TASK_OUTPUTS``) exactly as the training module does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from mmmoe.models.config import ModelConfig
from mmmoe.models.dual_encoder import RetrievalHead, encode_image, encode_text
from mmmoe.models.heads import MIMHead, NLVR2Head, TokenHead, VQAHead
from mmmoe.models.multiway_transformer import MultiwayTransformer

PathLike = Union[str, os.PathLike]

FORMAT = "mmmoe-pretrained"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.model"
CARD_NAME = "README.md"
TIED_EMBEDDING = "text_embed.token_embed"  # the backbone module a tied TokenHead shares
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class PretrainedFolderError(ValueError):
    """A model folder that is incomplete, altered or inconsistent with its config.json."""


# ------------------------------------------------------------------------------ head specifications
def head_spec(head: nn.Module, backbone: MultiwayTransformer) -> Dict[str, Any]:
    """``{"class": name, "args": {...}}`` that rebuilds ``head`` (a head of ``mmmoe.models``)."""
    if isinstance(head, TokenHead):
        tied = head.decoder is None
        if tied and head._embedding[0] is not backbone.get_submodule(TIED_EMBEDDING):
            raise ValueError("a TokenHead tied to something other than the backbone's token embedding cannot be saved")
        vocab = head.bias.shape[0] if tied else head.decoder.out_features
        return {"class": "TokenHead", "args": {"dim": head.dense.in_features, "vocab_size": int(vocab),
                                               "tied": tied, "eps": head.norm.eps}}
    if isinstance(head, MIMHead):
        P = head.proj.out_features
        return {"class": "MIMHead", "args": {"dim": head.proj.in_features, "patch_size": head.patch_size,
                                             "in_chans": P // (head.patch_size ** 2)}}
    if isinstance(head, VQAHead):
        return {"class": "VQAHead", "args": {"dim": head.pooler.dense.in_features,
                                             "num_answers": head.classifier[-1].out_features,
                                             "eps": head.pooler.norm.eps}}
    if isinstance(head, NLVR2Head):
        first_norm = head.classifier[0]  # LayerNorm(4 * dim) in both styles
        return {"class": "NLVR2Head", "args": {"dim": first_norm.normalized_shape[0] // 4, "eps": first_norm.eps,
                                               "style": head.style, "init_scale": head.init_scale}}
    if isinstance(head, RetrievalHead):
        return {"class": "RetrievalHead", "args": {"dim": head.image_proj.in_features, "embed_dim": head.embed_dim,
                                                   "pooling": head.pooling}}
    raise ValueError(f"no saved form for a head of type {type(head).__name__}")


def build_head(spec: Mapping[str, Any], backbone: MultiwayTransformer) -> nn.Module:
    """The head of a ``head_spec`` (weights freshly initialised; load them afterwards)."""
    cls, args = spec.get("class"), dict(spec.get("args") or {})
    if cls == "TokenHead":
        tied = args.pop("tied", False)
        return TokenHead(tied=backbone.get_submodule(TIED_EMBEDDING) if tied else None, **args)
    builders: Dict[str, Callable[..., nn.Module]] = {"MIMHead": MIMHead, "VQAHead": VQAHead, "NLVR2Head": NLVR2Head,
                                                     "RetrievalHead": RetrievalHead}
    if cls not in builders:
        raise ValueError(f"unknown head class {cls!r}: known TokenHead, {', '.join(builders)}")
    return builders[cls](**args)


# ------------------------------------------------------------------------------ task outputs
def _vqa(m: "PretrainedModel", image: Tensor, text_ids: Tensor, text_pad_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
    out = m.backbone.forward_features(image=image, text_ids=text_ids, text_pad_mask=text_pad_mask)
    return {"logits": m.head(out.hidden).float()}


def _nlvr2(m: "PretrainedModel", image_left: Tensor, image_right: Tensor, text_ids: Tensor,
           text_pad_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
    B = text_ids.shape[0]
    pad = None if text_pad_mask is None else torch.cat([text_pad_mask, text_pad_mask])
    out = m.backbone.forward_features(image=torch.cat([image_left, image_right]),
                                      text_ids=torch.cat([text_ids, text_ids]), text_pad_mask=pad)
    return {"logits": m.head(out.hidden[:B], out.hidden[B:], out.num_image_tokens).float()}


def _caption(m: "PretrainedModel", image: Tensor, text_ids: Tensor, text_pad_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
    out = m.backbone(image=image, text_ids=text_ids, text_pad_mask=text_pad_mask, attn_mode="prefix_causal")
    return {"logits": m.head(out.text_hidden).float()}


def _lm(m: "PretrainedModel", text_ids: Tensor, text_pad_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
    out = m.backbone(text_ids=text_ids, text_pad_mask=text_pad_mask, attn_mode="prefix_causal")
    return {"logits": m.head(out.text_hidden).float()}


def _mlm(m: "PretrainedModel", text_ids: Tensor, text_pad_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
    out = m.backbone(text_ids=text_ids, text_pad_mask=text_pad_mask)
    return {"logits": m.head(out.text_hidden).float()}


def _pretrain(m: "PretrainedModel", image: Optional[Tensor] = None, text_ids: Optional[Tensor] = None,
              text_pad_mask: Optional[Tensor] = None, image_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
    out = m.backbone.forward_features(image=image, text_ids=text_ids, text_pad_mask=text_pad_mask,
                                      image_mask=image_mask)
    res: Dict[str, Tensor] = {}
    if text_ids is not None:
        res["mlm_logits"] = m.mlm_head(out.text_hidden).float()
    if image is not None:
        res["mim_pred"] = m.mim_head(out.image_hidden[:, 1:]).float()
    return res


def _retrieval(m: "PretrainedModel", image: Optional[Tensor] = None, text_ids: Optional[Tensor] = None,
               text_pad_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
    res: Dict[str, Tensor] = {}
    if image is not None:
        res["image_embeds"] = encode_image(m.backbone, m.head, image)[0]
    if text_ids is not None:
        res["text_embeds"] = encode_text(m.backbone, m.head, text_ids, text_pad_mask)[0]
    if len(res) == 2:
        res["logits_per_image"], res["logits_per_text"] = m.head(res["image_embeds"], res["text_embeds"])
    return res


#: task -> (function of (model, **inputs) -> outputs, what it returns)
TASK_OUTPUTS: Dict[str, Tuple[Callable[..., Dict[str, Tensor]], str]] = {
    "vqa": (_vqa, "logits B x answers (labels: the answers)"),
    "nlvr2": (_nlvr2, "logits B x 2 (index 1 = true)"),
    "caption": (_caption, "logits B x L x V over the text positions (prefix LM)"),
    "lm": (_lm, "logits B x L x V (causal)"),
    "mlm": (_mlm, "logits B x L x V (bidirectional)"),
    "pretrain": (_pretrain, "mlm_logits B x L x V and/or mim_pred B x N x P"),
    "retrieval": (_retrieval, "image_embeds, text_embeds (normalised) and both logits when given both"),
}


# ------------------------------------------------------------------------------ tokenizer
class SentencePieceTokenizer:
    """The folder's SentencePiece model (special ids pad 0, unk 1, bos 2, eos 3, mask 4)."""

    pad_id, unk_id, bos_id, eos_id, mask_id = 0, 1, 2, 3, 4

    def __init__(self, path: PathLike):
        import sentencepiece as spm

        self.path = Path(path)
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(self.path.read_bytes())
        except (RuntimeError, OSError, TypeError) as exc:
            raise PretrainedFolderError(f"{self.path} is not a SentencePiece model ({exc})") from None
        if (sp.pad_id(), sp.bos_id(), sp.eos_id()) != (self.pad_id, self.bos_id, self.eos_id):
            raise PretrainedFolderError(f"{self.path}: special ids differ from mmmoe's (pad 0, bos 2, eos 3)")
        self._sp = sp

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    def encode(self, text: str) -> List[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])


# ------------------------------------------------------------------------------ the model
class PretrainedModel(nn.Module):
    """Backbone + task heads rebuilt from a folder. ``forward(**inputs)`` gives the task's outputs.

    Attributes: ``task``, ``config`` (ModelConfig), ``backbone``, the heads (by their names),
    ``labels`` (e.g. VQA answers; may be empty), ``tokenizer`` (or None), ``metadata`` (config.json).
    """

    def __init__(self, config: ModelConfig, task: str, heads: Mapping[str, Mapping[str, Any]],
                 buffers: Optional[Mapping[str, Mapping[str, Any]]] = None, labels: Optional[List[str]] = None):
        super().__init__()
        if task not in TASK_OUTPUTS:
            raise ValueError(f"unknown task {task!r}: known {', '.join(TASK_OUTPUTS)}")
        self.task = task
        self.config = config
        self.backbone = MultiwayTransformer(config)
        self.head_names = list(heads)
        for name, spec in heads.items():
            if name == "backbone" or "." in name:
                raise ValueError(f"invalid head name {name!r}")
            self.add_module(name, build_head(spec, self.backbone))
        for name, b in (buffers or {}).items():  # plain tensors of the task module (e.g. label counts)
            dtype = DTYPES.get(str(b.get("dtype")), torch.float32)
            self.register_buffer(name, torch.zeros(tuple(b.get("shape", ())), dtype=dtype))
        self.labels = list(labels or [])
        self.tokenizer: Optional[SentencePieceTokenizer] = None
        self.metadata: Dict[str, Any] = {}

    def forward(self, **inputs: Any) -> Dict[str, Tensor]:
        fn, _ = TASK_OUTPUTS[self.task]
        return fn(self, **inputs)

    def encode_text(self, texts: Sequence[str], max_len: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """``[bos] + tokens + [eos]`` ids (right-padded) and the padding mask (True = padding)."""
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer")
        tok = self.tokenizer
        L = min(max_len or self.config.max_text_len, self.config.max_text_len)
        seqs = [[tok.bos_id, *tok.encode(t)[: L - 2], tok.eos_id] for t in texts]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        lengths = torch.tensor([len(s) for s in seqs])
        pad = torch.arange(width)[None] >= lengths[:, None]
        dev = next(self.parameters()).device
        return ids.to(dev), pad.to(dev)


# ------------------------------------------------------------------------------ saving
def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_pretrained(out_dir: PathLike, model_config: ModelConfig, task: str, heads: Mapping[str, nn.Module],
                    state_dict: Mapping[str, Tensor], backbone: MultiwayTransformer,
                    tokenizer: Optional[PathLike] = None, card: Optional[str] = None,
                    extra: Optional[Mapping[str, Any]] = None, labels: Optional[List[str]] = None,
                    overwrite: bool = False) -> Path:
    """Write a model folder (see the module docstring). ``state_dict`` is the task module's (keys
    ``backbone.*``, ``<head>.*`` and top-level buffers); ``extra`` goes into config.json as is
    (plain types). A folder that exists and is not empty is refused unless it is a model folder and
    ``overwrite`` is set; files are written to a temporary folder and moved in at the end."""
    from safetensors.torch import save_file

    if task not in TASK_OUTPUTS:
        raise ValueError(f"unknown task {task!r}: known {', '.join(TASK_OUTPUTS)}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite or not (out / CONFIG_NAME).is_file():
            raise FileExistsError(f"{out} exists and is not empty: choose a new folder"
                                  + (" or pass overwrite (--overwrite)" if (out / CONFIG_NAME).is_file() else ""))
    specs = {name: head_spec(h, backbone) for name, h in heads.items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    owners = ("backbone.",) + tuple(f"{n}." for n in specs)
    buffers = {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in tensors.items()
               if not k.startswith(owners)}
    bad = [k for k in buffers if "." in k]
    if bad:
        raise ValueError(f"tensors outside the backbone and the heads cannot be saved: {bad[:5]}")
    stage = out.with_name(f".{out.name}.{os.getpid()}.partial")
    if stage.exists():
        import shutil

        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    save_file(tensors, str(stage / WEIGHTS_NAME), metadata={"format": "pt", "mmmoe_task": task})
    files = [WEIGHTS_NAME]
    if tokenizer is not None:
        _atomic_write(stage / TOKENIZER_NAME, Path(tokenizer).read_bytes())
        files.append(TOKENIZER_NAME)
    if card is not None:
        _atomic_write(stage / CARD_NAME, card.encode("utf-8"))
        files.append(CARD_NAME)
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "task": task,
        "model_config": model_config.to_dict(), "heads": specs, "buffers": buffers, "labels": list(labels or []),
        **dict(extra or {}),
        "files": {name: {"size": (stage / name).stat().st_size, "sha256": sha256_file(stage / name)} for name in files},
    }
    _atomic_write(stage / CONFIG_NAME, (json.dumps(config, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    if out.exists():
        for name in [*files, CONFIG_NAME, TOKENIZER_NAME, CARD_NAME]:
            if (out / name).exists() and not (stage / name).exists():
                (out / name).unlink()  # a file of the older export that this one does not have
        for name in files + [CONFIG_NAME]:
            os.replace(stage / name, out / name)
        stage.rmdir()
    else:
        os.replace(stage, out)
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, "F32")


# ------------------------------------------------------------------------------ loading
def read_folder_config(folder: PathLike) -> Dict[str, Any]:
    """config.json of a model folder, with its format checked."""
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"model folder {str(d)!r} does not exist")
    path = d / CONFIG_NAME
    if not path.is_file():
        raise PretrainedFolderError(f"{d} has no {CONFIG_NAME}: not a model folder written by 'mmmoe export'")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PretrainedFolderError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise PretrainedFolderError(f"{path}: 'format' is not {FORMAT!r}")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise PretrainedFolderError(f"{path}: format_version {cfg.get('format_version')!r} is not supported "
                                    f"(this mmmoe reads {FORMAT_VERSION})")
    for key in ("task", "model_config", "heads", "files"):
        if key not in cfg:
            raise PretrainedFolderError(f"{path} has no {key!r}")
    if WEIGHTS_NAME not in cfg["files"]:
        raise PretrainedFolderError(f"{path}: 'files' does not list {WEIGHTS_NAME}")
    return cfg


def verify_files(folder: PathLike, cfg: Mapping[str, Any]) -> None:
    """Every file listed in config.json exists with its recorded size and sha256."""
    d = Path(folder)
    for name, meta in cfg["files"].items():
        if Path(name).name != name:
            raise PretrainedFolderError(f"{d / CONFIG_NAME}: file entry {name!r} is not a plain file name")
        p = d / name
        if not p.is_file():
            raise PretrainedFolderError(f"{p} is missing (listed in {CONFIG_NAME})")
        size = p.stat().st_size
        if size != meta.get("size"):
            raise PretrainedFolderError(f"{p} has been altered: {size} bytes, {CONFIG_NAME} records {meta.get('size')}")
        digest = sha256_file(p)
        if digest != meta.get("sha256"):
            raise PretrainedFolderError(f"{p} has been altered: sha256 {digest[:16]}..., {CONFIG_NAME} records "
                                        f"{str(meta.get('sha256'))[:16]}...")


def load_weights(model: nn.Module, path: PathLike) -> None:
    """Strictly load a safetensors file into ``model``: the header's names, shapes and dtypes are
    compared with the model's state dict before any tensor is read."""
    from safetensors import safe_open

    path = Path(path)
    own = model.state_dict()
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            missing, unexpected = sorted(set(own) - names), sorted(names - set(own))
            if missing or unexpected:
                raise PretrainedFolderError(
                    f"{path} does not match the model of {CONFIG_NAME}"
                    + (f"; missing: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}" if missing else "")
                    + (f"; unexpected: {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}" if unexpected else ""))
            wrong = []
            for k in sorted(names):
                sl = f.get_slice(k)
                shape, dtype = tuple(sl.get_shape()), DTYPES.get(sl.get_dtype())
                if shape != tuple(own[k].shape) or dtype != own[k].dtype:
                    wrong.append(f"{k} {shape} {sl.get_dtype()} vs {tuple(own[k].shape)} {own[k].dtype}")
            if wrong:
                raise PretrainedFolderError(f"{path}: shapes/dtypes differ from the model of {CONFIG_NAME}: "
                                            + "; ".join(wrong[:4]) + (" ..." if len(wrong) > 4 else ""))
            state = {k: f.get_tensor(k) for k in names}
    except PretrainedFolderError:
        raise
    except Exception as exc:  # safetensors' own errors (bad header, truncated data)
        raise PretrainedFolderError(f"{path} is not a readable safetensors file: {exc}") from None
    model.load_state_dict(state, strict=True)


def from_pretrained(folder: PathLike, device: Union[str, torch.device] = "cpu", verify: bool = True) -> PretrainedModel:
    """Rebuild the model, its heads and its tokenizer from a folder written by ``mmmoe export``.

    Checks the recorded size and sha256 of every file (``verify=False`` skips the hashes, not the
    header checks) and returns the model in eval mode on ``device``."""
    d = Path(folder)
    cfg = read_folder_config(d)
    if verify:
        verify_files(d, cfg)
    try:
        mcfg = ModelConfig.from_dict(cfg["model_config"])
        model = PretrainedModel(mcfg, cfg["task"], cfg["heads"], cfg.get("buffers"), cfg.get("labels"))
    except (TypeError, ValueError) as exc:
        raise PretrainedFolderError(f"{d / CONFIG_NAME} describes no valid model: {exc}") from None
    load_weights(model, d / WEIGHTS_NAME)
    if TOKENIZER_NAME in cfg["files"]:
        model.tokenizer = SentencePieceTokenizer(d / TOKENIZER_NAME)
        if model.tokenizer.vocab_size > mcfg.vocab_size:
            raise PretrainedFolderError(f"{d / TOKENIZER_NAME} has {model.tokenizer.vocab_size} pieces, "
                                        f"the model's vocab_size is {mcfg.vocab_size}")
    model.metadata = cfg
    return model.to(device).eval()
