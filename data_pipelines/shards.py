"""WebDataset shard writers for the pretraining corpora and the task datasets.

Every writer turns one source format (see ``data_pipelines/schema.py`` for the sample contract and
the reference notes for the source formats) into ``<out_dir>/<prefix>-%06d.tar`` shards plus the
manifest ``<out_dir>/<prefix>.manifest.json``, and returns the manifest dict.

* Members are plain bytes: image files are copied byte for byte, text is UTF-8, metadata is JSON.
  Nothing is pickled.
* Each shard is written under a temporary name and renamed when complete, so a reader never sees a
  half-written ``.tar``; the manifest is written (also atomically) only after the last shard.
* A record that cannot be used (missing or empty image file, bytes that are no known image format,
  malformed JSON line, missing fields) is skipped: it is logged (the first few one by one, then a
  summary warning) and counted in the manifest's ``"skipped"`` field, counted in samples that were
  not written. A missing *input file* (the JSON / JSONL / captions file itself, or the image root)
  raises :class:`FileNotFoundError` naming the path.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from data_pipelines.schema import (
    IMAGE_KEY,
    KINDS,
    LEFT_IMAGE_KEY,
    MANIFEST_NAME,
    META_KEY,
    RIGHT_IMAGE_KEY,
    SHARD_NAME,
    TEXT_KEY,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: How many skipped records are logged one by one (at WARNING) before the rest go to DEBUG.
MAX_LOGGED_SKIPS = 20

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_SHARD_INDEX = re.compile(r"-(\d{6})\.tar$")


class BadRecord(Exception):
    """A source record that cannot be turned into a sample; the writers skip and count it."""


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def sanitize_key(text: str) -> str:
    """Map ``text`` to a WebDataset key: letters, digits, ``_`` and ``-`` only (never a dot)."""
    key = _KEY_UNSAFE.sub("_", str(text)).strip("_")
    return key or "x"


def _looks_like_image(data: bytes) -> bool:
    """True when ``data`` starts with the signature of a common image format."""
    return (
        data[:3] == b"\xff\xd8\xff"  # JPEG
        or data[:8] == b"\x89PNG\r\n\x1a\n"
        or data[:6] in (b"GIF87a", b"GIF89a")
        or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
        or data[:2] == b"BM"
        or data[:4] in (b"II*\x00", b"MM\x00*")  # TIFF
    )


def read_image_bytes(path: PathLike, check: bool = True) -> bytes:
    """The raw bytes of an image file; :class:`BadRecord` when missing, empty or not an image."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadRecord(f"image file not found: {path}") from None
    except OSError as e:
        raise BadRecord(f"cannot read image file {path}: {e}") from None
    if not data:
        raise BadRecord(f"empty image file: {path}")
    if check and not _looks_like_image(data):
        raise BadRecord(f"not a known image format (first bytes {data[:8]!r}): {path}")
    return data


def _find_file(candidates: Iterable[Path]) -> Path:
    tried = []
    for c in candidates:
        if c in tried:
            continue
        if c.is_file():
            return c
        tried.append(c)
    raise BadRecord("image file not found; tried " + ", ".join(str(t) for t in tried))


def _require_file(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def _require_dir(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} not found (or not a directory): {p}")
    return p


def _load_json(path: Path) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _encode_member(name: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if name.endswith("json") and isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    raise TypeError(
        f"sample member {name!r} has type {type(value).__name__}; only bytes, str, or a dict/list "
        "under a json member are written (nothing is pickled)"
    )


def _tar_size(nbytes: int) -> int:
    """Bytes one member of ``nbytes`` takes in a tar: a 512-byte header plus padded data."""
    return 512 + (nbytes + 511) // 512 * 512


# --------------------------------------------------------------------------------------------
# the shard writer
# --------------------------------------------------------------------------------------------


class ShardWriter:
    """Write samples into ``<out_dir>/<prefix>-%06d.tar`` shards and a manifest.

    A sample is a mapping with ``"__key__"`` (no dots, no slashes) and one entry per member
    (``"jpg"``, ``"txt"``, ``"json"``, ``"left.jpg"`` ...): bytes are stored as they are, str as
    UTF-8, and a dict/list under a ``json`` member as JSON. A new shard starts after
    ``max_samples`` samples, or before a sample that would take the shard past ``max_bytes`` (a
    single sample larger than ``max_bytes`` gets a shard of its own).

    A key already used in the current shard raises :class:`ValueError`, or, with
    ``rename_duplicate_keys=True`` (what the source writers use, so a duplicated source record
    cannot stop a run), gets a ``_dup<N>`` suffix.

    Use as a context manager, or call :meth:`close` (which writes the manifest and returns it). If
    the ``with`` block raises, the shard being written is deleted and no manifest is written.
    """

    def __init__(
        self,
        out_dir: PathLike,
        prefix: str,
        kind: str,
        max_samples: int = 1000,
        max_bytes: Optional[int] = None,
        rename_duplicate_keys: bool = False,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not prefix or "/" in prefix or os.sep in prefix:
            raise ValueError(f"prefix must be a non-empty file name stem, got {prefix!r}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.kind = kind
        self.max_samples = int(max_samples)
        self.max_bytes = max_bytes
        self.rename_duplicate_keys = rename_duplicate_keys
        self.shards: List[Dict[str, Any]] = []
        self.total = 0
        self.skipped = 0
        self._tar: Optional[tarfile.TarFile] = None
        self._tmp_path: Optional[Path] = None
        self._final_path: Optional[Path] = None
        self._count = 0
        self._bytes = 0
        self._keys: set = set()
        self._mtime = int(time.time())
        self._manifest: Optional[Dict[str, Any]] = None

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- writing ----------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST_NAME.format(prefix=self.prefix)

    def write(self, sample: Mapping[str, Any]) -> None:
        """Add one sample (see the class docstring for its form)."""
        if self._manifest is not None:
            raise RuntimeError("ShardWriter is closed")
        key = sample.get("__key__")
        if not isinstance(key, str) or not key or "." in key or "/" in key:
            raise ValueError(f"sample __key__ must be a non-empty str without '.' or '/', got {key!r}")
        members: List[Tuple[str, bytes]] = []
        for name, value in sample.items():
            if name.startswith("__"):
                continue
            if not name or "/" in name:
                raise ValueError(f"bad member name {name!r} in sample {key!r}")
            members.append((name, _encode_member(name, value)))
        if not members:
            raise ValueError(f"sample {key!r} has no members")
        size = sum(_tar_size(len(data)) for _, data in members)

        if self._tar is not None and (
            self._count >= self.max_samples
            or (self.max_bytes is not None and self._bytes + size > self.max_bytes)
        ):
            self._finish_shard()
        if self._tar is None:
            self._start_shard()
        if key in self._keys:
            if not self.rename_duplicate_keys:
                raise ValueError(f"duplicate sample key {key!r} in shard {self._final_path}")
            n = 1
            while f"{key}_dup{n}" in self._keys:
                n += 1
            logger.debug("%s: duplicate key %r renamed %r", self.prefix, key, f"{key}_dup{n}")
            key = f"{key}_dup{n}"
        self._keys.add(key)

        assert self._tar is not None
        for name, data in members:
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size = len(data)
            info.mtime = self._mtime
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size
        self.total += 1

    def skip(self, reason: str, n: int = 1) -> None:
        """Count ``n`` samples as skipped, logging ``reason``."""
        self.skipped += n
        level = logging.WARNING if self.skipped - n < MAX_LOGGED_SKIPS else logging.DEBUG
        logger.log(level, "%s: skipped %d sample(s): %s", self.prefix, n, reason)

    def _start_shard(self) -> None:
        index = len(self.shards)
        name = SHARD_NAME.format(prefix=self.prefix, index=index)
        self._final_path = self.out_dir / name
        self._tmp_path = self.out_dir / f"{name}.tmp"
        self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.GNU_FORMAT)
        self._count = 0
        self._bytes = 0
        self._keys = set()

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp_path is not None and self._final_path is not None
        self._tar.close()
        os.replace(self._tmp_path, self._final_path)
        self.shards.append({"name": self._final_path.name, "samples": self._count})
        logger.info("wrote %s (%d samples)", self._final_path, self._count)
        self._tar = None
        self._tmp_path = None

    def abort(self) -> None:
        """Drop the shard in progress (completed shards stay) and write no manifest."""
        if self._tar is not None:
            try:
                self._tar.close()
            finally:
                if self._tmp_path is not None and self._tmp_path.exists():
                    self._tmp_path.unlink()
                self._tar = None
                self._tmp_path = None

    def close(self) -> Dict[str, Any]:
        """Finish the last shard, write the manifest, and return it (idempotent)."""
        if self._manifest is not None:
            return self._manifest
        if self._tar is not None:
            self._finish_shard()
        n = len(self.shards)
        if n:
            pattern = f"{self.prefix}-{{{0:06d}..{n - 1:06d}}}.tar"
        else:
            pattern = ""
        manifest = {
            "kind": self.kind,
            "pattern": pattern,
            "shards": list(self.shards),
            "total": self.total,
            "skipped": self.skipped,
            "created_by": "mmmoe",
        }
        tmp = self.manifest_path.with_name(self.manifest_path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.manifest_path)
        self._manifest = manifest
        if self.skipped:
            logger.warning(
                "%s: skipped %d sample(s) in all (missing/unreadable records); %d written",
                self.prefix, self.skipped, self.total,
            )
        if not self.total:
            logger.warning("%s: no samples written; the manifest lists no shards", self.prefix)
        self._warn_stale(n)
        return manifest

    def _warn_stale(self, n: int) -> None:
        stale = []
        for p in self.out_dir.glob(f"{glob_escape(self.prefix)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            m = _SHARD_INDEX.search(p.name)
            if m and p.name[: -len(m.group(0))] == self.prefix and int(m.group(1)) >= n:
                stale.append(p.name)
        if stale:
            logger.warning(
                "%s: %d older shard(s) with this prefix are not part of the new manifest "
                "(e.g. %s); delete them to avoid mixing runs", self.prefix, len(stale), sorted(stale)[0],
            )


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


# --------------------------------------------------------------------------------------------
# manifests and patterns
# --------------------------------------------------------------------------------------------


def read_manifest(path: PathLike) -> Dict[str, Any]:
    """Load and check a ``<prefix>.manifest.json`` written by :class:`ShardWriter`."""
    p = _require_file(path, "shard manifest")
    m = _load_json(p)
    if not isinstance(m, dict):
        raise ValueError(f"{p}: a manifest is a JSON object")
    for field in ("kind", "pattern", "shards", "total"):
        if field not in m:
            raise ValueError(f"{p}: manifest has no {field!r} field")
    if m["kind"] not in KINDS:
        raise ValueError(f"{p}: unknown shard kind {m['kind']!r} (expected one of {KINDS})")
    if sum(int(s["samples"]) for s in m["shards"]) != int(m["total"]):
        raise ValueError(f"{p}: per-shard sample counts do not add up to total={m['total']}")
    return m


def expand_pattern(pattern: Optional[str]) -> List[str]:
    """Brace-expand a shard pattern: ``"p-{000000..000002}.tar"`` -> the three names.

    Several patterns may be joined with ``::`` (as webdataset does). An empty pattern (a manifest
    with no shards) gives ``[]``.
    """
    if not pattern:
        return []
    import braceexpand  # a webdataset dependency

    out: List[str] = []
    for part in str(pattern).split("::"):
        out.extend(braceexpand.braceexpand(part))
    return out


def manifest_shard_paths(path: PathLike) -> List[str]:
    """The shard files of a manifest, as paths next to the manifest file."""
    m = read_manifest(path)
    base = Path(path).parent
    return [str(base / s["name"]) for s in m["shards"]]


def iter_tar_samples(tar_path: PathLike) -> Iterator[Dict[str, Any]]:
    """Raw samples of one shard, without webdataset: ``{"__key__": key, member: bytes, ...}``.

    Members are grouped by the part of the file name before its first dot, as webdataset does.
    """
    current: Optional[Dict[str, Any]] = None
    with tarfile.open(tar_path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = os.path.basename(info.name)
            if "." not in base:
                continue
            key, ext = base.split(".", 1)
            f = tar.extractfile(info)
            data = f.read() if f is not None else b""
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = data
    if current is not None:
        yield current


# --------------------------------------------------------------------------------------------
# source writers
# --------------------------------------------------------------------------------------------


def write_karpathy_shards(
    dataset_json: PathLike,
    image_root: PathLike,
    out_dir: PathLike,
    splits: Sequence[str] = ("train", "restval"),
    kind: str = "image_text",
    *,
    prefix: Optional[str] = None,
    shard_size: int = 1000,
    max_bytes: Optional[int] = None,
    check_images: bool = True,
) -> Dict[str, Any]:
    """COCO (or Flickr) captions in the Karpathy split file ``dataset_coco.json``.

    ``kind="image_text"``: one sample per (image, caption), ``json`` {"image_id"}.
    ``kind="caption"``: one sample per image, ``json`` {"image_id", "split", "captions"}.
    Only images whose ``split`` is in ``splits`` are written. The image is read from
    ``image_root/<filepath>/<filename>`` (``image_root/<filename>`` when there is no filepath);
    ``image_id`` is ``cocoid`` (``imgid`` when there is none). Captions are the ``raw`` strings,
    stripped. Default prefix: ``coco-<kind>-<splits joined by '-'>``.
    """
    if kind not in ("image_text", "caption"):
        raise ValueError(f"kind must be 'image_text' or 'caption', got {kind!r}")
    if isinstance(splits, str):
        splits = (splits,)
    src = _require_file(dataset_json, "Karpathy split file")
    root = _require_dir(image_root, "image root")
    data = _load_json(src)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{src}: expected a Karpathy split file with an 'images' list")
    wanted = set(splits)
    prefix = prefix or f"coco-{kind}-{'-'.join(splits)}"

    with ShardWriter(out_dir, prefix, kind, shard_size, max_bytes,
                     rename_duplicate_keys=True) as w:
        for n, img in enumerate(images):
            try:
                if img.get("split") not in wanted:
                    continue
                image_id = img["cocoid"] if "cocoid" in img else img["imgid"]
                captions = []
                for s in img.get("sentences", []):
                    raw = s.get("raw")
                    if raw is None:
                        raw = " ".join(s.get("tokens", []))
                    raw = str(raw).strip()
                    if raw:
                        captions.append((s.get("sentid"), raw))
                if not captions:
                    raise BadRecord(f"image {image_id} has no captions")
                path = root / img.get("filepath", "") / img["filename"]
            except (KeyError, TypeError, AttributeError) as e:
                w.skip(f"malformed image record #{n} in {src}: {e!r}")
                continue
            except BadRecord as e:
                w.skip(str(e))
                continue
            n_samples = len(captions) if kind == "image_text" else 1
            try:
                jpg = read_image_bytes(path, check_images)
            except BadRecord as e:
                w.skip(str(e), n_samples)
                continue
            base = sanitize_key(f"{image_id}")
            if kind == "caption":
                w.write({
                    "__key__": base,
                    IMAGE_KEY: jpg,
                    META_KEY: {"image_id": image_id, "split": img["split"],
                               "captions": [c for _, c in captions]},
                })
            else:
                for i, (sentid, cap) in enumerate(captions):
                    suffix = sentid if sentid is not None else i
                    w.write({
                        "__key__": f"{base}_{sanitize_key(str(suffix))}",
                        IMAGE_KEY: jpg,
                        TEXT_KEY: cap,
                        META_KEY: {"image_id": image_id},
                    })
    return w.close()


def _iter_caption_records(path: Path) -> Iterator[Tuple[int, Optional[Dict[str, Any]], str]]:
    """(line number, {"image", "caption", "image_id"?} or None when malformed, raw line)."""
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip("\ufeff").lstrip()
    suffix = path.suffix.lower()
    if stripped.startswith("["):  # a JSON array of records
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        for i, rec in enumerate(records, 1):
            yield i, _caption_fields(rec), str(rec)[:200]
        return
    is_jsonl = suffix in (".jsonl", ".json", ".ndjson") or stripped.startswith("{")
    for i, line in enumerate(text.lstrip("\ufeff").splitlines(), 1):
        if not line.strip():
            continue
        if is_jsonl:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                yield i, None, line[:200]
                continue
            yield i, _caption_fields(rec), line[:200]
        else:
            parts = line.split("\t", 1)
            if len(parts) != 2:
                yield i, None, line[:200]
                continue
            name, caption = parts[0].strip(), parts[1].strip()
            if i == 1 and name.lower() in ("image", "file_name", "filename", "file", "path") \
                    and caption.lower() in ("caption", "text"):
                continue  # a header line
            yield i, ({"image": name, "caption": caption} if name and caption else None), line[:200]


def _caption_fields(rec: Any) -> Optional[Dict[str, Any]]:
    if not isinstance(rec, dict):
        return None
    name = next((rec[k] for k in ("image", "file_name", "filename") if k in rec), None)
    caption = next((rec[k] for k in ("caption", "text") if k in rec), None)
    if not isinstance(name, str) or not isinstance(caption, str) or not name or not caption.strip():
        return None
    out = {"image": name, "caption": caption.strip()}
    if "image_id" in rec:
        out["image_id"] = rec["image_id"]
    return out


def write_image_folder_shards(
    image_dir: PathLike,
    captions_file: Optional[PathLike],
    out_dir: PathLike,
    *,
    prefix: Optional[str] = None,
    shard_size: int = 1000,
    max_bytes: Optional[int] = None,
    check_images: bool = True,
) -> Dict[str, Any]:
    """A folder of images, with or without captions.

    With ``captions_file`` (kind ``image_text``): one sample per caption line. The file is JSON
    lines with an ``image`` / ``file_name`` / ``filename`` field and a ``caption`` / ``text`` field
    (an optional ``image_id`` is kept), or a JSON array of such records, or TSV
    ``filename<TAB>caption`` (an optional header line is ignored). File names are relative to
    ``image_dir``. ``image_id`` defaults to the file name as given.

    Without it (kind ``image``): every image file under ``image_dir`` (recursively, sorted), with
    ``image_id`` the path relative to ``image_dir``.
    Default prefix: ``images``.
    """
    root = _require_dir(image_dir, "image folder")
    prefix = prefix or "images"
    if captions_file is None:
        files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        with ShardWriter(out_dir, prefix, "image", shard_size, max_bytes,
                         rename_duplicate_keys=True) as w:
            for i, p in enumerate(files):
                rel = p.relative_to(root).as_posix()
                try:
                    jpg = read_image_bytes(p, check_images)
                except BadRecord as e:
                    w.skip(str(e))
                    continue
                w.write({"__key__": f"{i:09d}_{sanitize_key(Path(rel).stem)}",
                         IMAGE_KEY: jpg, META_KEY: {"image_id": rel}})
        return w.close()

    caps = _require_file(captions_file, "captions file")
    with ShardWriter(out_dir, prefix, "image_text", shard_size, max_bytes,
                     rename_duplicate_keys=True) as w:
        for lineno, rec, raw in _iter_caption_records(caps):
            if rec is None:
                w.skip(f"{caps}:{lineno}: malformed caption record {raw!r}")
                continue
            try:
                jpg = read_image_bytes(root / rec["image"], check_images)
            except BadRecord as e:
                w.skip(f"{caps}:{lineno}: {e}")
                continue
            w.write({
                "__key__": f"{lineno:09d}_{sanitize_key(Path(rec['image']).stem)}",
                IMAGE_KEY: jpg,
                TEXT_KEY: rec["caption"],
                META_KEY: {"image_id": rec.get("image_id", rec["image"])},
            })
    return w.close()


def _vqa_image_subtype(data_subtype: str) -> str:
    # test-dev2015 is a subset of the test2015 images (COCO_test2015_*.jpg in test2015/)
    return data_subtype.replace("test-dev", "test")


def write_vqa_shards(
    questions_json: PathLike,
    annotations_json: Optional[PathLike],
    image_root: PathLike,
    out_dir: PathLike,
    *,
    image_pattern: str = "COCO_{subtype}_{image_id:012d}.jpg",
    image_subtype: Optional[str] = None,
    prefix: Optional[str] = None,
    shard_size: int = 1000,
    max_bytes: Optional[int] = None,
    check_images: bool = True,
) -> Dict[str, Any]:
    """VQAv2 questions (+ annotations, joined by ``question_id``), one sample per question.

    ``json``: {"question_id", "image_id", "question"} plus, with annotations, {"answers" (the 10
    answer strings in answer_id order), "answer_type", "question_type", "multiple_choice_answer"}.
    ``annotations_json=None`` is for test splits. With annotations, a question that has none is
    skipped and counted.

    The image name is ``image_pattern.format(subtype=..., image_id=...)``, where the subtype is
    ``image_subtype`` or else the questions file's ``data_subtype`` with ``test-dev`` mapped to
    ``test`` (test-dev images live in test2015). The image is looked up at
    ``image_root/<subtype>/<name>``, then ``image_root/<name>``.
    Default prefix: ``vqa-<data_subtype>``.
    """
    qpath = _require_file(questions_json, "VQA questions file")
    apath = _require_file(annotations_json, "VQA annotations file") if annotations_json else None
    root = _require_dir(image_root, "image root")
    qdata = _load_json(qpath)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise ValueError(f"{qpath}: expected a VQA questions file with a 'questions' list")
    data_subtype = str(qdata.get("data_subtype") or "")
    subtype = image_subtype or _vqa_image_subtype(data_subtype)
    if "{subtype" in image_pattern and not subtype:
        raise ValueError(f"{qpath} has no data_subtype; pass image_subtype (e.g. 'val2014')")

    try:
        image_pattern.format(subtype=subtype, image_id=0)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"bad image_pattern {image_pattern!r}: fields are {{subtype}} and {{image_id}} ({e!r})"
        ) from None

    answers_by_qid: Optional[Dict[Any, Dict[str, Any]]] = None
    if apath is not None:
        adata = _load_json(apath)
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise ValueError(f"{apath}: expected a VQA annotations file with an 'annotations' list")
        a_sub = adata.get("data_subtype")
        if a_sub and data_subtype and a_sub != data_subtype:
            raise ValueError(
                f"questions ({qpath}: {data_subtype}) and annotations ({apath}: {a_sub}) are from "
                "different splits"
            )
        answers_by_qid = {}
        for a in adata["annotations"]:
            if isinstance(a, dict) and "question_id" in a:
                answers_by_qid[a["question_id"]] = a

    prefix = prefix or f"vqa-{data_subtype or subtype or 'questions'}"
    cache: Tuple[Optional[Path], bytes] = (None, b"")
    with ShardWriter(out_dir, prefix, "vqa", shard_size, max_bytes,
                     rename_duplicate_keys=True) as w:
        for n, q in enumerate(qdata["questions"]):
            try:
                qid, image_id, question = q["question_id"], int(q["image_id"]), str(q["question"])
                meta: Dict[str, Any] = {"question_id": qid, "image_id": image_id, "question": question}
                if answers_by_qid is not None:
                    ann = answers_by_qid.get(qid)
                    if ann is None:
                        raise BadRecord(f"question {qid} has no annotation in {apath}")
                    answers = sorted(ann["answers"], key=lambda a: a.get("answer_id", 0))
                    meta.update({
                        "answers": [str(a["answer"]) for a in answers],
                        "answer_type": ann["answer_type"],
                        "question_type": ann["question_type"],
                        "multiple_choice_answer": ann["multiple_choice_answer"],
                    })
                name = image_pattern.format(subtype=subtype, image_id=image_id)
                path = _find_file([root / subtype / name, root / name] if subtype else [root / name])
                if cache[0] != path:
                    cache = (path, read_image_bytes(path, check_images))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                w.skip(f"malformed question record #{n} in {qpath}: {e!r}")
                continue
            except BadRecord as e:
                w.skip(f"question {q.get('question_id')}: {e}")
                continue
            w.write({"__key__": sanitize_key(str(qid)), IMAGE_KEY: cache[1], META_KEY: meta})
    return w.close()


def _parse_nlvr2_label(value: Any) -> Optional[bool]:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise BadRecord(f"label {value!r} is not 'True' or 'False'")


def write_nlvr2_shards(
    jsonl_path: PathLike,
    image_root: PathLike,
    out_dir: PathLike,
    *,
    prefix: Optional[str] = None,
    shard_size: int = 1000,
    max_bytes: Optional[int] = None,
    check_images: bool = True,
) -> Dict[str, Any]:
    """NLVR2 JSON lines (train.json / dev.json / test1.json), one sample per sentence.

    ``left.jpg`` / ``right.jpg`` are the bytes of ``<split>-<set>-<pair>-img0.png`` / ``-img1.png``
    (from the identifier ``split-set-pair-sentence``), looked up in ``image_root/<split>/<directory>/``,
    ``image_root/<directory>/`` (train images sit in numbered folders given by ``directory``),
    ``image_root/<split>/`` and ``image_root/``. ``json``: {"identifier", "sentence", "label"}, the
    label a bool, or null when absent. Default prefix: ``nlvr2-<file stem>``.
    """
    src = _require_file(jsonl_path, "NLVR2 file")
    root = _require_dir(image_root, "image root")
    prefix = prefix or f"nlvr2-{sanitize_key(src.stem)}"
    cache: Tuple[Optional[Tuple[Path, Path]], bytes, bytes] = (None, b"", b"")
    with ShardWriter(out_dir, prefix, "nlvr2", shard_size, max_bytes,
                     rename_duplicate_keys=True) as w, \
            open(src, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                identifier = str(rec["identifier"])
                sentence = str(rec["sentence"])
                label = _parse_nlvr2_label(rec.get("label"))
                base, _, _ = identifier.rpartition("-")
                if not base:
                    raise BadRecord(f"identifier {identifier!r} is not split-set-pair-sentence")
                split = identifier.split("-", 1)[0]
                dirs = []
                if rec.get("directory") not in (None, ""):
                    d = str(rec["directory"])
                    dirs += [root / split / d, root / d]
                dirs += [root / split, root]
                left = _find_file(d / f"{base}-img0.png" for d in dirs)
                right = _find_file(d / f"{base}-img1.png" for d in dirs)
                if cache[0] != (left, right):
                    cache = ((left, right), read_image_bytes(left, check_images),
                             read_image_bytes(right, check_images))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                w.skip(f"{src}:{lineno}: malformed record: {e!r}")
                continue
            except BadRecord as e:
                w.skip(f"{src}:{lineno}: {e}")
                continue
            w.write({
                "__key__": sanitize_key(identifier),
                LEFT_IMAGE_KEY: cache[1],
                RIGHT_IMAGE_KEY: cache[2],
                META_KEY: {"identifier": identifier, "sentence": sentence, "label": label},
            })
    return w.close()


def _text_files(paths: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.glob("*.txt") if q.is_file())
            if not found:
                raise ValueError(f"no .txt files in folder {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"text file not found: {p}")
    return files


def write_text_shards(
    paths: Union[PathLike, Sequence[PathLike]],
    out_dir: PathLike,
    lang: Optional[str] = None,
    *,
    prefix: Optional[str] = None,
    shard_size: int = 1000,
    max_bytes: Optional[int] = None,
) -> Dict[str, Any]:
    """Plain UTF-8 text files, one sample per non-empty line (stripped).

    ``paths``: files and/or folders (a folder means every ``*.txt`` directly inside it, sorted).
    ``json`` {"lang"}: ``lang`` if given, else the file's stem (``de.txt`` -> ``"de"``). A line that
    is not valid UTF-8 is skipped and counted. Default prefix: ``text``.
    """
    files = _text_files(paths)
    prefix = prefix or "text"
    with ShardWriter(out_dir, prefix, "text", shard_size, max_bytes,
                     rename_duplicate_keys=True) as w:
        for fi, path in enumerate(files):
            file_lang = lang or path.stem
            stem = sanitize_key(path.stem)
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    try:
                        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
                    except UnicodeDecodeError as e:
                        w.skip(f"{path}:{lineno}: not UTF-8 ({e.reason})")
                        continue
                    if not line:
                        continue
                    w.write({"__key__": f"{stem}_{fi}_{lineno:09d}", TEXT_KEY: line,
                             META_KEY: {"lang": file_lang}})
    return w.close()


__all__ = [
    "BadRecord",
    "ShardWriter",
    "expand_pattern",
    "iter_tar_samples",
    "manifest_shard_paths",
    "read_image_bytes",
    "read_manifest",
    "sanitize_key",
    "write_image_folder_shards",
    "write_karpathy_shards",
    "write_nlvr2_shards",
    "write_text_shards",
    "write_vqa_shards",
]
