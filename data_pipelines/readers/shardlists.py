"""Shard lists and the rank / worker split: which shards (and samples) this process reads.

    EpochShardList         each shard once per epoch, order reshuffled per epoch by (seed, epoch),
                           the same order on every rank
    SeededResampledShards  infinite, drawn with replacement by a generator seeded by
                           (seed, epoch, rank, worker)
    split_by_node          shard i goes to rank i % world_size (epoch mode only; evaluation readers
                           with fewer shards than ranks split by sample: EvalNodeSplit)
    split_by_worker        then to DataLoader worker j % num_workers

Urls are brace patterns, ``<prefix>.manifest.json`` paths, or lists of them (``expand_urls``).
Rank and world size come from torch.distributed when it is initialised, else from the RANK and
WORLD_SIZE environment variables (``node_info``); ``is_rank_zero`` is the same question asked
before the process group exists (launcher variables). Worker id and count come from the
DataLoader's worker info (``worker_info``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from itertools import chain, islice
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import webdataset as wds

from .. import schema

log = logging.getLogger("data_pipelines.readers")

Urls = Union[str, Sequence[str]]

def expand_urls(urls: Urls) -> List[str]:
    """Brace patterns (``dir/x-{000000..000009}.tar``), ``::``-joined patterns, a shard set's
    manifest (``dir/x.manifest.json``: its shards, next to it), or a list of any of these."""
    if isinstance(urls, str):
        urls = [urls]
    out: List[str] = []
    for u in urls:
        if str(u).endswith(".manifest.json"):
            from ..shards import manifest_shard_paths

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


#: Launcher variables that hold a process's rank before torch.distributed is initialised
#: (torchrun / Lightning: RANK; SLURM: SLURM_PROCID; Lightning's DDP children: LOCAL_RANK).
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK")


def is_rank_zero() -> bool:
    """Whether this process is (or will be) rank 0: torch.distributed when initialised, else no
    launcher variable (``RANK_VARIABLES``) names another rank. For work only one process does
    before the process group exists, e.g. writing a missing dataset."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return all(os.environ.get(var, "0") in ("", "0") for var in RANK_VARIABLES)


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


_NOTHING = object()


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
        # pull the first sample before deciding: the stages are lazy, so only then has ``shards``
        # run (in this worker's copy) and set ``by_sample``
        it = iter(src)
        first = next(it, _NOTHING)
        if first is _NOTHING:
            return
        stream = chain((first,), it)
        if not self.by_sample:
            yield from stream
            return
        rank, world_size = node_info()
        yield from islice(stream, rank, None, world_size)


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
