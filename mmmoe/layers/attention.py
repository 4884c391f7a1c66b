"""Multi-head self-attention with a fused qkv projection, masks for the multiway sequence, and a
key/value cache for incremental decoding.

Shape legend: B batch, Q query positions (the new tokens), K key positions (cached + new),
H attention heads, Dh = D / H head width, D model width.

Mask conventions (two different ones meet here, so the names say which):

* ``padding_mask`` (B x K, bool): **True = padding**, as everywhere in mmmoe.
* the attention mask built by :func:`attention_mask` (B x 1 x Q x K, bool): **True = may attend**,
  the convention of ``torch.nn.functional.scaled_dot_product_attention``.

Modes:

* ``"bidirectional"``: every token attends to every non-padding token.
* ``"prefix_causal"``: image tokens attend to image tokens only (bidirectionally); text tokens
  attend to all image tokens and causally to earlier (and their own) text. Text-only input gets a
  plain causal mask, image-only input a bidirectional one.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmmoe.layers.bitlinear import BitLinear

ATTN_MODES = ("bidirectional", "prefix_causal")
KV = Tuple[Tensor, Tensor]
"""One layer's cache: keys and values, each B x H x K x Dh."""


def attention_mask(
    padding_mask_BK: Optional[Tensor],
    modality_BK: Optional[Tensor] = None,
    mode: str = "bidirectional",
    num_queries: Optional[int] = None,
    vision_id: int = 0,
) -> Optional[Tensor]:
    """Boolean SDPA mask (B x 1 x Q x K, True = may attend) or None when nothing is masked.

    The queries are the last ``num_queries`` key positions (default: all K), which is what an
    incremental decoding step sees: cached keys first, then the new tokens.

    Args:
        padding_mask_BK: True = padding key (never attended to); None = no padding.
        modality_BK: per-position modality id; required for ``"prefix_causal"``.
        mode: ``"bidirectional"`` or ``"prefix_causal"``.
        num_queries: Q; positions ``K - Q .. K - 1`` are the queries.
        vision_id: the modality id of image tokens (every other id counts as text).
    """
    if mode not in ATTN_MODES:
        raise ValueError(f"attention mode {mode!r} is invalid: allowed: {', '.join(ATTN_MODES)}")
    if mode == "bidirectional":
        if padding_mask_BK is None:
            return None
        keep_B1QK = ~padding_mask_BK[:, None, None, :]
        if num_queries is not None:
            keep_B1QK = keep_B1QK.expand(-1, -1, num_queries, -1)
    else:
        if modality_BK is None:
            raise ValueError("attention mode 'prefix_causal' needs the per-token modality ids")
        B, K = modality_BK.shape
        Q = K if num_queries is None else num_queries
        pos_K = torch.arange(K, device=modality_BK.device)
        image_BK = modality_BK == vision_id
        image_q_BQ = image_BK[:, K - Q:]
        causal_QK = pos_K[None, :] <= pos_K[K - Q:, None]
        # key is image, or (query and key are text and the key is not later than the query)
        keep_BQK = image_BK[:, None, :] | (~image_q_BQ[:, :, None] & ~image_BK[:, None, :] & causal_QK)
        if padding_mask_BK is not None:
            keep_BQK = keep_BQK & ~padding_mask_BK[:, None, :]
        keep_B1QK = keep_BQK[:, None]
    # a query with no key left (a fully padded sample) attends to everything instead of producing
    # NaN; its output is a padding output and is never read
    return keep_B1QK | ~keep_B1QK.any(dim=-1, keepdim=True)


class Attention(nn.Module):
    """Self-attention ``x -> proj(SDPA(q, k, v))`` with one fused ``qkv`` Linear.

    ``forward(x, attn_mask, kv_cache)`` returns ``(y, (k, v))``: the cache given (if any) with this
    call's keys and values appended along the sequence, ready for the next decoding step.
    With ``bitnet`` both projections are BitNet b1.58 ``BitLinear`` layers.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
        bitnet: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: num_heads={num_heads} must divide dim ({dim})")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_drop = attn_drop
        linear = BitLinear if bitnet else nn.Linear
        self.qkv = linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = linear(dim, dim, bias=True)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(
        self, x_BQD: Tensor, attn_mask: Optional[Tensor] = None, kv_cache: Optional[KV] = None
    ) -> Tuple[Tensor, KV]:
        """``x_BQD``: the new tokens; ``attn_mask``: bool B x 1 x Q x K (True = may attend; see
        :func:`attention_mask`) or None; ``kv_cache``: (k, v) of earlier positions or None."""
        B, Q, D = x_BQD.shape
        qkv = self.qkv(x_BQD).reshape(B, Q, 3, self.num_heads, self.head_dim)
        q_BHQd, k_BHQd, v_BHQd = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B x H x Q x Dh
        if kv_cache is not None:
            k_BHQd = torch.cat([kv_cache[0], k_BHQd], dim=2)  # B x H x K x Dh
            v_BHQd = torch.cat([kv_cache[1], v_BHQd], dim=2)
        y_BHQd = F.scaled_dot_product_attention(
            q_BHQd, k_BHQd, v_BHQd, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        y_BQD = y_BHQd.transpose(1, 2).reshape(B, Q, D)
        return self.proj_drop(self.proj(y_BQD)), (k_BHQd, v_BHQd)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, attn_drop={self.attn_drop}"
