"""A slow, obvious MH-MoE: per-sub-token routing and a per-expert Python loop. The oracle for tests.

It reads the parameters of an ``MHMoE`` module but shares none of its code paths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _expert(m, e: int, v):
    w_in, w_out = m.experts.w_in[e], m.experts.w_out[e]
    hid = m.config.expert_hidden
    if m.config.activation == "swiglu":
        return (F.silu(v @ w_in[:, :hid]) * (v @ w_in[:, hid:])) @ w_out
    return F.gelu(v @ w_in) @ w_out


def _logits(m, sub):
    c = m.config
    if c.router == "softmax":
        return sub @ m.router.proj.weight.t()
    z = sub @ m.router.proj.weight.t()
    z = z / z.norm(dim=-1, keepdim=True)
    emb = m.router.expert_embed / m.router.expert_embed.norm(dim=-1, keepdim=True)
    return (z @ emb.t()) / m.router.temperature


def reference_forward(m, x_TD):
    """Returns (y_TD, kept) where kept is the set of (sub-token, choice rank) pairs that ran."""
    c = m.config
    T, D = x_TD.shape
    h, Dh, E, K = c.num_heads, c.d_model // c.num_heads, c.num_experts, c.top_k
    s = x_TD @ m.head.weight.t() + m.head.bias if c.use_head_layer else x_TD
    sub = s.reshape(T * h, Dh)
    S = T * h
    probs = torch.softmax(_logits(m, sub), dim=-1)
    bias = m.expert_bias if c.balancing == "aux_free" else torch.zeros(E, dtype=probs.dtype)
    choices, gates = [], []
    for i in range(S):
        scores = (probs[i] + bias.to(probs.dtype)).tolist()
        order = sorted(range(E), key=lambda e: -scores[e])[:K]
        g = probs[i, order]
        if K > 1:
            g = g / g.sum()
        choices.append(order)
        gates.append(g)
    # capacity in GShard priority: all first choices in sub-token order, then second choices ...
    kept = set()
    if c.capacity_factor is None:
        kept = {(i, j) for i in range(S) for j in range(K)}
    else:
        cap = math.ceil(c.capacity_factor * K * math.ceil(S / E))
        used = [0] * E
        for j in range(K):
            for i in range(S):
                e = choices[i][j]
                if used[e] < cap:
                    used[e] += 1
                    kept.add((i, j))
    y = torch.zeros_like(sub)
    for e in range(E):  # per-expert loop
        pairs = [(i, j) for (i, j) in sorted(kept) if choices[i][j] == e]
        if not pairs:
            continue
        rows = torch.tensor([i for i, _ in pairs])
        g = torch.stack([gates[i][j] for i, j in pairs])
        y = y.index_add(0, rows, g.unsqueeze(-1) * _expert(m, e, sub[rows]))
    if c.sub_token_residual:
        y = y + sub
    y = y.reshape(T, D)
    if c.use_merge_layer:
        y = y @ m.merge.weight.t() + m.merge.bias
    if c.shared_expert_hidden:
        y = y + m.shared_expert(x_TD)
    return y, kept, choices
