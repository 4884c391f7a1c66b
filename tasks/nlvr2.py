"""NLVR2 fine-tuning: is a statement true of a pair of images?

Two passes through the backbone, (left image + sentence) and (right image + sentence), run as ONE
forward of 2B samples (the left images stacked over the right ones, the sentence repeated). The
NLVR2 head concatenates each pass's final image CLS and text BOS states (4D) and classifies true /
false with BEiT-3's MLP (``head_style="beit3"``, the default); ``head_style="tanh_pooler"`` puts a
tanh pooler on each of the four vectors first (this project's earlier head). Cross-entropy on ``label`` (1 true, 0 false);
examples labelled -1 (unknown) take no loss.

Evaluation (the test loop, see ``tasks/evaluation.py``; ``mmmoe evaluate nlvr2``, ``evaluate_split``)
writes ``nlvr2_predictions.json`` = [{"identifier", "prediction": "True"|"False"}] and, when the
labelled JSON-lines file of the split is known (``eval_data`` for "val", ``test_data`` for "test"),
scores it with the official definitions: ``nlvr2_accuracy``, ``nlvr2_consistency`` (percent), and
the trivial baselines on the same examples: ``nlvr2_majority_baseline`` (always the majority class
of the training labels) and ``nlvr2_constant_baseline`` (the better of always-True / always-False
on this split, an upper bound for any constant answer).

The training majority class comes from ``train_data`` (the training JSON lines) when given, else
from the labels the module has counted during training (buffer ``train_label_counts``, saved in
checkpoints; under DDP rank 0's counts), else (a module never trained) the split's own majority.

Shape legend: B examples, S sequence (image tokens + text), D width.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mmmoe.models import BackboneOutput, NLVR2Head
from data_pipelines.formats.nlvr2 import load_labels, write_predictions
from tasks.base import MMMoEModule, eval_mode

log = logging.getLogger(__name__)


class NLVR2Module(MMMoEModule):
    """NLVR2: backbone on both images in one 2B forward + ``NLVR2Head``; cross-entropy.

    Takes the arguments of ``MMMoEModule`` (backbone, optim, tokenizer, init_from) and these.

    Args:
        eval_data: labelled NLVR2 JSON lines of the "val" split (e.g. ``DIR/nlvr2/dev.json``).
        test_data: the same for the "test" split (e.g. ``test1.json``), when labelled.
        train_data: training JSON lines, only read for the majority-class baseline.
        head_style: ``"beit3"`` (BEiT-3's head: no poolers, 0.001-scaled init) or ``"tanh_pooler"``
            (a LayerNorm -> Linear -> tanh pooler per pooled vector; checkpoints written before the
            option existed have this head).
        head_init_scale: scale of the head classifier's initial linear weights; None = the style's
            (beit3: 0.001 as BEiT-3, tanh_pooler: 1).
    """

    TASK = "nlvr2"
    RECORD_KEY = "identifier"

    backbone_inputs = ("image_text",)  # image-text pairs only (see MMMoEModule.backbone_inputs)

    def __init__(
        self,
        eval_data: Optional[str] = None,
        test_data: Optional[str] = None,
        train_data: Optional[str] = None,
        head_style: str = "beit3",
        head_init_scale: Optional[float] = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.head = NLVR2Head(self.config.dim, eps=self.config.norm_eps, style=head_style,
                              init_scale=head_init_scale)  # initialises itself
        # [false, true] training labels seen (the majority-class baseline when train_data is not given)
        self.register_buffer("train_label_counts", torch.zeros(2, dtype=torch.long))
        self._finish_init()

    # ------------------------------------------------------------------ forward / loss
    def forward(self, image_left: Tensor, image_right: Tensor, text_ids: Tensor,
                text_pad_mask: Optional[Tensor] = None) -> Tuple[Tensor, BackboneOutput]:
        """True/false logits (B x 2, float32; index 1 = true) and the backbone output of the 2B pass."""
        B = text_ids.shape[0]
        image_2B = torch.cat([image_left, image_right], dim=0)
        ids_2B = torch.cat([text_ids, text_ids], dim=0)
        pad_2B = None if text_pad_mask is None else torch.cat([text_pad_mask, text_pad_mask], dim=0)
        out = self.backbone.forward_features(image=image_2B, text_ids=ids_2B, text_pad_mask=pad_2B)
        h_2BSD = out.hidden
        logits_B2 = self.head(h_2BSD[:B], h_2BSD[B:], out.num_image_tokens)
        return logits_B2.float(), out

    def _step(self, batch: Mapping[str, Any], stage: str) -> Tensor:
        label_B = batch["label"]
        logits_B2, out = self(batch["image_left"], batch["image_right"], batch["text_ids"], batch.get("text_pad_mask"))
        B = logits_B2.shape[0]
        known = label_B >= 0
        if bool(known.any()):
            task_loss = F.cross_entropy(logits_B2, label_B, ignore_index=-1)
            acc = (logits_B2.argmax(-1)[known] == label_B[known]).float().mean()
            self.log(f"{stage}/accuracy", acc, batch_size=int(known.sum()), prog_bar=stage == "val")
        else:  # nothing to learn from this batch; keep the graph connected
            task_loss = logits_B2.sum() * 0.0
        aux = self.moe_loss_and_log(out, "nlvr2", 2 * B)
        self.log(f"{stage}/nlvr2_loss", task_loss.detach(), batch_size=B, prog_bar=stage == "train")
        if stage == "train":
            self.train_label_counts += torch.bincount(label_B[known], minlength=2).to(self.train_label_counts)
        return task_loss + aux

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        self.log("train/loss", loss.detach(), batch_size=batch["label"].shape[0])
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss = self._step(batch, "val")
        self.log("val/loss", loss, batch_size=batch["label"].shape[0])
        return loss

    # ------------------------------------------------------------------ evaluation protocol
    def ground_truth(self, split: str) -> Optional[str]:
        """The labelled JSON-lines file of ``split`` from the hyperparameters (None when unknown)."""
        return self.hparams.get("eval_data" if split == "val" else "test_data")

    def majority_label(self, fallback: Optional[Mapping[str, bool]] = None) -> Tuple[bool, str]:
        """(majority training label, where it came from)."""
        train_data = self.hparams.get("train_data")
        if train_data:
            labels = list(load_labels(train_data).values())
            return sum(labels) * 2 > len(labels), f"train_data {train_data}"
        n_false, n_true = (int(x) for x in self.train_label_counts.tolist())
        if n_false + n_true > 0:
            return n_true > n_false, "labels counted during training"
        if fallback:
            labels = list(fallback.values())
            return sum(labels) * 2 > len(labels), "the evaluated split (the module never trained)"
        return True, "default (no label counts)"

    def check_eval_inputs(self, split: str) -> None:
        gt = self.ground_truth(split)
        if gt is not None and not Path(gt).is_file():
            raise FileNotFoundError(f"NLVR2 data file {gt!r} (labels of the {split} split) does not exist")

    @torch.no_grad()
    def eval_records(self, batch: Mapping[str, Any]) -> List[Dict[str, Any]]:
        """``{"identifier", "prediction": "True"|"False"}`` of every example of the batch."""
        logits_B2, _ = self(batch["image_left"], batch["image_right"], batch["text_ids"], batch.get("text_pad_mask"))
        return [{"identifier": str(ident), "prediction": "True" if p == 1 else "False"}
                for ident, p in zip(batch["identifier"], logits_B2.argmax(-1).tolist())]

    def score_records(self, records: List[Dict[str, Any]], split: str, out: Any) -> Dict[str, float]:
        """Write ``nlvr2_predictions.json``; with the split's labels, the official accuracy and
        consistency and the two trivial baselines (``nlvr2_scores.json``)."""
        gt = self.ground_truth(split)
        write_predictions(out.path("nlvr2_predictions.json"), records)
        metrics: Dict[str, float] = {"nlvr2_num_examples": float(len(records))}
        if gt is None:
            log.info("no labels for the %s split: wrote %s only", split, out.path("nlvr2_predictions.json"))
            return metrics
        from tasks.metrics.nlvr2 import nlvr2_scores

        scores = nlvr2_scores(gt, records)
        labels = load_labels(gt)
        majority, source = self.majority_label(fallback=labels)
        base = nlvr2_scores(gt, {i: majority for i in labels})
        always_true = 100.0 * sum(labels.values()) / len(labels)
        out.json("nlvr2_scores.json", {**scores, "majority_label": majority, "majority_source": source,
                                       "majority_baseline": base["accuracy"]})
        metrics.update(
            nlvr2_accuracy=float(scores["accuracy"]),
            nlvr2_consistency=float(scores["consistency"]),
            nlvr2_majority_baseline=float(base["accuracy"]),
            nlvr2_constant_baseline=float(max(always_true, 100.0 - always_true)),
        )
        return metrics

    @torch.no_grad()
    def predict_one(self, image_path: Union[str, os.PathLike], sentence: str,
                    right_image: Optional[Union[str, os.PathLike]] = None) -> Dict[str, Any]:
        """Is ``sentence`` true of (``image_path``, ``right_image``)? {"sentence", "prediction", "p_true"}."""
        from tasks.inputs import encode_text_batch, load_image

        if right_image is None:
            raise ValueError("predict nlvr2 needs two images: --image LEFT and --right-image RIGHT")
        if not isinstance(sentence, str) or not sentence.strip():
            raise ValueError("predict nlvr2 needs a non-empty --sentence")
        left = load_image(image_path, self.config.image_size).to(self.device)
        right = load_image(right_image, self.config.image_size).to(self.device)
        ids, pad = encode_text_batch(self, [sentence])
        with eval_mode(self):
            logits_12, _ = self(left, right, ids, pad)
        p_true = float(torch.softmax(logits_12, -1)[0, 1])
        return {"sentence": sentence, "prediction": "True" if p_true > 0.5 else "False", "p_true": round(p_true, 4)}
