"""The pieces of contrastive image-text training and retrieval scoring that need only torch (so
that gloo test processes start fast): gathering embeddings across ranks with gradient, the
symmetric InfoNCE loss over the global batch, Karpathy-protocol recalls and the exact
random-ranking baseline. See tasks/retrieval.py for the task module.

Shape legend: B batch, G global batch (all ranks), E embedding width, I images, T texts.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

RECALL_KS = (1, 5, 10)


# ------------------------------------------------------------------------------ distributed gather
class _GatherWithGrad(torch.autograd.Function):
    """all_gather of ``x`` (rows may differ per rank); backward: the gradients of the gathered
    tensor summed over ranks, the local rows returned."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: List[int], rank: int, group: Any) -> Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        width = max(sizes)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None, None, None


def _world(group: Any = None) -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def gathered_sizes(n: int, device: torch.device, group: Any = None) -> List[int]:
    """Every rank's row count (one all_gather of a scalar)."""
    rank, world = _world(group)
    if world == 1:
        return [n]
    t = torch.tensor([n], device=device)
    parts = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return [int(p.item()) for p in parts]


def all_gather_with_grad(x: Tensor, sizes: Optional[List[int]] = None, group: Any = None) -> Tensor:
    """The rows of ``x`` of every rank, in rank order (``x`` itself on one process); differentiable."""
    rank, world = _world(group)
    if world == 1:
        return x
    sizes = sizes if sizes is not None else gathered_sizes(x.shape[0], x.device, group)
    return _GatherWithGrad.apply(x, sizes, rank, group)


def all_gather_no_grad(x: Tensor, sizes: List[int], group: Any = None) -> Tensor:
    rank, world = _world(group)
    if world == 1:
        return x
    with torch.no_grad():
        return _GatherWithGrad.apply(x, sizes, rank, group)


def contrastive_loss(image_emb_BE: Tensor, text_emb_BE: Tensor, scale: Tensor,
                     image_ids_B: Optional[Tensor] = None, group: Any = None,
                     gather: bool = True) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Symmetric InfoNCE of this rank's rows against the global batch (``gather=False``: against
    this rank's batch only, no collective call; validation, whose ranks may see different numbers
    of batches). Pairs with the same ``image_ids_B`` are all positives.

    Returns (loss, {"i2t_acc", "t2i_acc"}: in-batch top-1 accuracy of this rank's rows)."""
    B = image_emb_BE.shape[0]
    if not gather:
        return _loss_rows(image_emb_BE, text_emb_BE, scale, image_ids_B, [B], 0, None, local=True)
    sizes = gathered_sizes(B, image_emb_BE.device, group)
    rank, _ = _world(group)
    return _loss_rows(image_emb_BE, text_emb_BE, scale, image_ids_B, sizes, rank, group, local=False)


def _loss_rows(image_emb_BE: Tensor, text_emb_BE: Tensor, scale: Tensor, image_ids_B: Optional[Tensor],
               sizes: List[int], rank: int, group: Any, local: bool) -> Tuple[Tensor, Dict[str, Tensor]]:
    B = image_emb_BE.shape[0]
    img_GE = image_emb_BE if local else all_gather_with_grad(image_emb_BE, sizes, group)
    txt_GE = text_emb_BE if local else all_gather_with_grad(text_emb_BE, sizes, group)
    start = sum(sizes[:rank])
    rows = slice(start, start + B)
    if image_ids_B is None:
        ids_G = torch.arange(sum(sizes), device=img_GE.device)
    elif local:
        ids_G = image_ids_B.reshape(-1)
    else:
        ids_G = all_gather_no_grad(image_ids_B.reshape(-1, 1), sizes, group).reshape(-1)
    pos_BG = (ids_G[rows, None] == ids_G[None, :]).float()  # pairs of the same image are positives
    target_BG = pos_BG / pos_BG.sum(-1, keepdim=True)
    logits_i2t_BG = scale * img_GE[rows] @ txt_GE.t()
    logits_t2i_BG = scale * txt_GE[rows] @ img_GE.t()
    loss = 0.5 * (F.cross_entropy(logits_i2t_BG, target_BG) + F.cross_entropy(logits_t2i_BG, target_BG))
    with torch.no_grad():
        acc = {"i2t_acc": pos_BG.gather(1, logits_i2t_BG.argmax(-1, keepdim=True)).mean(),
               "t2i_acc": pos_BG.gather(1, logits_t2i_BG.argmax(-1, keepdim=True)).mean()}
    return loss, acc


# ------------------------------------------------------------------------------ metrics
def recall_at_k(sim_IT: Tensor, text_image_T: Tensor, ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
    """Karpathy-protocol recalls in percent from an images x texts similarity matrix and the image
    index of every text. Ties are broken in favour of the lower index (``argsort`` stable)."""
    I, T = sim_IT.shape
    sim_IT = sim_IT.float()
    order_IT = torch.argsort(-sim_IT, dim=1, stable=True)
    correct_IT = text_image_T[order_IT] == torch.arange(I)[:, None]
    first_i2t = correct_IT.float().argmax(1)  # rank of the best-ranked own caption
    order_TI = torch.argsort(-sim_IT.t(), dim=1, stable=True)
    first_t2i = (order_TI == text_image_T[:, None]).float().argmax(1)
    out = {}
    for k in ks:
        out[f"retrieval_i2t_r{k}"] = 100.0 * float((first_i2t < k).float().mean())
        out[f"retrieval_t2i_r{k}"] = 100.0 * float((first_t2i < k).float().mean())
    return out


def random_recall(num_images: int, texts_per_image: Sequence[int], ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
    """Expected recalls (percent) of a uniformly random ranking, exactly."""
    T = sum(texts_per_image)
    out = {}
    for k in ks:
        kk = min(k, T)
        miss = [math.comb(T - p, kk) / math.comb(T, kk) for p in texts_per_image]
        out[f"retrieval_i2t_r{k}_random"] = 100.0 * (1.0 - sum(miss) / len(miss))
        out[f"retrieval_t2i_r{k}_random"] = 100.0 * min(k, num_images) / num_images
    return out
