"""Tar reading: shard dicts {"url"} -> raw samples {"__key__", "__url__", suffix: bytes}
(``tar_to_samples``), on the checked parser of ``data_pipelines.tario``."""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

import webdataset as wds

from .. import tario
from .errors import SampleError

_NAME_RE = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")  # key = path up to the first dot of the basename


def _tar_samples(
    src: Iterable[Dict[str, str]],
    handler: Callable[[BaseException], bool],
    keep: Optional[Iterable[str]] = None,
    required: Iterable[str] = (),
    max_member_bytes: int = tario.MAX_MEMBER_BYTES,
) -> Iterator[Dict[str, Any]]:
    keep = None if keep is None else frozenset(keep)
    required = frozenset(required)
    for shard in src:
        url = shard["url"]
        try:
            stream = wds.gopen(url)
        except Exception as exn:  # noqa: BLE001 - any open failure is an unreadable shard
            if not handler(SampleError("unreadable_shard", repr(exn), url=url)):
                return
            continue
        go_on = True
        try:
            go_on = yield from _read_tar(stream, url, handler, keep, required, max_member_bytes)
        finally:
            try:
                stream.close()
            except Exception as exn:  # noqa: BLE001 - e.g. a "pipe:" command that exited non-zero
                go_on = handler(SampleError("unreadable_shard", f"on close: {exn!r}", url=url)) and go_on
        if not go_on:
            return


def _read_tar(stream, url: str, handler, keep, required, max_member_bytes: int) -> Iterator[Dict[str, Any]]:
    """Group one shard's members into samples; returns False when the handler asks to stop."""
    current: Optional[Dict[str, Any]] = None

    def want(name: str) -> bool:
        match = _NAME_RE.match(name)
        return keep is None or (match is not None and match.group(2).lower() in keep)

    def drop(kind: str, message: str, key: str) -> None:
        if not current.get("__bad__"):  # one count per sample
            handler(SampleError(kind, message, key=key, url=url))
        current["__bad__"] = True

    try:
        for name, data in tario.iter_members(stream, want, max_member_bytes, specials=True):
            unsafe = _unsafe_name(name)
            key, suffix = _split_name(name)
            if key is None:
                if unsafe:  # not a sample member, but worth counting: the shard is hostile
                    handler(SampleError("unsafe_name", f"member {name!r}", url=url))
                continue
            if current is not None and current["__key__"] != key:
                if not current.pop("__bad__", False):
                    yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            if unsafe:
                drop("unsafe_name", f"member {name!r}", repr(key))
                continue
            if isinstance(data, tario.Special):
                if keep is None or suffix in keep:  # a member the reader would have read
                    drop("special_member", f".{suffix} is a {data!r}", key)
                continue
            if data is None:
                continue  # a member this reader does not use: skipped unread
            if isinstance(data, tario.Oversized):
                drop("oversized_member", f".{suffix}: {data}", key)
                continue
            if suffix in current:
                drop("duplicate_member", f"second .{suffix} member", key)
                continue
            current[suffix] = data
    except (tario.TarFormatError, EOFError, OSError, *tario.DECOMPRESSION_ERRORS) as exn:
        # The members read so far are complete; keep the sample in progress only if it has every
        # member the reader requires (the damage may have hit a member nobody reads).
        if current is not None and required <= current.keys() and not current.get("__bad__"):
            yield current
        return bool(handler(SampleError("truncated_tar", f"{type(exn).__name__}: {exn}", url=url)))
    if current is not None and not current.pop("__bad__", False):
        yield current
    return True


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _unsafe_name(name: str) -> bool:
    """An absolute member name, one with a ``..`` part, or one with control characters (which
    could forge log lines). Such names never reach the file system here (nothing is extracted), but
    a shard that holds them was not written by a shard writer: its samples are dropped."""
    return (
        name.startswith("/")
        or (".." in name and ".." in name.split("/"))
        or _CONTROL_RE.search(name) is not None
    )


def _split_name(name: str) -> Tuple[Optional[str], str]:
    """(key, lower-case suffix) of a member name; (None, "") for names that are not sample members
    (no dot in the basename, hidden files, ``__``-prefixed names)."""
    match = _NAME_RE.match(name)
    if match is None or os.path.basename(name).startswith("__"):
        return None, ""
    return match.group(1), match.group(2).lower()


tar_to_samples = wds.pipelinefilter(_tar_samples)
tar_to_samples.__doc__ = """Stage: shard dicts {"url"} -> raw samples {"__key__", "__url__", suffix: bytes}.

Like wds.tarfile_to_samples, but on ``tario`` (a checked tar parser, about 7x faster than tarfile
in stream mode) and with these guarantees, pinned down by the tests: a damaged shard (truncated
anywhere, also inside a header or exactly between two members; corrupt header; bad compression)
costs exactly one ``truncated_tar`` and never leaks its last sample into the next shard; only
members in ``keep`` are read; a member above ``max_member_bytes`` drops its sample
(``oversized_member``) without being read; an unopenable shard is one ``unreadable_shard``; a
sample with a member named by an absolute path, a ``..`` part or control characters is dropped
(``unsafe_name``), and so is one whose member is a link, device or FIFO (``special_member``: never
followed). Nothing is extracted or written anywhere. Memory stays bounded: at most one sample in
progress, of at most ``len(keep)`` members (with ``keep`` given) of at most ``max_member_bytes`` each.
"""
