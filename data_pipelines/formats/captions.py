"""COCO captions: Karpathy's split file ``dataset_coco.json``, COCO-format caption ground truth and
caption result files.

Karpathy split file (also the Flickr8k/30k ones)::

    {"images": [{"split": "train"|"restval"|"val"|"test", "filepath": "val2014",
                 "filename": "COCO_val2014_000000391895.jpg", "cocoid": 391895, "imgid": 0,
                 "sentences": [{"raw": "A man ...", "tokens": [...], "sentid": 0, "imgid": 0}, ...],
                 "sentids": [...]}, ...],
     "dataset": "coco"}

The image id is ``cocoid`` (``imgid`` in the Flickr files, which have no ``cocoid``); a sentence's
text is ``raw`` (its ``tokens`` joined by spaces when there is no ``raw``). :func:`karpathy_image`
checks one image record; the shard writer skips and counts the records it rejects, the metrics stop
with its message.

COCO-format caption ground truth: ``{"images": [{"id"}], "annotations": [{"image_id", "caption",
"id"}]}``. Result files: ``[{"image_id": int, "caption": str}]``, one entry per image.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from .io import FormatError, PathLike, describe, id_text_pairs, is_int, load_input, preview, unique_by_id, write_json

__all__ = [
    "KarpathyImage", "karpathy_image", "karpathy_records", "karpathy_split", "karpathy_to_coco", "coco_captions",
    "load_references", "load_captions", "write_karpathy", "write_caption_results",
]


class KarpathyImage(NamedTuple):
    """One image record of a Karpathy split file."""

    image_id: int
    split: Optional[str]
    filepath: str  # folder under the image root ("" when absent)
    filename: Optional[str]
    sentences: List[Tuple[str, Any]]  # (raw text, sentid or None), in file order


def karpathy_image(img: Any, where: str) -> KarpathyImage:
    """Check one record of a Karpathy file's ``images`` list; :class:`FormatError` starting with
    ``where`` (e.g. ``"dataset_coco.json: images[3]"``) when it is unusable."""
    if not isinstance(img, Mapping):
        raise FormatError(f"{where} is {describe(img)}, expected an object")
    # COCO's Karpathy file has cocoid; the Flickr ones only imgid.
    image_id = img.get("cocoid", img.get("imgid"))
    if not is_int(image_id):
        raise FormatError(f"{where}: 'cocoid' must be an integer, got {describe(image_id)}")
    sents = img.get("sentences")
    if not isinstance(sents, (list, tuple)) or not sents:
        raise FormatError(f"{where}: image {image_id}: 'sentences' must be a non-empty list")
    sentences = []
    for j, sent in enumerate(sents):
        raw = sent.get("raw") if isinstance(sent, Mapping) else None
        if raw is None and isinstance(sent, Mapping):
            tokens = sent.get("tokens")
            if isinstance(tokens, (list, tuple)) and all(isinstance(t, str) for t in tokens):
                raw = " ".join(tokens)
        if not isinstance(raw, str):
            raise FormatError(f"{where}: image {image_id}: sentences[{j}] has no string 'raw'")
        sentences.append((raw, sent.get("sentid")))
    filename, filepath = img.get("filename"), img.get("filepath") or ""
    if filename is not None and not isinstance(filename, str) or not isinstance(filepath, str):
        raise FormatError(f"{where}: image {image_id}: 'filename' / 'filepath' must be strings")
    split = img.get("split")
    return KarpathyImage(image_id, None if split is None else str(split), filepath, filename, sentences)


def karpathy_records(doc: Any, name: str) -> List[Any]:
    """The ``images`` list of a parsed Karpathy file (records unchecked: see :func:`karpathy_image`)."""
    images = doc.get("images") if isinstance(doc, Mapping) else None
    if not isinstance(images, (list, tuple)):
        if not isinstance(doc, Mapping) or "images" not in doc:
            raise FormatError(f"{name}: not a Karpathy split file (no 'images')")
        raise FormatError(f"{name}: 'images' must be a list, got {describe(images)}")
    return list(images)


def karpathy_split(doc: Any, split: str, name: str) -> List[KarpathyImage]:
    """The checked records of the images of ``split``, in file order; an error when the split has
    none (naming the splits present) or an image id appears twice in it."""
    out = []
    seen = set()
    splits: Counter = Counter()
    for i, img in enumerate(karpathy_records(doc, name)):
        if not isinstance(img, Mapping):
            raise FormatError(f"{name}: images[{i}] is {describe(img)}, expected an object")
        splits[str(img.get("split"))] += 1
        if img.get("split") != split:
            continue
        rec = karpathy_image(img, f"{name}: images[{i}]")
        if rec.image_id in seen:
            raise FormatError(f"{name}: image id {rec.image_id} appears twice in split {split!r}")
        seen.add(rec.image_id)
        out.append(rec)
    if not out:
        have = ", ".join(f"{k} ({v})" for k, v in sorted(splits.items())) or "none"
        raise FormatError(f"{name}: no images in split {split!r}; splits present: {have}")
    return out


def karpathy_to_coco(dataset: Union[PathLike, Mapping[str, Any]], split: str = "test") -> Dict[str, Any]:
    """COCO-format caption ground truth for one split of a Karpathy ``dataset_coco.json``.

    Returns ``{"images": [{"id"}], "annotations": [{"image_id", "caption", "id"}], "type": "captions"}``
    in file order; annotation ids are the sentences' ``sentid`` when present, else running numbers.
    """
    doc, name = load_input(dataset, "coco")
    return coco_captions((rec.image_id, rec.sentences) for rec in karpathy_split(doc, split, name))


def coco_captions(images: Iterable[Tuple[int, Sequence[Tuple[str, Any]]]]) -> Dict[str, Any]:
    """COCO-format caption ground truth from ``(image_id, [(caption, annotation id or None), ...])``
    pairs: ``{"images": [{"id"}], "annotations": [{"image_id", "caption", "id"}], "type": "captions"}``.
    An annotation without an integer id gets its running number."""
    out_images, annotations = [], []
    for image_id, caps in images:
        out_images.append({"id": int(image_id)})
        for caption, ann_id in caps:
            annotations.append({"image_id": int(image_id), "caption": caption,
                                "id": ann_id if is_int(ann_id) else len(annotations)})
    return {"images": out_images, "annotations": annotations, "type": "captions"}


def references(gt: Any, split: str) -> Tuple[Dict[int, List[str]], str]:
    """References ``{image_id: [captions]}`` plus how messages should name the evaluated set."""
    doc, name = load_input(gt, "coco")
    if not isinstance(doc, Mapping):
        raise FormatError(f"{name}: expected a JSON object, got {describe(doc)}")
    images = doc.get("images")
    is_karpathy = isinstance(images, (list, tuple)) and any(
        isinstance(img, Mapping) and "sentences" in img for img in images)
    if is_karpathy:
        refs = {rec.image_id: [raw for raw, _ in rec.sentences] for rec in karpathy_split(doc, split, name)}
        return refs, f"split {split!r} of {name}"
    if "annotations" not in doc:
        raise FormatError(f"{name}: neither a Karpathy split file (images with 'sentences') nor a "
                          "COCO caption file ('annotations')")
    anns = doc["annotations"]
    if not isinstance(anns, (list, tuple)):
        raise FormatError(f"{name}: 'annotations' must be a list, got {describe(anns)}")
    refs = {}
    if isinstance(images, (list, tuple)):
        for i, img in enumerate(images):
            iid = img.get("id") if isinstance(img, Mapping) else None
            if not is_int(iid):
                raise FormatError(f"{name}: images[{i}]: 'id' must be an integer, got {describe(iid)}")
            refs.setdefault(iid, [])
    pairs = id_text_pairs(anns, name, "image_id", "caption", "image", "'annotations'", "annotations[{}]".format)
    for i, (iid, cap) in enumerate(pairs):
        if isinstance(images, (list, tuple)) and iid not in refs:
            raise FormatError(f"{name}: annotations[{i}]: image {iid} is not in 'images'")
        refs.setdefault(iid, []).append(cap)
    empty = [iid for iid, caps in refs.items() if not caps]
    if empty:
        raise FormatError(f"{name}: {len(empty)} images have no reference caption: {preview(empty)}")
    if not refs:
        raise FormatError(f"{name}: no reference captions")
    return refs, name


def load_references(gt: Union[PathLike, Mapping[str, Any]], split: str = "test") -> Dict[int, List[str]]:
    """``{image_id: [reference captions]}`` in file order.

    ``gt`` is a Karpathy split file (``{"images": [{"split", "sentences", "cocoid", ...}]}``; only
    images of ``split`` are kept) or a COCO-format caption file (``{"annotations": [...]}``, optionally
    with ``"images"``; ``split`` is then ignored). Path or parsed object.
    """
    return references(gt, split)[0]


def load_captions(results: Union[PathLike, Sequence[Mapping[str, Any]]]) -> Dict[int, str]:
    """``{image_id: caption}`` from results ``[{"image_id": int, "caption": str}]`` (path or list).

    Duplicated image ids are an error; empty captions are kept.
    """
    doc, name = load_input(results, "results")
    pairs = id_text_pairs(doc, name, "image_id", "caption", "image")
    captions = unique_by_id(pairs, name, "image ids have more than one caption (pycocoevalcap scores one per image)")
    if not captions:
        raise FormatError(f"{name}: no captions")
    return captions


def write_karpathy(path: PathLike, images: Sequence[Mapping[str, Any]], dataset: str = "coco",
                   indent: Optional[int] = None) -> None:
    """Write a Karpathy split file ``{"images": images, "dataset": dataset}`` (atomically)."""
    write_json(path, {"images": list(images), "dataset": dataset}, indent=indent)


def write_caption_results(path: PathLike, results: Union[Mapping[int, str], Sequence[Mapping[str, Any]]]) -> None:
    """Write a caption result file ``[{"image_id", "caption"}]`` from ``{image_id: caption}`` or
    such a list (checked with :func:`load_captions` first, so an unscorable file is never written)."""
    rows = ([{"image_id": k, "caption": v} for k, v in results.items()] if isinstance(results, Mapping)
            else list(results))
    captions = load_captions(rows)
    write_json(path, [{"image_id": k, "caption": v} for k, v in captions.items()], indent=1)
