"""The fused CPU kernels (mmmoe.kernels: SwiGLU, router, dispatch order, row scatter): values
against ATen's ops and autograd, layouts, thread-count independence, errors, and the fallback when
they cannot be built."""

import logging

import pytest
import torch
import torch.nn.functional as F

from mmmoe import kernels
from mmmoe.layers.mlp import FeedForward

built = pytest.mark.skipif(not kernels.load(), reason=f"fused CPU kernels not built here: {kernels.error()}")


def _h(rows, width, gen, row_stride=None):
    """rows x 2*width activations with halves [a | b], optionally a view with a wider row stride."""
    full = torch.randn(rows, row_stride or 2 * width, generator=gen) * 3
    return full[:, : 2 * width]


def _reference(h, dp):
    """ATen's ops through autograd on the halves of one m x 2F tensor (rows of a and b are not
    contiguous with each other, as in the layers: ATen then vectorises row by row)."""
    hh = h.detach().clone().requires_grad_(True)
    a, b = hh.chunk(2, dim=-1)
    p = F.silu(a) * b
    p.backward(dp)
    return p.detach(), hh.grad


SHAPES = [(0, 8), (1, 1), (7, 31), (5, 32), (300, 100), (64, 384)]


@built
@pytest.mark.parametrize("rows,width", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_forward_is_atens_silu_times_b_bitwise(rows, width, strided):
    gen = torch.Generator().manual_seed(rows * 1000 + width)
    h = _h(rows, width, gen, row_stride=2 * width + 5 if strided else None)
    a, b = h.chunk(2, dim=-1)
    out = torch.full((rows, width), float("nan"))
    kernels.swiglu_forward(h, out)
    assert torch.equal(out, F.silu(a) * b)


@built
@pytest.mark.parametrize("rows,width", SHAPES)
@pytest.mark.parametrize("separate", [False, True])
def test_backward_matches_autograd(rows, width, separate):
    gen = torch.Generator().manual_seed(rows * 1000 + width + 1)
    h = _h(rows, width, gen, row_stride=2 * width + 3)
    dp = torch.randn(rows, width, generator=gen)
    p_ref, dh_ref = _reference(h, dp)
    before = h.clone()
    p = torch.full((rows, width), float("nan"))
    dh = torch.full((rows, 2 * width), float("nan")) if separate else None
    got = kernels.swiglu_backward(h, dp, p, dh)
    assert got is (dh if separate else h)
    assert torch.equal(p, p_ref)  # the activation comes out exactly as in forward
    torch.testing.assert_close(got, dh_ref, rtol=2e-6, atol=1e-6)
    if separate:
        assert torch.equal(h, before)  # the input is left alone
    # without p: the same gradient
    h2 = before.clone()
    torch.testing.assert_close(kernels.swiglu_backward(h2, dp), got, rtol=0, atol=0)


@built
@pytest.mark.parametrize("rows,width", SHAPES)
def test_gated_forward_is_atens_silu_times_b_times_gate_bitwise(rows, width):
    gen = torch.Generator().manual_seed(rows * 1000 + width + 2)
    h = _h(rows, width, gen, row_stride=2 * width + 1)
    gate = torch.rand(2 * rows, generator=gen)[::2]  # a strided vector of gates
    a, b = h.chunk(2, dim=-1)
    out = torch.full((rows, width), float("nan"))
    kernels.swiglu_forward(h, out, gate)
    assert torch.equal(out, (F.silu(a) * b).mul_(gate.unsqueeze(-1)))


@built
@pytest.mark.parametrize("rows,width", SHAPES)
@pytest.mark.parametrize("with_q", [False, True])
def test_gated_backward_matches_autograd_gate_gradient_included(rows, width, with_q):
    """q = gate * silu(a) * b: the kernel's gradients of h and gate against autograd (float64
    reference), and q written exactly as the gated forward writes it."""
    gen = torch.Generator().manual_seed(rows * 1000 + width + 3)
    h = _h(rows, width, gen, row_stride=2 * width + 3)
    gate = torch.rand(rows, generator=gen) + 0.1
    dq = torch.randn(rows, width, generator=gen)
    hh = h.detach().double().requires_grad_(True)
    gg = gate.double().requires_grad_(True)
    a, b = hh.chunk(2, dim=-1)
    (F.silu(a) * b * gg.unsqueeze(-1)).backward(dq.double())
    q_fwd = kernels.swiglu_forward(h, torch.empty(rows, width), gate)
    q = torch.full((rows, width), float("nan")) if with_q else None
    dgate = torch.full((rows,), float("nan"))
    got = kernels.swiglu_backward(h.clone(), dq, q, None, gate, dgate)
    torch.testing.assert_close(got.double(), hh.grad, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(dgate.double(), gg.grad, rtol=2e-5, atol=1e-4)
    if with_q:
        assert torch.equal(q, q_fwd)
    # without the gate's gradient: the same h gradient; dgate without gate is refused
    again = kernels.swiglu_backward(h.clone(), dq, None, None, gate)
    assert torch.equal(again, got)
    if rows:
        with pytest.raises(RuntimeError, match="dgate needs gate"):
            kernels.swiglu_backward(h.clone(), dq, None, None, None, dgate)


@built
def test_results_do_not_depend_on_the_thread_count():
    """Rows are never split between threads, so 1 and 2 threads give the same bits (ATen's silu can
    differ in the last bit between thread counts when a split falls inside a row)."""
    gen = torch.Generator().manual_seed(3)
    h = _h(777, 100, gen)
    dp = torch.randn(777, 100, generator=gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = kernels.swiglu_forward(h, torch.empty(777, 100))
            p = torch.empty(777, 100)
            dh = kernels.swiglu_backward(h, dp, p, torch.empty(777, 200))
            results.append((out, p, dh))
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(*results):
        assert torch.equal(x, y)


@built
def test_bad_inputs_are_refused_with_a_clear_error():
    h = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.swiglu_forward(h.double(), torch.empty(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="out must be 4 x 8"):
        kernels.swiglu_forward(h, torch.empty(4, 7))
    with pytest.raises(RuntimeError, match="m x 2F"):
        kernels.swiglu_forward(torch.randn(4, 15), torch.empty(4, 7))
    with pytest.raises(RuntimeError, match="unit column stride"):
        kernels.swiglu_forward(torch.randn(16, 4).t(), torch.empty(4, 8))
    with pytest.raises(RuntimeError, match="dp must be 4 x 8"):
        kernels.swiglu_backward(h, torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="gate must be a float32 CPU vector of 4 rows"):
        kernels.swiglu_forward(h, torch.empty(4, 8), torch.ones(3))
    with pytest.raises(RuntimeError, match="gate must be a float32 CPU vector of 4 rows"):
        kernels.swiglu_backward(h, torch.randn(4, 8), None, None, torch.ones(4, dtype=torch.float64))


@built
@pytest.mark.parametrize("shape", [(6, 16), (2, 5, 16)])
def test_feedforward_fused_equals_aten(shape, monkeypatch):
    """The dense SwiGLU FFN through the fused kernels gives ATen's output and gradients."""
    torch.manual_seed(0)
    m = FeedForward(16, 24)
    x = torch.randn(*shape)
    g = torch.randn(*shape)
    results = {}
    for on in (True, False):
        monkeypatch.setitem(kernels._state, "enabled", on)
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.backward(g)
        results[on] = [y.detach(), xi.grad] + [p.grad for p in m.parameters()]
    assert torch.equal(results[True][0], results[False][0])
    for a, b in zip(results[True][1:], results[False][1:]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)


@built
def test_feedforward_takes_the_fused_path_on_cpu_float32_only(monkeypatch):
    calls = []
    real = kernels.swiglu_forward
    monkeypatch.setattr(kernels, "swiglu_forward", lambda *a: calls.append(1) or real(*a))
    m = FeedForward(8, 8)
    m(torch.randn(3, 8)).sum().backward()
    assert calls == [1]
    m.double()(torch.randn(3, 8, dtype=torch.float64))
    with torch.autocast("cpu", torch.bfloat16):
        m.float()(torch.randn(3, 8))
    assert calls == [1]


@built
def test_feedforward_second_derivative_is_refused_not_wrong():
    m = FeedForward(8, 8)
    x = torch.randn(3, 8, requires_grad=True)
    (g,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def _fresh_state(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {"loaded": None, "error": None, "enabled": None})


def test_mode_off_uses_aten(monkeypatch):
    _fresh_state(monkeypatch)
    monkeypatch.setenv(kernels.ENV, "off")
    assert not kernels.enabled() and "off" in kernels.error()
    assert not kernels.applies(torch.randn(2, 4))
    m = FeedForward(8, 8)
    m(torch.randn(3, 8)).sum().backward()  # ATen ops
    with pytest.raises(RuntimeError, match="cannot be enabled"):
        kernels.set_enabled(True)


def test_bad_mode_names_the_variable(monkeypatch):
    _fresh_state(monkeypatch)
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(ValueError, match="MMMOE_CPU_KERNELS='fast'"):
        kernels.load()


def test_failed_build_falls_back_with_one_warning_or_raises_when_required(monkeypatch, caplog):
    def broken():
        raise RuntimeError("Error building extension 'x': [1/2] c++ -c swiglu_cpu.cpp\n/bin/sh: 1: c++: not found")

    _fresh_state(monkeypatch)
    monkeypatch.setattr(kernels, "_build", broken)
    monkeypatch.delenv(kernels.ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="mmmoe.kernels"):
        assert not kernels.applies(torch.randn(2, 4))
        assert not kernels.applies(torch.randn(2, 4))
        m = FeedForward(8, 8)
        y = m(torch.randn(3, 8))
        y.sum().backward()
    warnings = [r for r in caplog.records if r.name == "mmmoe.kernels"]
    assert len(warnings) == 1 and "c++: not found" in warnings[0].getMessage()
    monkeypatch.setenv(kernels.ENV, "require")
    with pytest.raises(RuntimeError, match="(?s)MMMOE_CPU_KERNELS=require.*c\\+\\+: not found"):
        kernels.load()


# ---------------------------------------------------------------- router kernels
from mmmoe.moe.dispatch import permute  # noqa: E402
from mmmoe.moe.router import load_balance_loss, route_with_lse, router_z_loss  # noqa: E402


def _aten_route(logits, k, bias=None):
    """The ATen path of route_with_lse, with the kernels switched off."""
    before = kernels.set_enabled(False)
    try:
        return route_with_lse(logits, k, bias)
    finally:
        kernels.set_enabled(before)


@built
@pytest.mark.parametrize("S,E,k", [(0, 8, 2), (1, 4, 1), (500, 32, 2), (300, 7, 3), (64, 128, 8), (33, 17, 17)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_kernel_forward_is_atens_softmax_topk_gates(S, E, k, with_bias):
    gen = torch.Generator().manual_seed(S * 7 + E + k)
    logits = torch.randn(S, E, generator=gen) * 3
    bias = torch.randn(E, generator=gen) * 0.05 if with_bias else None
    probs, idx, gates, lse = route_with_lse(logits.requires_grad_(True), k, bias)
    assert type(gates.grad_fn).__name__ == "_FusedRouteBackward"  # the kernel ran, not ATen's ops
    probs, gates, lse, logits = probs.detach(), gates.detach(), lse.detach(), logits.detach()
    want = _aten_route(logits, k, bias)
    assert type(want[2].grad_fn).__name__ != "_FusedRouteBackward"
    assert torch.equal(probs, want[0])  # ATen's softmax, bit for bit
    assert torch.equal(idx, want[1])
    if k <= 4:  # the renormalising sum is then taken in ATen's order too
        assert torch.equal(gates, want[2])
    torch.testing.assert_close(gates, want[2], rtol=1e-6, atol=0)
    torch.testing.assert_close(lse, want[3], rtol=1e-6, atol=1e-6)
    assert idx.dtype == torch.long and gates.shape == (S, k)


@built
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_kernel_gradient_matches_float64_autograd(k, with_bias):
    """Through every consumer of the router in the layer: the balance loss (probs), the experts
    (gates) and the z-loss (lse); the float64 ATen path is the reference."""
    gen = torch.Generator().manual_seed(k + 10 * with_bias)
    S, E = 257, 9
    logits = torch.randn(S, E, generator=gen, dtype=torch.float64) * 2
    bias = torch.randn(E, generator=gen) * 0.1 if with_bias else None
    w = torch.randn(S, k, generator=gen, dtype=torch.float64)

    def loss(lg, cast):
        probs, idx, gates, lse = route_with_lse(lg, k, bias)
        return 0.1 * load_balance_loss(probs, idx) + 0.01 * router_z_loss(lg, lse) + (gates * cast(w)).sum(), idx

    ref = logits.clone().requires_grad_(True)
    l_ref, idx_ref = loss(ref, lambda t: t)
    l_ref.backward()
    got = logits.float().requires_grad_(True)
    l_got, idx_got = loss(got, lambda t: t.float())
    assert torch.equal(idx_got, idx_ref)
    l_got.backward()
    torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-5, atol=1e-6)
    # each consumer alone: unused outputs send no gradient, and the kernel handles that
    for part in ("probs", "gates", "lse"):
        lg = logits.float().requires_grad_(True)
        probs, idx, gates, lse = route_with_lse(lg, k, bias)
        {"probs": probs, "gates": gates, "lse": lse}[part].square().sum().backward()
        lr = logits.clone().requires_grad_(True)
        pr, _, gr, sr = _aten_route(lr, k, bias)
        {"probs": pr, "gates": gr, "lse": sr}[part].square().sum().backward()
        torch.testing.assert_close(lg.grad.double(), lr.grad, rtol=1e-5, atol=1e-6)


@built
def test_route_kernel_ties_nan_and_threads():
    """Equal scores go to the lower expert index; a NaN row still yields k distinct valid experts;
    the result does not depend on the thread count."""
    wide = torch.randn(6, 9)
    got = route_with_lse(wide.t(), 2)  # a transposed view: read through a contiguous copy
    want = _aten_route(wide.t(), 2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    logits = torch.zeros(5, 6)  # all equal (e.g. zero sub-tokens): experts 0..k-1
    _, idx, gates, _ = route_with_lse(logits, 3)
    assert idx.tolist() == [[0, 1, 2]] * 5
    assert torch.allclose(gates, torch.full((5, 3), 1 / 3))
    bad = torch.randn(4, 6)
    bad[1, 2] = float("nan")
    _, idx, _, _ = route_with_lse(bad, 2)
    assert all(len(set(r)) == 2 and all(0 <= e < 6 for e in r) for r in idx.tolist())
    # experts switched off by a -inf bias are chosen only after every other one (lowest index first)
    lg = torch.randn(7, 6)
    bias = torch.tensor([float("-inf"), 0.0, float("-inf"), 0.0, float("-inf"), float("-inf")])
    probs, idx, _, _ = route_with_lse(lg, 4, bias)
    two = probs[:, [1, 3]]
    assert idx[:, :2].tolist() == [[1, 3] if a >= b else [3, 1] for a, b in two.tolist()]
    assert idx[:, 2:].tolist() == [[0, 2]] * 7
    gen = torch.Generator().manual_seed(5)
    lg = torch.randn(3001, 32, generator=gen)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x = lg.clone().requires_grad_(True)
            probs, idx, gates, lse = route_with_lse(x, 2)
            (probs.mean(0).square().sum() + gates.sum() + lse.square().mean()).backward()
            outs.append((probs, idx, gates, lse, x.grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@built
@pytest.mark.parametrize("S,E,k", [(0, 4, 2), (1, 3, 1), (1000, 32, 2), (77, 5, 4)])
def test_dispatch_order_is_a_stable_argsort_and_bincount(S, E, k, monkeypatch):
    gen = torch.Generator().manual_seed(S + E + k)
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(S)]) if S else torch.empty(0, k, dtype=torch.long)
    calls = []
    real = kernels.dispatch_order
    monkeypatch.setattr(kernels, "dispatch_order", lambda *a: calls.append(1) or real(*a))
    plan = permute(idx, E)
    assert calls  # the counting sort ran, not the argsort
    flat = idx.t().reshape(-1)
    order = torch.argsort(flat, stable=True)
    assert torch.equal(plan.order_A, order)
    assert torch.equal(plan.token_A, order % S if S else order)
    assert torch.equal(plan.counts_E, torch.bincount(flat, minlength=E))
    # the capacity mode on top of the kernel's order equals the ATen path's
    before = kernels.set_enabled(False)
    try:
        want = permute(idx, E, capacity=max(1, S * k // (2 * E)))
    finally:
        kernels.set_enabled(before)
    got = permute(idx, E, capacity=max(1, S * k // (2 * E)))
    for f in ("order_A", "token_A", "counts_E", "routed_E", "num_dropped"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f


@built
def test_router_kernels_refuse_bad_inputs_clearly():
    with pytest.raises(RuntimeError, match="top_k must be in"):
        kernels.route_forward(torch.randn(4, 3), None, 4)
    with pytest.raises(RuntimeError, match="bias must be float32 of 3"):
        kernels.route_forward(torch.randn(4, 3), torch.zeros(4), 2)
    with pytest.raises(RuntimeError, match="logits must be float32"):
        kernels.route_forward(torch.randn(4, 3, dtype=torch.float64), None, 2)
    with pytest.raises(RuntimeError, match="expert index 7 out of range"):
        kernels.dispatch_order(torch.tensor([[0, 7]]), 4)


def _scatter_calls(gen, n, D, calls, dup_free=False):
    """Random (index, src) calls into n rows of width D; src rows are views with a row stride
    wider than D; with ``dup_free`` no row repeats within a call."""
    out = []
    for _ in range(calls):
        m = int(torch.randint(0, 2 * n + 1, (1,), generator=gen))
        if dup_free:
            m = min(m, n)
            index = torch.randperm(n, generator=gen)[:m]
        else:
            index = torch.randint(0, n, (m,), generator=gen)
        src = torch.randn(m, D + 3, generator=gen)[:, :D]
        out.append((index, src))
    return out


@built
@pytest.mark.parametrize("n,D,calls,dup_free", [(1, 1, 1, False), (50, 7, 3, False), (300, 128, 4, True),
                                                (300, 33, 5, False), (20, 16, 0, False), (1000, 64, 2, True)])
def test_row_scatter_equals_index_add_into_zeros(n, D, calls, dup_free):
    """Copy-first scatter (no zero fill) against zeros.index_add_: bitwise, with rows repeated within
    a call (column-split path), unique rows (row-split path), rows never written (zeroed at the
    end) and an output whose initial contents are garbage (NaN)."""
    gen = torch.Generator().manual_seed(n * 31 + D)
    plan = _scatter_calls(gen, n, D, calls, dup_free)
    want = torch.zeros(n, D)
    acc = kernels.RowScatter(torch.full((n, D), float("nan")))
    for index, src in plan:
        want.index_add_(0, index, src)
        acc.add(index, src)
    got = acc.finish()
    assert got is acc.out
    assert torch.equal(got, want)
    if n > 1 and calls:
        untouched = torch.ones(n, dtype=torch.bool)
        for index, _ in plan:
            untouched[index] = False
        assert torch.equal(acc.stamp < 0, untouched)


@built
def test_row_scatter_does_not_depend_on_the_thread_count():
    """Large enough that both the row split and the column split give work to both threads."""
    gen = torch.Generator().manual_seed(5)
    results = []
    threads = torch.get_num_threads()
    try:
        for dup_free in (True, False):
            plan = _scatter_calls(gen, 4000, 96, 3, dup_free)
            want = torch.zeros(4000, 96)
            for index, src in plan:
                want.index_add_(0, index, src)
            per_threads = [want]
            for t in (1, 2):
                torch.set_num_threads(t)
                acc = kernels.RowScatter(torch.empty(4000, 96))
                for index, src in plan:
                    acc.add(index, src)
                per_threads.append(acc.finish())
            results.append(per_threads)
    finally:
        torch.set_num_threads(threads)
    for want, one, two in results:  # rows split (unique rows), columns split (repeated rows)
        assert torch.equal(one, want) and torch.equal(two, want)


@built
def test_row_scatter_refuses_bad_inputs_and_writes_nothing():
    out = torch.full((5, 4), float("nan"))
    acc = kernels.RowScatter(out)
    with pytest.raises(RuntimeError, match=r"index 5 out of range \[0, 5\)"):
        acc.add(torch.tensor([0, 5]), torch.ones(2, 4))
    assert out.isnan().all() and torch.equal(acc.stamp, torch.full((5,), -1, dtype=torch.int32))
    acc.add(torch.tensor([0, 0]), torch.ones(2, 4))  # still usable: row 0 is 1 + 1, the rest zero
    assert torch.equal(acc.finish(), torch.tensor([[2.0] * 4] + [[0.0] * 4] * 4))
    with pytest.raises(RuntimeError, match="src must be 2 x 4"):
        acc.add(torch.tensor([0, 1]), torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="src must be float32"):
        acc.add(torch.tensor([0, 1]), torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="index must be an int64"):
        acc.add(torch.tensor([0, 1], dtype=torch.int32), torch.ones(2, 4))
    with pytest.raises(RuntimeError, match="stamp must be a contiguous int32"):
        torch.ops.mmmoe_cpu.scatter_rows(out, torch.tensor([0]), torch.ones(1, 4), torch.zeros(4, dtype=torch.int32), 0)
