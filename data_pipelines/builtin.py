"""The built-in dataset end to end: raw files in the official formats, then WebDataset shards.

``make_builtin_dataset(out_dir)`` draws the scenes (``data_pipelines.synthetic.generate``) and writes,
under ``out_dir/shards``, with the same writers users run on real COCO / VQAv2 / NLVR2 files:

    pretrain-image-text-*   Karpathy train + restval, one sample per (image, caption)
    pretrain-image-text-val-*  Karpathy val, the same way (held out)
    pretrain-image-*        the train2014 images alone
    pretrain-text-en-*      text/en.txt without its last 10% of lines; pretrain-text-en-val-* those
    pretrain-text-ml-<lang>-*  text/multilingual/<lang>.txt likewise, and pretrain-text-ml-<lang>-val-*
    caption-<split>-*       Karpathy train / val / test, one sample per image with its captions
    vqa-<subtype>-*         VQAv2 train2014 / val2014 questions joined with their annotations
    nlvr2-<split>-*         NLVR2 train / dev / test1

``out_dir/shards/index.json`` maps each of those names to its manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Union

from data_pipelines import shards as W
from data_pipelines.formats.io import atomic_write, write_json
from data_pipelines.synthetic import generate

PathLike = Union[str, os.PathLike]


TEXT_HELDOUT = 0.1
"""Share of each text corpus's lines (the last ones) held out as ``<name>-val``."""


def _split_lines(path: Path, stem: Path, heldout: float):
    """Write the first (1 - heldout) of ``path``'s lines to ``<stem>.train.txt`` and the rest to
    ``<stem>.val.txt``; return both paths."""
    lines = path.read_bytes().splitlines(keepends=True)
    n_val = max(1, round(heldout * len(lines))) if len(lines) > 1 else 0
    stem.parent.mkdir(parents=True, exist_ok=True)
    train, val = Path(f"{stem}.train.txt"), Path(f"{stem}.val.txt")
    for target, part in ((train, lines[: len(lines) - n_val]), (val, lines[len(lines) - n_val:])):
        atomic_write(target, b"".join(part))
    return train, val


def make_builtin_dataset(
    out_dir: PathLike,
    num_images: int = 300,
    seed: int = 0,
    image_size: int = 96,
    shard_size: int = 500,
) -> Dict[str, Any]:
    """Generate (or reuse) the raw dataset in ``out_dir`` and (re)write its shards. Returns the index."""
    out = Path(out_dir)
    summary = generate(out, num_images=num_images, seed=seed, image_size=image_size)
    sdir = out / "shards"
    index_path = sdir / "index.json"
    params = dict(num_images=num_images, seed=seed, image_size=image_size, shard_size=shard_size)
    if summary.get("cached") and index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            if index.get("params") == params and all(
                Path(m["manifest"]).exists() for m in index["datasets"].values()
            ):
                return index
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable index is rebuilt below
    sdir.mkdir(parents=True, exist_ok=True)
    common = dict(shard_size=shard_size)
    coco_json = out / "coco" / "dataset_coco.json"
    coco_root = out / "coco"
    made: Dict[str, Dict[str, Any]] = {}

    def add(name: str, manifest: Dict[str, Any]) -> None:
        made[name] = dict(
            manifest=str(sdir / f"{name}.manifest.json"), kind=manifest["kind"],
            pattern=manifest["pattern"], total=manifest["total"], skipped=manifest.get("skipped", 0),
        )

    add("pretrain-image-text", W.write_karpathy_shards(
        coco_json, coco_root, sdir, splits=("train", "restval"), kind="image_text", prefix="pretrain-image-text", **common))
    add("pretrain-image", W.write_image_folder_shards(
        coco_root / "train2014", None, sdir, prefix="pretrain-image", **common))
    add("pretrain-image-text-val", W.write_karpathy_shards(
        coco_json, coco_root, sdir, splits=("val",), kind="image_text", prefix="pretrain-image-text-val", **common))
    texts = [("pretrain-text-en", out / "text" / "en.txt", "en")] + [
        (f"pretrain-text-ml-{f.stem}", f, f.stem) for f in sorted((out / "text" / "multilingual").glob("*.txt"))]
    for name, path, lang in texts:
        train_txt, val_txt = _split_lines(path, sdir / "text-splits" / name, TEXT_HELDOUT)
        add(name, W.write_text_shards([train_txt], sdir, lang=lang, prefix=name, **common))
        add(f"{name}-val", W.write_text_shards([val_txt], sdir, lang=lang, prefix=f"{name}-val", **common))
    for split in ("train", "val", "test"):
        name = f"caption-{split}"
        add(name, W.write_karpathy_shards(coco_json, coco_root, sdir, splits=(split,), kind="caption", prefix=name, **common))
    for sub in ("train2014", "val2014"):
        name = f"vqa-{sub}"
        add(name, W.write_vqa_shards(
            out / "vqav2" / f"v2_OpenEnded_mscoco_{sub}_questions.json",
            out / "vqav2" / f"v2_mscoco_{sub}_annotations.json",
            coco_root, sdir, prefix=name, **common))
    for split in ("train", "dev", "test1"):
        name = f"nlvr2-{split}"
        add(name, W.write_nlvr2_shards(out / "nlvr2" / f"{split}.json", out / "nlvr2" / "images", sdir, prefix=name, **common))

    index = dict(params=params, root=str(out), datasets=made)
    write_json(index_path, index, indent=2)
    return index
