"""Scaling note for expert parallelism: all-to-all bytes per MoE layer per step, the measured CPU
grouped-matmul speed, and a projected step time at 8 and 64 GPUs (a model, with every assumption
printed). Writes nothing; the README's scaling section quotes its output.

    PYTHONPATH=$PWD python scripts/scaling_model.py                 # tables + CPU measurement
    PYTHONPATH=$PWD python scripts/scaling_model.py --no-measure    # tables only
    PYTHONPATH=$PWD python scripts/scaling_model.py --tokens 8352 --mfu 0.4 --a2a-efficiency 0.6

Traffic model (exact for the dispatch in mmmoe.parallel): every routed assignment of a sub-token
(h sub-tokens x top-k per token, width D/h) is sent to its expert's owner and its output sent back,
forward and again in backward: 4 x T x k x D x bytes per MoE layer per step and GPU, of which the
fraction (P-1)/P leaves the GPU at EP degree P (uniform routing). With the registry's variants
k = h, so h = 2, 3 move 2x, 3x the bytes of h = 1 (top-1 SMoE) at equal FLOPs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mmmoe.models.registry import count_costs, get_config  # noqa: E402

VARIANTS = [("h=1 (smoe, top-1)", "smoe"), ("h=2 (mhmoe-h2, top-2)", "mhmoe-h2"), ("h=3 (mhmoe-h3, top-3)", "mhmoe-h3")]
# published link rates, per GPU and direction
NVLINK_GBS = 450.0  # H100 SXM NVLink 4: 900 GB/s total bidirectional per GPU
IB_GBS = 50.0       # one 400 Gb/s NDR InfiniBand NIC per GPU (8 per node)
PEAK_TFLOPS = 989.0  # H100 SXM dense bf16
GPUS_PER_NODE = 8


def layer_facts(preset: str, variant: str):
    cfg = get_config(preset, variant)
    costs = count_costs(cfg)
    m = cfg.moe
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.depth))
    with torch.device("meta"):
        from mmmoe.models.multiway_transformer import MultiwayTransformer

        model = MultiwayTransformer(cfg)
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return cfg, m, costs, moe_layers, expert


def a2a_bytes(T: int, k: int, D: int, nbytes: int = 2) -> float:
    """Bytes one GPU sends per MoE layer per step (forward + backward) before the (P-1)/P factor."""
    return 4.0 * T * k * D * nbytes


def a2a_seconds(bytes_out: float, P: int, eff: float) -> float:
    """Time of the exchanges of one layer at EP degree P: the intra-node part over NVLink, the
    part to other nodes over InfiniBand (they run concurrently; the slower one counts)."""
    if P == 1:
        return 0.0
    intra = min(P, GPUS_PER_NODE) - 1
    inter = P - min(P, GPUS_PER_NODE)
    t_nv = bytes_out * intra / P / (NVLINK_GBS * 1e9 * eff)
    t_ib = bytes_out * inter / P / (IB_GBS * 1e9 * eff)
    return max(t_nv, t_ib)


def allreduce_seconds(nbytes: float, n: int, gpus: int, eff: float, per_node: int = GPUS_PER_NODE) -> float:
    """Ring all-reduce of nbytes over n ranks (``per_node`` of them on each node) of a ``gpus``-GPU
    job: NVLink inside one node; across nodes NCCL runs one ring per NIC, so the bus bandwidth is
    the members' NICs of a node together (capped by NVLink)."""
    if n <= 1:
        return 0.0
    bw = NVLINK_GBS if gpus <= GPUS_PER_NODE else min(NVLINK_GBS, per_node * IB_GBS)
    return 2.0 * (n - 1) / n * nbytes / (bw * 1e9 * eff)


def measure_grouped_mm(preset: str, variant: str, tokens: int, reps: int = 3):
    """Forward + backward of one MH-MoE layer's experts on CPU (1 thread), fp32, and a dense
    matmul chain of the same FLOPs; GFLOP/s of each."""
    from mmmoe.moe import MHMoE
    from mmmoe.moe.dispatch import permute
    from mmmoe.moe.experts import expert_offsets
    from mmmoe.moe.router import route

    cfg = get_config(preset, variant)
    m = cfg.moe
    torch.manual_seed(0)
    layer = MHMoE(m)
    S = tokens * m.num_heads
    s = torch.randn(S, m.head_dim, requires_grad=True)
    with torch.no_grad():
        _, idx, gates = route(layer.router(s), m.top_k)
    plan = permute(idx, m.num_experts)
    offs, counts = expert_offsets(plan.counts_E)
    gate_A = gates.t().reshape(-1)[plan.order_A]
    flops = 3 * 2 * tokens * m.top_k * m.num_heads * (3 * m.head_dim * m.expert_hidden)  # fwd+bwd, swiglu

    def run():
        s.grad = None
        layer.zero_grad(set_to_none=True)
        layer.experts(s, plan.token_A, gate_A, offs, counts).sum().backward()

    run()  # warm up

    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    # dense reference with the same matmul FLOPs: tokens*k*h rows through one expert-sized FFN
    rows = tokens * m.top_k * m.num_heads
    a = torch.randn(rows, m.head_dim, requires_grad=True)
    w1 = torch.randn(m.head_dim, 2 * m.expert_hidden, requires_grad=True)
    w2 = torch.randn(m.expert_hidden, m.head_dim, requires_grad=True)

    def dense():
        h = a @ w1
        u, v = h.chunk(2, -1)
        (torch.nn.functional.silu(u) * v @ w2).sum().backward()

    dense()
    best_d = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        dense()
        best_d = min(best_d, time.perf_counter() - t0)
    return best, flops / best / 1e9, flops / best_d / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32 * 261,
                    help="tokens per GPU per step (default 32 image-text sequences of 197 + 64 positions)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of peak bf16 FLOP/s reached")
    ap.add_argument("--a2a-efficiency", type=float, default=0.6, help="assumed fraction of link rate reached")
    ap.add_argument("--no-measure", action="store_true")
    ap.add_argument("--measure-tokens", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(1)
    T = args.tokens
    print(f"tokens per GPU per step T = {T}; bf16 activations (2 bytes); MFU {args.mfu}; all-to-all and "
          f"all-reduce at {args.a2a_efficiency:.0%} of NVLink {NVLINK_GBS:.0f} GB/s / IB {IB_GBS:.0f} GB/s per GPU "
          f"and direction; peak {PEAK_TFLOPS:.0f} TFLOP/s (H100 SXM)\n")
    print("| preset | variant | experts x width | MoE layers | params (experts) | a2a MB / layer / step (P-1)/P=1 |")
    print("|---|---|---|---|---|---|")
    facts = {}
    for preset in ("base", "large"):
        for label, variant in VARIANTS:
            try:
                cfg, m, costs, L, expert = layer_facts(preset, variant)
            except ValueError as exc:  # large: dim 1024 is not divisible by 3
                print(f"| {preset} | {label} | n/a: {exc} | | | |")
                continue
            facts[preset, variant] = (cfg, m, costs, L, expert)
            mb = a2a_bytes(T, m.top_k, cfg.dim) / 1e6
            print(f"| {preset} | {label} | {m.num_experts} x {m.expert_hidden} | {L} | "
                  f"{costs['params'] / 1e6:.0f}M ({expert / 1e6:.0f}M) | {mb:.1f} |")
    print("\nProjected step time per GPU (compute + all-to-all on the critical path; gradient all-reduce "
          "overlapped with backward, shown separately; fp32 gradients):\n")
    print("| preset | variant | GPUs | EP | params/GPU | compute ms | a2a ms | grad all-reduce ms | step ms | a2a share |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset in ("base", "large"):
        for label, variant in VARIANTS:
            if (preset, variant) not in facts:
                continue
            cfg, m, costs, L, expert = facts[preset, variant]
            flops = 6.0 * costs["macs_per_token"] * T  # fwd + bwd, 2 FLOPs per MAC
            t_comp = flops / (PEAK_TFLOPS * 1e12 * args.mfu)
            rep = costs["params"] - expert
            for gpus, eps in ((8, (1, 2, 4, 8)), (64, (8, 16, 64))):
                for P in eps:
                    if m.num_experts % P:
                        continue
                    t_a2a = L * a2a_seconds(a2a_bytes(T, m.top_k, cfg.dim), P, args.a2a_efficiency)
                    t_ar = (allreduce_seconds(4 * rep, gpus, gpus, args.a2a_efficiency)
                            + allreduce_seconds(4 * expert / P, gpus // P, gpus, args.a2a_efficiency,
                                                per_node=max(1, GPUS_PER_NODE // P)))
                    per_gpu = rep + expert / P
                    step = t_comp + t_a2a + max(0.0, t_ar - 2 / 3 * t_comp)
                    print(f"| {preset} | {variant} | {gpus} | {P} | {per_gpu / 1e6:.0f}M | {t_comp * 1e3:.1f} | "
                          f"{t_a2a * 1e3:.1f} | {t_ar * 1e3:.1f} | {step * 1e3:.1f} | {t_a2a / step:.0%} |")
    if not args.no_measure:
        print(f"\nMeasured on this CPU (1 thread, fp32, {args.measure_tokens} tokens, best of 3): one MoE layer's "
              "experts (gather, grouped matmuls, scatter) forward+backward vs a dense SwiGLU of the same "
              "matmul FLOPs\n")
        print("| preset | variant | experts ms | grouped GFLOP/s | dense GFLOP/s | ratio |")
        print("|---|---|---|---|---|---|")
        for label, variant in VARIANTS:
            t, g, d = measure_grouped_mm("base", variant, args.measure_tokens)
            print(f"| base | {variant} | {t * 1e3:.0f} | {g:.1f} | {d:.1f} | {g / d:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
