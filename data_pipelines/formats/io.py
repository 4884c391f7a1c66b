"""Reading and writing files: the one atomic write, the one JSON writer, and the checked readers
every format module uses.

Writing: :func:`atomic_write` puts bytes (or text) in place through a temporary file in the same
folder and ``os.replace`` (:func:`atomic_open` gives that file to a streaming writer, e.g.
``torch.save`` of a checkpoint), so a reader never sees a half-written file and an interrupted write never
clobbers the previous one (``fsync=True`` also makes it survive a power cut). :func:`write_json` is
that plus ``json.dumps`` (UTF-8, ``ensure_ascii=False``, a final newline); long result lists are
written with ``indent=None``, on one line like the official ones.

Reading: problems with an input raise :class:`FormatError` (a ``ValueError``) whose message starts
with the file path (or with the argument's role when an already-parsed object was passed) and says
what is wrong, in one line. Only JSON and plain text are ever read; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "FormatError", "PathLike", "atomic_open", "atomic_write", "fsync_dir", "write_json", "is_path", "source_name", "read_text",
    "read_json", "load_input", "id_text_pairs", "unique_by_id", "preview", "describe", "is_int", "one_line",
]


class FormatError(ValueError):
    """An input file (or object) is missing, unreadable or does not follow its official format."""


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_open(path: PathLike, fsync: bool = False, mkdir: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` with: it is a temporary file in the same folder, renamed
    over ``path`` when the block ends without an error (and removed when it raises), so ``path``
    holds either its old or its complete new content. ``fsync``: flush the file and the rename to
    disk. ``mkdir``: create the folder."""
    p = Path(path)
    if mkdir:
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    if fsync:
        fsync_dir(p.parent)


def atomic_write(path: PathLike, data: Union[bytes, str], fsync: bool = False, mkdir: bool = True) -> Path:
    """Write ``data`` (str: as UTF-8) to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path, fsync=fsync, mkdir=mkdir) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def fsync_dir(folder: PathLike) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: PathLike, obj: Any, indent: Optional[int] = 1, fsync: bool = False) -> Path:
    """Write ``obj`` as JSON (UTF-8, non-ASCII kept, final newline) atomically, creating the folder."""
    return atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", fsync=fsync)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def is_path(obj: Any) -> bool:
    """True for ``str`` and ``os.PathLike`` objects (which the readers treat as file paths)."""
    return isinstance(obj, (str, os.PathLike))


def source_name(obj: Any, role: str) -> str:
    """How error messages refer to an input: its path when it is one, else its role (e.g. 'results')."""
    return os.fspath(obj) if is_path(obj) else role


def read_text(path: PathLike, what: str = "file") -> str:
    """Read a UTF-8 text file, turning OS and decoding problems into :class:`FormatError`."""
    p = Path(path)
    if p.exists() and not p.is_file() and not p.is_dir():  # a FIFO or device would block or never end
        raise FormatError(f"{p}: not a regular file, expected a {what}")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise FormatError(f"{p}: no such {what}") from None
    except IsADirectoryError:
        raise FormatError(f"{p}: is a directory, expected a {what}") from None
    except OSError as err:
        raise FormatError(f"{p}: cannot read {what}: {err.strerror or err}") from None
    try:
        # utf-8-sig: tolerate the byte-order mark some editors and tools write.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise FormatError(f"{p}: not UTF-8 text (byte {err.start})") from None


def read_json(path: PathLike, what: str = "JSON file") -> Any:
    """Parse a whole file as JSON; a syntax error names the file, line and column."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise FormatError(
            f"{os.fspath(path)}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None


def load_input(src: Any, role: str) -> Tuple[Any, str]:
    """(parsed JSON, name for messages) of a path or an already-parsed object."""
    name = source_name(src, role)
    return (read_json(src, f"{role} file") if is_path(src) else src), name


def id_text_pairs(
    entries: Any, name: str, id_key: str, text_key: str, noun: str, what: str = "results",
    where: Callable[[int], str] = "entry {}".format,
) -> List[Tuple[int, str]]:
    """``[(id, text)]`` of a list of ``{id_key: int, text_key: str}`` records, in order: the shape
    of the official result files (and of COCO caption annotations). A non-list, an entry that is not
    an object, an id that is not an integer (booleans excluded) or a text that is not a string is a
    :class:`FormatError` naming the entry (``where(i)``) and, for the text, its ``noun`` and id."""
    shape = f'{{"{id_key}": int, "{text_key}": str}}'
    if not isinstance(entries, (list, tuple)):
        raise FormatError(f"{name}: {what} must be a JSON array of {shape}, got {describe(entries)}")
    out = []
    for i, r in enumerate(entries):
        if not isinstance(r, Mapping):
            raise FormatError(f"{name}: {where(i)} is {describe(r)}, expected {shape}")
        key, text = r.get(id_key), r.get(text_key)
        if not is_int(key):
            raise FormatError(f"{name}: {where(i)}: {id_key!r} must be an integer, got {describe(key)}")
        if not isinstance(text, str):
            raise FormatError(f"{name}: {where(i)} ({noun} {key}): {text_key!r} must be a string, got {describe(text)}")
        out.append((key, text))
    return out


def unique_by_id(pairs: Iterable[Tuple[Any, Any]], name: str, duplicates: str) -> Dict[Any, Any]:
    """``{id: value}`` of ``(id, value)`` pairs; ids seen twice are a :class:`FormatError`
    ``"<name>: <n> <duplicates>: <ids>"``."""
    out: Dict[Any, Any] = {}
    dups = set()
    for key, text in pairs:
        if key in out:
            dups.add(key)
        out[key] = text
    if dups:
        raise FormatError(f"{name}: {len(dups)} {duplicates}: {preview(dups)}")
    return out


def preview(items: Iterable[Any], limit: int = 5) -> str:
    """A short, sorted-when-possible listing for error messages: ``1, 2, 3 (and 7 more)``."""
    seq: List[Any] = list(items)
    try:
        seq = sorted(seq)
    except TypeError:
        pass
    shown = ", ".join(repr(x) if isinstance(x, str) else str(x) for x in seq[:limit])
    rest = len(seq) - limit
    return shown + (f" (and {rest} more)" if rest > 0 else "")


def _type_name(value: Any) -> str:
    """JSON-flavoured type names for messages ('null', 'string', 'array', ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple)):
        return "array"
    return type(value).__name__


def describe(value: Any, max_len: int = 40) -> str:
    """``<json type> <short repr>`` for messages about a wrongly typed value."""
    text = repr(value)
    if len(text) > max_len:
        text = text[: max_len - 3] + "..."
    return f"{_type_name(value)} {text}"


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON ``true`` must not pass as question id 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def one_line(text: str) -> str:
    """Collapse whitespace so a message fits on one line."""
    return " ".join(str(text).split())
