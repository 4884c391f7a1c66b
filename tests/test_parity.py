import json
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mmmoe.moe.parity import FFN_MATRICES, ParityRow, format_parity_table, solve_parity
from tasks.cli import main

PAPER = dict(d_model=768, num_experts=8, expert_hidden=2048, top_k=1, activation="swiglu")
PAPER_ARGV = ["parity", "--d-model", "768", "--experts", "8", "--expert-hidden", "2048"]


def by_name(rows: list[ParityRow]) -> dict[str, ParityRow]:
    return {r.name: r for r in rows}


# --- hand-built layers, counted by torch rather than by the formula ---------------------------


def expert(d_in: int, width: int, activation: str) -> nn.ModuleList:
    """Bias-free expert FFN on the meta device (no memory): SwiGLU w1, w3, w2 or GELU w1, w2."""
    n_up = FFN_MATRICES[activation] - 1
    up = [nn.Linear(d_in, width, bias=False, device="meta") for _ in range(n_up)]
    return nn.ModuleList([*up, nn.Linear(width, d_in, bias=False, device="meta")])


def expert_forward(ffn: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    *up, down = ffn
    hidden = up[0](x) if len(up) == 1 else nn.functional.silu(up[0](x)) * up[1](x)
    return down(hidden)


def build(row: ParityRow, d: int, activation: str) -> nn.Module:
    layer = nn.Module()
    layer.experts = nn.ModuleList(
        expert(d // row.num_heads, row.expert_hidden, activation) for _ in range(row.num_experts)
    )
    if row.head_merge:
        layer.head = nn.Linear(d, d, bias=False, device="meta")
        layer.merge = nn.Linear(d, d, bias=False, device="meta")
    return layer


def token_macs(layer: nn.Module, row: ParityRow, d: int) -> int:
    """Run one token through the layer (each sub-token to top_k experts) and count MACs."""
    x = torch.zeros(1, d, device="meta")
    with FlopCounterMode(display=False) as counter:
        if row.head_merge:
            x = layer.head(x)
        subs = x.view(row.num_heads, d // row.num_heads)
        out = sum(expert_forward(layer.experts[j], subs) for j in range(row.top_k))
        if row.head_merge:
            layer.merge(out.reshape(1, d))
    return counter.get_total_flops() // 2


# --- the paper's configuration (2411) ---------------------------------------------------------


def test_paper_configuration():
    rows = solve_parity(**PAPER)
    assert [r.name for r in rows] == ["dense", "smoe", "fine-grained", "mh-moe h=2", "mh-moe h=3"]
    r = by_name(rows)
    shapes = {n: (x.num_heads, x.num_experts, x.expert_hidden, x.top_k) for n, x in r.items()}
    assert shapes == {
        "dense": (1, 1, 2048, 1),
        "smoe": (1, 8, 2048, 1),
        "fine-grained": (1, 16, 1024, 2),
        "mh-moe h=2": (2, 40, 768, 2),
        "mh-moe h=3": (3, 96, 512, 3),
    }
    for row in rows:
        assert row.macs_per_token == 4_718_592
        assert row.flop_ratio == 1.0
    # "About 3%" in the paper: exactly -3.125% (h=2) and +3.125% (h=3).
    assert r["fine-grained"].param_ratio == 1.0
    assert r["mh-moe h=2"].param_ratio == 31 / 32
    assert r["mh-moe h=3"].param_ratio == 33 / 32
    assert r["smoe"].params == 37_748_736 and r["fine-grained"].params == 37_748_736
    assert r["dense"].param_ratio == pytest.approx(1 / 8)
    assert r["mh-moe h=2"].exact_experts == pytest.approx(41.3333, abs=1e-3)
    assert r["mh-moe h=3"].exact_experts == pytest.approx(93.0)
    assert [x.head_merge for x in rows] == [False, False, False, True, True]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("shared", [0, 96])
def test_counts_match_brute_force(activation, shared):
    d = 96
    rows = solve_parity(d, 4, 128, top_k=2, activation=activation, heads=(2, 3, 4),
                        expert_multiple=1, shared_expert_hidden=shared)
    for row in rows:
        layer = build(row, d, activation)
        if shared:
            layer.shared = expert(d, shared, activation)
        params = sum(p.numel() for p in layer.parameters())
        macs = token_macs(layer, row, d)
        if shared:
            x = torch.zeros(1, d, device="meta")
            with FlopCounterMode(display=False) as counter:
                expert_forward(layer.shared, x)
            macs += counter.get_total_flops() // 2
        assert (row.params, row.macs_per_token) == (params, macs), row.name


def test_gelu_rule():
    d, d_moe, k_s = 768, 2048, 2
    rows = by_name(solve_parity(d, 8, d_moe, top_k=k_s, activation="gelu", heads=(2, 4),
                                mh_top_k=(2, 4)))
    assert rows["mh-moe h=2"].expert_hidden == (k_s * d_moe - d) // 2
    assert rows["mh-moe h=4"].expert_hidden == (k_s * d_moe - d) // 4
    for row in rows.values():
        assert row.macs_per_token == 2 * d * d_moe * k_s


def test_non_integer_width_leaves_flop_residual():
    # GELU, h=3: (2048 - 768) / 3 = 426.67 -> 427.
    row = by_name(solve_parity(768, 8, 2048, activation="gelu"))["mh-moe h=3"]
    assert row.expert_hidden == 427
    assert row.macs_per_token != 2 * 768 * 2048
    assert row.flop_ratio != 1.0 and abs(row.flop_ratio - 1) < 1e-3


def test_exact_experts_and_rounding():
    r = by_name(solve_parity(**PAPER, expert_multiple=1))
    assert r["mh-moe h=2"].num_experts == 41
    assert r["mh-moe h=3"].num_experts == 93
    exact = Fraction(8 * 3 * 768 * 2048 - 2 * 768 ** 2, 3 * 384 * 768)
    assert r["mh-moe h=2"].exact_experts == pytest.approx(float(exact))


def test_mh_top_k_override():
    row = by_name(solve_parity(**PAPER, heads=(2,), mh_top_k=(1,)))["mh-moe h=2"]
    assert row.top_k == 1
    assert row.expert_hidden == 2048 - 512


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(d_model=0), "d_model"),
        (dict(num_experts=-1), "num_experts"),
        (dict(expert_hidden=1.5), "expert_hidden"),
        (dict(top_k=9), "top_k"),
        (dict(activation="relu"), "activation"),
        (dict(heads=(5,)), "heads"),
        (dict(heads=(0,)), "heads"),
        (dict(mh_top_k=(2,)), "mh_top_k"),
        (dict(fine_grained_factor=3), "fine_grained_factor"),
        (dict(expert_multiple=0), "expert_multiple"),
        (dict(shared_expert_hidden=-1), "shared_expert_hidden"),
        (dict(expert_hidden=256, heads=(2,)), "head"),  # head+merge exceed the FLOP budget
    ],
)
def test_invalid_inputs(kwargs, field):
    with pytest.raises(ValueError, match=field):
        solve_parity(**{**PAPER, **kwargs})


def test_table_format():
    text = format_parity_table(solve_parity(**PAPER))
    lines = text.splitlines()
    assert len(lines) == 2 + 5
    assert "4,718,592" in text and "-3.12%" in text and "+3.12%" in text and "41.33" in text
    assert len({len(line) for line in lines}) == 1  # fixed width


# --- CLI --------------------------------------------------------------------------------------


def test_cli_table(capsys):
    assert main(PAPER_ARGV) == 0
    out = capsys.readouterr().out
    names = ["dense", "smoe", "fine-grained", "mh-moe h=2", "mh-moe h=3"]
    table = [line for line in out.splitlines() if line.split("  ")[0].strip() in names]
    assert [line.split("  ")[0].strip() for line in table] == names


def test_cli_json(capsys):
    assert main([*PAPER_ARGV, "--json", "--expert-multiple", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"]["d_model"] == 768 and data["inputs"]["heads"] == [2, 3]
    assert len(data["rows"]) == 5
    assert data["rows"][3]["num_experts"] == 41
    assert set(data["rows"][0]) == set(ParityRow.__dataclass_fields__)


@pytest.mark.parametrize(
    "extra, word",
    [(["--heads", "5"], "heads"), (["--mh-top-k", "1"], "mh_top_k"),
     (["--fine-grained-factor", "3"], "fine_grained_factor")],
)
def test_cli_bad_input(capsys, extra, word):
    assert main([*PAPER_ARGV, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmmoe parity: error:") and word in err
