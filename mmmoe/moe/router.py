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
from torch.autograd.function import once_differentiable

from mmmoe import kernels


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
    return _route(logits_SE, top_k, bias_E, with_lse=False)[:3]


def route_with_lse(logits_SE: Tensor, top_k: int, bias_E: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`route` and the log-sum-exp of each row of logits (the z-loss's input, S).

    On CPU in float32 one fused kernel (:mod:`mmmoe.kernels`) computes all four in one pass, and
    their gradient in one pass back. Its probabilities and selections are those of ATen's softmax
    and topk (bitwise on the machines tested; between exactly equal scores the lower expert index
    is chosen), its gates, log-sum-exp and gradient equal ATen's to float32 rounding (the gates
    bitwise up to k = 4 there). Elsewhere ATen's ops run.
    """
    return _route(logits_SE, top_k, bias_E, with_lse=True)


def _route(logits_SE: Tensor, top_k: int, bias_E: Optional[Tensor], with_lse: bool):
    """The fused kernel (which always gives the log-sum-exp), or ATen's ops (which compute it only
    ``with_lse``; ``None`` otherwise)."""
    if kernels.applies(logits_SE) and logits_SE.dim() == 2:
        bias = None if bias_E is None else bias_E.detach().to("cpu", torch.float32)
        if logits_SE.stride(-1) != 1:
            logits_SE = logits_SE.contiguous()  # the kernel reads rows with unit column stride
        return _FusedRoute.apply(logits_SE, bias, top_k)
    probs_SE = logits_SE.softmax(dim=-1)
    scores = probs_SE if bias_E is None else probs_SE + bias_E.to(probs_SE.dtype)
    idx_SK = scores.topk(top_k, dim=-1).indices
    gates_SK = probs_SE.gather(1, idx_SK)
    if top_k > 1:
        gates_SK = gates_SK / gates_SK.sum(dim=-1, keepdim=True)
    return probs_SE, idx_SK, gates_SK, torch.logsumexp(logits_SE, dim=-1) if with_lse else None


class _FusedRoute(torch.autograd.Function):
    """:func:`route_with_lse` through the fused CPU kernels: probs, idx (not differentiable),
    gates and lse from one pass; the logits' gradient from one pass over whichever of their
    gradients reach it (the balance loss's, the gates', the z-loss's). Saves probs and idx."""

    @staticmethod
    def forward(ctx, logits_SE: Tensor, bias_E: Optional[Tensor], top_k: int):
        probs, idx, gates, lse = kernels.route_forward(logits_SE, bias_E, top_k)
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)  # unused outputs send None, not zeros
        ctx.save_for_backward(probs, idx)
        return probs, idx, gates, lse

    @staticmethod
    @once_differentiable  # a second derivative raises instead of being wrong
    def backward(ctx, dprobs, _didx, dgates, dlse):
        probs, idx = ctx.saved_tensors
        f32 = (lambda t: None if t is None else t.float())
        return kernels.route_backward(probs, idx, f32(dprobs), f32(dgates), f32(dlse)), None, None


def load_balance_loss(probs_SE: Tensor, idx_SK: Tensor) -> Tensor:
    """Switch/GShard balance loss on sub-tokens: E * sum_e P_e * f_e, where P_e is the mean router
    probability of expert e and f_e the fraction of sub-tokens whose top-1 choice is e. Equals 1 at
    perfect balance."""
    S, E = probs_SE.shape
    if S == 0:
        return probs_SE.sum() * 0
    f_E = torch.bincount(idx_SK[:, 0], minlength=E).to(probs_SE.dtype) / S
    return E * (probs_SE.mean(dim=0) * f_E).sum()


def router_z_loss(logits_SE: Tensor, lse_S: Optional[Tensor] = None) -> Tensor:
    """ST-MoE router z-loss: mean over sub-tokens of logsumexp(logits)^2 (``lse_S``: that
    log-sum-exp when already computed, e.g. by :func:`route_with_lse`)."""
    if logits_SE.shape[0] == 0:
        return logits_SE.sum() * 0
    lse_S = torch.logsumexp(logits_SE, dim=-1) if lse_S is None else lse_S
    return lse_S.square().mean()
