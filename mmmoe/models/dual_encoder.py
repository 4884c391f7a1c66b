"""The retrieval head: the multiway backbone used as a dual encoder (BEiT-3's retrieval fine-tuning).

An image-only pass (vision way) and a text-only pass (language way) of the same backbone; the
final-normed first token of each (image CLS, text BOS; ``pooling="cls"``, BEiT-3) or the mean of
the patch / non-padding text positions (``pooling="mean"``) is projected by its own linear layer
and L2-normalised. Similarities are cosines scaled by a learnable temperature ``exp(logit_scale)``
(CLIP: initialised at 1 / 0.07, clamped at 100).

Shape legend: B images, T texts, D width, E embedding width.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_LOGIT_SCALE = math.log(100.0)
POOLINGS = ("cls", "mean")


class RetrievalHead(nn.Module):
    """Image CLS / text BOS hidden state -> Linear(D, E, bias=False) -> L2 norm, and the temperature."""

    def __init__(self, dim: int, embed_dim: Optional[int] = None, init_temperature: float = 0.07, pooling: str = "cls"):
        super().__init__()
        if not 0.0 < init_temperature <= 1.0:
            raise ValueError(f"init_temperature must be in (0, 1], got {init_temperature}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is invalid: allowed {', '.join(POOLINGS)}")
        self.pooling = pooling
        embed_dim = embed_dim or dim
        self.image_proj = nn.Linear(dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    @property
    def embed_dim(self) -> int:
        return self.image_proj.out_features

    def embed_image(self, hidden_BSD: Tensor) -> Tensor:
        """Normalised image embeddings (B x E, float32) from an image-only pass."""
        pooled = hidden_BSD[:, 0] if self.pooling == "cls" else hidden_BSD[:, 1:].mean(1)
        return F.normalize(self.image_proj(pooled).float(), dim=-1)

    def embed_text(self, hidden_TLD: Tensor, pad_TL: Optional[Tensor] = None) -> Tensor:
        """Normalised text embeddings (T x E, float32) from a text-only pass (padding: True)."""
        if self.pooling == "cls":
            pooled = hidden_TLD[:, 0]
        elif pad_TL is None:
            pooled = hidden_TLD.mean(1)
        else:
            keep_TL1 = (~pad_TL).unsqueeze(-1).to(hidden_TLD.dtype)
            pooled = (hidden_TLD * keep_TL1).sum(1) / keep_TL1.sum(1).clamp(min=1)
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp().float()

    def forward(self, image_emb_BE: Tensor, text_emb_TE: Tensor) -> Tuple[Tensor, Tensor]:
        """Scaled similarity logits: image->text (B x T) and text->image (T x B)."""
        logits_BT = self.scale() * image_emb_BE @ text_emb_TE.t()
        return logits_BT, logits_BT.t()


def encode_image(backbone: nn.Module, head: RetrievalHead, image: Tensor) -> Tuple[Tensor, object]:
    """Image-only pass -> (normalised embeddings B x E, backbone output)."""
    out = backbone.forward_features(image=image)
    return head.embed_image(out.hidden), out


def encode_text(backbone: nn.Module, head: RetrievalHead, text_ids: Tensor,
                text_pad_mask: Optional[Tensor] = None) -> Tuple[Tensor, object]:
    """Text-only pass (bidirectional) -> (normalised embeddings T x E, backbone output)."""
    out = backbone.forward_features(text_ids=text_ids, text_pad_mask=text_pad_mask)
    return head.embed_text(out.hidden, text_pad_mask), out
