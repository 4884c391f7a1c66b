"""Process groups of expert parallelism composed with data parallelism.

World of W ranks, expert-parallel degree P (P divides W): W / P expert-parallel groups of P
consecutive ranks ({0..P-1}, {P..2P-1}, ...), each holding one copy of every expert (rank p of a
group holds experts [p E/P, (p+1) E/P)); and P replica groups {p, p+P, p+2P, ...} of the ranks
holding the same expert shard. Every rank is a data-parallel rank for the replicated
(non-expert) weights. Consecutive ranks share a node under torchrun / SLURM, so with P at most the
GPUs per node the all-to-all stays on the node's fast interconnect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

import torch.distributed as dist


@dataclass
class ExpertParallelLayout:
    ep_size: int
    """Expert-parallel degree P: ranks sharing one copy of the experts."""
    ep_rank: int
    """This rank's index in its expert-parallel group (which expert shard it holds)."""
    ep_group: Any
    """Process group of the P ranks exchanging sub-tokens (None = the default group)."""
    replica_size: int
    """W / P: ranks holding the same expert shard (data-parallel copies of it)."""
    replica_group: Any
    """Process group of those ranks (None when replica_size is 1)."""
    world_size: int
    ep_ranks: List[int]
    """Global ranks of this rank's expert-parallel group, in group order."""

    @classmethod
    def create(cls, ep_degree: int) -> "ExpertParallelLayout":
        """Build the groups (a collective: every rank of the default group calls it, same order).
        ``ep_degree`` = 1 gives plain data parallelism (each rank keeps all experts)."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelLayout.create needs torch.distributed initialised (init_process_group)")
        W, rank = dist.get_world_size(), dist.get_rank()
        if isinstance(ep_degree, bool) or not isinstance(ep_degree, int) or ep_degree < 1 or W % ep_degree:
            raise ValueError(f"expert_parallel={ep_degree!r} must be a positive integer dividing the world size {W}")
        P = ep_degree
        ep_group = replica_group = None
        ep_ranks: List[int] = []
        for g in range(W // P):  # new_group is collective over the default group: all ranks, same order
            ranks = list(range(g * P, (g + 1) * P))
            pg = dist.new_group(ranks) if P < W else dist.group.WORLD
            if rank in ranks:
                ep_group, ep_ranks = pg, ranks
        if W // P > 1:
            for p in range(P):
                ranks = list(range(p, W, P))
                pg = dist.new_group(ranks)
                if rank in ranks:
                    replica_group = pg
        return cls(P, rank % P, ep_group, W // P, replica_group, W, ep_ranks)

    def describe(self) -> str:
        return (f"expert parallel {self.ep_size} x data-parallel replicas {self.replica_size} "
                f"(world {self.world_size}); this rank holds expert shard {self.ep_rank} of group {self.ep_ranks}")
