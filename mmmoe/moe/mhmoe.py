"""The Multi-Head Mixture-of-Experts layer (arXiv 2404.15045, 2411.16205).

Shape legend: B batch, L sequence, D = d_model, T = routed (non-padding) tokens, h = heads,
S = T * h sub-tokens, Dh = D / h, E experts, K top-k, A = routed assignments (<= S * K).

    x_TD --head layer--> split into h sub-tokens s_SDh --router--> top-k experts per sub-token
         --sort by expert--> grouped expert FFNs --gate-weighted scatter-add--> y_SDh
         --merge h sub-tokens--> y_TD --merge layer--> (+ shared expert) --> out

``num_heads=1`` without head/merge layers is plain sparse MoE; fine-grained MoE is a configuration
(more, narrower experts, larger top-k).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from mmmoe.layers.bitlinear import BitLinear
from mmmoe.layers.mlp import FeedForward
from mmmoe.moe.config import MoEConfig
from mmmoe.moe.dispatch import expert_capacity, permute
from mmmoe.moe.experts import GroupedExperts, expert_offsets
from mmmoe.moe.router import SoftmaxRouter, XMoERouter, load_balance_loss, route_with_lse, router_z_loss
from mmmoe.moe.stats import MoEOutput, sub_token_divergence


class MHMoE(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"MHMoE expects a MoEConfig, got {type(config).__name__}")
        self.config = c = config
        D, Dh = c.d_model, c.head_dim
        linear = BitLinear if c.bitnet_head_merge else nn.Linear
        self.head = linear(D, D, bias=True) if c.use_head_layer else nn.Identity()
        self.merge = linear(D, D, bias=True) if c.use_merge_layer else nn.Identity()
        if c.router == "softmax":
            self.router = SoftmaxRouter(Dh, c.num_experts)
        else:
            self.router = XMoERouter(Dh, c.num_experts, c.xmoe_dim, c.xmoe_temperature)
        self.experts = GroupedExperts(c.num_experts, Dh, c.expert_hidden, c.activation, c.bitnet)
        self.shared_expert = (
            FeedForward(D, c.shared_expert_hidden, c.activation, bitnet=c.bitnet) if c.shared_expert_hidden else None
        )
        # aux-loss-free balancing: a selection bias per expert, changed only by update_balancing()
        self.register_buffer("expert_bias", torch.zeros(c.num_experts), persistent=True)
        # None: every expert lives here. mmmoe.parallel sets an object whose dispatch(s, idx, gates)
        # replaces self.dispatch and whose reduce_stats(MoEOutput) makes the statistics global
        self.dispatcher = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The papers' initialisation of the parts an outer model must not re-initialise: head layer
        xavier_uniform (gain 1/sqrt(2)), merge layer xavier_uniform, zero biases, and the router's
        own init (``SoftmaxRouter`` / ``XMoERouter.reset_parameters``). The experts and the shared
        expert are left alone: they follow the FFN initialisation of whoever builds the layer
        (``GroupedExperts.reset_parameters`` standalone, the backbone's scheme inside a model)."""
        self.router.reset_parameters()
        if isinstance(self.head, nn.Linear):
            nn.init.xavier_uniform_(self.head.weight, gain=1 / math.sqrt(2))
            nn.init.zeros_(self.head.bias)
        if isinstance(self.merge, nn.Linear):
            nn.init.xavier_uniform_(self.merge.weight)
            nn.init.zeros_(self.merge.bias)

    # ------------------------------------------------------------------ forward
    def forward(self, x_BLD: Tensor, padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, MoEOutput]:
        """``x_BLD``: (..., D). ``padding_mask``: bool of x's leading shape, True = padding; padding
        tokens are neither routed nor counted, and their output is zero.

        Returns the output (same shape as x) and a :class:`MoEOutput` with losses and statistics.
        """
        c = self.config
        if x_BLD.shape[-1] != c.d_model:
            raise ValueError(f"MHMoE: input width {x_BLD.shape[-1]} != d_model {c.d_model}")
        lead = x_BLD.shape[:-1]
        x_ND = x_BLD.reshape(-1, c.d_model)
        keep_N = None
        if padding_mask is not None:
            if padding_mask.shape != lead or padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"MHMoE: padding_mask must be bool of shape {tuple(lead)} (True = padding), "
                    f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
                )
            keep_N = ~padding_mask.reshape(-1)
            x_TD = x_ND[keep_N]
        else:
            x_TD = x_ND
        y_TD, out = self._forward_tokens(x_TD)
        if keep_N is not None:
            # zeros in the output's dtype: under autocast the experts / merge layer answer in bf16
            y_ND = y_TD.new_zeros(x_ND.shape).index_put((keep_N.nonzero().squeeze(1),), y_TD)
        else:
            y_ND = y_TD
        return y_ND.reshape(x_BLD.shape), out

    def _forward_tokens(self, x_TD: Tensor) -> Tuple[Tensor, MoEOutput]:
        c = self.config
        T, h, Dh, E, K = x_TD.shape[0], c.num_heads, c.head_dim, c.num_experts, c.top_k
        s_SDh = self.head(x_TD).reshape(T * h, Dh)  # token split: sub-token j = j-th slice
        logits_SE = self.router(s_SDh)
        bias = self.expert_bias if c.balancing == "aux_free" else None
        probs_SE, idx_SK, gates_SK, lse_S = route_with_lse(logits_SE, K, bias)

        S = T * h
        run = self.dispatch if self.dispatcher is None else self.dispatcher.dispatch
        y_SDh, routed_E, num_dropped = run(s_SDh, idx_SK, gates_SK)
        if c.sub_token_residual:
            y_SDh = y_SDh + s_SDh
        y_TD = self.merge(y_SDh.reshape(T, c.d_model))  # token merge: heads concatenated in order
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)

        aux = load_balance_loss(probs_SE, idx_SK)
        z = router_z_loss(logits_SE, lse_S)
        loss = c.z_loss_coef * z
        if c.balancing == "aux_loss":
            loss = loss + c.aux_loss_coef * aux
        with torch.no_grad():
            load_E = routed_E.float()
            ratio_E = load_E / max(T, 1)
            out = MoEOutput(
                loss=loss,
                aux_loss=aux,
                z_loss=z,
                expert_load=load_E,
                num_tokens=T,
                expert_ratio=ratio_E,
                activation_ratio=(ratio_E > c.activation_threshold).float().mean(),
                dropped_fraction=torch.as_tensor(num_dropped, device=load_E.device).float() / max(S * K, 1),
                divergence=sub_token_divergence(idx_SK, h),
            )
        if self.dispatcher is not None:
            out = self.dispatcher.reduce_stats(out)
        return y_TD, out

    def dispatch(self, s_SDh: Tensor, idx_SK: Tensor, gates_SK: Tensor) -> Tuple[Tensor, Tensor, Union[int, Tensor]]:
        """The seam between routing and the experts: sub-tokens ``s_SDh`` with their top-k experts
        and gates -> gate-weighted expert mixture per sub-token (S x Dh), assignments routed to each
        expert before drops (E), number of dropped assignments (an int or a 0-dim tensor). This
        method runs all experts here; when ``self.dispatcher`` is set (``mmmoe.parallel``) its
        ``dispatch`` runs instead."""
        c = self.config
        S, E, K = s_SDh.shape[0], c.num_experts, c.top_k
        capacity = None if c.capacity_factor is None else expert_capacity(S, E, K, c.capacity_factor)
        plan = permute(idx_SK, E, capacity)
        # no Python list of counts here: the grouped kernel reads the device offsets, so a dropless
        # forward makes no host-device sync (the fallback loop derives the list itself)
        offs_E, _ = expert_offsets(plan.counts_E, with_counts=False)
        gate_A = gates_SK.t().reshape(-1)[plan.order_A]
        y_SDh = self.experts(s_SDh, plan.token_A, gate_A, offs_E)
        return y_SDh, plan.routed_E, plan.num_dropped

    # ------------------------------------------------------------------ balancing
    @torch.no_grad()
    def update_balancing(self, out: Union[MoEOutput, Tensor]) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts and lower it for
        over-loaded ones (step ``bias_update_rate`` times the sign of the load error). Call after
        the optimiser step, with the ``MoEOutput`` of this layer's forward or an expert load (E;
        e.g. summed over several forwards of one step). A no-op in eval mode and for
        balancing='aux_loss'. Under data parallelism pass a load summed over ranks."""
        c = self.config
        if not self.training or c.balancing != "aux_free":
            return
        load = out.expert_load if isinstance(out, MoEOutput) else out
        load = load.to(self.expert_bias.device, torch.float32)
        self.expert_bias.add_(c.bias_update_rate * torch.sign(load.mean() - load))

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"d_model={c.d_model}, heads={c.num_heads}, experts={c.num_experts}, top_k={c.top_k}, "
            f"router={c.router}, capacity_factor={c.capacity_factor}"
        )
