"""Paper-fidelity options of the model (issue #13): whole-model BitNet b1.58, one initialisation for
every FFN, routers keeping their own init, the head/merge ablation variants of 2411 Table 5 at
matched FLOPs, BEiT-3's vision-language blocks and NLVR2 head."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mmmoe.layers.bitlinear import BitLinear, weight_quant_ternary
from mmmoe.layers.mlp import FeedForward
from mmmoe.models import (
    ABLATION_VARIANTS,
    ALL_VARIANTS,
    VARIANTS,
    ModelConfig,
    NLVR2Head,
    count_costs,
    create_model,
    get_config,
    parse_variant,
)
from mmmoe.models.registry import ABLATION_EXPERT_MULTIPLE, ffn_macs_per_token
from mmmoe.moe import MHMoE, solve_parity
from mmmoe.moe.experts import GroupedExperts
from mmmoe.moe.router import SoftmaxRouter, XMoERouter

VOCAB = 60
REPO = Path(__file__).resolve().parents[1]


def _inputs(cfg: ModelConfig, B: int = 2, L: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g),
            torch.randint(5, cfg.vocab_size, (B, L), generator=g))


def _router_linears(model: nn.Module) -> set:
    return {id(m.proj) for m in model.modules() if isinstance(m, (SoftmaxRouter, XMoERouter))}


# ------------------------------------------------------------------------------ BitNet b1.58
def test_bitnet_all_quantises_every_linear_of_the_blocks():
    torch.manual_seed(0)
    model = create_model("tiny", "mhmoe-h2-bitnet", vocab_size=VOCAB, depth=2)  # block 0 dense, block 1 MoE
    cfg = model.config
    assert cfg.bitnet == "all" and cfg.moe.bitnet and cfg.moe.bitnet_head_merge
    routers = _router_linears(model.blocks)
    linears = [m for m in model.blocks.modules() if isinstance(m, nn.Linear)]
    plain = [m for m in linears if not isinstance(m, BitLinear) and id(m) not in routers]
    assert not plain, plain
    kinds = {type(m).__name__ for m in model.blocks.modules()}
    assert {"Attention", "FeedForward", "MHMoE"} <= kinds  # attention, dense FFN and MoE all covered
    assert all(e.bitnet for e in model.modules() if isinstance(e, GroupedExperts))
    heads = [m.head for m in model.modules() if isinstance(m, MHMoE)]
    assert heads and all(isinstance(h, BitLinear) for h in heads)

    # in forward, every weight reaching F.linear is ternary (gamma * {-1, 0, 1}), routers excepted
    seen = []
    router_w = {id(m.proj.weight) for m in model.modules() if isinstance(m, (SoftmaxRouter, XMoERouter))}
    real_linear = F.linear

    def spy(x, w, b=None):
        if id(w) not in router_w:
            seen.append(w.detach().clone())
        return real_linear(x, w, b)

    img, ids = _inputs(cfg)
    torch.nn.functional.linear = spy
    try:
        with torch.no_grad():
            model(img, ids), model(image=img), model(text_ids=ids)
    finally:
        torch.nn.functional.linear = real_linear
    assert seen
    for w in seen:
        levels = torch.unique(torch.round(w / w.abs().max(), decimals=5))
        assert set(levels.tolist()) <= {-1.0, 0.0, 1.0}, levels[:8]
    # and every BitLinear of the blocks ran, with its own ternarised weight
    for m in model.blocks.modules():
        if isinstance(m, BitLinear):
            want = weight_quant_ternary(m.weight.detach())
            assert any(w.shape == want.shape and torch.equal(w, want) for w in seen), m


def test_bitnet_modes_and_errors():
    experts = create_model("tiny", "mhmoe-h2", vocab_size=VOCAB, depth=2, bitnet="experts")
    assert not any(isinstance(m, BitLinear) for m in experts.blocks.modules())  # attention, head/merge full
    assert all(e.bitnet for e in experts.modules() if isinstance(e, GroupedExperts))
    dense = create_model("tiny", "dense-bitnet", vocab_size=VOCAB, depth=2)
    lin = [m for m in dense.blocks.modules() if isinstance(m, nn.Linear)]
    assert lin and all(isinstance(m, BitLinear) for m in lin)  # the dense baseline of 2411 Table 3
    # the MoE-level switch alone still means BitNet experts; contradictions are errors
    assert get_config("tiny", moe={"bitnet": True}).bitnet == "experts"
    with pytest.raises(ValueError, match="ModelConfig.bitnet='quarter' is invalid"):
        get_config("tiny", bitnet="quarter")
    with pytest.raises(ValueError, match="all-BitNet"):
        get_config("tiny", "smoe-bitnet", bitnet="experts")
    with pytest.raises(ValueError, match="contradicts"):
        get_config("tiny", bitnet="experts", moe={"bitnet_head_merge": True})
    # cost counting is unchanged (MACs equal; BitLinear adds only its RMSNorm gains to the parameters)
    for v in ("dense", "mhmoe-h2"):
        a, b = count_costs(get_config("tiny", v)), count_costs(get_config("tiny", v + "-bitnet"))
        assert a["macs_per_token"] == b["macs_per_token"] and 0 < b["params"] - a["params"] < 0.002 * a["params"]
    # round trip through a checkpoint's plain dict
    cfg = get_config("tiny", "mhmoe-h2-bitnet")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("variant", ["mhmoe-h2-bitnet", "dense-bitnet", "mhmoe-h2-nohead", "mhmoe-h2-nomerge",
                                     "mhmoe-h2-nohead-nomerge", "mhmoe-h3-nohead-bitnet"])
def test_each_option_trains_a_step(variant):
    torch.manual_seed(0)
    model = create_model("tiny", variant, vocab_size=VOCAB, depth=2, moe={"router": "xmoe"} if "h3" in variant else {})
    img, ids = _inputs(model.config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(img, ids)
    (out.hidden.pow(2).mean() + out.aux_loss).backward()
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # latent weights of the quantised layers and of every way that saw tokens move
    assert any("experts.w_in" in n for n in changed) and any("attn.qkv.weight" in n for n in changed)
    assert len(changed) > 0.5 * len(before)


# ------------------------------------------------------------------------------ initialisation
def test_dense_ffn_and_experts_share_one_init():
    torch.manual_seed(0)
    dense = create_model("tiny", "dense", vocab_size=VOCAB, depth=2)
    smoe = create_model("tiny", "smoe", vocab_size=VOCAB, depth=2, moe={"shared_expert_hidden": 256})
    ffn = dense.blocks[1].ffn.ways["vision"]
    moe = smoe.blocks[1].ffn.ways["vision"]
    ex = moe.experts
    # same shapes: the SMoE expert is the dense FFN (w_in[e] = fc_in.weight^T)
    assert ex.w_in.shape[1:] == ffn.fc_in.weight.t().shape and ex.w_out.shape[1:] == ffn.fc_out.weight.t().shape
    stds = {"dense fc_in": ffn.fc_in.weight.std(), "dense fc_out": ffn.fc_out.weight.std(),
            "expert w_in": ex.w_in.std(), "expert w_out": ex.w_out.std(),
            "shared fc_in": moe.shared_expert.fc_in.weight.std(), "shared fc_out": moe.shared_expert.fc_out.weight.std()}
    for name, s in stds.items():
        s = s.detach()
        assert abs(float(s) - 0.02) < 0.02 * 0.03, (name, float(s))
    for e in range(ex.num_experts):  # every expert, not only on average
        assert abs(float(ex.w_in[e].detach().std()) - float(ffn.fc_in.weight.detach().std())) < 0.02 * 0.05
    # standalone layers agree too: both nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    f, g = FeedForward(48, 192), GroupedExperts(8, 48, 192)
    with torch.no_grad():
        torch.testing.assert_close(g.w_in.std(), f.fc_in.weight.std(), rtol=0.05, atol=0)
        torch.testing.assert_close(g.w_out.std(), f.fc_out.weight.std(), rtol=0.05, atol=0)


@pytest.mark.parametrize("router", ["softmax", "xmoe"])
@torch.no_grad()
def test_router_and_head_merge_init_survive_the_backbone_init(router):
    torch.manual_seed(0)
    model = create_model("tiny", "mhmoe-h2", vocab_size=VOCAB, moe={"router": router})
    layers = list(model.moe_layers().values())
    assert layers
    D, Dh = model.config.dim, model.config.moe.head_dim
    for layer in layers:
        r = layer.router
        w = r.proj.weight
        # nn.Linear's default (the public code's gate): U(+-1/sqrt(fan_in)), std 1/sqrt(3 fan_in) -- not 0.02
        bound = 1 / math.sqrt(Dh)
        assert float(w.abs().max()) <= bound and abs(float(w.std()) * math.sqrt(3) / bound - 1) < 0.15
        if router == "xmoe":
            e = r.expert_embed  # E x 16 with E > 16: orthonormal columns
            torch.testing.assert_close(e.t() @ e, torch.eye(e.shape[1]), atol=1e-5, rtol=0)
            assert float(r.temperature) == pytest.approx(0.3)
        # head xavier_uniform gain 1/sqrt(2): std 1/sqrt(2D); merge xavier_uniform: std 1/sqrt(D)
        assert float(layer.head.weight.std()) == pytest.approx(1 / math.sqrt(2 * D), rel=0.05)
        assert float(layer.merge.weight.std()) == pytest.approx(1 / math.sqrt(D), rel=0.05)
        assert not layer.head.bias.any() and not layer.merge.bias.any()


# ------------------------------------------------------------------------------ 2411 Table 5 ablations
def test_ablation_variants_are_registered():
    assert set(ABLATION_VARIANTS) == {f"mhmoe-h{h}-{a}" for h in (2, 3) for a in ("nohead", "nomerge", "nohead-nomerge")}
    assert set(VARIANTS) < set(ALL_VARIANTS) and all(v + "-bitnet" in ALL_VARIANTS for v in VARIANTS + ABLATION_VARIANTS)
    assert parse_variant("mhmoe-h2-nohead-nomerge-bitnet") == ("mhmoe-h2", False, False, True)
    assert parse_variant("mhmoe-h3-nomerge") == ("mhmoe-h3", True, False, False)
    assert parse_variant("smoe") == ("smoe", False, False, False)
    with pytest.raises(ValueError, match="variant='smoe-nohead' is invalid"):
        get_config("tiny", "smoe-nohead")


@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_ablation_variants_match_the_parity_solver(preset):
    smoe_macs = ffn_macs_per_token(get_config(preset, "smoe"), 1)
    for variant in ABLATION_VARIANTS:
        cfg = get_config(preset, variant)
        base, head, merge, _ = parse_variant(variant)
        h = cfg.moe.num_heads
        row = [r for r in solve_parity(cfg.dim, 8, cfg.ffn_hidden, 1, cfg.activation, heads=[h], head_layer=head,
                                       merge_layer=merge, expert_multiple=ABLATION_EXPERT_MULTIPLE)
               if r.name == f"mh-moe h={h}"][0]
        m = cfg.moe
        assert (m.num_experts, m.expert_hidden, m.top_k) == (row.num_experts, row.expert_hidden, row.top_k), variant
        assert (m.use_head_layer, m.use_merge_layer) == (head, merge) == (row.head_layer, row.merge_layer)
        assert ffn_macs_per_token(cfg, 1) == row.macs_per_token
        # the built layer holds what the solver counts (expert weights + d x d layers; biases, router aside)
        with torch.device("meta"):
            layer = MHMoE(m)
        counted = layer.experts.w_in.numel() + layer.experts.w_out.numel()
        counted += sum(x.weight.numel() for x in (layer.head, layer.merge) if isinstance(x, nn.Linear))
        assert counted == row.params, variant
        assert isinstance(layer.head, nn.Identity) != head and isinstance(layer.merge, nn.Identity) != merge
        if h == 2:  # whole widths allow exact FLOP parity with SMoE (and the dense FFN)
            assert ffn_macs_per_token(cfg, 1) == smoe_macs, variant
        else:
            assert abs(ffn_macs_per_token(cfg, 1) / smoe_macs - 1) < 0.01, variant
    # hand-solved for tiny (d 96, SMoE 8 x 256 top-1, SwiGLU): width = (3*256 - n*96) / (3*2) and
    # experts = (8*3*96*256 - n*96^2) / (3*48*width), n = head/merge layers kept
    if preset == "tiny":
        shapes = {v: (get_config("tiny", v).moe.num_experts, get_config("tiny", v).moe.expert_hidden)
                  for v in ("mhmoe-h2", "mhmoe-h2-nohead", "mhmoe-h2-nomerge", "mhmoe-h2-nohead-nomerge")}
        assert shapes == {"mhmoe-h2": (40, 96), "mhmoe-h2-nohead": (36, 112), "mhmoe-h2-nomerge": (36, 112),
                          "mhmoe-h2-nohead-nomerge": (32, 128)}


def test_ablation_config_fragments():
    for a in ("nohead", "nomerge", "nohead-nomerge"):
        path = REPO / "configs" / "model" / f"mhmoe-h2-{a}.yaml"
        variant = yaml.safe_load(path.read_text())["model"]["init_args"]["backbone"]["variant"]
        assert variant == f"mhmoe-h2-{a}"
        cfg = get_config("tiny", variant)
        assert count_costs(cfg)["macs_per_token"] == count_costs(get_config("tiny", "smoe"))["macs_per_token"]


# ------------------------------------------------------------------------------ BEiT-3 choices
def test_vision_language_blocks_as_beit3():
    assert ModelConfig().vl_layers == 3
    base = get_config("base", "dense")
    assert base.vl_layers == 3 and [i for i in range(base.depth) if base.has_vl_way(i)] == [9, 10, 11]
    assert get_config("tiny").vl_layers == 1  # the CPU preset keeps one (of 4 blocks)
    two = get_config("tiny", vl_layers=2)
    assert [i for i in range(two.depth) if two.has_vl_way(i)] == [2, 3]


@torch.no_grad()
def test_nlvr2_head_structure_as_beit3():
    D = 16
    torch.manual_seed(0)
    head = NLVR2Head(D)
    assert head.style == "beit3" and not hasattr(head, "image_pooler") and not hasattr(head, "text_pooler")
    kinds = [type(m) for m in head.classifier]
    assert kinds == [nn.LayerNorm, nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear]
    assert head.classifier[0].normalized_shape == (4 * D,)
    assert (head.classifier[1].in_features, head.classifier[1].out_features) == (4 * D, 2 * D)
    assert (head.classifier[4].in_features, head.classifier[4].out_features) == (2 * D, 2)
    assert sum(p.numel() for p in head.parameters()) == 2 * 4 * D + 4 * D * 2 * D + 2 * D + 2 * 2 * D + 2 * D * 2 + 2
    big = NLVR2Head(256)  # BEiT-3's init: N(0, 0.02) weights scaled by 0.001
    for lin in (big.classifier[1], big.classifier[4]):
        assert float(lin.weight.std()) == pytest.approx(0.02 * 0.001, rel=0.1)
    # the earlier head, kept as an option: tanh poolers, unscaled init
    old = NLVR2Head(256, style="tanh_pooler")
    assert isinstance(old.image_pooler.dense, nn.Linear) and float(old.classifier[1].weight.std()) == pytest.approx(0.02, rel=0.05)
    hl, hr = torch.randn(3, 9, 256), torch.randn(3, 9, 256)
    pooled = torch.cat([torch.tanh(old.image_pooler.dense(old.image_pooler.norm(hl[:, 0]))),
                        torch.tanh(old.text_pooler.dense(old.text_pooler.norm(hl[:, 5])))], dim=-1)
    torch.testing.assert_close(old.pool(hl, 5), pooled)
    torch.testing.assert_close(big.pool(hl, 5), torch.cat([hl[:, 0], hl[:, 5]], dim=-1))
    with pytest.raises(ValueError, match="style='pooler' is invalid"):
        NLVR2Head(D, style="pooler")
