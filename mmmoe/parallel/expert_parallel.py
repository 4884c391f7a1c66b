"""Expert-parallel MH-MoE: experts sharded over a process group, sub-tokens exchanged by all-to-all.

Shape legend: S local sub-tokens, K top-k, E experts, P expert-parallel degree, El = E / P local
experts, A kept local assignments (sorted by expert), R assignments received from the group.

One MoE layer's forward on every rank of an expert-parallel group (``ExpertParallelDispatcher``,
plugged into the seam ``MHMoE.dispatch`` between routing and the experts):

1. count the local assignments per (choice rank k, expert e) and ``all_gather`` the P x K x E
   counts (one small collective, one host sync: split sizes are host integers). From them every
   rank knows every other rank's split sizes and capacity drops, so no second count exchange.
2. sort the local assignments by expert (as the single-device layer does), drop by capacity,
   gather their sub-tokens and ``all_to_all_single`` them (uneven splits) to the expert owners.
3. the owner reorders what it received by local expert and runs the same fused grouped matmuls
   (``GroupedExperts`` holding only its El experts) with unit gates.
4. the outputs travel back by the reverse all-to-all; the source applies its gates and
   scatter-adds them onto its sub-tokens. Autograd flows through both exchanges.

Capacity (``capacity_factor`` set). ``capacity_scope="group"`` (default): the capacity and the
drop decision are those of the single-device layer on the concatenation of the group's micro-
batches in rank order (C from the group's sub-token count; GShard priority: choice rank first,
then the global sub-token order, i.e. rank 0's sub-tokens before rank 1's). ``"rank"``: each rank
computes C from its own sub-tokens and drops before sending, which is what plain DDP (each rank a
single-device layer on its micro-batch) does. Dropless routing is the same under both.

Losses and statistics: ``MoEOutput.loss`` (the objective term) stays the rank's own (the aux and
z losses of its micro-batch, as under DDP); the statistics fields (``expert_load``,
``num_tokens``, ``expert_ratio``, ``activation_ratio``, ``dropped_fraction``, ``divergence``,
``aux_loss``, ``z_loss``) are made group-wide (loads summed, ratios recomputed, losses averaged
over ranks, divergence token-weighted), so logs and heatmaps show the group's expert loads.

Gradients. Each expert shard's gradient already sums the contributions of every rank of its group
(they arrive through the backward all-to-all); it is summed over the shard's replicas only and
divided by the world size, while replicated weights are averaged over all ranks (DDP). With a
global loss ``J = mean over ranks of the rank losses`` this is exactly dJ/dw for every weight.

Every rank of a group must run the same MoE layers in the same order (the same number of
forwards): true for training with resampled readers; a generation loop that stops early on one
rank would hang. Activation checkpointing recomputes the exchanges in backward (consistent,
untested).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmmoe.moe.dispatch import expert_capacity
from mmmoe.moe.experts import GroupedExperts
from mmmoe.moe.mhmoe import MHMoE
from mmmoe.moe.stats import MoEOutput
from mmmoe.parallel.comm import all_to_all
from mmmoe.parallel.layout import ExpertParallelLayout

CAPACITY_SCOPES = ("group", "rank")
EXPERT_WEIGHTS = ("w_in", "w_out")


class ExpertParallelDispatcher:
    """Runs one MHMoE's experts across its expert-parallel group (see the module docstring)."""

    def __init__(self, layer: MHMoE, layout: ExpertParallelLayout, capacity_scope: str = "group", index: int = 0):
        if capacity_scope not in CAPACITY_SCOPES:
            raise ValueError(f"capacity_scope={capacity_scope!r} is invalid: allowed {', '.join(CAPACITY_SCOPES)}")
        E, P = layer.config.num_experts, layout.ep_size
        if E % P:
            raise ValueError(f"expert parallel degree {P} must divide the number of experts ({E})")
        self.layer, self.layout, self.capacity_scope = layer, layout, capacity_scope
        self.num_local = E // P
        self.first = layout.ep_rank * self.num_local
        self.index = index  # this layer's number in the model (the same on every rank)
        self._group_stats: Optional[Tuple[Tensor, int, int]] = None

    # ------------------------------------------------------------------ the seam
    def dispatch(self, s_SDh: Tensor, idx_SK: Tensor, gates_SK: Tensor) -> Tuple[Tensor, Tensor, int]:
        c = self.layer.config
        S, K = idx_SK.shape
        E, P = c.num_experts, self.layout.ep_size
        dev = idx_SK.device
        choice_SK = torch.arange(K, device=dev).unsqueeze(0).expand(S, K)
        n_KE = torch.bincount((choice_SK * E + idx_SK).reshape(-1), minlength=K * E).view(K, E)
        # header (active, layer, dtype of the rows sent, dtype the experts compute in) + counts,
        # padded to the model's largest K*E (see drain); the two dtypes differ under autocast when
        # the rows are float32 (no head layer), and a serving rank must answer in the second
        compute = self.layer.experts.compute_dtype(s_SDh)
        header = torch.tensor([1, self.index, _DTYPES.index(s_SDh.dtype), _DTYPES.index(compute)], device=dev)
        msg = torch.cat([header, n_KE.reshape(-1), n_KE.new_zeros(self.message_size - HEADER - K * E)])
        N_all = _all_gather_rows(msg, self.layout.ep_group, P).cpu()  # the host sync (split sizes)
        N_PKE = self._counts(N_all)
        y_SDh, num_dropped = self._exchange(N_PKE, n_KE, s_SDh, idx_SK, gates_SK)
        return y_SDh, n_KE.sum(0), num_dropped

    message_size = 0  # set by parallelize_experts: HEADER + the largest K*E of the model's layers

    def _counts(self, N_all: Tensor) -> Tensor:
        c = self.layer.config
        K, E = c.top_k, c.num_experts
        active = N_all[:, 0] == 1
        layers = N_all[active, 1].unique().tolist()
        if layers != [self.index]:
            raise RuntimeError(
                f"expert-parallel ranks out of step: MoE layer {self.index} met layer(s) {layers} on other ranks "
                "(every rank of a group must run the same MoE layers in the same order)")
        return N_all[:, HEADER:HEADER + K * E].reshape(-1, K, E)

    def _exchange(self, N_PKE: Tensor, n_KE: Tensor, s_SDh: Tensor, idx_SK: Tensor, gates_SK: Tensor):
        """Steps 2-4 of the module docstring, given every rank's counts (P x K x E, on the host)."""
        c = self.layer.config
        lay = self.layout
        S, K = idx_SK.shape
        E, P, El, p = c.num_experts, lay.ep_size, self.num_local, lay.ep_rank
        dev = idx_SK.device
        routed_PE = N_PKE.sum(1)

        flat_A = idx_SK.t().reshape(-1)  # choice-major, as mmmoe.moe.dispatch.permute
        order_A = torch.argsort(flat_A, stable=True)
        kept_PE = routed_PE
        if c.capacity_factor is not None:
            e_A = flat_A[order_A]
            pos_A = torch.arange(order_A.numel(), device=dev) - (routed_PE[p].cumsum(0) - routed_PE[p]).to(dev)[e_A]
            if self.capacity_scope == "rank":
                S_P = N_PKE[:, 0].sum(1)
                C_P = torch.tensor([expert_capacity(int(s), E, K, c.capacity_factor) for s in S_P])
                kept_PE = torch.minimum(routed_PE, C_P.unsqueeze(1))
                keep_A = pos_A < int(C_P[p])
            else:
                C = expert_capacity(int(N_PKE[:, 0].sum()), E, K, c.capacity_factor)
                # global priority of (rank r, choice k, expert e): all earlier choices of e on every
                # rank, then choice k of e on ranks before r
                tot_KE = N_PKE.sum(0)
                before_k = tot_KE.cumsum(0) - tot_KE
                before_r = N_PKE.cumsum(0) - N_PKE
                offset_PKE = before_k.unsqueeze(0) + before_r
                kept_PE = (C - offset_PKE).clamp(min=0).minimum(N_PKE).sum(1)
                # local rank of an assignment among this rank's (k, e) assignments
                local_before_k = (n_KE.cumsum(0) - n_KE)
                k_A = torch.div(order_A, max(S, 1), rounding_mode="floor")
                rank_A = pos_A - local_before_k[k_A, e_A]
                keep_A = offset_PKE[p].to(dev)[k_A, e_A] + rank_A < C
            order_A = order_A[keep_A]
        token_A = order_A % S if S > 0 else order_A
        compute = self.layer.experts.compute_dtype(s_SDh)  # the dtype of the expert outputs (autocast)
        gate_A = gates_SK.t().reshape(-1)[order_A].to(compute)

        kept_PPl = kept_PE.view(P, P, El)  # (source rank, owner rank, local expert)
        send = kept_PPl[p].sum(1).tolist()  # rows to each owner
        recv_PEl = kept_PPl[:, p]  # rows of each local expert from each source
        recv = recv_PEl.sum(1).tolist()
        if int(kept_PE.sum()) == 0:  # nothing moves anywhere in the group: every rank skips alike
            y_SDh = (s_SDh * 0).to(compute)
        else:
            x_AD = s_SDh[token_A]
            x_RD = all_to_all(x_AD, recv, send, lay.ep_group)
            counts_El = recv_PEl.sum(0)
            expert_R = torch.repeat_interleave(torch.arange(El).repeat(P), recv_PEl.reshape(-1)).to(dev)
            perm_R = torch.argsort(expert_R, stable=True)  # received rows grouped by local expert
            ones_R = x_RD.new_ones(x_RD.shape[0])
            offs = counts_El.cumsum(0).to(device=dev, dtype=torch.int32)
            o_RD = self.layer.experts(x_RD, perm_R, ones_R, offs, counts_El.tolist())
            o_AD = all_to_all(o_RD, send, recv, lay.ep_group)
            y_SDh = o_AD.new_zeros(s_SDh.shape).index_add(0, token_A, o_AD * gate_A.unsqueeze(-1))
        num_dropped_local = S * K - int(token_A.numel())
        total_S = int(N_PKE[:, 0].sum())
        self._group_stats = (routed_PE.sum(0), total_S, int(routed_PE.sum() - kept_PE.sum()))
        return y_SDh, num_dropped_local

    @torch.no_grad()
    def serve(self, N_all: Tensor) -> None:
        """Take part in one forward of this layer without tokens of its own (a rank that has run
        out of evaluation batches, see :func:`drain`): run the local experts on what the other
        ranks send, send it back, and join the statistics reduction."""
        c = self.layer.config
        w = self.layer.experts.w_in
        active = N_all[N_all[:, 0] == 1][0]
        dtype, compute = _DTYPES[int(active[2])], _DTYPES[int(active[3])]
        N_PKE = self._counts(N_all)
        s = torch.empty(0, c.head_dim, device=w.device, dtype=dtype)
        idx = torch.empty(0, c.top_k, device=w.device, dtype=torch.long)
        with torch.autocast(w.device.type, dtype=compute, enabled=compute in (torch.bfloat16, torch.float16)):
            self._exchange(N_PKE, torch.zeros(c.top_k, c.num_experts, dtype=torch.long, device=w.device),
                           s, idx, s.new_empty(0, c.top_k))
        self._group_stats = None
        dist.all_reduce(torch.zeros(4, dtype=torch.float64, device=w.device), group=self.layout.ep_group)

    @torch.no_grad()
    def reduce_stats(self, out: MoEOutput) -> MoEOutput:
        """Group-wide statistics (one small all-reduce); ``out.loss`` is left as it is."""
        c = self.layer.config
        if self._group_stats is None:
            return out
        load_E, total_S, dropped = self._group_stats
        self._group_stats = None
        h, K, P = c.num_heads, c.top_k, self.layout.ep_size
        T = total_S // h
        dev = out.aux_loss.device
        local = torch.stack([
            out.aux_loss.detach().double().to(dev), out.z_loss.detach().double().to(dev),
            out.divergence.detach().double().to(dev) * out.num_tokens, torch.ones((), dtype=torch.float64, device=dev),
        ])
        dist.all_reduce(local, group=self.layout.ep_group)
        P = float(local[3])  # ranks with a forward of their own (see serve)
        load_E = load_E.to(device=out.expert_load.device, dtype=torch.float32)
        ratio_E = load_E / max(T, 1)
        return MoEOutput(
            loss=out.loss,
            aux_loss=(local[0] / P).to(out.aux_loss.dtype),
            z_loss=(local[1] / P).to(out.z_loss.dtype),
            expert_load=load_E,
            num_tokens=T,
            expert_ratio=ratio_E,
            activation_ratio=(ratio_E > c.activation_threshold).float().mean(),
            dropped_fraction=torch.tensor(dropped / max(total_S * K, 1)),
            divergence=(local[2] / max(T, 1)).float(),
        )


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HEADER = 4  # active, layer, dtype of the rows, dtype of the expert compute


@torch.no_grad()
def drain(model: nn.Module) -> int:
    """Call on every rank after its last evaluation batch: a rank that finished early keeps serving
    its experts to the ranks still running forwards, until every rank of its group has called
    ``drain``. Makes evaluation loops with uneven batch counts per rank safe. Returns the number of
    layer forwards served."""
    layers = [m for _, m in _moe_layers(model) if m.dispatcher is not None]
    if not layers:
        return 0
    by_index = {m.dispatcher.index: m for m in layers}
    d = layers[0].dispatcher
    dev = layers[0].experts.w_in.device
    served = 0
    while True:
        msg = torch.zeros(d.message_size, dtype=torch.long, device=dev)  # header: inactive
        N_all = _all_gather_rows(msg, d.layout.ep_group, d.layout.ep_size).cpu()
        active = N_all[:, 0] == 1
        if not bool(active.any()):
            return served
        by_index[int(N_all[active, 1][0])].dispatcher.serve(N_all)
        served += 1


def _all_gather_rows(t: Tensor, group, size: int) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


# ---------------------------------------------------------------------------- applying it
def _moe_layers(model: nn.Module) -> Iterable[Tuple[str, MHMoE]]:
    for name, m in model.named_modules():
        if isinstance(m, MHMoE):
            yield name, m


def parallelize_experts(model: nn.Module, layout: ExpertParallelLayout, capacity_scope: str = "group") -> nn.Module:
    """Shard the experts of every MHMoE in ``model`` (in place) over ``layout``'s expert-parallel
    group: rank p keeps experts [p E/P, (p+1) E/P) (a new ``GroupedExperts`` holding that slice;
    the full tensors are freed) and gets an :class:`ExpertParallelDispatcher`. Call it on every
    rank, on models with identical weights (same seed or the same checkpoint), before building
    the optimiser and before wrapping in DDP. Returns ``model``."""
    P = layout.ep_size
    layers = list(_moe_layers(model))
    message_size = HEADER + max((m.config.top_k * m.config.num_experts for _, m in layers), default=0)
    for index, (name, layer) in enumerate(layers):
        if layer.dispatcher is not None:
            raise ValueError(f"MoE layer {name!r} is already expert-parallel")
        E = layer.config.num_experts
        if E % P:
            raise ValueError(f"expert parallel degree {P} must divide the number of experts of layer {name!r} ({E})")
        full = layer.experts
        El, lo = E // P, layout.ep_rank * (E // P)
        with torch.device("meta"):  # no initialisation: the global RNG stream stays that of one device
            local = GroupedExperts(El, full.dim, full.hidden, full.activation, full.bitnet)
        local = local.to_empty(device=full.w_in.device).to(dtype=full.w_in.dtype)
        local.impl = full.impl  # the training path the user chose (auto / blocked / grouped)
        with torch.no_grad():
            for w in EXPERT_WEIGHTS:
                getattr(local, w).copy_(getattr(full, w)[lo:lo + El])
                getattr(local, w).requires_grad_(getattr(full, w).requires_grad)
        layer.experts = local
        layer.dispatcher = ExpertParallelDispatcher(layer, layout, capacity_scope, index)
        layer.dispatcher.message_size = message_size
    return model


def _expert_entries(model: nn.Module) -> Dict[str, Tuple[MHMoE, str]]:
    """Parameter name -> (layer, weight name) of every sharded expert weight."""
    out = {}
    for name, layer in _moe_layers(model):
        if layer.dispatcher is not None:
            for w in EXPERT_WEIGHTS:
                out[f"{name}.experts.{w}" if name else f"experts.{w}"] = (layer, w)
    return out


def expert_parameter_names(model: nn.Module) -> List[str]:
    """Names of the sharded expert weights (to hide from DDP, which would average them over every
    rank and broadcast rank 0's shard at start)."""
    return sorted(_expert_entries(model))


def _expert_params(model: nn.Module) -> List[nn.Parameter]:
    return [getattr(layer.experts, w) for layer, w in _expert_entries(model).values()]


def _layout_of(model: nn.Module) -> Optional[ExpertParallelLayout]:
    for _, m in _moe_layers(model):
        if m.dispatcher is not None:
            return m.dispatcher.layout
    return None


# ---------------------------------------------------------------------------- gradients
def _grads(params: Iterable[Tensor]) -> List[Tensor]:
    """Gradients of the trainable ``params``; a missing one (weight unused on this rank) becomes
    zeros, so every rank reduces the same tensors (as DDP does)."""
    out = []
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            out.append(p.grad)
    return out


@torch.no_grad()
def reduce_expert_gradients(model: nn.Module, layout: ExpertParallelLayout) -> None:
    """Expert shards: sum over the shard's replicas, divide by the world size (see module docs).
    Use next to DDP (which averages the replicated weights and must ignore the experts)."""
    grads = _grads(_expert_params(model))
    if not grads:
        return
    if layout.replica_size > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=layout.replica_group)
        for t, g in zip(torch.split(flat, [g.numel() for g in grads]), grads):
            g.copy_(t.view_as(g))
    torch._foreach_div_(grads, float(layout.world_size))


@torch.no_grad()
def reduce_gradients(model: nn.Module, layout: ExpertParallelLayout) -> None:
    """Without DDP: replicated weights averaged over all ranks, expert shards as
    :func:`reduce_expert_gradients`. Afterwards every gradient is that of the mean rank loss."""
    experts = {id(p) for p in _expert_params(model)}
    rep = _grads(p for p in model.parameters() if id(p) not in experts)
    if rep and layout.world_size > 1:
        flat = torch.cat([g.reshape(-1) for g in rep])
        dist.all_reduce(flat)
        flat /= layout.world_size
        for t, g in zip(torch.split(flat, [g.numel() for g in rep]), rep):
            g.copy_(t.view_as(g))
    reduce_expert_gradients(model, layout)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, model: nn.Module, norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole (logical) model: replicated gradients count
    once, expert-shard gradients are summed over the expert-parallel group, so every rank scales by
    the same factor (the norm of the single-device model's gradient). 2-norm only."""
    if float(norm_type) != 2.0:
        raise ValueError("expert-parallel clip_grad_norm_ supports norm_type=2 only")
    params = [p for p in parameters if p.grad is not None]
    layout = _layout_of(model)
    experts = {id(p) for p in _expert_params(model)}
    if not params:
        return torch.zeros(())
    dev = params[0].grad.device
    rep = [p.grad for p in params if id(p) not in experts]
    exp = [p.grad for p in params if id(p) in experts]
    sq_rep = torch.stack([g.detach().float().square().sum() for g in rep]).sum() if rep else torch.zeros((), device=dev)
    sq_exp = torch.stack([g.detach().float().square().sum() for g in exp]).sum() if exp else torch.zeros((), device=dev)
    if layout is not None and layout.ep_size > 1:
        dist.all_reduce(sq_exp, group=layout.ep_group)
    total = (sq_rep.to(dev) + sq_exp.to(dev)).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_([p.grad for p in params], coef.to(dev))
    return total


# ---------------------------------------------------------------------------- checkpoints
def _shard_rows(t: Tensor, layout: ExpertParallelLayout, key: str) -> Tensor:
    P = layout.ep_size
    if t.shape[0] % P:
        raise ValueError(f"{key}: {t.shape[0]} experts cannot be split over expert parallel degree {P}")
    El = t.shape[0] // P
    return t[layout.ep_rank * El:(layout.ep_rank + 1) * El]


def _gather_rows(t: Tensor, layout: ExpertParallelLayout) -> Tensor:
    if layout.ep_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(layout.ep_size)]
    dist.all_gather(parts, t.detach().contiguous(), group=layout.ep_group)
    return torch.cat(parts, dim=0)


def full_state_dict(model: nn.Module, state: Optional[Dict[str, Any]] = None, prefix: str = "") -> Dict[str, Any]:
    """``model.state_dict()`` (or ``state``, whose keys are ``prefix`` + the model's names) with every
    sharded expert weight gathered to its full E rows: the same keys and shapes as the
    single-device model, whatever the layout. A collective over each expert-parallel group; every
    rank gets the full dict."""
    state = dict(model.state_dict() if state is None else state)
    layout = _layout_of(model)
    if layout is None:
        return state
    for name in expert_parameter_names(model):
        key = prefix + name
        if key in state:
            state[key] = _gather_rows(state[key], layout)
    return state


def shard_state_dict(model: nn.Module, state: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """The inverse of :func:`full_state_dict`: full expert weights (E rows) in ``state`` are cut to
    this rank's shard, so a checkpoint of any layout (single device, EP degree 2, 4...) loads."""
    layout = _layout_of(model)
    if layout is None:
        return dict(state)
    out = dict(state)
    for name, (layer, w) in _expert_entries(model).items():
        key = prefix + name
        if key not in out:
            continue
        t, E = out[key], layer.config.num_experts
        if t.shape[0] != E:
            raise ValueError(f"{key}: checkpoint holds {t.shape[0]} experts, the model has {E} (full tensors expected)")
        out[key] = _shard_rows(t, layout, key)
    return out


def _optimizer_param_index(optimizer: torch.optim.Optimizer) -> Dict[int, int]:
    """id(param) -> its index in ``optimizer.state_dict()`` (params numbered over the groups in order)."""
    index, i = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            index.setdefault(id(p), i)
            i += 1
    return index


def _expert_state_indices(model: nn.Module, optimizer: torch.optim.Optimizer) -> List[int]:
    index = _optimizer_param_index(optimizer)
    return [index[id(p)] for p in _expert_params(model) if id(p) in index]


def _map_expert_state(model: nn.Module, optimizer: torch.optim.Optimizer, sd: Dict[str, Any],
                      fn: Callable[[Tensor, str], Tensor]) -> Dict[str, Any]:
    """``sd`` with ``fn(tensor, name)`` applied to the per-expert (3-D) state of expert weights."""
    state = dict(sd["state"])
    for i in _expert_state_indices(model, optimizer):
        if i in state:
            state[i] = {k: fn(v, f"optimizer state {i}.{k}") if isinstance(v, Tensor) and v.ndim == 3 else v
                        for k, v in state[i].items()}
    return {**sd, "state": state}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """``optimizer.state_dict()`` with the per-expert state of sharded weights (AdamW moments)
    gathered to full E rows; a collective like :func:`full_state_dict`."""
    sd = optimizer.state_dict()
    layout = _layout_of(model)
    return sd if layout is None else _map_expert_state(model, optimizer, sd, lambda v, _: _gather_rows(v, layout))


def shard_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sd: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of :func:`full_optimizer_state`, ready for ``optimizer.load_state_dict``."""
    layout = _layout_of(model)
    return sd if layout is None else _map_expert_state(model, optimizer, sd, lambda v, name: _shard_rows(v, layout, name))
