"""Token dispatch: sort (sub-token, expert) assignments by expert, optionally enforce a capacity.

Shape legend: S = routed sub-tokens, K = top-k, A = assignments (S*K, fewer after drops), E = experts.

Assignments are enumerated choice-major (all first choices in sub-token order, then all second
choices, ...), and the sort by expert is stable, so within one expert the order is the GShard
priority: earlier choice rank first, then earlier sub-token. With a capacity C, the first C
assignments of each expert are kept and the rest dropped. Nothing of size S x E x C is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from mmmoe import kernels


@dataclass
class DispatchPlan:
    order_A: Tensor
    """Indices into the choice-major flattening (k * S + s) of the kept assignments, by expert."""
    token_A: Tensor
    """Sub-token index of each sorted assignment."""
    counts_E: Tensor
    """Kept assignments per expert (int64)."""
    routed_E: Tensor
    """Assignments per expert before any drop (int64)."""
    num_dropped: Tensor
    """Assignments dropped by the capacity limit (a 0-dim int64 tensor: no host sync)."""


def expert_capacity(num_subtokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = ceil(cf * k * ceil(S / E)); at cf = 1 this is the public MH-MoE code's k * ceil(S / E)."""
    return int(math.ceil(capacity_factor * top_k * math.ceil(num_subtokens / num_experts)))


def permute(idx_SK: Tensor, num_experts: int, capacity: Optional[int] = None) -> DispatchPlan:
    S, K = idx_SK.shape
    flat_A = None  # the choice-major flattening: the ATen sort and the capacity mode need it
    token_A = None
    if kernels.applies(idx_SK, dtype=torch.long):
        order_A, token_A, routed_E = kernels.dispatch_order(idx_SK, num_experts)  # a counting sort
    else:
        flat_A = idx_SK.t().reshape(-1)
        order_A = torch.argsort(flat_A, stable=True)
        routed_E = torch.bincount(flat_A, minlength=num_experts)
    counts_E = routed_E
    num_dropped = torch.zeros((), dtype=torch.long, device=idx_SK.device)
    if capacity is not None:
        flat_A = idx_SK.t().reshape(-1) if flat_A is None else flat_A
        e_sorted = flat_A[order_A]
        start_E = routed_E.cumsum(0) - routed_E
        position_A = torch.arange(order_A.numel(), device=idx_SK.device) - start_E[e_sorted]
        keep = position_A < capacity
        order_A = order_A[keep]  # boolean indexing: the capacity mode's one host sync
        token_A = None
        counts_E = routed_E.clamp(max=capacity)
        num_dropped = (routed_E - counts_E).sum()
    if token_A is None:
        token_A = order_A % S if S > 0 else order_A
    return DispatchPlan(order_A, token_A, counts_E, routed_E, num_dropped)
