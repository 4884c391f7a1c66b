import torch

from mmmoe.layers.bitlinear import BitLinear, act_quant_8bit, weight_quant_ternary


def test_weight_quant_is_ternary_times_absmean_with_identity_gradient():
    torch.manual_seed(0)
    w = torch.randn(3, 8, 6, requires_grad=True)
    q = weight_quant_ternary(w, dims=(-2, -1))
    for e in range(3):
        gamma = w[e].abs().mean()
        levels = set(torch.round(q[e] / gamma, decimals=4).unique().tolist())
        assert levels <= {-1.0, 0.0, 1.0}
        # hand rule: round(w / gamma) clipped to [-1, 1]
        want = torch.clamp(torch.round(w[e] / gamma), -1, 1) * gamma
        torch.testing.assert_close(q[e], want)
    g = torch.randn_like(w)
    q.backward(g)
    torch.testing.assert_close(w.grad, g)  # straight-through


def test_act_quant_8bit_per_token_levels():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0], [10.0, 3.0, -7.0, 1.0]], requires_grad=True)
    q = act_quant_8bit(x)
    for row_x, row_q in zip(x, q):
        scale = 127 / row_x.abs().max()
        torch.testing.assert_close(row_q, torch.round(row_x * scale).clamp(-128, 127) / scale)
    assert q[0, 1].item() == -1.0  # the absmax value survives exactly
    q.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_bitlinear_matches_manual_quantised_matmul():
    torch.manual_seed(0)
    lin = BitLinear(8, 5, norm=False)
    x = torch.randn(4, 8)
    gamma = lin.weight.abs().mean()
    wq = torch.clamp(torch.round(lin.weight / gamma), -1, 1) * gamma
    s = 127 / x.abs().amax(-1, keepdim=True)
    xq = torch.round(x * s).clamp(-128, 127) / s
    torch.testing.assert_close(lin(x), xq @ wq.t())
