"""Official benchmark metrics, re-implemented: VQA accuracy, NLVR2 accuracy / consistency, COCO captions.

Submodules (imported lazily by their users; ``caption`` needs the optional ``pycocoevalcap``):

``tasks.metrics.vqa``      VQA answer normalisation, accuracy (overall / per answer type / per
                           question type / per question), answer vocabulary.
``tasks.metrics.nlvr2``    NLVR2 accuracy and consistency.
``tasks.metrics.caption``  BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D), optional SPICE via pycocoevalcap.

Every scorer accepts either already-parsed Python objects or paths to the files. Problems with the
inputs raise :class:`MetricInputError` (a ``ValueError``) whose message starts with the file path (or
with the argument's role when an object was passed) and says what is wrong, in one line.
Only JSON and plain text are ever read; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, List, Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "MetricInputError", "PathLike", "is_path", "source_name", "read_text", "read_json", "preview",
    "describe", "is_int", "one_line",
]


class MetricInputError(ValueError):
    """An evaluation input is missing, unreadable or does not follow the expected format."""


def is_path(obj: Any) -> bool:
    """True for ``str`` and ``os.PathLike`` objects (which the scorers treat as file paths)."""
    return isinstance(obj, (str, os.PathLike))


def source_name(obj: Any, role: str) -> str:
    """How error messages refer to an input: its path when it is one, else its role (e.g. 'results')."""
    return os.fspath(obj) if is_path(obj) else role


def read_text(path: PathLike, what: str = "file") -> str:
    """Read a UTF-8 text file, turning OS and decoding problems into :class:`MetricInputError`."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise MetricInputError(f"{p}: no such {what}") from None
    except IsADirectoryError:
        raise MetricInputError(f"{p}: is a directory, expected a {what}") from None
    except OSError as err:
        raise MetricInputError(f"{p}: cannot read {what}: {err.strerror or err}") from None
    try:
        # utf-8-sig: tolerate the byte-order mark some editors and tools write.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise MetricInputError(f"{p}: not UTF-8 text (byte {err.start})") from None


def read_json(path: PathLike, what: str = "JSON file") -> Any:
    """Parse a whole file as JSON; a syntax error names the file, line and column."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise MetricInputError(
            f"{os.fspath(path)}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None


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
