import itertools
import math

import pytest
import torch

from mmmoe import kernels
from mmmoe.moe import MHMoE, MoEConfig
from mmmoe.moe import experts as experts_mod
from mmmoe.moe.dispatch import expert_capacity, permute
from mmmoe.moe.router import load_balance_loss
from mmmoe.moe.stats import sub_token_divergence
from tests.moe_reference import reference_forward


def _only_path(monkeypatch, impl):
    """Make the experts' other autograd function raise, so a test provably runs ``impl``."""
    other = {"blocked": experts_mod._FusedExperts, "grouped": experts_mod._BlockedExperts}[impl]

    def refuse(*args, **kwargs):
        raise AssertionError(f"{other.__name__} ran, expected the {impl} path")

    monkeypatch.setattr(other, "apply", refuse)


def make(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(d_model=16, num_experts=5, expert_hidden=12, top_k=1, num_heads=1)
    base.update(kw)
    return MHMoE(MoEConfig(**base)).to(dtype)


def _grads(m, x):
    return [x.grad] + [p.grad for p in m.parameters()]


def _zero(m, x):
    x.grad = None
    m.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "h,k,act,router,impl",
    [c + ("blocked",) for c in itertools.product([1, 2, 4], [1, 2], ["swiglu", "gelu"], ["softmax", "xmoe"])]
    + [(h, 2, act, "softmax", "grouped") for h in (1, 2, 4) for act in ("swiglu", "gelu")],
)
def test_dropless_matches_loop_reference_float64(h, k, act, router, impl, monkeypatch):
    # both training paths of the experts (blocked: CPU; grouped: accelerators), gradients included
    _only_path(monkeypatch, impl)
    m = make(num_heads=h, top_k=k, activation=act, router=router, shared_expert_hidden=8 if h == 2 else 0)
    m.experts.impl = impl
    x = torch.randn(11, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 16, dtype=torch.float64)
    y, out = m(x)
    (y * w).sum().backward()
    got = _grads(m, x)
    _zero(m, x)
    y_ref, kept, _ = reference_forward(m, x)
    (y_ref * w).sum().backward()
    want = _grads(m, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, g, r in zip(names, got, want):
        assert g is not None and r is not None, name
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11, msg=f"grad of {name}")
    assert len(kept) == 11 * h * k and float(out.dropped_fraction) == 0.0


@pytest.mark.parametrize("h,k,act", [(1, 1, "swiglu"), (2, 2, "swiglu"), (4, 2, "gelu")])
def test_float32_fast_path_matches_float64_reference(h, k, act):
    # widths chosen so torch._grouped_mm's 16-byte stride rule holds and the fast kernel runs
    m = make(dtype=torch.float32, d_model=32, num_experts=6, expert_hidden=16, num_heads=h, top_k=k, activation=act)
    x = torch.randn(40, 32, requires_grad=True)
    y, _ = m(x)
    y.square().sum().backward()
    got = [g.double() for g in _grads(m, x)]
    m64 = m.double()
    _zero(m64, x)
    x64 = x.detach().double().requires_grad_(True)
    y_ref, _, _ = reference_forward(m64, x64)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(got, _grads(m64, x64)):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("h,k,cf", [(1, 1, 1.0), (2, 2, 1.0), (4, 2, 0.5), (2, 1, 1.25)])
def test_capacity_drops_exactly_the_reference_set(h, k, cf):
    m = make(num_heads=h, top_k=k, capacity_factor=cf, num_experts=4)
    # skew the router so some experts overflow
    with torch.no_grad():
        m.router.proj.weight[0] += 2.0
    x = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    y, out = m(x)
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    y_ref, kept, choices = reference_forward(m, x)
    y_ref.sum().backward()
    S = 23 * h
    assert out.dropped_fraction.item() == pytest.approx(1 - len(kept) / (S * k))
    assert len(kept) < S * k, "the skewed router should overflow at least one expert"
    # the very pairs that ran: compare against the dispatch plan
    idx = torch.tensor(choices)
    plan = permute(idx, 4, expert_capacity(S, 4, k, cf))
    ran = {(int(a) % S, int(a) // S) for a in plan.order_A}
    assert ran == kept
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, x.grad, rtol=1e-9, atol=1e-11)


def test_capacity_formula_matches_public_code():
    # capacity factor 1.0: C = k * ceil(S / E)
    assert expert_capacity(100, 8, 2, 1.0) == 2 * math.ceil(100 / 8)
    assert expert_capacity(64, 8, 1, 1.5) == 12


def test_token_outputs_do_not_depend_on_other_tokens():
    m = make(num_heads=2, top_k=2, num_experts=6)
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    y, _ = m(x)
    for b, t in [(0, 0), (1, 4), (2, 8)]:
        y1, _ = m(x[b, t].reshape(1, 1, 16))
        torch.testing.assert_close(y1.reshape(16), y[b, t], rtol=1e-12, atol=1e-13)
    # changing other tokens leaves a token's output unchanged
    x2 = torch.randn_like(x)
    x2[1, 4] = x[1, 4]
    y2, _ = m(x2)
    torch.testing.assert_close(y2[1, 4], y[1, 4], rtol=1e-12, atol=1e-13)


def test_padding_is_neither_routed_nor_counted():
    m = make(num_heads=2, top_k=2, num_experts=4)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    pad[1, 1] = True
    y, out = m(x, padding_mask=pad)
    assert out.num_tokens == 9
    assert out.expert_load.sum().item() == 9 * 2 * 2  # tokens * heads * top-k
    assert torch.all(y[pad] == 0)
    y_valid, out_valid = m(x[~pad])
    torch.testing.assert_close(y[~pad], y_valid)
    torch.testing.assert_close(out.expert_load, out_valid.expert_load)
    with pytest.raises(ValueError, match="padding_mask"):
        m(x, padding_mask=pad.long())


def test_aux_free_bias_changes_only_in_training_and_only_outside_forward():
    m = make(num_heads=2, top_k=1, num_experts=4, balancing="aux_free", bias_update_rate=0.1)
    x = torch.randn(30, 16, dtype=torch.float64)
    before = m.expert_bias.clone()
    m.train()
    _, out = m(x)
    assert torch.equal(m.expert_bias, before), "forward must not touch balancing state"
    m.eval()
    _, out_eval = m(x)
    m.update_balancing(out_eval)
    assert torch.equal(m.expert_bias, before), "eval mode must leave balancing state unchanged"
    m.train()
    m.update_balancing(out)
    load = out.expert_load
    expected = 0.1 * torch.sign(load.mean() - load)
    torch.testing.assert_close(m.expert_bias, before + expected.float())
    # in aux-free mode the balance loss is reported but not part of the objective
    assert out.loss.item() == pytest.approx(0.0)
    assert out.aux_loss.item() > 0


def test_aux_free_bias_shifts_selection_but_not_gates():
    m = make(num_experts=4, balancing="aux_free")
    x = torch.randn(50, 16, dtype=torch.float64)
    with torch.no_grad():
        m.expert_bias[2] = 10.0  # every sub-token now picks expert 2
    _, out = m(x)
    assert out.expert_load[2].item() == 50
    y, kept, _ = reference_forward(m, x)
    torch.testing.assert_close(m(x)[0], y)


def test_losses_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    idx = probs.topk(1).indices
    # P = mean probs; f = top-1 fractions (2/4, 1/4, 1/4)
    P = probs.mean(0)
    want = 3 * (P[0] * 0.5 + P[1] * 0.25 + P[2] * 0.25)
    torch.testing.assert_close(load_balance_loss(probs, idx), want)
    uniform = torch.full((6, 3), 1 / 3)
    balanced_idx = torch.tensor([[0], [1], [2], [0], [1], [2]])
    assert load_balance_loss(uniform, balanced_idx).item() == pytest.approx(1.0)


def test_statistics():
    # 2 tokens, h = 2, k = 2: token 0 reaches {0, 1, 3}, token 1 reaches {2}
    idx = torch.tensor([[0, 1], [3, 1], [2, 2], [2, 2]])
    assert sub_token_divergence(idx, 2).item() == pytest.approx((3 + 1) / 2)
    m = make(num_heads=2, top_k=2, num_experts=8, activation_threshold=0.5)
    x = torch.randn(20, 16, dtype=torch.float64)
    _, out = m(x)
    assert out.expert_load.sum().item() == 20 * 4
    torch.testing.assert_close(out.expert_ratio, out.expert_load / 20)
    want = (out.expert_load / 20 > 0.5).float().mean()
    assert out.activation_ratio.item() == pytest.approx(want.item())
    assert 1 <= out.divergence.item() <= 4


def test_empty_input_and_all_padding():
    m = make(num_heads=2, top_k=2)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    y, out = m(x, padding_mask=torch.ones(2, 3, dtype=torch.bool))
    assert out.num_tokens == 0 and torch.all(y == 0)
    (y.sum() + out.loss).backward()


def test_bitnet_experts_train_latent_weights():
    m = make(dtype=torch.float32, num_heads=2, top_k=2, bitnet=True, d_model=32, expert_hidden=16)
    x = torch.randn(10, 32)
    y, out = m(x)
    y.square().mean().backward()
    assert m.experts.w_in.grad is not None and m.experts.w_in.grad.abs().sum() > 0
    assert torch.isfinite(y).all()


def test_compile_safe_path_matches_eager():
    m = make(dtype=torch.float32, d_model=32, num_experts=4, expert_hidden=16, num_heads=2, top_k=2)
    x = torch.randn(2, 8, 32)
    y_eager, _ = m(x)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager")
    y_c, _ = compiled(x)
    torch.testing.assert_close(y_c, y_eager, rtol=1e-5, atol=1e-6)
    y_c.sum().backward()
    assert m.experts.w_in.grad is not None


def test_fast_path_with_an_unused_expert_gives_zero_weight_grad():
    m = make(dtype=torch.float32, d_model=32, num_experts=6, expert_hidden=16, num_heads=2, top_k=2,
             balancing="aux_free")
    with torch.no_grad():
        m.expert_bias[3] = -10.0  # expert 3 is never selected
    x = torch.randn(40, 32)
    y, out = m(x)
    y.square().sum().backward()
    assert out.expert_load[3] == 0
    assert torch.all(m.experts.w_in.grad[3] == 0) and torch.all(m.experts.w_out.grad[3] == 0)
    m64 = m.double()
    m64.zero_grad(set_to_none=True)
    y_ref, _, _ = reference_forward(m64, x.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)


def test_second_backward_through_one_graph_is_refused():
    m = make(num_heads=2, top_k=2)
    y, _ = m(torch.randn(5, 16, dtype=torch.float64))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        y.sum().backward()


def _step(m, x, impl):
    m.experts.impl = impl
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y, out = m(x)
    (y.float().square().mean() + out.loss).backward()
    return [y, x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("block_bytes", [None, 1, 16000])
@pytest.mark.parametrize("case", ["h1-swiglu", "h4-gelu", "capacity", "unused-expert", "bf16-autocast", "float32",
                                  "float32-aten"])
def test_blocked_cpu_path_equals_grouped_path_bitwise(case, block_bytes, recompute, monkeypatch):
    """The CPU path (expert blocks, reused buffers) computes what the grouped path computes, in the
    same order: outputs and every gradient are bitwise equal (so the choice is invisible to
    training and determinism), with all experts in one block (the default at these sizes), one
    expert per block (1 byte) and a few experts per block (16000 bytes), with the first matmul
    recomputed in backward or stored. float32 runs the SwiGLU through the fused CPU kernels where
    they are built, float32-aten through ATen's ops."""
    if case == "float32-aten":
        monkeypatch.setitem(kernels._state, "enabled", False)
    if block_bytes is not None:
        monkeypatch.setattr(experts_mod, "BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(experts_mod, "RECOMPUTE_MAX_WIDTH", 10**9 if recompute else 0)
    dtype = torch.float32 if case in ("bf16-autocast", "float32", "float32-aten") else torch.float64
    kw = dict(d_model=32, num_experts=6, expert_hidden=16, num_heads=2, top_k=2)
    kw.update({"h1-swiglu": dict(num_heads=1, top_k=1), "h4-gelu": dict(num_heads=4, activation="gelu"),
               "capacity": dict(capacity_factor=0.5), "unused-expert": dict(balancing="aux_free")}.get(case, {}))
    m = make(dtype=dtype, **kw)
    if case == "unused-expert":
        with torch.no_grad():
            m.expert_bias[3] = -10.0  # an expert with no rows: zero weight gradient on both paths
    x = torch.randn(3, 13, 32, dtype=dtype)
    with torch.autocast("cpu", torch.bfloat16, enabled=case == "bf16-autocast"):
        got = _step(m, x, "blocked")
        want = _step(m, x, "grouped")
    if case == "bf16-autocast":
        assert got[0].dtype == torch.bfloat16
    if case == "unused-expert":
        names = [n for n, _ in m.named_parameters()]
        for w in ("experts.w_in", "experts.w_out"):
            g = got[2 + names.index(w)]
            assert torch.all(g[3] == 0) and g.abs().sum() > 0
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert torch.equal(g, w)


@pytest.mark.skipif(not kernels.load(), reason="fused CPU kernels not built here")
@pytest.mark.parametrize("impl", ["blocked", "grouped"])
def test_float32_cpu_experts_use_the_fused_swiglu_kernels_with_atens_values(impl, monkeypatch):
    """On CPU in float32 the experts' SwiGLU, the router and (blocked) the scatter-adds go through
    the fused kernels, forward and backward, and the step matches the ATen-ops step (outputs
    bitwise: the forward kernels are ATen's softmax, topk, silu, muls and index_add_; gradients to
    float32 rounding)."""
    calls = {"fwd": 0, "bwd": 0, "route": 0, "route_bwd": 0, "order": 0, "scatter": 0}

    def count(name, fn):
        def wrapped(*a):
            calls[name] += 1
            return fn(*a)
        return wrapped

    for name, attr in (("fwd", "swiglu_forward"), ("bwd", "swiglu_backward"), ("route", "route_forward"),
                       ("route_bwd", "route_backward"), ("order", "dispatch_order")):
        monkeypatch.setattr(kernels, attr, count(name, getattr(kernels, attr)))
    monkeypatch.setattr(kernels.RowScatter, "add", count("scatter", kernels.RowScatter.add))
    monkeypatch.setattr(experts_mod, "BLOCK_BYTES", 16000)  # several blocks
    m = make(dtype=torch.float32, d_model=32, num_experts=6, expert_hidden=16, num_heads=2, top_k=2)
    x = torch.randn(3, 13, 32)
    got = _step(m, x, impl)
    assert calls["fwd"] >= 1 and calls["bwd"] == (calls["fwd"] if impl == "blocked" else 1)
    assert calls["route"] == calls["route_bwd"] == calls["order"] == 1  # the router kernels too
    # the blocked path adds each block's rows (forward output, backward input gradient) with the
    # copy-first scatter kernel; the grouped path keeps ATen's index_add_
    assert calls["scatter"] == (2 * calls["fwd"] if impl == "blocked" else 0)
    seen = dict(calls)
    monkeypatch.setitem(kernels._state, "enabled", False)
    want = _step(m, x, impl)
    assert calls == seen  # not called with them off
    assert torch.equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recompute", [True, False])
def test_blocked_path_stores_first_matmul_only_for_wide_subtokens(recompute, monkeypatch):
    """Narrow sub-tokens: nothing of the assignments' size is saved for backward (neither the first
    matmul's output A x 2F nor the expert outputs A x D: the gate multiplies the activation, so its
    gradient needs no output); wide ones store the first matmul's output."""
    monkeypatch.setattr(experts_mod, "RECOMPUTE_MAX_WIDTH", 10**9 if recompute else 0)
    monkeypatch.setattr(experts_mod, "BLOCK_BYTES", 16000)
    m = make(torch.float32, d_model=32, num_experts=6, expert_hidden=16, num_heads=2, top_k=2)
    m.experts.impl = "blocked"
    x = torch.randn(4, 13, 32)
    y, out = m(x)
    node, seen = None, [y.grad_fn]
    while seen and node is None:  # find the experts' autograd node
        f = seen.pop()
        if type(f).__name__ == "_BlockedExpertsBackward":
            node = f
        seen.extend(g for g, _ in f.next_functions if g is not None)
    shapes = [tuple(t.shape) for t in node.saved_tensors]
    A = 4 * 13 * 2 * 2  # sub-tokens x top-k, dropless
    S = 4 * 13 * 2
    # sub-tokens, their assignment indices and gates, the two weights; h (A x 2F, F = 16) if stored
    want = [(S, 16), (A,), (A,), (6, 16, 32), (6, 16, 16)] + ([] if recompute else [(A, 32)])
    assert shapes == want
    y.square().mean().backward()
    with torch.no_grad():
        y2, _ = m(x)
    assert torch.equal(y2, y.detach())


def test_blocked_scratch_is_reused_disjoint_and_private_to_a_nested_call():
    """The blocked path's scratch buffers come from one per-thread buffer reused by the next call
    (no fresh pages per step); the views of one call do not overlap, and a call made while the
    buffer is in use gets a buffer of its own."""
    ref = torch.zeros(1)
    experts_mod.release_workspace()
    with experts_mod._scratch(ref, 4, (3, 0, 5)) as (a, none, b):
        assert none is None and a.shape == (4, 3) and b.shape == (4, 5)
        ptr = a.untyped_storage().data_ptr()
        assert b.untyped_storage().data_ptr() == ptr  # one flat buffer
        a.fill_(1.0)
        b.fill_(2.0)
        assert torch.all(a == 1.0) and a.data_ptr() % 64 == 0 and b.data_ptr() % 64 == 0
        with experts_mod._scratch(ref, 4, (3,)) as (c,):
            assert c.untyped_storage().data_ptr() != ptr
            c.fill_(3.0)
        assert torch.all(a == 1.0) and torch.all(b == 2.0)
    with experts_mod._scratch(ref, 2, (3,)) as (d,):
        assert d.untyped_storage().data_ptr() == ptr  # the larger buffer was kept and is reused
    with experts_mod._scratch(ref, 100, (3,)) as (e,):
        assert e.untyped_storage().nbytes() >= 300 * 4  # too small: replaced by a larger one
    assert experts_mod._WORKSPACE.pool[(ref.device, ref.dtype)].numel() >= 300
    experts_mod.release_workspace()
    with experts_mod._scratch(ref, 2, (3,)) as (f,):
        assert f.shape == (2, 3)


def test_blocked_training_step_after_an_inference_mode_forward():
    """An evaluation under torch.inference_mode (Lightning's sanity check runs first) creates the
    scratch buffer; the training step after it writes into the same buffer and must not fail on
    an inference tensor."""
    experts_mod.release_workspace()
    m = make(torch.float32, d_model=32, num_experts=4, expert_hidden=16, num_heads=2, top_k=2)
    m.experts.impl = "blocked"
    x = torch.randn(64, 32)
    with torch.inference_mode():
        want, _ = m(x[:16])
    y, out = m(x[:16])
    (y.square().mean() + out.loss).backward()
    assert torch.equal(y.detach(), want)
    assert m.experts.w_in.grad.abs().sum() > 0


def test_expert_blocks_cover_every_row_once():
    blocks = experts_mod._expert_blocks([3, 0, 5, 2, 0, 4, 0], row_bytes=experts_mod.BLOCK_BYTES // 6)
    assert blocks == [(0, 8, [(0, 0, 3), (2, 3, 8)]), (8, 14, [(3, 8, 10), (5, 10, 14)])]
    assert experts_mod._expert_blocks([0, 0], row_bytes=4) == []
    one = experts_mod._expert_blocks([3, 0, 5], row_bytes=experts_mod.BLOCK_BYTES)  # one row per block
    assert one == [(0, 3, [(0, 0, 3)]), (3, 8, [(2, 3, 8)])]
