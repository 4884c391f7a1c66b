"""Decoding: raw sample bytes -> python / array fields (runs in the DataLoader workers).

Image bytes -> PIL (JPEG draft) -> crop/resize -> uint8 array, UTF-8 text -> token ids, JSON ->
task fields. Nothing is ever unpickled: webdataset's ``.decode()`` is not used anywhere. A sample
that cannot be decoded raises ``SampleError`` (counted and skipped by the stage's handler).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import schema
from ..formats.nlvr2 import parse_truth_value
from ..transforms import ImageTransform, decode_image
from .errors import SampleError

def _member(sample: Mapping[str, Any], suffix: str) -> bytes:
    data = sample.get(suffix)
    if data is None:
        raise SampleError("missing_field", f"no .{suffix} member", key=sample.get("__key__"), url=sample.get("__url__"))
    return data


def text_member(sample: Mapping[str, Any], suffix: str = schema.TEXT_KEY) -> str:
    data = _member(sample, suffix)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exn:
        raise SampleError("bad_utf8", f".{suffix}: {exn}", key=sample.get("__key__"), url=sample.get("__url__")) from None
    if not text.strip():
        raise SampleError("missing_field", f"empty .{suffix}", key=sample.get("__key__"), url=sample.get("__url__"))
    return text.strip()


def meta_member(sample: Mapping[str, Any], required: bool) -> Dict[str, Any]:
    data = sample.get(schema.META_KEY)
    if data is None:
        if required:
            _member(sample, schema.META_KEY)
        return {}
    key, url = sample.get("__key__"), sample.get("__url__")
    try:
        meta = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exn:
        raise SampleError("bad_utf8", f".json: {exn}", key=key, url=url) from None
    except (ValueError, RecursionError) as exn:  # JSONDecodeError, over-long ints, deep nesting
        raise SampleError("bad_json", f"{type(exn).__name__}: {exn}", key=key, url=url) from None
    if not isinstance(meta, dict):
        raise SampleError("bad_json", f"expected an object, got {type(meta).__name__}", key=key, url=url)
    return meta


def _field(sample: Mapping[str, Any], meta: Mapping[str, Any], name: str, types: Tuple[type, ...]) -> Any:
    if name not in meta or meta[name] is None:
        raise SampleError("missing_field", f"json has no {name!r}", key=sample.get("__key__"), url=sample.get("__url__"))
    value = meta[name]
    if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
        raise SampleError(
            "bad_value", f"json {name!r} is {type(value).__name__}", key=sample.get("__key__"), url=sample.get("__url__")
        )
    if isinstance(value, int) and not -(2**63) <= value < 2**63:  # it goes into an int64 tensor
        raise SampleError("bad_value", f"json {name!r} out of int64 range", key=sample.get("__key__"), url=sample.get("__url__"))
    return value


def _image(sample: Mapping[str, Any], suffix: str, transform: ImageTransform,
           generator: Optional[torch.Generator] = None) -> np.ndarray:
    data = _member(sample, suffix)
    try:
        return transform.to_array(decode_image(data, transform.size), generator)
    except Exception as exn:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise SampleError(
            "corrupt_image", f".{suffix}: {type(exn).__name__}: {exn}", key=sample.get("__key__"), url=sample.get("__url__")
        ) from None


def encode_text(tokenizer: Any, text: str, max_len: int) -> List[int]:
    """``[bos] + encode(text) + [eos]``, the tokens cut so the whole fits in ``max_len``. Only the
    first ``max(4096, 64 * max_len)`` characters are tokenized (far more than ``max_len`` tokens
    need), so a huge text member costs no more than a normal one."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (bos + eos), got {max_len}")
    text = text[: max(4096, 64 * max_len)]
    return [tokenizer.bos_id, *tokenizer.encode(text)[: max_len - 2], tokenizer.eos_id]


class StreamRandom:
    """Base of the stages that draw random numbers (crops, flips, masks, caption choice): they
    draw from ``self.generator``, which ``Pipeline`` re-seeds at the start of every pass from
    (seed, epoch, rank, worker, stage), so what they draw depends only on the stream position and
    not on the process, the global RNG or how many other readers share it. ``None`` (a stage used
    outside a Pipeline) draws from torch's global generator."""

    generator: Optional[torch.Generator] = None


class DecodeImageText(StreamRandom):
    def __init__(self, tokenizer: Any, transform: ImageTransform, max_len: int):
        self.tokenizer, self.transform, self.max_len = tokenizer, transform, max_len

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        text = text_member(sample)
        image = _image(sample, schema.IMAGE_KEY, self.transform, self.generator)
        return {"key": sample["__key__"], "image": image, "text": encode_text(self.tokenizer, text, self.max_len)}


class DecodeImage(StreamRandom):
    def __init__(self, transform: ImageTransform):
        self.transform = transform

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        return {"key": sample["__key__"], "image": _image(sample, schema.IMAGE_KEY, self.transform, self.generator)}


class DecodeText:
    def __init__(self, tokenizer: Any, max_len: int, lang: str):
        self.tokenizer, self.max_len, self.lang = tokenizer, max_len, lang

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        text = text_member(sample)
        lang = meta_member(sample, required=False).get("lang") or self.lang
        return {"key": sample["__key__"], "text": encode_text(self.tokenizer, text, self.max_len), "lang": str(lang)}


class DecodeVQA(StreamRandom):
    def __init__(
        self,
        tokenizer: Any,
        transform: ImageTransform,
        max_len: int,
        answer_vocab: Mapping[str, int],
        with_answers: bool,
        normalize_answer: Optional[Callable[[str], str]],
    ):
        self.tokenizer, self.transform, self.max_len = tokenizer, transform, max_len
        self.answer_vocab, self.with_answers, self.normalize_answer = answer_vocab, with_answers, normalize_answer

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        meta = meta_member(sample, required=True)
        question = _field(sample, meta, "question", (str,))
        qid = _field(sample, meta, "question_id", (int,))
        out = {"key": sample["__key__"], "question_id": qid}
        if self.with_answers:
            answers = _field(sample, meta, "answers", (list,))
            if not all(isinstance(a, str) for a in answers):
                raise SampleError("bad_value", "answers must be strings", key=sample["__key__"], url=sample["__url__"])
            out["answers"] = answers
            out["target"] = vqa_soft_scores(answers, self.answer_vocab, self.normalize_answer)
        out["image"] = _image(sample, schema.IMAGE_KEY, self.transform, self.generator)
        out["text"] = encode_text(self.tokenizer, question, self.max_len)
        return out


def vqa_soft_scores(
    answers: Sequence[str], answer_vocab: Mapping[str, int], normalize: Optional[Callable[[str], str]] = None
) -> Dict[int, float]:
    """{answer index: min(1, n / 3)} for the in-vocabulary answers given by n annotators."""
    counts: Dict[str, int] = {}
    for a in answers:
        a = normalize(a) if normalize is not None else a
        counts[a] = counts.get(a, 0) + 1
    return {answer_vocab[a]: min(1.0, n / 3.0) for a, n in counts.items() if a in answer_vocab}


class DecodeNLVR2(StreamRandom):
    def __init__(self, tokenizer: Any, transform: ImageTransform, max_len: int):
        self.tokenizer, self.transform, self.max_len = tokenizer, transform, max_len

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        meta = meta_member(sample, required=True)
        sentence = _field(sample, meta, "sentence", (str,))
        label = meta.get("label")
        if label is not None:
            try:
                label = parse_truth_value(label)  # "True" / "False" (the official files' spelling) or a bool
            except ValueError:
                raise SampleError("bad_value", f"label {label!r}", key=sample["__key__"], url=sample["__url__"]) from None
        return {
            "key": sample["__key__"],
            "identifier": str(meta.get("identifier", sample["__key__"])),
            "label": -1 if label is None else int(label),
            "image_left": _image(sample, schema.LEFT_IMAGE_KEY, self.transform, self.generator),
            "image_right": _image(sample, schema.RIGHT_IMAGE_KEY, self.transform, self.generator),
            "text": encode_text(self.tokenizer, sentence, self.max_len),
        }


class DecodeCaption(StreamRandom):
    def __init__(self, tokenizer: Any, transform: ImageTransform, max_len: int, train: bool):
        self.tokenizer, self.transform, self.max_len, self.train = tokenizer, transform, max_len, train

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        meta = meta_member(sample, required=True)
        image_id = _field(sample, meta, "image_id", (int,))
        captions = meta.get("captions") or []
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise SampleError("bad_value", "captions must be a list of strings", key=sample["__key__"], url=sample["__url__"])
        if self.train and not captions:
            raise SampleError("missing_field", "no captions", key=sample["__key__"], url=sample["__url__"])
        if self.train:
            caption = captions[int(torch.randint(len(captions), (), generator=self.generator))]
        else:
            caption = captions[0] if captions else ""
        return {
            "key": sample["__key__"],
            "image_id": image_id,
            "captions": captions,
            "image": _image(sample, schema.IMAGE_KEY, self.transform, self.generator),
            "text": encode_text(self.tokenizer, caption, self.max_len),
        }
