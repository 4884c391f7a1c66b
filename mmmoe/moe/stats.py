"""What one MH-MoE forward returns besides its output: losses and routing statistics."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict

import torch
from torch import Tensor


@dataclass
class MoEOutput:
    """Returned by ``MHMoE.forward`` next to the hidden states. Losses carry gradients; the
    statistics are detached."""

    loss: Tensor
    """What the training objective adds: aux_loss_coef * aux_loss (balancing='aux_loss') +
    z_loss_coef * z_loss."""
    aux_loss: Tensor
    """Unweighted Switch balance loss on sub-tokens (1.0 = perfectly balanced)."""
    z_loss: Tensor
    """Unweighted router z-loss."""
    expert_load: Tensor
    """E: sub-token assignments routed to each expert (before capacity drops)."""
    num_tokens: int
    """Tokens routed (padding excluded)."""
    expert_ratio: Tensor
    """E: the paper's activation ratio per expert, selections / tokens."""
    activation_ratio: Tensor
    """Fraction of experts whose ratio exceeds the config's activation_threshold."""
    dropped_fraction: Tensor
    """Fraction of assignments dropped by the capacity limit (0 when dropless)."""
    divergence: Tensor
    """Mean number of distinct experts reached by one token's sub-tokens (all top-k choices)."""

    def scalars(self) -> Dict[str, float]:
        """Plain floats of the scalar fields, for logging."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and v.numel() == 1:
                out[f.name] = float(v.detach())
            elif isinstance(v, int):
                out[f.name] = float(v)
        return out


@torch.no_grad()
def sub_token_divergence(idx_SK: Tensor, num_heads: int) -> Tensor:
    """Mean over tokens of the number of distinct experts among a token's h * k assignments."""
    S, K = idx_SK.shape
    if S == 0:
        return torch.zeros((), device=idx_SK.device)
    per_token = idx_SK.reshape(S // num_heads, num_heads * K).sort(dim=1).values
    distinct = 1 + (per_token[:, 1:] != per_token[:, :-1]).sum(dim=1)
    return distinct.float().mean()
