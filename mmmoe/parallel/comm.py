"""Differentiable collectives used by expert parallelism."""

from __future__ import annotations

import socket
from typing import List

import torch
import torch.distributed as dist
from torch import Tensor


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` travel to ranks by ``in_splits``; ``out_splits`` rows arrive from each rank.
    The backward is the reverse exchange (the transpose of a permutation of rows)."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _exchange(g, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def _exchange(x: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


def all_to_all(x: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
    """``torch.distributed.all_to_all_single`` with uneven splits along dim 0, differentiable.

    ``in_splits[q]``: rows of ``x`` (consecutive blocks) sent to rank q of ``group``;
    ``out_splits[r]``: rows received from rank r. Every rank of the group must call it."""
    if len(out_splits) != dist.get_world_size(group) or len(in_splits) != dist.get_world_size(group):
        raise ValueError("all_to_all: one split per rank of the group is needed")
    if sum(in_splits) != x.shape[0]:
        raise ValueError(f"all_to_all: in_splits sum to {sum(in_splits)}, x has {x.shape[0]} rows")
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a process group's rendezvous (tests, localhost runs)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
