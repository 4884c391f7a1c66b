"""Losses shared by several task modules.

``masked_token_loss``: cross-entropy of a token head on the labelled positions only (labels !=
``data_pipelines.masking.IGNORE_INDEX``, -100), the loss of masked language modelling (pretraining's
image-text and text MLM, ``tasks.lm``'s masked LM) and of next-token prediction (causal LM,
captioning). Only the labelled positions go through the head: with 15% masking that is a sixth of
the vocabulary projection's work.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor

from data_pipelines.masking import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "masked_token_loss"]


def masked_token_loss(
    head: Callable[[Tensor], Tensor], hidden_BLD: Tensor, labels_BL: Tensor, label_smoothing: float = 0.0
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """Mean cross-entropy of ``head(hidden)`` against ``labels_BL`` over the positions whose label is
    not IGNORE_INDEX (computed in float32).

    Returns ``(loss, logits_NV, targets_N, sel_BL)``: the loss, the float32 logits and targets of the
    N labelled positions and their (B, L) mask. With no labelled position the loss is a zero that
    keeps the graph (``0 * hidden.sum()``, so every rank still runs backward) and ``logits_NV`` is None.
    """
    sel_BL = labels_BL != IGNORE_INDEX
    targets_N = labels_BL[sel_BL]
    if targets_N.numel() == 0:
        return hidden_BLD.sum() * 0.0, None, targets_N, sel_BL
    logits_NV = head(hidden_BLD[sel_BL]).float()
    loss = F.cross_entropy(logits_NV, targets_N, label_smoothing=label_smoothing)
    return loss, logits_NV, targets_N, sel_BL
