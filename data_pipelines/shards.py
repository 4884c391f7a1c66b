"""WebDataset shard writers for the pretraining corpora and the task datasets.

Every writer turns one source format (see ``data_pipelines/schema.py`` for the sample contract and
the reference notes for the source formats) into ``<out_dir>/<prefix>-%06d.tar`` shards plus the
manifest ``<out_dir>/<prefix>.manifest.json``, and returns the manifest dict.

* Members are plain bytes: image files are copied byte for byte, text is UTF-8, metadata is JSON.
  Nothing is pickled.
* Source records are checked by the format readers of ``data_pipelines.formats`` where one exists
  (Karpathy image records, NLVR2 truth values); the manifest is written with its atomic JSON writer.
* Each shard is written under a temporary name and renamed when complete, so a reader never sees a
  half-written ``.tar``; the manifest is written (also atomically) only after the last shard.
* A record that cannot be used (missing or empty image file, bytes that are no known image format,
  malformed JSON line, missing fields) is skipped: it is logged (the first few one by one, then a
  summary warning) and counted in the manifest's ``"skipped"`` field, counted in samples that were
  not written. A missing *input file* (the JSON / JSONL / captions file itself, or the image root)
  raises :class:`FileNotFoundError` naming the path.
* Hostile input is bounded and contained: a path taken from an input file that is absolute, has a
  ``..`` part or a NUL byte is skipped as escaping the folder; an image file that is not a regular
  file (FIFO, device: never opened for a blocking read) or is larger than the readers accept
  (``tario.MAX_MEMBER_BYTES``) is skipped; a JSON input file above ``MAX_JSON_BYTES``, not UTF-8,
  malformed or nested too deeply is a :class:`ValueError` naming it; in JSON-lines / TSV / text
  inputs such a line (or one above ``MAX_LINE_BYTES``) is skipped and counted instead. Keys are
  capped at ``MAX_KEY_CHARS`` characters. Nothing is written outside ``out_dir``.
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

from data_pipelines import tario
from data_pipelines.formats.captions import karpathy_image, karpathy_records
from data_pipelines.formats.io import FormatError, write_json
from data_pipelines.formats.nlvr2 import parse_truth_value
from data_pipelines.safe_io import read_regular_file
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

#: Largest JSON input file read whole (VQA's largest official file, train annotations, is ~330 MB).
MAX_JSON_BYTES = 1 << 30
#: Longest line of a JSON-lines / TSV / text input; longer lines are skipped and counted.
MAX_LINE_BYTES = 16 << 20
#: Longest sample key written (readers cap member names at tario.MAX_NAME_BYTES).
MAX_KEY_CHARS = 200

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_SHARD_INDEX = re.compile(r"-(\d{6})\.tar$")


class BadRecord(ValueError):
    """A source record that cannot be turned into a sample; the writers skip and count it."""


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def sanitize_key(text: str) -> str:
    """Map ``text`` to a WebDataset key: letters, digits, ``_`` and ``-`` only (never a dot)."""
    key = _KEY_UNSAFE.sub("_", str(text)[: 4 * MAX_KEY_CHARS]).strip("_")[:MAX_KEY_CHARS]
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


def read_image_bytes(path: PathLike, check: bool = True, max_bytes: int = tario.MAX_MEMBER_BYTES) -> bytes:
    """The raw bytes of an image file; :class:`BadRecord` when missing, empty, not a regular file
    (never blocks on a FIFO), larger than ``max_bytes`` (never reads more) or not an image."""
    try:
        data = read_regular_file(path, max_bytes, what="image file")
    except FileNotFoundError:
        raise BadRecord(f"image file not found: {path}") from None
    except ValueError as e:
        raise BadRecord(str(e)) from None
    if check and not _looks_like_image(data):
        raise BadRecord(f"not a known image format (first bytes {data[:8]!r}): {path}")
    return data


def _safe_join(root: Path, *parts: Any) -> Path:
    """``root / part / ...`` for parts taken from an input file; :class:`BadRecord` when a part is
    not a string, is absolute, has a ``..`` component or a NUL byte (it would leave ``root``)."""
    out = root
    for part in parts:
        if not isinstance(part, str):
            raise BadRecord(f"path part {part!r} is not a string")
        if "\x00" in part:
            raise BadRecord(f"path {part!r} has a NUL byte")
        pieces = part.replace("\\", "/").split("/")
        if part.startswith(("/", "\\")) or os.path.isabs(part) or ".." in pieces:
            raise BadRecord(f"path {part!r} escapes {root}")
        out = out / part
    return out


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
        if p.exists():
            raise ValueError(f"{what} is not a regular file: {p}")
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def _require_dir(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} not found (or not a directory): {p}")
    return p


def _load_json(path: Path) -> Any:
    """A whole JSON file; :class:`ValueError` naming it when it is above ``MAX_JSON_BYTES``, not
    UTF-8, not JSON, or nested too deeply."""
    try:
        raw = read_regular_file(path, MAX_JSON_BYTES, what="JSON file")
    except FileNotFoundError:
        raise FileNotFoundError(f"JSON file not found: {path}") from None
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except (ValueError, RecursionError) as e:  # over-long integers, deep nesting
        raise ValueError(f"{path} is not usable JSON: {type(e).__name__}: {str(e)[:200]}") from None


def _lines(path: Path) -> Iterator[Tuple[int, Optional[bytes]]]:
    """(line number, raw line without its newline) of a file, read with bounded memory; None for
    a line longer than ``MAX_LINE_BYTES`` (consumed, not kept)."""
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while True:  # the rest of the over-long line
                    rest = f.readline(1 << 20)
                    if not rest or rest.endswith(b"\n"):
                        break
                yield lineno, None
                continue
            yield lineno, raw.rstrip(b"\r\n")


def _json_line(raw: bytes) -> Any:
    """One JSON-lines record; :class:`BadRecord` for bad UTF-8, malformed or too deep JSON."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRecord(f"not UTF-8 ({e.reason})") from None
    except (ValueError, RecursionError) as e:
        raise BadRecord(f"not a JSON record: {type(e).__name__}: {str(e)[:200]}") from None


def _encode_member(name: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates, e.g. "\ud800" escapes in a JSON input
            raise BadRecord(f"member {name!r} is not encodable as UTF-8 ({e.reason})") from None
    elif name.endswith("json") and isinstance(value, (dict, list)):
        try:
            data = json.dumps(value, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, ValueError, RecursionError) as e:
            raise BadRecord(f"member {name!r} cannot be written as UTF-8 JSON: {type(e).__name__}") from None
    else:
        data = None
    if data is not None:
        if len(data) > tario.MAX_MEMBER_BYTES:
            raise BadRecord(f"member {name!r} has {len(data)} bytes; readers skip members above "
                            f"{tario.MAX_MEMBER_BYTES}")
        return data
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
        self._file: Any = None
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

    def write_or_skip(self, sample: Mapping[str, Any], where: str = "") -> bool:
        """``write``, but a sample whose member cannot be encoded (:class:`BadRecord`: text with
        lone surrogates, JSON too deep, a member above the readers' size limit) is skipped and
        counted instead; nothing of it is written. True when written."""
        try:
            self.write(sample)
        except BadRecord as e:
            self.skip(f"{where}: {e}" if where else str(e))
            return False
        return True

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
        if self._tmp_path.is_symlink():  # a symlink planted at the temporary name: replaced, not followed
            self._tmp_path.unlink()
        fd = os.open(self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
        self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)
        self._count = 0
        self._bytes = 0
        self._keys = set()

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp_path is not None and self._final_path is not None
        self._tar.close()
        self._file.close()
        os.replace(self._tmp_path, self._final_path)
        self.shards.append({"name": self._final_path.name, "samples": self._count})
        logger.info("wrote %s (%d samples)", self._final_path, self._count)
        self._tar = None
        self._tmp_path = None

    def abort(self) -> None:
        """Drop the shard in progress (completed shards stay) and write no manifest."""
        if self._tar is not None:
            try:
                try:
                    self._tar.close()
                finally:
                    self._file.close()
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
        write_json(self.manifest_path, manifest)
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
    try:
        counts = [int(s["samples"]) for s in m["shards"]]
        names = [s["name"] for s in m["shards"]]
        total = int(m["total"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{p}: malformed shards list or total ({type(e).__name__}: {e})") from None
    if sum(counts) != total:
        raise ValueError(f"{p}: per-shard sample counts do not add up to total={m['total']}")
    for name in names:  # shards sit next to the manifest: plain file names only
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") \
                or "\x00" in name:
            raise ValueError(f"{p}: shard name {name!r} is not a file name next to the manifest")
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
    try:
        images = karpathy_records(_load_json(src), str(src))
    except FormatError as e:
        raise ValueError(f"{e} (expected a Karpathy split file with an 'images' list)") from None
    wanted = set(splits)
    prefix = prefix or f"coco-{kind}-{'-'.join(splits)}"

    with ShardWriter(out_dir, prefix, kind, shard_size, max_bytes,
                     rename_duplicate_keys=True) as w:
        for n, img in enumerate(images):
            try:
                if isinstance(img, dict) and img.get("split") not in wanted:
                    continue
                rec = karpathy_image(img, f"{src}: images[{n}]")
                image_id = rec.image_id
                captions = [(sentid, raw.strip()) for raw, sentid in rec.sentences if raw.strip()]
                if not captions:
                    raise BadRecord(f"image {image_id} has no captions")
                if not rec.filename:
                    raise BadRecord(f"image {image_id} has no 'filename'")
                path = _safe_join(root, rec.filepath, rec.filename)
            except (FormatError, RecursionError) as e:
                w.skip(f"malformed image record: {e}")
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
                w.write_or_skip({
                    "__key__": base,
                    IMAGE_KEY: jpg,
                    META_KEY: {"image_id": image_id, "split": rec.split,
                               "captions": [c for _, c in captions]},
                }, f"image {image_id}")
            else:
                for i, (sentid, cap) in enumerate(captions):
                    suffix = sentid if sentid is not None else i
                    w.write_or_skip({
                        "__key__": f"{base}_{sanitize_key(str(suffix))}",
                        IMAGE_KEY: jpg,
                        TEXT_KEY: cap,
                        META_KEY: {"image_id": image_id},
                    }, f"image {image_id} caption {i}")
    return w.close()


def _iter_caption_records(path: Path) -> Iterator[Tuple[int, Optional[Dict[str, Any]], str]]:
    """(line number, {"image", "caption", "image_id"?} or None when malformed, raw line)."""
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", "replace")
    stripped = head.lstrip("\ufeff").lstrip()
    suffix = path.suffix.lower()
    if stripped.startswith("["):  # a JSON array of records
        records = _load_json(path)
        if not isinstance(records, list):
            raise ValueError(f"{path} is not a JSON array of caption records")
        for i, rec in enumerate(records, 1):
            yield i, _caption_fields(rec), _short(rec)
        return
    is_jsonl = suffix in (".jsonl", ".json", ".ndjson") or stripped.startswith("{")
    for i, raw in _lines(path):
        if raw is None:
            yield i, None, f"<line longer than {MAX_LINE_BYTES} bytes>"
            continue
        if i == 1:
            raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield i, None, f"<not UTF-8: {e.reason}>"
            continue
        if not line.strip():
            continue
        if is_jsonl:
            try:
                rec = _json_line(raw)
            except BadRecord as e:
                yield i, None, f"{line[:200]} ({e})"
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


def _short(value: Any) -> str:
    try:
        return repr(value)[:200]
    except RecursionError:
        return "<too deeply nested>"


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
        # symlinked folders are not descended into (no loops); symlinked, dangling and special
        # files with an image suffix are listed, then skipped and counted unless they are regular
        # files inside the folder
        files = sorted(
            p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not _is_real_dir(p)
        )
        real_root = root.resolve()
        with ShardWriter(out_dir, prefix, "image", shard_size, max_bytes,
                         rename_duplicate_keys=True) as w:
            for i, p in enumerate(files):
                rel = p.relative_to(root).as_posix()
                try:
                    if p.is_symlink() and not _inside(p, real_root):
                        raise BadRecord(f"symlink {p} leads out of {root} (or nowhere)")
                    jpg = read_image_bytes(p, check_images)
                except BadRecord as e:
                    w.skip(str(e))
                    continue
                w.write_or_skip({"__key__": f"{i:09d}_{sanitize_key(Path(rel).stem)}",
                                 IMAGE_KEY: jpg, META_KEY: {"image_id": rel}}, rel)
        return w.close()

    caps = _require_file(captions_file, "captions file")
    with ShardWriter(out_dir, prefix, "image_text", shard_size, max_bytes,
                     rename_duplicate_keys=True) as w:
        for lineno, rec, raw in _iter_caption_records(caps):
            if rec is None:
                w.skip(f"{caps}:{lineno}: malformed caption record {raw!r}")
                continue
            try:
                jpg = read_image_bytes(_safe_join(root, rec["image"]), check_images)
            except BadRecord as e:
                w.skip(f"{caps}:{lineno}: {e}")
                continue
            w.write_or_skip({
                "__key__": f"{lineno:09d}_{sanitize_key(Path(rec['image']).stem)}",
                IMAGE_KEY: jpg,
                TEXT_KEY: rec["caption"],
                META_KEY: {"image_id": rec.get("image_id", rec["image"])},
            }, f"{caps}:{lineno}")
    return w.close()


def _is_real_dir(p: Path) -> bool:
    try:
        return p.is_dir() and not p.is_symlink()
    except OSError:
        return False


def _inside(p: Path, real_root: Path) -> bool:
    """Whether ``p`` resolves (symlinks followed) to an existing path inside ``real_root``."""
    try:
        target = p.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling, loop
        return False
    return target == real_root or real_root in target.parents


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
    if subtype:
        try:
            _safe_join(root, subtype)
        except BadRecord as e:
            raise ValueError(f"{qpath}: image subtype {subtype!r} cannot name an image folder ({e})") from None
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
                try:
                    answers_by_qid[a["question_id"]] = a
                except TypeError:  # an unhashable question_id (a list, an object): never matches
                    pass

    prefix = prefix or f"vqa-{sanitize_key(data_subtype or subtype or 'questions')}"
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
                path = _find_file([_safe_join(root, subtype, name), _safe_join(root, name)] if subtype
                                  else [_safe_join(root, name)])
                if cache[0] != path:
                    cache = (path, read_image_bytes(path, check_images))
            except BadRecord as e:
                w.skip(f"question {_short(q.get('question_id') if isinstance(q, dict) else q)}: {e}")
                continue
            except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
                w.skip(f"malformed question record #{n} in {qpath}: {e!r}")
                continue
            w.write_or_skip({"__key__": sanitize_key(str(qid)), IMAGE_KEY: cache[1], META_KEY: meta},
                            f"question {_short(qid)}")
    return w.close()


def _parse_nlvr2_label(value: Any) -> Optional[bool]:
    if value is None:
        return None
    try:
        return parse_truth_value(value)
    except ValueError:
        raise BadRecord(f"label {value!r} is not 'True' or 'False'") from None


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
                     rename_duplicate_keys=True) as w:
        for lineno, line in _lines(src):
            if line is not None and not line.strip():
                continue
            try:
                if line is None:
                    raise BadRecord(f"line longer than {MAX_LINE_BYTES} bytes")
                rec = _json_line(line[3:] if lineno == 1 and line.startswith(b"\xef\xbb\xbf") else line)
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
                    dirs += [_safe_join(root, split, d), _safe_join(root, d)]
                dirs += [_safe_join(root, split), root]
                left = _find_file([_safe_join(d, f"{base}-img0.png") for d in dirs])
                right = _find_file([_safe_join(d, f"{base}-img1.png") for d in dirs])
                if cache[0] != (left, right):
                    cache = ((left, right), read_image_bytes(left, check_images),
                             read_image_bytes(right, check_images))
            except BadRecord as e:
                w.skip(f"{src}:{lineno}: {e}")
                continue
            except (KeyError, TypeError, AttributeError, RecursionError) as e:
                w.skip(f"{src}:{lineno}: malformed record: {type(e).__name__}: {str(e)[:200]}")
                continue
            w.write_or_skip({
                "__key__": sanitize_key(identifier),
                LEFT_IMAGE_KEY: cache[1],
                RIGHT_IMAGE_KEY: cache[2],
                META_KEY: {"identifier": identifier, "sentence": sentence, "label": label},
            }, f"{src}:{lineno}")
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
        elif p.exists():
            raise ValueError(f"text input is not a regular file or folder: {p}")
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
            for lineno, raw in _lines(path):
                if raw is None:
                    w.skip(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES} bytes")
                    continue
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
                except UnicodeDecodeError as e:
                    w.skip(f"{path}:{lineno}: not UTF-8 ({e.reason})")
                    continue
                if not line:
                    continue
                w.write_or_skip({"__key__": f"{stem}_{fi}_{lineno:09d}", TEXT_KEY: line,
                                 META_KEY: {"lang": file_lang}}, f"{path}:{lineno}")
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
