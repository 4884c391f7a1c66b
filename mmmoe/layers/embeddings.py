"""Input embeddings of the multiway sequence ``[image CLS, patches..., text BOS, tokens...]``.

Each part has its own learned absolute positions (BEiT-3): the image part (CLS + patches) one table,
the text part (BOS + tokens, BOS being the tokenizer's ``bos_id`` at position 0 of ``text_ids``)
another. Which FFN way a token takes is given by per-token ids:

* modality ids: ``VISION = 0`` (CLS and patches), ``LANGUAGE = 1`` (text tokens);
* way ids: the modality id, or ``VL = 2`` for every token of an image-text input in the top layers
  that hold a vision-language FFN.

Shape legend: B batch, N patches, L text length, D model width, C channels.
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.layers import PatchEmbed, trunc_normal_
from torch import Tensor, nn

VISION = 0
LANGUAGE = 1
VL = 2
WAYS = ("vision", "language", "vl")
"""Way names, indexed by way id."""


class VisionEmbedding(nn.Module):
    """Image -> ``[CLS, patch_1 .. patch_N]`` + learned positions; masked patches (SimMIM style)
    have their patch embedding replaced by a learned mask token before positions are added."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, dim)  # Conv2d, stride = patch
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            trunc_normal_(p, std=0.02)

    @property
    def num_tokens(self) -> int:
        """CLS + patches."""
        return 1 + self.num_patches

    def forward(self, image_BCHW: Tensor, image_mask: Optional[Tensor] = None) -> Tensor:
        """``image_mask``: bool B x N or B x Hp x Wp, True = masked patch. Returns B x (1+N) x D."""
        x_BND = self.patch_embed(image_BCHW)
        B, N, D = x_BND.shape
        if image_mask is not None:
            mask_BN = image_mask.reshape(B, -1)
            if mask_BN.shape[1] != N or mask_BN.dtype != torch.bool:
                raise ValueError(
                    f"image_mask must be bool with {N} patches per image (B x {N} or B x Hp x Wp, "
                    f"True = masked), got {image_mask.dtype} {tuple(image_mask.shape)}"
                )
            x_BND = torch.where(mask_BN[..., None], self.mask_token.to(x_BND.dtype), x_BND)
        x_BND = torch.cat([self.cls_token.expand(B, -1, -1).to(x_BND.dtype), x_BND], dim=1)
        return x_BND + self.pos_embed.to(x_BND.dtype)


class TextEmbedding(nn.Module):
    """Token ids -> token embedding + learned positions (``start`` = position of the first id, for
    incremental decoding)."""

    def __init__(self, vocab_size: int, max_len: int, dim: int):
        super().__init__()
        self.max_len = max_len
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        trunc_normal_(self.token_embed.weight, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, ids_BL: Tensor, start: int = 0) -> Tensor:
        L = ids_BL.shape[1]
        if start + L > self.max_len:
            raise ValueError(
                f"text of {start + L} positions exceeds max_text_len={self.max_len} "
                "(raise ModelConfig.max_text_len)"
            )
        return self.token_embed(ids_BL) + self.pos_embed[:, start : start + L]
