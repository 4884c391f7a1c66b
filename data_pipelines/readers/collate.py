"""Collation: decoded samples -> batch dicts of tensors (runs in the DataLoader workers; big
tensors are allocated in shared memory there, so handing the batch to the main process copies
nothing). See ``data_pipelines.readers`` for the batch fields and the padding convention."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..masking import IMAGE_MASK_RATIO, MIN_BLOCK_PATCHES, block_masks, mlm_mask, special_ids_of
from ..transforms import Normalizer, normalize_into
from .decode import StreamRandom

def _empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty, in shared memory when called in a DataLoader worker (as default_collate does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).resize_(*shape)


IMAGE_FIELDS = ("image", "image_left", "image_right")


def stack_images(images: Sequence[Union[np.ndarray, torch.Tensor]], normalizer: Optional[Normalizer]) -> torch.Tensor:
    """uint8 images, arrays (H, W, 3) or tensors (3, H, W) -> normalised float32 (B, 3, H, W),
    contiguous.

    With ``normalizer=None``: uint8 (B, 3, H, W), a channel-last view of one (B, H, W, 3) buffer
    (a plain memcpy per image, 1/4 of the bytes to hand over and to move to the GPU); finish with
    ``normalize_images`` after the transfer."""
    first = images[0]
    H, W = first.shape[:2] if isinstance(first, np.ndarray) else first.shape[1:]
    if normalizer is None:
        out_BHWC = _empty((len(images), H, W, 3), torch.uint8)
        out_np = out_BHWC.numpy()
        for i, img in enumerate(images):
            if isinstance(img, np.ndarray):
                out_np[i] = img
            else:
                out_BHWC[i].copy_(img.permute(1, 2, 0))
        return out_BHWC.permute(0, 3, 1, 2)
    out = _empty((len(images), 3, H, W), torch.float32)
    return normalize_into(out, images, normalizer)


def normalize_images(batch: Dict[str, Any], normalizer: Optional[Normalizer] = None) -> Dict[str, Any]:
    """Turn the uint8 image fields of a batch (readers built with ``normalize=False``) into
    normalised float32 (B, 3, H, W) contiguous tensors on the same device, in place; nested batch
    dicts (a CombinedLoader's ``{"image_text": batch, ...}``) are handled too. Meant for
    ``on_after_batch_transfer``: on a GPU the conversion is free and the copy 4x smaller."""
    normalizer = normalizer or Normalizer()
    for name, x in batch.items():
        if isinstance(x, dict):
            normalize_images(x, normalizer)
        elif name in IMAGE_FIELDS and torch.is_tensor(x) and x.dtype == torch.uint8:
            out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
            batch[name] = normalizer(x, out=out)
    return batch


def pad_text(seqs: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists: ids (B, L) long and pad mask (B, L) bool, True = padding."""
    L = length if length is not None else max(len(s) for s in seqs)
    ids_BL = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_BL[i, : len(s)] = torch.as_tensor(s[:L], dtype=torch.long)
    lengths_B = torch.tensor([min(len(s), L) for s in seqs])
    return ids_BL, torch.arange(L).unsqueeze(0) >= lengths_B.unsqueeze(1)


class Collate(StreamRandom):
    """Collation for every reader kind; which fields appear depends on the samples' keys.

    image / image_left / image_right -> stacked normalised float images (uint8 when
    ``normalize=False``, see ``stack_images``); image_mask (block-wise,
    when ``patch_grid`` is set); text -> ``text_prefix``_ids + ``text_prefix``_pad_mask, and
    mlm_labels when ``mlm_ratio`` is set; target (vqa) -> dense soft-score matrix; scalars ->
    long tensors; the rest -> lists.
    """

    def __init__(
        self,
        tokenizer: Any,
        normalizer: Optional[Normalizer] = None,
        patch_grid: Optional[Tuple[int, int]] = None,
        image_mask_ratio: float = IMAGE_MASK_RATIO,
        min_block: int = MIN_BLOCK_PATCHES,
        mlm_ratio: Optional[float] = None,
        text_prefix: str = "text",
        num_answers: Optional[int] = None,
        pad_to: Optional[int] = None,
        normalize: bool = True,
    ):
        self.pad_id = tokenizer.pad_id
        self.mask_id = tokenizer.mask_id if mlm_ratio is not None else None
        self.vocab_size = tokenizer.vocab_size
        self.special_ids = tuple(special_ids_of(tokenizer))
        self.normalizer = (normalizer or Normalizer()) if normalize else None
        self.patch_grid = patch_grid
        self.image_mask_ratio = image_mask_ratio
        self.min_block = min_block
        self.mlm_ratio = mlm_ratio
        self.text_prefix = text_prefix
        self.num_answers = num_answers
        self.pad_to = pad_to

    def __call__(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        first = samples[0]
        batch: Dict[str, Any] = {"key": [s["key"] for s in samples]}
        for name in IMAGE_FIELDS:
            if name in first:
                batch[name] = stack_images([s[name] for s in samples], self.normalizer)
        if "image" in first and self.patch_grid is not None:
            batch["image_mask"] = block_masks(
                len(samples), *self.patch_grid, mask_ratio=self.image_mask_ratio, min_block=self.min_block,
                generator=self.generator,
            )
        if "text" in first:
            ids_BL, pad_BL = pad_text([s["text"] for s in samples], self.pad_id, self.pad_to)
            if self.mlm_ratio is not None:
                ids_BL, batch["mlm_labels"] = mlm_mask(
                    ids_BL, self.mlm_ratio, self.mask_id, self.vocab_size, self.special_ids, generator=self.generator
                )
            batch[f"{self.text_prefix}_ids"] = ids_BL
            batch[f"{self.text_prefix}_pad_mask"] = pad_BL
        if "target" in first:
            target_BA = torch.zeros(len(samples), self.num_answers)
            for i, s in enumerate(samples):
                for a, score in s["target"].items():
                    target_BA[i, a] = score
            batch["vqa_targets"] = target_BA
        for name in ("question_id", "image_id", "label"):
            if name in first:
                batch[name] = torch.tensor([s[name] for s in samples], dtype=torch.long)
        for name in ("answers", "identifier", "captions", "lang", "source"):  # source: data_pipelines.mixing
            if name in first:
                batch[name] = [s[name] for s in samples]
        return batch
