"""Multiway FFN: one FFN per way (vision, language and optionally vision-language), routed by an
explicit per-token way id passed to forward (no module state; BEiT-3 / VLMo design).

Each way is a dense :class:`~mmmoe.layers.mlp.FeedForward` or an :class:`~mmmoe.moe.MHMoE` with its
own router. Forward sorts the non-padding tokens by way, runs every way once on its packed tokens
and scatters the outputs back (one host sync per call, for the per-way token counts).

Shape legend: B batch, L sequence, N = B*L, T tokens of one way, D model width.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from mmmoe.layers.embeddings import WAYS
from mmmoe.layers.mlp import FeedForward
from mmmoe.moe import MHMoE, MoEConfig, MoEOutput


class MultiwayFFN(nn.Module):
    """FFNs ``ways["vision"]``, ``ways["language"]`` and, with ``vl=True``, ``ways["vl"]``.

    Args:
        dim: model width D.
        hidden: hidden width of the dense ways (ignored when ``moe`` is set).
        activation: dense FFN activation, ``"swiglu"`` or ``"gelu"``.
        moe: when set, every way is an MHMoE built from this config (one router per way).
        vl: add the vision-language way (way id 2).
        bitnet: BitNet b1.58 dense ways (``BitLinear``); MoE ways follow ``moe.bitnet``.
    """

    def __init__(self, dim: int, hidden: int, activation: str = "swiglu", moe: Optional[MoEConfig] = None,
                 vl: bool = False, bitnet: bool = False):
        super().__init__()
        if moe is not None and moe.d_model != dim:
            raise ValueError(f"MultiwayFFN: moe.d_model={moe.d_model} != dim={dim}")
        self.is_moe = moe is not None
        names = WAYS if vl else WAYS[:2]
        self.ways = nn.ModuleDict(
            {n: MHMoE(moe) if moe is not None else FeedForward(dim, hidden, activation, bitnet=bitnet) for n in names}
        )

    @property
    def has_vl(self) -> bool:
        return "vl" in self.ways

    def forward(
        self, x_BLD: Tensor, way_BL: Tensor, padding_mask_BL: Optional[Tensor] = None
    ) -> Tuple[Tensor, Dict[str, MoEOutput]]:
        """``way_BL``: long way id per token (0 vision, 1 language, 2 vision-language);
        ``padding_mask_BL``: True = padding (not processed, output 0).

        Returns the output (same shape as x; padding rows are zero) and, for MoE ways that received
        tokens, ``{way name: MoEOutput}``.
        """
        D = x_BLD.shape[-1]
        x_ND = x_BLD.reshape(-1, D)
        way_N = way_BL.reshape(-1).long()
        num_ways = len(WAYS)
        if padding_mask_BL is not None:
            way_N = way_N.masked_fill(padding_mask_BL.reshape(-1), num_ways)  # padding sorts last
        counts = torch.bincount(way_N, minlength=num_ways + 1).tolist()  # the one host sync
        if len(counts) > num_ways + 1 or (counts[2] and not self.has_vl):
            raise ValueError(
                f"MultiwayFFN: way ids must be in 0..{num_ways - 1} and 2 (vl) needs a layer with a "
                f"vl way; this layer has {list(self.ways)}"
            )
        order_N = torch.argsort(way_N, stable=True)
        stats: Dict[str, MoEOutput] = {}
        parts, start = [], 0
        for w, name in enumerate(WAYS):
            T = counts[w]
            # an expert-parallel way (mmmoe.parallel) joins its group's collectives even without tokens
            collective = name in self.ways and getattr(self.ways[name], "dispatcher", None) is not None
            if T == 0 and not collective:
                continue
            x_TD = x_ND[order_N[start : start + T]]
            if self.is_moe:
                y_TD, out = self.ways[name](x_TD)
                if out.num_tokens:  # (group-wide count when expert-parallel)
                    stats[name] = out
            else:
                y_TD = self.ways[name](x_TD)
            parts.append(y_TD)
            start += T
        if not parts:
            return x_BLD.new_zeros(x_BLD.shape), stats
        y_SD = torch.cat(parts, dim=0)  # S = non-padding tokens, sorted by way
        y_ND = y_SD.new_zeros(x_ND.shape[0], D).index_copy(0, order_N[:start], y_SD)
        return y_ND.reshape(x_BLD.shape), stats

    def extra_repr(self) -> str:
        return f"ways={list(self.ways)}, moe={self.is_moe}"
