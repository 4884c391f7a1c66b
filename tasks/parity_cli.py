"""``mmmoe parity``: Dense / SMoE / fine-grained / MH-MoE layers at matched FLOPs and parameters."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``parity`` arguments on ``parser``."""
    ref = parser.add_argument_group("SMoE reference layer")
    ref.add_argument("--d-model", type=int, required=True, metavar="D",
                     help="token width d (each MH-MoE head count must divide it)")
    ref.add_argument("--experts", type=int, required=True, metavar="E",
                     help="number of SMoE experts E")
    ref.add_argument("--expert-hidden", type=int, required=True, metavar="D_MOE",
                     help="hidden width of each SMoE expert FFN")
    ref.add_argument("--top-k", type=int, default=1, metavar="K",
                     help="SMoE experts per token (default: %(default)s)")
    ref.add_argument("--activation", choices=("swiglu", "gelu"), default="swiglu",
                     help="expert FFN type: swiglu has 3 weight matrices, gelu 2 "
                     "(default: %(default)s)")
    ref.add_argument("--shared-expert-hidden", type=int, default=0, metavar="S",
                     help="width of an always-on shared expert added to every variant "
                     "(0 = none; default: %(default)s)")
    var = parser.add_argument_group("variants")
    var.add_argument("--heads", type=int, nargs="+", default=[2, 3], metavar="H",
                     help="MH-MoE head counts, one row each (default: 2 3)")
    var.add_argument("--mh-top-k", type=int, nargs="+", default=None, metavar="K",
                     help="top-k of each MH-MoE row, one per --heads value (default: k = h)")
    var.add_argument("--fine-grained-factor", type=int, default=2, metavar="M",
                     help="fine-grained SMoE splits each expert into M experts of width "
                     "D_MOE/M and routes top M*K (default: %(default)s)")
    var.add_argument("--expert-multiple", type=int, default=8, metavar="N",
                     help="round MH-MoE expert counts to a multiple of N; 1 = nearest integer "
                     "(default: %(default)s)")
    var.add_argument("--no-head-layer", action="store_true",
                     help="MH-MoE rows without the d x d head layer (2411 Table 5 ablation; its MACs go "
                     "to wider experts at the same FLOPs)")
    var.add_argument("--no-merge-layer", action="store_true",
                     help="MH-MoE rows without the d x d merge layer (2411 Table 5 ablation)")
    parser.add_argument("--json", action="store_true",
                        help='print JSON {"inputs": {...}, "rows": [...]} instead of a table')


def run(ns: argparse.Namespace) -> int:
    """Solve and print; return 0, or 2 with a message on stderr when the inputs are invalid."""
    from mmmoe.moe.parity import format_parity_table, solve_parity

    inputs = dict(
        d_model=ns.d_model,
        num_experts=ns.experts,
        expert_hidden=ns.expert_hidden,
        top_k=ns.top_k,
        activation=ns.activation,
        heads=list(ns.heads),
        mh_top_k=None if ns.mh_top_k is None else list(ns.mh_top_k),
        fine_grained_factor=ns.fine_grained_factor,
        expert_multiple=ns.expert_multiple,
        shared_expert_hidden=ns.shared_expert_hidden,
        head_layer=not getattr(ns, "no_head_layer", False),
        merge_layer=not getattr(ns, "no_merge_layer", False),
    )
    try:
        rows = solve_parity(**inputs)
    except ValueError as err:
        print(f"mmmoe parity: error: {err}", file=sys.stderr)
        return 2
    if ns.json:
        print(json.dumps({"inputs": inputs, "rows": [r.to_dict() for r in rows]}, indent=2))
        return 0
    shared = f", shared expert {ns.shared_expert_hidden:,}" if ns.shared_expert_hidden else ""
    print(
        f"Parity for d_model={ns.d_model:,}, SMoE {ns.experts} x {ns.expert_hidden:,} "
        f"top-{ns.top_k}, {ns.activation}{shared} (per MoE layer; router and biases excluded)\n"
    )
    print(format_parity_table(rows))
    return 0
