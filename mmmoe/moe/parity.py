"""Parameter / FLOP parity of Dense, SMoE, fine-grained SMoE and MH-MoE layers (arXiv 2411.16205).

Given one sparse MoE reference layer (E experts of hidden width d_moe, top-k_s, token width d), the
solver derives the other variants at matched cost and reports how far whole numbers leave each one
from exact parity.

Counting conventions (per MoE layer, per token, as in the paper):

* An expert FFN has ``c`` weight matrices of size d_in x d_ff: ``c = 3`` for SwiGLU, ``c = 2`` for
  GELU. It costs ``c * d_in * d_ff`` parameters and the same number of multiply-adds (MACs) per
  sub-token it processes.
* The MH-MoE head and merge layers are two d x d matrices: ``2 d^2`` parameters and MACs (``d^2``
  each; the head/merge ablations of 2411 Table 5 drop one or both and re-solve the expert width).
* The router, biases and normalisation are left out of both counts (they are small and identical
  in kind across variants). Real modules therefore hold slightly more parameters than reported.
* An optional shared expert of width s adds ``c * d * s`` parameters and MACs to every row.

FLOP parity for MH-MoE with h heads, top-k_h and n d x d layers (n = 2 with head and merge layers):
``c * d * d_mh * k_h + n d^2 = c * d * d_moe * k_s``, hence
``d_mh = (c * k_s * d_moe - n d) / (c * k_h)``, rounded to the nearest integer.
Parameter parity: ``E_s * c * d * d_moe = n d^2 + E_mh * c * (d / h) * d_mh``; the real solution is
reported as ``exact_experts`` and rounded to the nearest multiple of ``expert_multiple``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Optional, Sequence

FFN_MATRICES = {"swiglu": 3, "gelu": 2}
"""Weight matrices per expert FFN for each activation (the factor ``c``)."""


@dataclass
class ParityRow:
    """One layer variant and its cost relative to the SMoE reference.

    ``params`` counts expert weights plus the head/merge d x d matrices (and the shared expert, if
    any); router weights and biases are excluded. ``macs_per_token`` counts multiply-adds per token
    under the same convention.
    """

    name: str
    num_heads: int
    num_experts: int
    expert_hidden: int
    top_k: int
    head_merge: bool
    """The row has a head and/or a merge layer (see ``head_layer`` / ``merge_layer``)."""
    params: int
    macs_per_token: int
    param_ratio: float
    """params / SMoE params."""
    flop_ratio: float
    """macs_per_token / SMoE macs_per_token."""
    exact_experts: float
    """Real-valued expert count giving exact parameter parity (MH-MoE); otherwise the count used."""
    head_layer: bool = False
    """The row has the d x d head layer (MH-MoE rows unless ablated)."""
    merge_layer: bool = False
    """The row has the d x d merge layer (MH-MoE rows unless ablated)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name}={value!r} is invalid: must be {what}")


def _validate(
    d_model: int,
    num_experts: int,
    expert_hidden: int,
    top_k: int,
    activation: str,
    heads: Sequence[int],
    mh_top_k: Optional[Sequence[int]],
    fine_grained_factor: int,
    expert_multiple: int,
    shared_expert_hidden: int,
) -> None:
    for name, value in (
        ("d_model", d_model),
        ("num_experts", num_experts),
        ("expert_hidden", expert_hidden),
        ("top_k", top_k),
        ("fine_grained_factor", fine_grained_factor),
        ("expert_multiple", expert_multiple),
    ):
        _check_int(name, value, 1)
    _check_int("shared_expert_hidden", shared_expert_hidden, 0)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is invalid: must be <= num_experts ({num_experts})")
    if activation not in FFN_MATRICES:
        raise ValueError(
            f"activation={activation!r} is invalid: allowed: {', '.join(FFN_MATRICES)}"
        )
    if expert_hidden % fine_grained_factor:
        raise ValueError(
            f"fine_grained_factor={fine_grained_factor} is invalid: must divide "
            f"expert_hidden ({expert_hidden})"
        )
    for h in heads:
        _check_int("heads", h, 1)
        if d_model % h:
            raise ValueError(f"heads={h} is invalid: must divide d_model ({d_model})")
    if mh_top_k is not None:
        if len(mh_top_k) != len(heads):
            raise ValueError(
                f"mh_top_k={list(mh_top_k)} is invalid: needs one value per entry of "
                f"heads ({len(heads)})"
            )
        for k in mh_top_k:
            _check_int("mh_top_k", k, 1)


def solve_parity(
    d_model: int,
    num_experts: int,
    expert_hidden: int,
    top_k: int = 1,
    activation: str = "swiglu",
    heads: Sequence[int] = (2, 3),
    mh_top_k: Optional[Sequence[int]] = None,
    fine_grained_factor: int = 2,
    expert_multiple: int = 8,
    shared_expert_hidden: int = 0,
    head_layer: bool = True,
    merge_layer: bool = True,
) -> list[ParityRow]:
    """Derive Dense, SMoE, fine-grained SMoE and MH-MoE layers matched to one SMoE layer.

    Args:
        d_model: token width d.
        num_experts: SMoE expert count E_s.
        expert_hidden: SMoE expert hidden width d_moe.
        top_k: SMoE experts per token k_s.
        activation: ``"swiglu"`` (3 matrices per expert) or ``"gelu"`` (2).
        heads: one MH-MoE row per head count h (each must divide ``d_model``).
        mh_top_k: top-k of each MH-MoE row; default ``k_h = h``.
        fine_grained_factor: m; the fine-grained row has m*E experts of width d_moe/m, top m*k.
        expert_multiple: MH-MoE expert counts are rounded to a multiple of this (1 = any integer).
        shared_expert_hidden: width of an always-on FFN added to every row (0 = none).
        head_layer, merge_layer: whether the MH-MoE rows have the d x d head / merge layer (2411
            Table 5 ablations: without one, its d^2 MACs go to wider experts at the same FLOPs).

    Returns:
        Rows in order: dense, smoe, fine-grained, then one ``"mh-moe h=<h>"`` row per head count.

    Raises:
        ValueError: an argument is out of range, or the head/merge layers alone cost more MACs
            than the SMoE budget.
    """
    _validate(
        d_model, num_experts, expert_hidden, top_k, activation, heads, mh_top_k,
        fine_grained_factor, expert_multiple, shared_expert_hidden,
    )
    c = FFN_MATRICES[activation]
    d = d_model
    shared = c * d * shared_expert_hidden
    smoe_params = num_experts * c * d * expert_hidden + shared
    smoe_macs = top_k * c * d * expert_hidden + shared

    def row(
        name: str, h: int, e: int, width: int, k: int, layers: tuple[bool, bool], exact: float
    ) -> ParityRow:
        extra = (int(layers[0]) + int(layers[1])) * d * d
        per_expert = c * (d // h) * width  # params of one expert, and MACs per routed sub-token
        params = extra + e * per_expert + shared
        macs = extra + h * k * per_expert + shared
        return ParityRow(
            name=name, num_heads=h, num_experts=e, expert_hidden=width, top_k=k,
            head_merge=any(layers), params=params, macs_per_token=macs,
            param_ratio=params / smoe_params, flop_ratio=macs / smoe_macs, exact_experts=exact,
            head_layer=layers[0], merge_layer=layers[1],
        )

    m = fine_grained_factor
    rows = [
        row("dense", 1, 1, top_k * expert_hidden, 1, (False, False), 1.0),
        row("smoe", 1, num_experts, expert_hidden, top_k, (False, False), float(num_experts)),
        row("fine-grained", 1, m * num_experts, expert_hidden // m, m * top_k, (False, False),
            float(m * num_experts)),
    ]
    layers = (bool(head_layer), bool(merge_layer))
    n = sum(layers)
    for i, h in enumerate(heads):
        k_h = mh_top_k[i] if mh_top_k is not None else h
        width_exact = Fraction(c * top_k * expert_hidden - n * d, c * k_h)
        width = _round_half_up(width_exact)
        if width <= 0:
            raise ValueError(
                f"heads={h} (top-{k_h}) is infeasible: the head and merge layers ({n}*d_model^2 = "
                f"{n * d * d:,} MACs) leave no expert width within the SMoE budget of "
                f"{smoe_macs - shared:,} MACs per token; raise expert_hidden or top_k"
            )
        exact = Fraction(num_experts * c * d * expert_hidden - n * d * d, c * (d // h) * width)
        e_mh = max(expert_multiple, expert_multiple * _round_half_up(exact / expert_multiple))
        if k_h > e_mh:
            raise ValueError(
                f"mh_top_k={k_h} is invalid for heads={h}: must be <= the solved expert "
                f"count ({e_mh})"
            )
        rows.append(row(f"mh-moe h={h}", h, e_mh, width, k_h, layers, float(exact)))
    return rows


def format_parity_table(rows: Sequence[ParityRow]) -> str:
    """Render rows as a fixed-width text table; differences are relative to the ``smoe`` row."""
    header = (
        "variant", "heads", "experts", "expert hidden", "top-k", "params/layer", "MACs/token",
        "params vs SMoE", "FLOPs vs SMoE", "exact experts",
    )
    body = [
        (
            r.name, str(r.num_heads), f"{r.num_experts:,}", f"{r.expert_hidden:,}", str(r.top_k),
            f"{r.params:,}", f"{r.macs_per_token:,}", f"{(r.param_ratio - 1) * 100:+.2f}%",
            f"{(r.flop_ratio - 1) * 100:+.2f}%", f"{r.exact_experts:,.2f}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(cells[1:], widths[1:]))
        return "  ".join((first, *rest))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body)])
