"""Routers over sub-tokens, top-k selection, and the router losses.

Shape legend: S = routed sub-tokens, D = sub-token width, E = experts, K = top-k.
Router logits and probabilities are computed in float32 (float64 stays float64), also inside a
``torch.autocast`` region (which is switched off for the router: expert choices must not flip with
bf16 rounding of the logits).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _router_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class SoftmaxRouter(nn.Module):
    """Linear logits ``s W^T`` (no bias); softmax over all experts is taken in :func:`route`.

    Initialisation (``reset_parameters``): ``nn.Linear``'s default, U(-1/sqrt(dim), 1/sqrt(dim)), as
    the gate ``wg`` of the public MH-MoE / X-MoE code (a plain ``Linear(dim, E, bias=False)``). The
    backbone's own initialisation does not overwrite it (``MHMoE.reset_parameters`` re-applies it).
    """

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.proj = nn.Linear(dim, num_experts, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()

    def forward(self, s_SD: Tensor) -> Tensor:
        dt = _router_dtype(s_SD)
        with torch.autocast(s_SD.device.type, enabled=False):
            return F.linear(s_SD.to(dt), self.proj.weight.to(dt))


class XMoERouter(nn.Module):
    """X-MoE router (Chi et al. 2022): project to a low dimension, cosine similarity against
    L2-normalised expert embeddings, divided by a learnable temperature.

    Initialisation (``reset_parameters``), as X-MoE: the projection is ``nn.Linear``'s default (the
    public code's ``wg_reduction``), the expert embeddings are orthogonal (``orthogonal_``; the public
    code's gain does not matter here because they are L2-normalised in forward) and the temperature
    starts at ``temperature`` (the paper's 0.3). The backbone's initialisation does not overwrite it.
    """

    def __init__(self, dim: int, num_experts: int, routing_dim: int = 16, temperature: float = 0.3):
        super().__init__()
        self.init_temperature = float(temperature)
        self.proj = nn.Linear(dim, routing_dim, bias=False)
        self.expert_embed = nn.Parameter(torch.empty(num_experts, routing_dim))
        self.temperature = nn.Parameter(torch.tensor(self.init_temperature))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()
        nn.init.orthogonal_(self.expert_embed)
        with torch.no_grad():
            self.temperature.fill_(self.init_temperature)

    def forward(self, s_SD: Tensor) -> Tensor:
        dt = _router_dtype(s_SD)
        with torch.autocast(s_SD.device.type, enabled=False):
            z_SR = F.normalize(F.linear(s_SD.to(dt), self.proj.weight.to(dt)), dim=-1)
            e_ER = F.normalize(self.expert_embed.to(dt), dim=-1)
            tau = self.temperature.to(dt).clamp(min=1e-2)
            return (z_SR @ e_ER.t()) / tau


def route(logits_SE: Tensor, top_k: int, bias_E: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Softmax over experts, top-k selection, gates.

    ``bias_E`` (aux-loss-free balancing) shifts only the *selection*; gates come from the
    unbiased probabilities. With k > 1 the k gates are renormalised to sum to 1.
    Returns ``probs_SE``, ``idx_SK`` (int64), ``gates_SK``.
    """
    probs_SE = logits_SE.softmax(dim=-1)
    scores = probs_SE if bias_E is None else probs_SE + bias_E.to(probs_SE.dtype)
    idx_SK = scores.topk(top_k, dim=-1).indices
    gates_SK = probs_SE.gather(1, idx_SK)
    if top_k > 1:
        gates_SK = gates_SK / gates_SK.sum(dim=-1, keepdim=True)
    return probs_SE, idx_SK, gates_SK


def load_balance_loss(probs_SE: Tensor, idx_SK: Tensor) -> Tensor:
    """Switch/GShard balance loss on sub-tokens: E * sum_e P_e * f_e, where P_e is the mean router
    probability of expert e and f_e the fraction of sub-tokens whose top-1 choice is e. Equals 1 at
    perfect balance."""
    S, E = probs_SE.shape
    if S == 0:
        return probs_SE.sum() * 0
    f_E = torch.bincount(idx_SK[:, 0], minlength=E).to(probs_SE.dtype) / S
    return E * (probs_SE.mean(dim=0) * f_E).sum()


def router_z_loss(logits_SE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over sub-tokens of logsumexp(logits)^2."""
    if logits_SE.shape[0] == 0:
        return logits_SE.sum() * 0
    return torch.logsumexp(logits_SE, dim=-1).square().mean()
