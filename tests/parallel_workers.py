"""Worker bodies of tests/test_parallel.py, run in gloo process groups on CPU (one spawn of 2 and
one of 4 processes; every worker loops over all cases and returns its failures as text).

The reference in every case is the single-process layer, computed on every rank from the same
seeded global batch (the concatenation of the ranks' micro-batches in rank order)."""

from __future__ import annotations

import copy
import itertools
import os
import traceback
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from mmmoe.moe import MHMoE, MoEConfig
from mmmoe.parallel import (
    ExpertParallelLayout,
    clip_grad_norm_,
    drain,
    full_optimizer_state,
    full_state_dict,
    parallelize_experts,
    reduce_gradients,
    shard_optimizer_state,
    shard_state_dict,
)

D, E, L = 12, 8, 5
ATOL, RTOL = 2e-5, 1e-4


def _close(a, b, what: str, errors: List[str]) -> None:
    if a.shape != b.shape:
        errors.append(f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
    elif not torch.allclose(a, b, atol=ATOL, rtol=RTOL):
        errors.append(f"{what}: max abs diff {(a - b).abs().max().item():.3g}")


def _batch(seed: int, sizes: List[int], empty_rank: Optional[int]):
    g = torch.Generator().manual_seed(seed)
    xs, pads, ws = [], [], []
    for r, b in enumerate(sizes):
        xs.append(torch.randn(b, L, D, generator=g))
        pad = torch.rand(b, L, generator=g) < 0.3
        if r == empty_rank:
            pad[:] = True  # this rank routes no token at all
        pads.append(pad)
        ws.append(torch.randn(b, L, D, generator=g))
    return xs, pads, ws


def _gather_experts(t: torch.Tensor, layout: ExpertParallelLayout) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(layout.ep_size)]
    dist.all_gather(parts, t.contiguous(), group=layout.ep_group)
    return torch.cat(parts)


def layer_cases(rank: int, world: int, layout: ExpertParallelLayout, errors: List[str], seen: Dict[str, int]) -> None:
    """EP MHMoE vs the single-process layer: outputs, statistics, every parameter's gradient."""
    P = layout.ep_size
    group = rank // P
    sizes = [3, 1, 2, 4][:world]
    combos = itertools.product((1, 2, 3), (1, 2), (None, "group", "rank"))
    for n, (h, k, cap) in enumerate(combos):
        name = f"W={world} P={P} h={h} k={k} cap={cap}"
        cfg = MoEConfig(d_model=D, num_experts=E, expert_hidden=8, top_k=k, num_heads=h,
                        capacity_factor=None if cap is None else 1.0, z_loss_coef=0.01,
                        shared_expert_hidden=8 if h == 2 else 0)
        torch.manual_seed(n)
        ref = MHMoE(cfg)
        ep = copy.deepcopy(ref)
        parallelize_experts(ep, layout, capacity_scope=cap or "group")
        empty = (n % 3) if world > 2 else (1 if n % 2 else None)
        xs, pads, ws = _batch(100 + n, sizes, empty)
        # reference: capacity decided per unit = all ranks (dropless: batch-independent), the
        # expert-parallel group (group scope) or the rank's micro-batch (rank scope)
        if cap == "rank":
            units = [[r] for r in range(world)]
        elif cap == "group":
            units = [list(range(g * P, (g + 1) * P)) for g in range(world // P)]
        else:
            units = [list(range(world))]
        ref_loss = 0.0
        ref_y: Dict[int, torch.Tensor] = {}
        for unit in units:
            x = torch.cat([xs[r] for r in unit])
            pad = torch.cat([pads[r] for r in unit])
            y, out = ref(x, pad)
            ref_loss = ref_loss + (y * torch.cat([ws[r] for r in unit])).sum()
            for r, part in zip(unit, y.split([sizes[r] for r in unit])):
                ref_y[r] = part
        dropped = assigned = 0.0
        members = list(range(group * P, (group + 1) * P))
        for r in range(world):  # the objective's MoE loss term is each rank's own (as under DDP)
            _, o = ref(xs[r], pads[r])
            ref_loss = ref_loss + o.loss
            if r in members:
                dropped += float(o.dropped_fraction) * o.num_tokens * h * k
                assigned += o.num_tokens * h * k
        ref_loss.backward()
        with torch.no_grad():  # group-wide statistics: the single layer on the group's micro-batches
            _, gout = ref(torch.cat([xs[r] for r in members]), torch.cat([pads[r] for r in members]))
        ref_load = gout.expert_load
        ref_drop = float(gout.dropped_fraction) if cap != "rank" else dropped / max(assigned, 1)
        # coverage: an expert with no sub-token from some rank
        for r in range(world):
            with torch.no_grad():
                _, o = ref(xs[r], pads[r])
            seen["expert_idle_on_a_rank"] += int((o.expert_load == 0).any())
        y, out = ep(xs[rank], pads[rank])
        _close(y, ref_y[rank], f"{name} output", errors)
        _close(out.expert_load, ref_load, f"{name} group expert load", errors)
        if out.num_tokens != gout.num_tokens:
            errors.append(f"{name} group tokens {out.num_tokens} vs {gout.num_tokens}")
        if abs(float(out.dropped_fraction) - ref_drop) > 1e-6:
            errors.append(f"{name} dropped fraction {float(out.dropped_fraction)} vs {ref_drop}")
        seen["dropped"] += int(cap is not None and float(out.dropped_fraction) > 0)
        loss = (y * ws[rank]).sum() + out.loss
        loss.backward()
        reduce_gradients(ep, layout)  # gradients of the mean rank loss
        ref_p = dict(ref.named_parameters())
        for pname, p in ep.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if pname.startswith("experts."):
                g = _gather_experts(g, layout)
            want = ref_p[pname].grad / world if ref_p[pname].grad is not None else torch.zeros_like(ref_p[pname])
            _close(g, want, f"{name} grad {pname}", errors)


def checkpoint_case(rank: int, world: int, errors: List[str]) -> None:
    """Layout-independent state: written at EP degree 2, read at degree 1 (the plain layer) and at
    the world size; one AdamW step with EP gradients equals the single-process step."""
    cfg = MoEConfig(d_model=D, num_experts=E, expert_hidden=8, top_k=2, num_heads=2)
    torch.manual_seed(7)
    ref = MHMoE(cfg)
    layout2 = ExpertParallelLayout.create(2)
    ep2 = parallelize_experts(copy.deepcopy(ref), layout2)
    xs, pads, ws = _batch(55, [2] * world, None)
    # one optimiser step each: the EP replicas on their micro-batches, the reference on all of them
    opt = torch.optim.AdamW(ep2.parameters(), lr=0.1)
    y, out = ep2(xs[rank], pads[rank])
    ((y * ws[rank]).sum() + out.loss).backward()
    reduce_gradients(ep2, layout2)
    clip_grad_norm_(list(ep2.parameters()), 1.0, ep2)
    opt.step()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    total = 0.0
    for r in range(world):
        yr, outr = ref(xs[r], pads[r])
        total = total + ((yr * ws[r]).sum() + outr.loss) / world
    total.backward()
    torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0)
    ref_opt.step()
    full = full_state_dict(ep2)
    ref_sd = ref.state_dict()
    if sorted(full) != sorted(ref_sd):
        errors.append(f"checkpoint keys differ: {sorted(set(full) ^ set(ref_sd))}")
    for key in ref_sd:
        _close(full[key], ref_sd[key], f"state after one EP step {key}", errors)
    fo = full_optimizer_state(ep2, opt)
    ro = ref_opt.state_dict()
    for i in ro["state"]:
        for k2, v in ro["state"][i].items():
            if isinstance(v, torch.Tensor) and v.ndim > 0:
                _close(fo["state"][i][k2], v, f"optimizer state {i}.{k2}", errors)
    so = shard_optimizer_state(ep2, opt, fo)
    for i, st in opt.state_dict()["state"].items():
        for k2, v in st.items():
            if isinstance(v, torch.Tensor) and not torch.equal(so["state"][i][k2], v):
                errors.append(f"optimizer state {i}.{k2} does not survive gather + shard")
    # load the EP-2 checkpoint at EP degree = world size and at degree 1 (the single-device layer)
    torch.manual_seed(99)
    epw = parallelize_experts(MHMoE(cfg), ExpertParallelLayout.create(world))
    epw.load_state_dict(shard_state_dict(epw, full))
    single = MHMoE(cfg)
    single.load_state_dict(full)
    x = torch.cat(xs)
    pad = torch.cat(pads)
    y1, _ = single(x, pad)
    yw, _ = epw(xs[rank], pads[rank])
    _close(yw, y1.split([2] * world)[rank], f"EP-{world} from an EP-2 checkpoint", errors)


def model_case(rank: int, world: int, layout: ExpertParallelLayout, errors: List[str]) -> None:
    """A multiway backbone whose ranks use different ways (rank 0: image+text, so the top block
    runs the vl way; other ranks: text only): outputs and gradients vs the single-device model."""
    from mmmoe.models import create_model

    torch.manual_seed(3)
    ref = create_model("tiny", "mhmoe-h2", depth=2, vl_layers=1, vocab_size=50, dim=48, num_heads=2)
    ep = parallelize_experts(copy.deepcopy(ref), layout)
    g = torch.Generator().manual_seed(11)
    batches = []
    for r in range(world):
        text = torch.randint(1, 50, (2, 7), generator=g)
        pad = torch.zeros(2, 7, dtype=torch.bool)
        pad[1, 5:] = True
        image = torch.randn(2, 3, 64, 64, generator=g) if r == 0 else None
        batches.append((image, text, pad))
    total = 0.0
    for r, (image, text, pad) in enumerate(batches):
        o = ref.forward_features(image=image, text_ids=text, text_pad_mask=pad)
        total = total + (o.hidden.square().mean() + o.aux_loss) / world
        if r == rank:
            want = o.hidden.detach()
    total.backward()
    image, text, pad = batches[rank]
    o = ep.forward_features(image=image, text_ids=text, text_pad_mask=pad)
    _close(o.hidden, want, "multiway model hidden", errors)
    (o.hidden.square().mean() + o.aux_loss).backward()
    reduce_gradients(ep, layout)
    ref_p = dict(ref.named_parameters())
    for pname, p in ep.named_parameters():
        gr = p.grad if p.grad is not None else torch.zeros_like(p)
        if ".experts." in pname:
            gr = _gather_experts(gr, layout)
        want_g = ref_p[pname].grad if ref_p[pname].grad is not None else torch.zeros_like(gr)
        _close(gr, want_g, f"multiway model grad {pname}", errors)


def drain_case(rank: int, world: int, layout: ExpertParallelLayout, errors: List[str], bf16: bool = False) -> None:
    """Evaluation with uneven batch counts: rank r runs r + 1 forwards (rank 0 one), then drain();
    the ranks still running get the single-process outputs and nobody hangs. ``bf16``: under
    bf16 autocast with no head layer (float32 rows sent, bf16 expert outputs returned: the serving
    rank must answer in the compute dtype, not in the rows' dtype)."""
    cfg = MoEConfig(d_model=D, num_experts=E, expert_hidden=8, top_k=2, num_heads=1 if bf16 else 3)
    torch.manual_seed(5)
    ref = MHMoE(cfg).eval()
    ep = parallelize_experts(copy.deepcopy(ref), layout).eval()
    tag = "drain bf16" if bf16 else "drain"
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for i in range(rank + 1):
            xs, pads, _ = _batch(300 + 10 * rank + i, [2], None)
            y, out = ep(xs[0], pads[0])
            want = ref(xs[0], pads[0])[0]
            if bf16:
                if not torch.allclose(y.float(), want.float(), atol=3e-2, rtol=3e-2):
                    errors.append(f"{tag}: rank {rank} batch {i}: max abs diff {(y.float() - want.float()).abs().max():.3g}")
            else:
                _close(y, want, f"{tag}: rank {rank} batch {i}", errors)
        served = drain(ep)
    if served != world - 1 - rank:
        errors.append(f"{tag}: rank {rank} served {served} forwards, expected {world - 1 - rank}")


def run(rank: int, world: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    errors: List[str] = []
    seen = {"expert_idle_on_a_rank": 0, "dropped": 0}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        for P in sorted({world, 2}):
            layout = ExpertParallelLayout.create(P)
            layer_cases(rank, world, layout, errors, seen)
            if P == world == 2:  # (imports timm: ~7 s per process, so only in the 2-process run)
                model_case(rank, world, layout, errors)
        checkpoint_case(rank, world, errors)
        drain_case(rank, world, ExpertParallelLayout.create(world), errors)
        drain_case(rank, world, ExpertParallelLayout.create(world), errors, bf16=True)
        dist.barrier()
    except Exception:  # reported to the test, which fails with the traceback
        errors.append(traceback.format_exc())
    finally:
        queue.put((rank, errors, seen))
        if dist.is_initialized():
            dist.destroy_process_group()
