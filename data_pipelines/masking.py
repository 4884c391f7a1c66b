"""Masks for masked image-text pretraining: block-wise patch masks (MIM) and token masks (MLM).

Block masking follows the recipe of BEiT: rectangles of at least ``min_block`` patches with a
log-uniform aspect ratio are placed at random until the target is nearly reached; the remainder is
then grown from the edges of the masked region, so the result holds *exactly*
``round(mask_ratio * H * W)`` masked patches and stays made of a few compact blobs.

Token masking is BERT's: a share of the maskable tokens is chosen; of those, 80% become ``mask_id``,
10% a random ordinary token, 10% stay as they are. The loss is computed on the chosen ones only
(``labels`` holds -100 elsewhere, the ignore index of ``torch.nn.functional.cross_entropy``).

Shapes: B batch, L sequence length, H x W patch grid.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

# BEiT-3 recipe (see shared/reference/MULTIMODAL.md)
TEXT_ONLY_MASK_RATIO = 0.15
IMAGE_TEXT_MASK_RATIO = 0.5
IMAGE_MASK_RATIO = 0.4
MIN_BLOCK_PATCHES = 16
BLOCK_ASPECT = (0.3, 1 / 0.3)
IGNORE_INDEX = -100

_ATTEMPTS_PER_BLOCK = 10


def block_mask(
    num_patches_h: int,
    num_patches_w: int,
    mask_ratio: float = IMAGE_MASK_RATIO,
    min_block: int = MIN_BLOCK_PATCHES,
    aspect: Tuple[float, float] = BLOCK_ASPECT,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Block-wise mask of an H x W patch grid; returns a bool tensor (H, W), True = masked.

    1. Place rectangles: area uniform in [min_block, remaining], aspect ratio (height / width)
       log-uniform in ``aspect``, sides rounded up (so every rectangle covers >= min_block
       patches; one whose rounded sides leave ``aspect`` counts as a failed try), random
       position. A rectangle is kept when it masks at least one new patch and no more than
       the remaining budget; after ``10`` failed tries in a row the placement stops.
    2. Top up: the patches still missing are taken from the unmasked neighbours of the masked
       region (random order), so the blobs grow instead of scattering single patches.
    The count is always exactly ``round(mask_ratio * H * W)``.
    """
    return block_mask_and_blocks(num_patches_h, num_patches_w, mask_ratio, min_block, aspect, generator)[0]


def block_mask_and_blocks(
    num_patches_h: int,
    num_patches_w: int,
    mask_ratio: float = IMAGE_MASK_RATIO,
    min_block: int = MIN_BLOCK_PATCHES,
    aspect: Tuple[float, float] = BLOCK_ASPECT,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, List[Tuple[int, int, int, int]]]:
    """``block_mask`` plus the rectangles it placed, as (top, left, height, width); the top-up
    patches are the mask minus the union of the rectangles."""
    if num_patches_h <= 0 or num_patches_w <= 0:
        raise ValueError(f"patch grid must be positive, got {num_patches_h} x {num_patches_w}")
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    if min_block < 1:
        raise ValueError(f"min_block must be >= 1, got {min_block}")
    lo, hi = aspect
    if not 0 < lo <= hi:
        raise ValueError(f"aspect must be (low, high) with 0 < low <= high, got {aspect}")
    H, W = num_patches_h, num_patches_w
    N = H * W
    target = int(round(mask_ratio * N))
    mask_HW = np.zeros((H, W), dtype=bool)
    if target == 0:
        return torch.from_numpy(mask_HW), []
    if target == N:
        return torch.ones(H, W, dtype=torch.bool), [(0, 0, H, W)]

    # One draw from the generator per call: uniforms for the placement tries, and a score per
    # patch that orders the top-up. Python floats keep the loop cheap (~tens of microseconds).
    max_tries = _ATTEMPTS_PER_BLOCK * (target // min_block + 2)
    u = torch.rand(max_tries * 4 + N, generator=generator, dtype=torch.float64).numpy()
    tries_U4 = u[: max_tries * 4].reshape(max_tries, 4).tolist()
    score_HW = u[max_tries * 4 :].reshape(H, W)

    log_lo, log_hi = math.log(lo), math.log(hi)
    count, failures = 0, 0
    blocks: List[Tuple[int, int, int, int]] = []
    for ua, ur, ut, ul in tries_U4:
        remaining = target - count
        if remaining < min_block or failures >= _ATTEMPTS_PER_BLOCK:
            break
        area = min_block + ua * (remaining - min_block)
        ratio = math.exp(log_lo + ur * (log_hi - log_lo))
        h = math.ceil(math.sqrt(area * ratio))
        w = math.ceil(math.sqrt(area / ratio))
        if h > H or w > W or not lo <= h / w <= hi:
            failures += 1
            continue
        top = int(ut * (H - h + 1))
        left = int(ul * (W - w + 1))
        window = mask_HW[top : top + h, left : left + w]
        new = h * w - int(window.sum())
        if 0 < new <= remaining:
            window[...] = True
            blocks.append((top, left, h, w))
            count += new
            failures = 0
        else:
            failures += 1

    if count < target:
        _grow(mask_HW, target - count, score_HW)
    elif count > target:  # cannot happen with the rule above; kept so the contract never breaks
        _trim(mask_HW, count - target, score_HW)
    return torch.from_numpy(mask_HW), blocks


def _grow(mask_HW: np.ndarray, need: int, score_HW: np.ndarray) -> None:
    """Mask ``need`` more patches, taken from the 4-neighbour frontier of the masked region."""
    if not mask_HW.any():  # nothing to grow from: start at the lowest-scored patch
        mask_HW.flat[int(np.argmin(score_HW))] = True
        need -= 1
    while need > 0:
        grown = mask_HW.copy()
        grown[1:, :] |= mask_HW[:-1, :]
        grown[:-1, :] |= mask_HW[1:, :]
        grown[:, 1:] |= mask_HW[:, :-1]
        grown[:, :-1] |= mask_HW[:, 1:]
        frontier = np.flatnonzero(grown & ~mask_HW)
        if frontier.size > need:
            frontier = frontier[np.argsort(score_HW.flat[frontier], kind="stable")[:need]]
        mask_HW.flat[frontier] = True
        need -= frontier.size


def _trim(mask_HW: np.ndarray, extra: int, score_HW: np.ndarray) -> None:
    """Unmask ``extra`` masked patches (highest scores first)."""
    masked = np.flatnonzero(mask_HW)
    drop = masked[np.argsort(-score_HW.flat[masked], kind="stable")[:extra]]
    mask_HW.flat[drop] = False


def block_masks(
    batch: int,
    num_patches_h: int,
    num_patches_w: int,
    mask_ratio: float = IMAGE_MASK_RATIO,
    min_block: int = MIN_BLOCK_PATCHES,
    aspect: Tuple[float, float] = BLOCK_ASPECT,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``batch`` independent block masks stacked: bool (B, H, W)."""
    if batch == 0:
        return torch.zeros(0, num_patches_h, num_patches_w, dtype=torch.bool)
    masks = [block_mask(num_patches_h, num_patches_w, mask_ratio, min_block, aspect, generator) for _ in range(batch)]
    return torch.stack(masks)


def mlm_mask(
    ids: torch.Tensor,
    mask_ratio: float,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking of token ids (L,) or (B, L); returns ``(input_ids, labels)``.

    Per sequence, ``max(1, round(mask_ratio * n))`` of its n maskable tokens are chosen (none when
    n = 0); tokens in ``special_ids`` (pad, bos, eos, mask, ...) are never chosen. Of the chosen:
    80% -> ``mask_id``, 10% -> a random id from ``[0, vocab_size)`` minus the special ids, 10% kept.
    ``labels`` holds the original id at chosen positions and -100 elsewhere.
    """
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    squeeze = ids.dim() == 1
    ids_BL = ids.unsqueeze(0) if squeeze else ids
    if ids_BL.dim() != 2:
        raise ValueError(f"ids must be (L,) or (B, L), got shape {tuple(ids.shape)}")
    ids_BL = ids_BL.long()
    B, L = ids_BL.shape
    special = torch.tensor(sorted(set(int(i) for i in special_ids)), dtype=torch.long)
    maskable_BL = ~torch.isin(ids_BL, special)

    n_B = maskable_BL.sum(dim=1)
    k_B = torch.round(n_B.double() * mask_ratio).long()
    if mask_ratio > 0.0:
        k_B = torch.where(n_B > 0, k_B.clamp(min=1), k_B)
    # Choose k random maskable positions per row: random scores, non-maskable pushed last.
    score_BL = torch.rand(B, L, generator=generator)
    score_BL = score_BL.masked_fill(~maskable_BL, 2.0)
    rank_BL = score_BL.argsort(dim=1).argsort(dim=1)
    chosen_BL = (rank_BL < k_B.unsqueeze(1)) & maskable_BL

    labels_BL = torch.full_like(ids_BL, IGNORE_INDEX)
    labels_BL[chosen_BL] = ids_BL[chosen_BL]

    action_BL = torch.rand(B, L, generator=generator)
    to_mask = chosen_BL & (action_BL < 0.8)
    to_random = chosen_BL & (action_BL >= 0.8) & (action_BL < 0.9)
    input_BL = ids_BL.clone()
    input_BL[to_mask] = mask_id
    n_random = int(to_random.sum())
    if n_random:
        ordinary = _ordinary_ids(vocab_size, tuple(special.tolist()))
        pick = torch.randint(0, ordinary.numel(), (n_random,), generator=generator)
        input_BL[to_random] = ordinary[pick]
    if squeeze:
        return input_BL[0], labels_BL[0]
    return input_BL, labels_BL


@functools.lru_cache(maxsize=8)
def _ordinary_ids(vocab_size: int, special: Tuple[int, ...]) -> torch.Tensor:
    ids = torch.arange(vocab_size)
    ordinary = ids[~torch.isin(ids, torch.tensor(special, dtype=torch.long))]
    if ordinary.numel() == 0:
        raise ValueError("vocab has no ordinary (non-special) token to draw random replacements from")
    return ordinary


def special_ids_of(tokenizer: object) -> Sequence[int]:
    """The ids a tokenizer marks as special (pad, bos, eos, mask, and unk when present)."""
    ids = []
    for name in ("pad_id", "bos_id", "eos_id", "mask_id", "unk_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and value >= 0:
            ids.append(value)
    return ids
