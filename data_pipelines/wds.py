"""WebDataset readers: shards (see ``schema.py``) -> batch dicts of tensors.

Every reader is one explicit list of stages, read top to bottom (``_reader_stages`` + a decode map
+ a batch stage):

    shard list     EpochShardList (each shard once per epoch, order reshuffled per epoch, the same
                   order on every rank) or SeededResampledShards (infinite, sampled with
                   replacement by a generator seeded by (seed, epoch, rank, worker));
                   urls are brace patterns, ``<prefix>.manifest.json`` paths, or lists of them
    split_by_node  shard i goes to rank i % world_size        (epoch mode only; evaluation readers
                   with fewer shards than ranks split by sample: EvalNodeSplit)
    split_by_worker  then to DataLoader worker j % num_workers (epoch mode only)
    tar_to_samples read the tar stream (``tario``: checked headers, bounded member sizes), group
                   members by key; only the members the reader needs are read (anything else,
                   e.g. a ``.pyd`` / ``.pth`` pickle, is skipped unread)
    SeededShuffle  sample shuffle buffer over the raw bytes (train only), seeded by
                   (seed, epoch, rank, worker)
    wds.map        our decode: image bytes -> PIL (JPEG draft) -> crop/resize -> uint8 array,
                   UTF-8 text -> token ids, JSON -> task fields. Nothing is ever unpickled:
                   webdataset's ``.decode()`` is not used anywhere.
    wds.batched    collate: normalise images into one float tensor (or stack them as uint8 with
                   ``normalize=False``; see ``normalize_images``), pad text, draw masks

Reproducibility: nothing draws from the global RNGs. Crops, flips, caption choice (decode) and
masks (collate) draw from generators that ``Pipeline`` seeds at the start of each pass from
(seed, epoch, rank, worker, stage) (``StreamRandom``), so a batch depends only on the seed and its
position in the stream: runs repeat bitwise, with any worker count, and ``EpochLoader.resume``
can replay a pass up to the batch where an interrupted run stopped.

Rank and world size come from torch.distributed when it is initialised, else from the RANK and
WORLD_SIZE environment variables; worker id and count from the DataLoader's worker info. In epoch
mode every sample is produced exactly once per epoch over all ranks and workers (when there are
fewer shards than ranks x workers, some readers get none: write more, smaller shards). Ranks can
receive different numbers of batches; for DDP training prefer ``resampled=True`` with
``epoch_samples`` or shard counts that divide evenly.

Bad data never stops a reader: a ``SkipCounter`` (the handler of every stage) counts it by kind
(``SKIP_KINDS``), logs at a bounded rate and never sleeps. Counts live in shared memory, so the
main process sees what the DataLoader workers skipped; ``EpochLoader`` closes each epoch with one
summary line (``SkipCounter.report``), and ``datamodules.SkipReportCallback`` logs the per-epoch
counts as metrics.

Batch dicts (B batch, L text length, Hp x Wp patch grid; images are ImageNet-normalised float32):

    image_text   image (B,3,H,W), image_mask (B,Hp,Wp) bool True = masked patch,
                 text_ids (B,L) long (MLM-corrupted), text_pad_mask (B,L) bool, mlm_labels (B,L)
    image        image, image_mask
    text         text_ids, text_pad_mask, mlm_labels (when mask_ratio is set), lang [str]
    vqa          image, text_ids, text_pad_mask, question_id (B,) long,
                 vqa_targets (B,num_answers) float soft scores min(1, n/3), answers [[str]]
                 (the last two only with_answers=True)
    nlvr2        image_left, image_right, text_ids, text_pad_mask, label (B,) long
                 (1 true, 0 false, -1 unknown), identifier [str]
    caption      image, image_id (B,) long, caption_ids (B,L) long, caption_pad_mask (B,L) bool,
                 captions [[str]] (all references)
    every batch  key [str] (the samples' ``__key__``)

PADDING CONVENTION: every ``*_pad_mask`` is True at padding positions (the same convention as the
MH-MoE layer's ``padding_mask``). Text is ``[bos] + tokens + [eos]`` padded with ``pad_id`` on the
right. ``mlm_labels`` / labels hold -100 where no loss is taken.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import time
from itertools import islice
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from . import schema, tario
from .masking import (
    IGNORE_INDEX,
    IMAGE_MASK_RATIO,
    IMAGE_TEXT_MASK_RATIO,
    MIN_BLOCK_PATCHES,
    TEXT_ONLY_MASK_RATIO,
    block_masks,
    mlm_mask,
    special_ids_of,
)
from .transforms import ImageTransform, Normalizer, decode_image, eval_transform, normalize_into, train_transform

log = logging.getLogger(__name__)

Urls = Union[str, Sequence[str]]

# ----------------------------------------------------------------------------------------------
# Bad data: typed errors and the counting handler
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Shard list and splitting
# ----------------------------------------------------------------------------------------------


def expand_urls(urls: Urls) -> List[str]:
    """Brace patterns (``dir/x-{000000..000009}.tar``), ``::``-joined patterns, a shard set's
    manifest (``dir/x.manifest.json``: its shards, next to it), or a list of any of these."""
    if isinstance(urls, str):
        urls = [urls]
    out: List[str] = []
    for u in urls:
        if str(u).endswith(".manifest.json"):
            from .shards import manifest_shard_paths

            out.extend(manifest_shard_paths(u))
        else:
            out.extend(wds.shardlists.expand_urls(str(u)))
    return out


class EpochShardList(wds.SimpleShardList):
    """Every shard once per epoch; with a seed the order is reshuffled each epoch by (seed, epoch),
    identically on every rank (required for exact node/worker splitting). ``set_epoch`` is called by
    ``EpochLoader`` before each epoch; without it the epoch advances by one per iteration."""

    def __init__(self, urls: Urls, seed: Optional[int] = None):
        urls = expand_urls(urls)
        if not urls:
            raise ValueError("no shards: the url list or pattern expanded to nothing")
        super().__init__(urls, seed=None)
        self.shuffle_seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Dict[str, str]]:
        urls = list(self.urls)
        if self.shuffle_seed is not None:
            random.Random(self.shuffle_seed * 1_000_003 + self.epoch).shuffle(urls)
        self.epoch += 1
        for url in urls:
            yield dict(url=url)


def node_info() -> Tuple[int, int]:
    """(rank, world_size): torch.distributed when initialised, else RANK / WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


#: Set in a DataLoader worker by ``Pipeline.__iter__`` when a pass resumes after ``k`` batches:
#: worker ``j`` then plays the stream of worker ``(j + k) % num_workers``, so that the DataLoader's
#: round robin (which always starts at worker 0) continues with the stream whose turn it was.
_WORKER_ROTATION = 0


def worker_info() -> Tuple[int, int]:
    """(stream id, number of workers) of the current DataLoader worker; (0, 1) in the main process.

    The stream id is the worker id, rotated when a pass resumed mid-way (see ``Pipeline``): what a
    worker reads, shuffles and draws depends on it, never on the process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else ((info.id + _WORKER_ROTATION) % info.num_workers, info.num_workers)


def stream_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts, the same in every process and Python run (unlike
    ``hash()`` of a string, which is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SeededResampledShards(torch.utils.data.IterableDataset):
    """Shards drawn with replacement, forever, from a generator seeded by (seed, epoch, rank,
    worker). Replaces ``wds.ResampledShards``, which mixes the process id, the time and
    ``os.urandom`` into its seed, so two runs with the same seed read different shards."""

    def __init__(self, urls: Urls, seed: int = 0):
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError("no shards: the url list or pattern expanded to nothing")
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Dict[str, str]]:
        rank, _ = node_info()
        worker, _ = worker_info()
        rng = random.Random(stream_seed("resample", self.seed, self.epoch, rank, worker))
        while True:
            yield dict(url=self.urls[rng.randrange(len(self.urls))])


def split_by_node(src: Iterable[Any]) -> Iterator[Any]:
    """Keep every world_size-th shard starting at this rank."""
    rank, world_size = node_info()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    yield from islice(src, rank, None, world_size)


class EvalNodeSplit:
    """Rank split of evaluation readers: by shard when every rank can get at least one shard, else
    by sample (every rank reads every shard and keeps every world_size-th sample), so no rank is
    left without data. An empty rank would skip the epoch-end collectives of distributed
    validation (synced logs, gathered meters) and leave the other ranks waiting forever; a
    held-out set often has a single shard. ``shards`` goes before ``split_by_worker`` and
    ``samples`` after the tar stage; each sample is still read by exactly one rank."""

    def __init__(self) -> None:
        self.by_sample = False

    def shards(self, src: Iterable[Any]) -> Iterator[Any]:
        rank, world_size = node_info()
        shards = list(src)
        self.by_sample = len(shards) < world_size
        yield from (shards if self.by_sample else shards[rank::world_size])

    def samples(self, src: Iterable[Any]) -> Iterator[Any]:
        if not self.by_sample:
            yield from src
            return
        rank, world_size = node_info()
        yield from islice(src, rank, None, world_size)


def split_by_worker(src: Iterable[Any]) -> Iterator[Any]:
    """Keep every num_workers-th of this rank's shards starting at this worker; warns when empty."""
    worker, num_workers = worker_info()
    n = 0
    for item in islice(src, worker, None, num_workers):
        n += 1
        yield item
    if n == 0:
        rank, world_size = node_info()
        log.warning(
            "rank %d worker %d received no shard (%d ranks x %d workers share fewer shards)",
            rank, worker, world_size, num_workers,
        )


# ----------------------------------------------------------------------------------------------
# Tar reading
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Decoding: raw bytes -> python / tensor fields (runs in the DataLoader workers)
# ----------------------------------------------------------------------------------------------


def _member(sample: Mapping[str, Any], suffix: str) -> bytes:
    data = sample.get(suffix)
    if data is None:
        raise SampleError("missing_field", f"no .{suffix} member", key=sample.get("__key__"), url=sample.get("__url__"))
    return data


def _text(sample: Mapping[str, Any], suffix: str = schema.TEXT_KEY) -> str:
    data = _member(sample, suffix)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exn:
        raise SampleError("bad_utf8", f".{suffix}: {exn}", key=sample.get("__key__"), url=sample.get("__url__")) from None
    if not text.strip():
        raise SampleError("missing_field", f"empty .{suffix}", key=sample.get("__key__"), url=sample.get("__url__"))
    return text.strip()


def _meta(sample: Mapping[str, Any], required: bool) -> Dict[str, Any]:
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
        text = _text(sample)
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
        text = _text(sample)
        lang = _meta(sample, required=False).get("lang") or self.lang
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
        meta = _meta(sample, required=True)
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
        meta = _meta(sample, required=True)
        sentence = _field(sample, meta, "sentence", (str,))
        label = meta.get("label")
        if isinstance(label, str) and label in ("True", "False"):  # the official files' spelling
            label = label == "True"
        if label is not None and not isinstance(label, bool):
            raise SampleError("bad_value", f"label {label!r}", key=sample["__key__"], url=sample["__url__"])
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
        meta = _meta(sample, required=True)
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


# ----------------------------------------------------------------------------------------------
# Collation (runs in the DataLoader workers; big tensors are allocated in shared memory there,
# so handing the batch to the main process copies nothing)
# ----------------------------------------------------------------------------------------------


def _empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty, in shared memory when called in a DataLoader worker (as default_collate does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).resize_(*shape)


IMAGE_FIELDS = ("image", "image_left", "image_right")


def stack_images(images: Sequence[Union[np.ndarray, torch.Tensor]], normalizer: Optional[Normalizer]) -> torch.Tensor:
    """uint8 images, arrays (H, W, 3) or tensors (3, H, W) -> normalised float32 (B, 3, H, W),
    contiguous.

    With ``normalizer=None``: uint8 (B, 3, H, W), a channel-last view of one (B, H, W, 3) buffer
    (a plain memcpy per image, 1/4 of the bytes to hand over and to move to the GPU); finish with
    ``normalize_images`` after the transfer."""
    first = images[0]
    H, W = first.shape[:2] if isinstance(first, np.ndarray) else first.shape[1:]
    if normalizer is None:
        out_BHWC = _empty((len(images), H, W, 3), torch.uint8)
        out_np = out_BHWC.numpy()
        for i, img in enumerate(images):
            if isinstance(img, np.ndarray):
                out_np[i] = img
            else:
                out_BHWC[i].copy_(img.permute(1, 2, 0))
        return out_BHWC.permute(0, 3, 1, 2)
    out = _empty((len(images), 3, H, W), torch.float32)
    return normalize_into(out, images, normalizer)


def normalize_images(batch: Dict[str, Any], normalizer: Optional[Normalizer] = None) -> Dict[str, Any]:
    """Turn the uint8 image fields of a batch (readers built with ``normalize=False``) into
    normalised float32 (B, 3, H, W) contiguous tensors on the same device, in place; nested batch
    dicts (a CombinedLoader's ``{"image_text": batch, ...}``) are handled too. Meant for
    ``on_after_batch_transfer``: on a GPU the conversion is free and the copy 4x smaller."""
    normalizer = normalizer or Normalizer()
    for name, x in batch.items():
        if isinstance(x, dict):
            normalize_images(x, normalizer)
        elif name in IMAGE_FIELDS and torch.is_tensor(x) and x.dtype == torch.uint8:
            out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
            batch[name] = normalizer(x, out=out)
    return batch


def pad_text(seqs: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists: ids (B, L) long and pad mask (B, L) bool, True = padding."""
    L = length if length is not None else max(len(s) for s in seqs)
    ids_BL = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_BL[i, : len(s)] = torch.as_tensor(s[:L], dtype=torch.long)
    lengths_B = torch.tensor([min(len(s), L) for s in seqs])
    return ids_BL, torch.arange(L).unsqueeze(0) >= lengths_B.unsqueeze(1)


class Collate(StreamRandom):
    """Collation for every reader kind; which fields appear depends on the samples' keys.

    image / image_left / image_right -> stacked normalised float images (uint8 when
    ``normalize=False``, see ``stack_images``); image_mask (block-wise,
    when ``patch_grid`` is set); text -> ``text_prefix``_ids + ``text_prefix``_pad_mask, and
    mlm_labels when ``mlm_ratio`` is set; target (vqa) -> dense soft-score matrix; scalars ->
    long tensors; the rest -> lists.
    """

    def __init__(
        self,
        tokenizer: Any,
        normalizer: Optional[Normalizer] = None,
        patch_grid: Optional[Tuple[int, int]] = None,
        image_mask_ratio: float = IMAGE_MASK_RATIO,
        min_block: int = MIN_BLOCK_PATCHES,
        mlm_ratio: Optional[float] = None,
        text_prefix: str = "text",
        num_answers: Optional[int] = None,
        pad_to: Optional[int] = None,
        normalize: bool = True,
    ):
        self.pad_id = tokenizer.pad_id
        self.mask_id = tokenizer.mask_id if mlm_ratio is not None else None
        self.vocab_size = tokenizer.vocab_size
        self.special_ids = tuple(special_ids_of(tokenizer))
        self.normalizer = (normalizer or Normalizer()) if normalize else None
        self.patch_grid = patch_grid
        self.image_mask_ratio = image_mask_ratio
        self.min_block = min_block
        self.mlm_ratio = mlm_ratio
        self.text_prefix = text_prefix
        self.num_answers = num_answers
        self.pad_to = pad_to

    def __call__(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        first = samples[0]
        batch: Dict[str, Any] = {"key": [s["key"] for s in samples]}
        for name in IMAGE_FIELDS:
            if name in first:
                batch[name] = stack_images([s[name] for s in samples], self.normalizer)
        if "image" in first and self.patch_grid is not None:
            batch["image_mask"] = block_masks(
                len(samples), *self.patch_grid, mask_ratio=self.image_mask_ratio, min_block=self.min_block,
                generator=self.generator,
            )
        if "text" in first:
            ids_BL, pad_BL = pad_text([s["text"] for s in samples], self.pad_id, self.pad_to)
            if self.mlm_ratio is not None:
                ids_BL, batch["mlm_labels"] = mlm_mask(
                    ids_BL, self.mlm_ratio, self.mask_id, self.vocab_size, self.special_ids, generator=self.generator
                )
            batch[f"{self.text_prefix}_ids"] = ids_BL
            batch[f"{self.text_prefix}_pad_mask"] = pad_BL
        if "target" in first:
            target_BA = torch.zeros(len(samples), self.num_answers)
            for i, s in enumerate(samples):
                for a, score in s["target"].items():
                    target_BA[i, a] = score
            batch["vqa_targets"] = target_BA
        for name in ("question_id", "image_id", "label"):
            if name in first:
                batch[name] = torch.tensor([s[name] for s in samples], dtype=torch.long)
        for name in ("answers", "identifier", "captions", "lang", "source"):  # source: data_pipelines.mixing
            if name in first:
                batch[name] = [s[name] for s in samples]
        return batch


# ----------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------


class Pipeline(wds.DataPipeline):
    """A wds.DataPipeline that carries its SkipCounter (``skips``), forwards ``set_epoch`` to its
    stages, seeds its random stages, and can resume a pass mid-way.

    ``random_stages`` (``StreamRandom`` objects: decoders and the collate) get, at the start of
    every pass, a torch generator seeded by (seed, epoch, rank, worker, stage index). With the
    seeded shard list and shuffle buffer, every batch is then a function of (seed, epoch, rank,
    worker) and its position in the pass, whatever the process or the global RNG state.

    ``resume_batches = k`` (set by ``EpochLoader.resume``, consumed by the next pass) makes the
    next pass start after the first ``k`` batches of the loader: in a DataLoader worker ``j`` of
    ``n``, batch ``i`` of the pass came from stream ``i % n``, so stream ``j`` drops the
    ``ceil((k - j) / n)`` batches it produced and the streams are rotated by ``k % n`` (see
    ``worker_info``). Dropped batches are made in full and thrown away (the same decode, shuffle
    and random draws as the first time), so the rest of the pass is bitwise what it would have
    been without the interruption."""

    def __init__(self, *stages: Any, skips: SkipCounter, seed: int = 0, random_stages: Sequence[StreamRandom] = (),
                 nested: bool = False):
        super().__init__(*stages)
        self.skips = skips
        self.seed = seed
        self.epoch = 0
        self.random_stages = list(random_stages)
        self.resume_batches = 0
        self.nested = nested  # a source inside another pipeline: leaves the worker rotation alone

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for stage in self.pipeline:
            if hasattr(stage, "set_epoch"):
                stage.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        global _WORKER_ROTATION
        skip, self.resume_batches = self.resume_batches, 0  # once (also in a persistent worker's copy)
        info = torch.utils.data.get_worker_info()
        if info is not None and not self.nested:
            _WORKER_ROTATION = skip % info.num_workers
        epoch = self.epoch
        self.set_epoch(epoch)
        self.epoch = epoch + 1  # the next pass of a persistent worker's copy (EpochLoader sets it in the main process)
        rank, _ = node_info()
        worker, num_workers = worker_info()
        for i, stage in enumerate(self.random_stages):
            stage.generator = torch.Generator().manual_seed(stream_seed("stage", self.seed, epoch, rank, worker, i))
        mine = -(-(skip - worker) // num_workers) if skip > worker else 0  # batches i < skip with i % n == worker
        batches = super().__iter__()
        return islice(batches, mine, None) if mine else batches


class EpochLoader(torch.utils.data.DataLoader):
    """DataLoader for pipelines that batch themselves (batch_size=None). Before each pass it sets
    the pipeline's epoch (shard order changes per epoch even with non-persistent workers); after
    each complete pass it closes the epoch's skip count (``pipeline.skips.report()``: one log
    line, kept in ``last_skips`` and in ``pipeline.skips.history``).

    ``resume(epoch, batches)`` makes the next pass epoch ``epoch`` starting after its first
    ``batches`` batches (exact resume, see ``Pipeline``). The loader has its own torch generator,
    so making an iterator never draws from the global RNG (which would shift the model's draws
    between an interrupted and an uninterrupted run)."""

    def __init__(
        self,
        dataset: Pipeline,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: Optional[int] = None,
    ):
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(stream_seed("loader", getattr(dataset, "seed", 0))),
        )
        self.epoch = 0
        self.last_skips: Optional[Dict[str, int]] = None
        self._resume_batches = 0

    def resume(self, epoch: int, batches: int = 0) -> None:
        """The next pass is epoch ``epoch``, without its first ``batches`` batches."""
        if epoch < 0 or batches < 0:
            raise ValueError(f"resume(epoch={epoch}, batches={batches}): both must be >= 0")
        self.epoch, self._resume_batches = int(epoch), int(batches)

    def __iter__(self):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        if hasattr(self.dataset, "resume_batches"):
            self.dataset.resume_batches = self._resume_batches
        self._resume_batches = 0
        self.epoch += 1
        try:
            it = super().__iter__()  # workers start (and take their copy of the dataset) here
        finally:
            if hasattr(self.dataset, "resume_batches"):
                self.dataset.resume_batches = 0
        return self._pass(it)

    def _pass(self, batches: Iterator[Any]) -> Iterator[Any]:
        yield from batches
        skips = getattr(self.dataset, "skips", None)
        if skips is not None:
            self.last_skips = skips.report()


def make_loader(pipeline: Pipeline, num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False) -> EpochLoader:
    return EpochLoader(pipeline, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers)


def _limit_per_reader(src: Iterable[Any], total: int) -> Iterator[Any]:
    """Epoch length for infinite (resampled) readers: ceil(total / (world_size x workers)) items
    from each reader, so one epoch is about ``total`` items over the whole job."""
    _, world_size = node_info()
    _, num_workers = worker_info()
    yield from islice(src, math.ceil(total / (world_size * num_workers)))


def _reader_stages(
    urls: Urls,
    skips: SkipCounter,
    keep: Iterable[str],
    required: Iterable[str],
    train: bool,
    resampled: bool,
    shuffle_buffer: int,
    seed: int,
) -> List[Any]:
    """shard list -> split by node -> split by worker -> tar -> shuffle: raw byte samples."""
    if resampled:
        stages: List[Any] = [SeededResampledShards(urls, seed=seed)]
    else:
        split = split_by_node if train else EvalNodeSplit()
        stages = [EpochShardList(urls, seed=seed if train else None), split if train else split.shards, split_by_worker]
    stages.append(tar_to_samples(handler=skips, keep=keep, required=required))
    if not resampled and not train:
        stages.append(split.samples)
    if train and shuffle_buffer > 0:
        stages.append(SeededShuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed))
    return stages


class SeededShuffle:
    """Sample shuffle buffer whose order depends only on (seed, epoch, rank, worker), so a run
    repeats exactly with the same seed (webdataset's own shuffle seeds itself from pid and time).

    The buffer fills to ``initial`` samples before the first one leaves, then grows towards
    ``bufsize`` while emitting: each incoming sample swaps places with a random buffered one,
    which is emitted."""

    def __init__(self, bufsize: int, initial: int = 100, seed: int = 0):
        self.bufsize, self.initial, self.seed = bufsize, max(1, min(initial, bufsize)), seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        rank, _ = node_info()
        worker, _ = worker_info()
        rng = random.Random(stream_seed("shuffle", self.seed, self.epoch, rank, worker))
        buf: List[Any] = []
        for sample in src:
            if len(buf) < self.initial or (len(buf) < self.bufsize and rng.random() < 0.5):
                buf.append(sample)  # still filling (half the time once past ``initial``)
                continue
            i = rng.randrange(len(buf))
            out, buf[i] = buf[i], sample
            yield out
        rng.shuffle(buf)
        yield from buf


def _batch_stages(collate: Collate, batch_size: int, epoch_batches: Optional[int]) -> List[Any]:
    stages: List[Any] = [wds.batched(batch_size, collation_fn=collate, partial=True)]
    if epoch_batches is not None:
        stages.append(wds.pipelinefilter(_limit_per_reader)(epoch_batches))
    return stages


def _epoch_batches(epoch_samples: Optional[int], batch_size: int, resampled: bool) -> Optional[int]:
    if epoch_samples is None:
        return None
    if not resampled:
        raise ValueError("epoch_samples applies to resampled=True readers; epoch readers end with the data")
    return math.ceil(epoch_samples / batch_size)


def _transform(image_size: int, train: bool, hflip: bool) -> ImageTransform:
    return train_transform(image_size, hflip=hflip) if train else eval_transform(image_size)


def image_text_pipeline(
    urls: Urls,
    tokenizer: Any,
    image_size: int = 224,
    train: bool = True,
    batch_size: int = 32,
    max_len: int = 64,
    patch_size: int = 16,
    image_mask_ratio: Optional[float] = IMAGE_MASK_RATIO,
    mlm_ratio: Optional[float] = IMAGE_TEXT_MASK_RATIO,
    hflip: bool = False,
    resampled: bool = False,
    epoch_samples: Optional[int] = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    skips: Optional[SkipCounter] = None,
    normalize: bool = True,
) -> Pipeline:
    """Image-text pretraining pairs (``jpg`` + ``txt``): image, image_mask, text_ids, text_pad_mask,
    mlm_labels. ``image_mask_ratio=None`` / ``mlm_ratio=None`` leave out the masks."""
    skips = skips or SkipCounter("image_text")
    transform = _transform(image_size, train, hflip)
    collate = Collate(
        tokenizer,
        transform.normalizer,
        patch_grid=_grid(image_size, patch_size) if image_mask_ratio is not None else None,
        image_mask_ratio=image_mask_ratio or 0.0,
        mlm_ratio=mlm_ratio,
        normalize=normalize,
    )
    decode = DecodeImageText(tokenizer, transform, max_len)
    return Pipeline(
        *_reader_stages(urls, skips, ("jpg", "txt", "json"), ("jpg", "txt"), train, resampled, shuffle_buffer, seed),
        wds.map(decode, handler=skips),
        *_batch_stages(collate, batch_size, _epoch_batches(epoch_samples, batch_size, resampled)),
        skips=skips, seed=seed, random_stages=(decode, collate),
    )


def image_pipeline(
    urls: Urls,
    image_size: int = 224,
    train: bool = True,
    batch_size: int = 32,
    patch_size: int = 16,
    image_mask_ratio: Optional[float] = IMAGE_MASK_RATIO,
    hflip: bool = False,
    resampled: bool = False,
    epoch_samples: Optional[int] = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    skips: Optional[SkipCounter] = None,
    normalize: bool = True,
) -> Pipeline:
    """Image-only pretraining (``jpg``): image, image_mask."""
    skips = skips or SkipCounter("image")
    transform = _transform(image_size, train, hflip)
    collate = Collate(
        _NoTokenizer(),
        transform.normalizer,
        patch_grid=_grid(image_size, patch_size) if image_mask_ratio is not None else None,
        image_mask_ratio=image_mask_ratio or 0.0,
        normalize=normalize,
    )
    decode = DecodeImage(transform)
    return Pipeline(
        *_reader_stages(urls, skips, ("jpg", "json"), ("jpg",), train, resampled, shuffle_buffer, seed),
        wds.map(decode, handler=skips),
        *_batch_stages(collate, batch_size, _epoch_batches(epoch_samples, batch_size, resampled)),
        skips=skips, seed=seed, random_stages=(decode, collate),
    )


def language_probs(sizes: Mapping[str, float], alpha: float) -> Dict[str, float]:
    """XLM-style sampling: p_l proportional to n_l ** alpha (alpha = 1: by size; 0: uniform)."""
    if not sizes:
        raise ValueError("no languages")
    if any(n <= 0 for n in sizes.values()):
        raise ValueError(f"language sizes must be positive, got {dict(sizes)}")
    w = {lang: float(n) ** alpha for lang, n in sizes.items()}
    total = sum(w.values())
    return {lang: x / total for lang, x in w.items()}


def manifest_total(urls: Urls) -> Optional[int]:
    """Sample count from the ``<prefix>.manifest.json`` next to the shards (schema.py), if any."""
    first = expand_urls(urls)[0]
    match = re.match(r"^(.*)-\d+\.tar$", first)
    if match is None:
        return None
    path = schema.MANIFEST_NAME.format(prefix=match.group(1))
    try:
        with open(path) as f:
            return int(json.load(f)["total"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class WeightedMix(torch.utils.data.IterableDataset):
    """Draw each sample from one of several pipelines with fixed probabilities. In epoch mode a
    finished source drops out and the others are renormalised, so each sample still comes once."""

    def __init__(self, sources: Mapping[str, Iterable[Any]], probs: Mapping[str, float], seed: Optional[int] = None):
        if set(sources) != set(probs):
            raise ValueError(f"sources {sorted(sources)} and probs {sorted(probs)} must name the same languages")
        self.sources = dict(sources)
        self.probs = dict(probs)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for src in self.sources.values():
            if hasattr(src, "set_epoch"):
                src.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        rank, _ = node_info()
        worker, _ = worker_info()
        rng = random.Random(None if self.seed is None else (self.seed, self.epoch, rank, worker).__repr__())
        self.epoch += 1
        live = {name: iter(src) for name, src in self.sources.items()}
        while live:
            names = list(live)
            name = rng.choices(names, weights=[self.probs[n] for n in names])[0]
            try:
                yield next(live[name])
            except StopIteration:
                del live[name]


def text_pipeline(
    urls_by_lang: Union[Mapping[str, Urls], Urls],
    tokenizer: Any,
    train: bool = True,
    batch_size: int = 32,
    max_len: int = 128,
    mlm_ratio: Optional[float] = TEXT_ONLY_MASK_RATIO,
    weights: Optional[Mapping[str, float]] = None,
    alpha: float = 0.5,
    sizes: Optional[Mapping[str, int]] = None,
    resampled: bool = False,
    epoch_samples: Optional[int] = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    skips: Optional[SkipCounter] = None,
) -> Pipeline:
    """Text-only (``txt``), one shard set per language, mixed per sample: text_ids, text_pad_mask,
    mlm_labels (``mlm_ratio=None`` for causal LM), lang.

    Language probabilities: ``weights`` if given, else p_l proportional to n_l ** alpha where n_l
    is ``sizes[l]``, else the manifest's total, else the language's shard count.
    """
    if isinstance(urls_by_lang, (str, list, tuple)):
        urls_by_lang = {"und": urls_by_lang}
    skips = skips or SkipCounter("text")
    if weights is not None:
        probs = language_probs(weights, 1.0)
    else:
        n = {}
        for lang, urls in urls_by_lang.items():
            n[lang] = (sizes or {}).get(lang) or manifest_total(urls) or len(expand_urls(urls))
        probs = language_probs(n, alpha)
    sources = {
        # one seed per language: two languages' readers must not draw the same shard sequence
        lang: Pipeline(
            *_reader_stages(urls, skips, ("txt", "json"), ("txt",), train, resampled, shuffle_buffer,
                            stream_seed("lang", seed, lang) if len(urls_by_lang) > 1 else seed),
            wds.map(DecodeText(tokenizer, max_len, lang), handler=skips),
            skips=skips, nested=True,
        )
        for lang, urls in urls_by_lang.items()
    }
    collate = Collate(tokenizer, mlm_ratio=mlm_ratio)
    return Pipeline(
        WeightedMix(sources, probs, seed=seed),
        *_batch_stages(collate, batch_size, _epoch_batches(epoch_samples, batch_size, resampled)),
        skips=skips, seed=seed, random_stages=(collate,),
    )


def vqa_pipeline(
    urls: Urls,
    tokenizer: Any,
    answer_vocab: Mapping[str, int],
    image_size: int = 384,
    train: bool = True,
    batch_size: int = 32,
    max_len: int = 64,
    with_answers: bool = True,
    normalize_answer: Optional[Callable[[str], str]] = None,
    resampled: bool = False,
    epoch_samples: Optional[int] = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    skips: Optional[SkipCounter] = None,
    normalize: bool = True,
) -> Pipeline:
    """VQAv2 (``jpg`` + ``json``): image, text_ids, text_pad_mask, question_id, and with_answers:
    vqa_targets (B, len(answer_vocab)) with min(1, n/3) for an answer given n times, answers.
    ``normalize_answer`` maps raw answers to vocabulary entries (identity when None)."""
    skips = skips or SkipCounter("vqa")
    transform = _transform(image_size, train, hflip=False)
    num_answers = max(answer_vocab.values(), default=-1) + 1
    collate = Collate(tokenizer, transform.normalizer, num_answers=num_answers, normalize=normalize)
    decode = DecodeVQA(tokenizer, transform, max_len, answer_vocab, with_answers, normalize_answer)
    return Pipeline(
        *_reader_stages(urls, skips, ("jpg", "json"), ("jpg", "json"), train, resampled, shuffle_buffer, seed),
        wds.map(decode, handler=skips),
        *_batch_stages(collate, batch_size, _epoch_batches(epoch_samples, batch_size, resampled)),
        skips=skips, seed=seed, random_stages=(decode, collate),
    )


def nlvr2_pipeline(
    urls: Urls,
    tokenizer: Any,
    image_size: int = 384,
    train: bool = True,
    batch_size: int = 32,
    max_len: int = 64,
    resampled: bool = False,
    epoch_samples: Optional[int] = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    skips: Optional[SkipCounter] = None,
    normalize: bool = True,
) -> Pipeline:
    """NLVR2 (``left.jpg`` + ``right.jpg`` + ``json``): image_left, image_right, text_ids,
    text_pad_mask, label, identifier. Never flipped (the statements talk about left and right)."""
    skips = skips or SkipCounter("nlvr2")
    transform = _transform(image_size, train, hflip=False)
    collate = Collate(tokenizer, transform.normalizer, normalize=normalize)
    keep = (schema.LEFT_IMAGE_KEY, schema.RIGHT_IMAGE_KEY, schema.META_KEY)
    decode = DecodeNLVR2(tokenizer, transform, max_len)
    return Pipeline(
        *_reader_stages(urls, skips, keep, keep, train, resampled, shuffle_buffer, seed),
        wds.map(decode, handler=skips),
        *_batch_stages(collate, batch_size, _epoch_batches(epoch_samples, batch_size, resampled)),
        skips=skips, seed=seed, random_stages=(decode, collate),
    )


def caption_pipeline(
    urls: Urls,
    tokenizer: Any,
    image_size: int = 384,
    train: bool = True,
    batch_size: int = 32,
    max_len: int = 32,
    hflip: bool = False,
    resampled: bool = False,
    epoch_samples: Optional[int] = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    skips: Optional[SkipCounter] = None,
    normalize: bool = True,
) -> Pipeline:
    """COCO captioning (``jpg`` + ``json``): image, image_id, caption_ids, caption_pad_mask (train:
    a random one of the image's captions each time; eval: the first), captions (all)."""
    skips = skips or SkipCounter("caption")
    transform = _transform(image_size, train, hflip)
    collate = Collate(tokenizer, transform.normalizer, text_prefix="caption", normalize=normalize)
    decode = DecodeCaption(tokenizer, transform, max_len, train)
    return Pipeline(
        *_reader_stages(urls, skips, ("jpg", "json"), ("jpg", "json"), train, resampled, shuffle_buffer, seed),
        wds.map(decode, handler=skips),
        *_batch_stages(collate, batch_size, _epoch_batches(epoch_samples, batch_size, resampled)),
        skips=skips, seed=seed, random_stages=(decode, collate),
    )


def _grid(image_size: int, patch_size: int) -> Tuple[int, int]:
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    return image_size // patch_size, image_size // patch_size


class _NoTokenizer:
    """Stand-in for readers without text."""

    pad_id = 0
    vocab_size = 0
