"""Bad data: the skip kinds, the typed error and the counting handler every reader stage uses.

Bad data never stops a reader: a ``SkipCounter`` (the handler of every stage) counts it by kind
(``SKIP_KINDS``), logs at a bounded rate and never sleeps. Counts live in shared memory, so the
main process sees what the DataLoader workers skipped; ``EpochLoader`` closes each epoch with one
summary line (``SkipCounter.report``), and ``datamodules.SkipReportCallback`` logs the per-epoch
counts as metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Dict, List, Mapping, Optional

import torch
from PIL import Image, UnidentifiedImageError

from .. import tario

log = logging.getLogger("data_pipelines.readers")

SKIP_KINDS = (
    "corrupt_image",  # bytes PIL cannot decode (garbage, truncated JPEG, decompression bomb)
    "truncated_tar",  # a shard that ends early or has a broken header; its complete samples are kept
    "unreadable_shard",  # a shard that cannot be opened at all
    "missing_field",  # a required member (jpg, txt, json, ...) or JSON field is absent or empty
    "bad_utf8",  # a text or JSON member that is not UTF-8
    "bad_json",  # a JSON member that does not parse or is not an object
    "bad_value",  # a field with the wrong type or value (label, question_id, ...)
    "duplicate_member",  # two members with the same key and suffix in one sample
    "oversized_member",  # a member above tario.MAX_MEMBER_BYTES (skipped unread, with its sample)
    "unsafe_name",  # a member named by an absolute path, with a ".." part or control characters
    "special_member",  # a link, device, FIFO, ... where a sample member is expected (never followed)
)


class SampleError(Exception):
    """A sample (or shard) that cannot be used; ``kind`` is one of SKIP_KINDS."""

    def __init__(self, kind: str, message: str, key: Optional[str] = None, url: Optional[str] = None):
        if kind not in SKIP_KINDS:
            raise ValueError(f"unknown skip kind {kind!r}; allowed: {SKIP_KINDS}")
        super().__init__(message)
        self.kind = kind
        self.key = key
        self.url = url

    def __str__(self) -> str:
        where = " ".join(x for x in (self.url and f"shard {self.url}", self.key and f"key {self.key}") if x)
        return f"{self.kind}: {self.args[0]}" + (f" ({where})" if where else "")


class SkipCounter:
    """Exception handler for the reader stages: counts bad data by kind, logs, continues.

    Call it with an exception: a ``SampleError`` (or a UnicodeDecodeError / JSONDecodeError /
    PIL UnidentifiedImageError / tario.TarFormatError raised by stock stages) is counted and the
    handler returns True (skip and continue). Anything else is a bug, not bad data: it is raised.

    Logging is bounded in time, never by sleeping: the first ``log_first`` errors of each kind are
    logged one by one, after that each process writes at most one line per ``log_interval``
    seconds (with the running count). Counts sit in a shared-memory tensor with one row per
    process (row 0: the main process, row 1 + i: DataLoader worker i), so no locks are needed and
    the main process sees every worker.

    ``report()`` closes an epoch: it returns the counts since the previous report, appends them to
    ``history`` and logs one summary line. ``EpochLoader`` calls it at the end of every complete
    pass; ``SkipReportCallback`` turns the reports into logged metrics.
    """

    def __init__(self, name: str = "data", log_first: int = 5, log_interval: float = 30.0, max_workers: int = 256):
        self.name = name
        self.log_first = log_first
        self.log_interval = log_interval
        self.counts_PK = torch.zeros(max_workers + 1, len(SKIP_KINDS), dtype=torch.int64).share_memory_()
        self._reported_K = torch.zeros(len(SKIP_KINDS), dtype=torch.int64)
        self._last_log = -math.inf
        self.history: List[Dict[str, int]] = []

    def __call__(self, exn: BaseException) -> bool:
        kind = classify_error(exn)
        if kind is None:
            raise exn
        self.add(kind, exn)
        return True

    def add(self, kind: str, exn: Optional[BaseException] = None) -> None:
        k = SKIP_KINDS.index(kind)
        info = torch.utils.data.get_worker_info()
        row = 0 if info is None else 1 + info.id % (self.counts_PK.shape[0] - 1)
        self.counts_PK[row, k] += 1
        n = int(self.counts_PK[:, k].sum())
        if n <= self.log_first:
            log.warning("%s: skipped %s #%d: %s", self.name, kind, n, "" if exn is None else exn)
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_interval:
            self._last_log = now
            log.warning(
                "%s: skipped %s #%d: %s (further skips: at most one line per %gs per process; "
                "totals at the end of each epoch)",
                self.name, kind, n, "" if exn is None else exn, self.log_interval,
            )

    def counts(self) -> Dict[str, int]:
        """Cumulative counts by kind, over all processes."""
        return dict(zip(SKIP_KINDS, self.counts_PK.sum(0).tolist()))

    def report(self) -> Dict[str, int]:
        """Counts since the previous report (all kinds, zeros included); logs one summary line and
        appends the counts to ``history``."""
        now_K = self.counts_PK.sum(0)
        delta = dict(zip(SKIP_KINDS, (now_K - self._reported_K).tolist()))
        self._reported_K = now_K.clone()
        self.history.append(delta)
        (log.warning if any(delta.values()) else log.info)("%s", self.format(delta))
        return delta

    def format(self, counts: Mapping[str, int]) -> str:
        total = sum(counts.values())
        parts = ", ".join(f"{k}={v}" for k, v in counts.items() if v)
        return f"{self.name}: skipped {total} this epoch" + (f" ({parts})" if parts else "")


def classify_error(exn: BaseException) -> Optional[str]:
    """The SKIP_KINDS entry of a data error, or None for anything that is not bad data."""
    if isinstance(exn, SampleError):
        return exn.kind
    if isinstance(exn, UnicodeDecodeError):
        return "bad_utf8"
    if isinstance(exn, json.JSONDecodeError):
        return "bad_json"
    if isinstance(exn, (UnidentifiedImageError, Image.DecompressionBombError)):
        return "corrupt_image"
    if isinstance(exn, (tario.TarFormatError, EOFError)):
        return "truncated_tar"
    return None
