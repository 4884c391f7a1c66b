"""Heads on top of the backbone's hidden states: pretraining (MLM, MIM) and tasks (VQA, NLVR2).

Shape legend: B batch, N patches, L text length, D width, V vocabulary, P = patch_size^2 * C
pixel values of one patch, A answers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TokenHead(nn.Module):
    """Hidden -> vocabulary logits: Linear(D, D) -> GELU -> LayerNorm -> Linear(D, V).

    With ``tied`` (an ``nn.Embedding`` of V x D) the output projection shares the embedding's
    weight and only owns a bias. Used for masked LM, captioning and causal LM."""

    def __init__(self, dim: int, vocab_size: int, tied: Optional[nn.Embedding] = None, eps: float = 1e-6):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.tied = tied is not None
        if tied is not None:
            if tied.weight.shape != (vocab_size, dim):
                raise ValueError(f"tied embedding is {tuple(tied.weight.shape)}, expected ({vocab_size}, {dim})")
            self._embedding = [tied]  # a list, so the embedding is not registered twice
            self.bias = nn.Parameter(torch.zeros(vocab_size))
            self.decoder = None
        else:
            self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, h_BLD: Tensor) -> Tensor:
        x = self.norm(F.gelu(self.dense(h_BLD)))
        if self.decoder is not None:
            return self.decoder(x)
        return F.linear(x, self._embedding[0].weight, self.bias)


def patchify(image_BCHW: Tensor, patch_size: int) -> Tensor:
    """B x C x H x W -> B x N x (p*p*C), patches in row-major order (the PatchEmbed order)."""
    B, C, H, W = image_BCHW.shape
    p = patch_size
    x = image_BCHW.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def mim_targets(image_BCHW: Tensor, patch_size: int, eps: float = 1e-6) -> Tensor:
    """Per-patch normalised pixels (MAE's norm_pix target): B x N x P."""
    x_BNP = patchify(image_BCHW.float(), patch_size)
    mean = x_BNP.mean(dim=-1, keepdim=True)
    var = x_BNP.var(dim=-1, keepdim=True, unbiased=False)
    return (x_BNP - mean) / (var + eps).sqrt()


class MIMHead(nn.Module):
    """Patch hidden state -> the patch's normalised pixels (P values)."""

    def __init__(self, dim: int, patch_size: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(dim, patch_size * patch_size * in_chans)

    def forward(self, patch_hidden_BND: Tensor) -> Tensor:
        return self.proj(patch_hidden_BND)

    def loss(self, patch_hidden_BND: Tensor, image_BCHW: Tensor, mask_BN: Tensor) -> Tensor:
        """Mean squared error over the masked patches only (SimMIM / MAE)."""
        mask_BN = mask_BN.reshape(mask_BN.shape[0], -1)
        target = mim_targets(image_BCHW, self.patch_size)
        pred = self(patch_hidden_BND[mask_BN]).float()
        if pred.numel() == 0:
            return patch_hidden_BND.sum() * 0.0
        return F.mse_loss(pred, target[mask_BN])


class Pooler(nn.Module):
    """First token -> LayerNorm -> Linear(D, D) -> tanh."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x_BD: Tensor) -> Tensor:
        return torch.tanh(self.dense(self.norm(x_BD)))


class VQAHead(nn.Module):
    """Pooled first token -> Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, A) (BEiT-3)."""

    def __init__(self, dim: int, num_answers: int, eps: float = 1e-6):
        super().__init__()
        self.pooler = Pooler(dim, eps)
        self.classifier = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim, eps=eps), nn.GELU(), nn.Linear(2 * dim, num_answers)
        )

    def forward(self, hidden_BSD: Tensor) -> Tensor:
        return self.classifier(self.pooler(hidden_BSD[:, 0]))


NLVR2_HEAD_STYLES = ("beit3", "tanh_pooler")


class NLVR2Head(nn.Module):
    """NLVR2 classifier over two passes (left image + sentence, right image + sentence).

    ``style="beit3"`` (default, BEiT-3's ``BEiT3ForVisualReasoning``): the final hidden states of
    each pass's image CLS and text BOS, concatenated over both passes (4D) -> LayerNorm ->
    Linear(4D, 2D) -> LayerNorm -> GELU -> Linear(2D, 2). ``reset_parameters`` gives BEiT-3's init:
    linear weights N(0, 0.02), then the classifier's two linear layers scaled by ``init_scale``
    (default 0.001 for this style, as BEiT-3: near-zero initial logits; a head on an untrained
    backbone then needs more steps to start learning, ``init_scale=1`` removes the scaling).

    ``style="tanh_pooler"`` (this project's earlier head): each of the four vectors first goes through
    a pooler (LayerNorm -> Linear(D, D) -> tanh; one for the image CLS, one for the text BOS), then
    the same classifier; linear weights N(0, 0.02) (``init_scale`` default 1: no scaling).
    """

    def __init__(self, dim: int, eps: float = 1e-6, style: str = "beit3", init_scale: Optional[float] = None):
        super().__init__()
        if style not in NLVR2_HEAD_STYLES:
            raise ValueError(f"NLVR2Head.style={style!r} is invalid: allowed {', '.join(NLVR2_HEAD_STYLES)}")
        if init_scale is None:
            init_scale = self.BEIT3_INIT_SCALE if style == "beit3" else 1.0
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not init_scale > 0:
            raise ValueError(f"NLVR2Head.init_scale={init_scale!r} is invalid: must be a number > 0")
        self.style, self.init_scale = style, float(init_scale)
        if style == "tanh_pooler":
            self.image_pooler = Pooler(dim, eps)
            self.text_pooler = Pooler(dim, eps)
        self.classifier = nn.Sequential(
            nn.LayerNorm(4 * dim, eps=eps), nn.Linear(4 * dim, 2 * dim), nn.LayerNorm(2 * dim, eps=eps),
            nn.GELU(), nn.Linear(2 * dim, 2),
        )
        self.reset_parameters()

    BEIT3_INIT_SCALE = 0.001
    """BEiT-3 multiplies the NLVR2 head's linear weights and biases by this after init."""

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.init_scale != 1.0:
            with torch.no_grad():
                for m in (self.classifier[1], self.classifier[4]):
                    m.weight.mul_(self.init_scale)
                    m.bias.mul_(self.init_scale)

    def pool(self, hidden_BSD: Tensor, num_image_tokens: int) -> Tensor:
        """[image CLS, text BOS] of one pass (B x 2D), through the poolers for ``tanh_pooler``."""
        cls_BD, bos_BD = hidden_BSD[:, 0], hidden_BSD[:, num_image_tokens]
        if self.style == "tanh_pooler":
            cls_BD, bos_BD = self.image_pooler(cls_BD), self.text_pooler(bos_BD)
        return torch.cat([cls_BD, bos_BD], dim=-1)

    def forward(self, left_BSD: Tensor, right_BSD: Tensor, num_image_tokens: int) -> Tensor:
        feats = torch.cat([self.pool(left_BSD, num_image_tokens), self.pool(right_BSD, num_image_tokens)], dim=-1)
        return self.classifier(feats)

    def extra_repr(self) -> str:
        return f"style={self.style}, init_scale={self.init_scale}"
