"""VQAv2 fine-tuning: image + question through the backbone, answer classification over a vocabulary.

The image and the question go through the backbone together (bidirectional attention); the VQA head
pools the first token (the image CLS) and classifies it over the answer vocabulary (BEiT-3: pooler,
then Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, A)). Prediction = the argmax answer.

Targets are the official soft scores: an answer given by n of the 10 annotators scores min(1, n/3)
after the official answer normalisation (``data_pipelines.formats.vqa.normalize_answer``). They are computed
here from the raw ``answers`` of the batch, so they are right whatever the data module did with the
answer strings; a batch without ``answers`` falls back to its ``vqa_targets``.

Loss (``loss_reduction``): ``"beit3"`` (default) = BCE-with-logits averaged over batch and answers,
times the number of answers (what BEiT-3 does: the sum over answers, averaged over the batch, so the
gradient does not shrink with a larger vocabulary); ``"mean"`` = the plain mean.

Answer vocabulary (``answer_vocab``): a list of answers (index = position) or the path of a JSON file
holding such a list (or an ``{answer: index}`` object, the format ``VQADataModule`` also reads). A
missing file is built from ``train_annotations`` with ``data_pipelines.formats.vqa.build_answer_vocab``
(answers given as ``multiple_choice_answer`` at least ``min_answer_freq`` times; frequency-sorted)
and written there, so the data module (which reads the same path) finds it. The module keeps the
list itself in its hyperparameters: a checkpoint needs no vocabulary file.

Evaluation (the test loop, see ``tasks/evaluation.py``; ``mmmoe evaluate vqa``, ``evaluate_split``)
writes ``vqa_results.json`` = [{"question_id", "answer"}] and, when the ground truth of the split is
known (``eval_questions`` + ``eval_annotations`` for "val", ``test_questions`` + ``test_annotations``
for "test"), scores it with the official metric and returns ``vqa_accuracy`` (percent),
``vqa_accuracy_<answer type>``, ``vqa_majority_baseline`` (always answering the most common training
answer, ``majority_answer``) and ``vqa_num_questions``. ``predict_one(image_path, question)`` answers
one question about one image file.

Shape legend: B batch, L question tokens, S sequence (image tokens + L), D width, A answers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from data_pipelines.formats.vqa import (  # noqa: F401 - read_answer_vocab: still importable from here
    answers_from,
    build_answer_vocab,
    normalize_answer,
    read_answer_vocab,
    write_answer_vocab,
    write_results,
)
from mmmoe.models import BackboneOutput, MultiwayTransformer, VQAHead
from tasks.base import MMMoEModule, eval_mode

log = logging.getLogger(__name__)

LOSS_REDUCTIONS = ("beit3", "mean")


# ------------------------------------------------------------------------------ answer vocabulary
def ensure_answer_vocab(
    path: Union[str, os.PathLike],
    annotations: Optional[Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]] = None,
    min_freq: int = 9,
) -> List[str]:
    """The answer vocabulary at ``path``; when the file is missing, built from ``annotations`` (one
    or several VQA annotation files) and written there (atomically, as a JSON list)."""
    p = Path(path)
    if p.is_file():
        return read_answer_vocab(p)
    if annotations is None:
        raise FileNotFoundError(
            f"answer vocabulary {str(p)!r} does not exist; give the training annotations "
            "(train_annotations) to build it, or write it with tasks.vqa.ensure_answer_vocab"
        )
    answers = build_answer_vocab(_as_list(annotations), min_freq=min_freq)
    if not answers:
        raise ValueError(f"no answer of {annotations} occurs min_answer_freq={min_freq} times; lower it")
    write_answer_vocab(p, answers)
    log.info("wrote answer vocabulary of %d answers (min freq %d) to %s", len(answers), min_freq, p)
    return answers


def majority_training_answer(annotations: Any) -> str:
    """The most common normalised ``multiple_choice_answer`` (ties: alphabetical first)."""
    answers = build_answer_vocab(_as_list(annotations), min_freq=1)
    if not answers:
        raise ValueError(f"{annotations}: no answers")
    return answers[0]


def _as_list(x: Any) -> List[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


# ------------------------------------------------------------------------------ the module
class VQAModule(MMMoEModule):
    """VQAv2: backbone + ``VQAHead``; BCE against soft scores.

    Takes the arguments of ``MMMoEModule`` (backbone, optim, tokenizer, init_from) and these.

    Args:
        answer_vocab: list of answers or a JSON file path (built from ``train_annotations`` if missing).
        train_annotations: training annotation file(s): build the vocabulary and find the majority answer.
        min_answer_freq: minimum frequency of an answer to enter a built vocabulary (VQAv2: 9).
        majority_answer: the trivial baseline's answer; default: most common training answer
            (from ``train_annotations``, else the first = most frequent vocabulary entry).
        loss_reduction: ``"beit3"`` (BCE mean x num_answers) or ``"mean"``.
        eval_questions, eval_annotations: ground truth of the "val" split (official JSON files).
        test_questions, test_annotations: ground truth of the "test" split (usually unknown).
    """

    TASK = "vqa"
    RECORD_KEY = "question_id"

    backbone_inputs = ("image_text",)  # image-text pairs only (see MMMoEModule.backbone_inputs)

    def __init__(
        self,
        answer_vocab: Union[str, List[str]],
        train_annotations: Optional[Union[str, List[str]]] = None,
        min_answer_freq: int = 9,
        majority_answer: Optional[str] = None,
        loss_reduction: str = "beit3",
        eval_questions: Optional[str] = None,
        eval_annotations: Optional[str] = None,
        test_questions: Optional[str] = None,
        test_annotations: Optional[str] = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction={loss_reduction!r} is invalid: allowed {', '.join(LOSS_REDUCTIONS)}")
        if isinstance(answer_vocab, (str, os.PathLike)):
            answers = ensure_answer_vocab(answer_vocab, train_annotations, min_answer_freq)
        else:
            answers = answers_from(answer_vocab)
        if majority_answer is None:
            majority_answer = majority_training_answer(train_annotations) if train_annotations else answers[0]
        self.answers: List[str] = answers
        self.answer_index: Dict[str, int] = {a: i for i, a in enumerate(answers)}
        # the checkpoint carries the vocabulary and baseline answer themselves (plain types)
        self.hparams["answer_vocab"] = list(answers)
        self.hparams["majority_answer"] = majority_answer
        self.head = VQAHead(self.config.dim, len(answers), eps=self.config.norm_eps)
        self.head.apply(MultiwayTransformer._init_weights)
        self._finish_init()

    @property
    def num_answers(self) -> int:
        return len(self.answers)

    # ------------------------------------------------------------------ forward / loss
    def forward(self, image: Tensor, text_ids: Tensor,
                text_pad_mask: Optional[Tensor] = None) -> Tuple[Tensor, BackboneOutput]:
        """Answer logits (B x A, float32) and the backbone output."""
        out = self.backbone.forward_features(image=image, text_ids=text_ids, text_pad_mask=text_pad_mask)
        return self.head(out.hidden).float(), out

    def targets(self, batch: Mapping[str, Any]) -> Tensor:
        """B x A soft scores min(1, n/3) of the normalised human answers (official targets): the
        data module's ``vqa_targets`` (built in the loader workers), else made from ``answers``."""
        if "vqa_targets" in batch:
            t = batch["vqa_targets"]
            if t.shape[-1] != self.num_answers:
                raise ValueError(f"vqa_targets has {t.shape[-1]} answers, the model {self.num_answers}: "
                                 "the data module and the model use different answer vocabularies")
            return t.float()
        answers = batch.get("answers")
        if answers is None:
            raise KeyError("a VQA training batch needs 'answers' or 'vqa_targets'")
        from data_pipelines.readers import vqa_soft_scores

        t_BA = torch.zeros(len(answers), self.num_answers)
        for i, human in enumerate(answers):
            for a, score in vqa_soft_scores(human, self.answer_index, normalize_answer).items():
                t_BA[i, a] = score
        return t_BA.to(self.device)

    def loss(self, logits_BA: Tensor, targets_BA: Tensor) -> Tensor:
        bce = F.binary_cross_entropy_with_logits(logits_BA, targets_BA, reduction="mean")
        return bce * self.num_answers if self.hparams.loss_reduction == "beit3" else bce

    def _step(self, batch: Mapping[str, Any], stage: str) -> Tensor:
        logits_BA, out = self(batch["image"], batch["text_ids"], batch.get("text_pad_mask"))
        targets_BA = self.targets(batch)
        B = logits_BA.shape[0]
        task_loss = self.loss(logits_BA, targets_BA)
        aux = self.moe_loss_and_log(out, "vqa", B)
        # VQA score of the argmax answer against the soft targets (the usual training-time metric)
        score = targets_BA.gather(1, logits_BA.argmax(-1, keepdim=True)).mean()
        self.log(f"{stage}/vqa_loss", task_loss.detach(), batch_size=B, prog_bar=stage == "train")
        self.log(f"{stage}/vqa_score", score, batch_size=B, prog_bar=stage == "val")
        return task_loss + aux

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        self.log("train/loss", loss.detach(), batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss = self._step(batch, "val")
        self.log("val/loss", loss, batch_size=batch["image"].shape[0])
        return loss

    # ------------------------------------------------------------------ evaluation protocol
    def eval_data_overrides(self) -> Dict[str, Any]:
        """The data module gets this module's vocabulary at evaluation (no vocabulary file needed)."""
        return {"answer_vocab": list(self.answers)}

    @torch.no_grad()
    def predict_batch(self, batch: Mapping[str, Any], top_k: int = 1) -> Tuple[Tensor, Tensor]:
        """(scores, indices), each B x top_k: sigmoid scores of the best answers."""
        logits_BA, _ = self(batch["image"], batch["text_ids"], batch.get("text_pad_mask"))
        return torch.sigmoid(logits_BA).topk(min(top_k, self.num_answers), dim=-1)

    def ground_truth(self, split: str) -> Tuple[Optional[str], Optional[str]]:
        """(questions, annotations) files of ``split`` from the hyperparameters (None when unknown)."""
        prefix = "eval" if split == "val" else "test"
        q, a = self.hparams.get(f"{prefix}_questions"), self.hparams.get(f"{prefix}_annotations")
        if (q is None) != (a is None):
            raise ValueError(f"VQA scoring of the {split} split needs both {prefix}_questions and "
                             f"{prefix}_annotations (got only {'questions' if a is None else 'annotations'})")
        return q, a

    def check_eval_inputs(self, split: str) -> None:
        for what, path in zip(("questions", "annotations"), self.ground_truth(split)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"VQA {what} file {path!r} (ground truth of the {split} split) does not exist")

    def eval_records(self, batch: Mapping[str, Any]) -> List[Dict[str, Any]]:
        """``{"question_id", "answer"}`` of every question of the batch (the official result entry)."""
        _, idx_B1 = self.predict_batch(batch, top_k=1)
        return [{"question_id": int(qid), "answer": self.answers[i]}
                for qid, i in zip(batch["question_id"].tolist(), idx_B1[:, 0].tolist())]

    def score_records(self, records: List[Dict[str, Any]], split: str, out: Any) -> Dict[str, float]:
        """Write ``vqa_results.json``; with the split's ground truth, score it with the official VQA
        accuracy (per answer type) and the majority-answer baseline (``vqa_scores.json``)."""
        questions, annotations = self.ground_truth(split)
        write_results(out.path("vqa_results.json"), records)
        metrics: Dict[str, float] = {"vqa_num_questions": float(len(records))}
        if questions is None:
            log.info("no ground truth for the %s split: wrote %s only", split, out.path("vqa_results.json"))
            return metrics
        from tasks.metrics.vqa import vqa_accuracy

        scores = vqa_accuracy(questions, annotations, records)
        majority = self.hparams.majority_answer
        baseline = vqa_accuracy(questions, annotations,
                                [{"question_id": r["question_id"], "answer": majority} for r in records])
        out.json("vqa_scores.json", {k: v for k, v in scores.items() if k != "perQuestion"}
                 | {"majority_answer": majority, "majority_baseline": baseline["overall"]})
        metrics["vqa_accuracy"] = float(scores["overall"])
        for atype, acc in sorted(scores["perAnswerType"].items()):
            metrics[f"vqa_accuracy_{atype.replace('/', '_')}"] = float(acc)
        metrics["vqa_majority_baseline"] = float(baseline["overall"])
        return metrics

    @torch.no_grad()
    def predict_one(self, image_path: Union[str, os.PathLike], question: str, top_k: int = 5) -> Dict[str, Any]:
        """Answer ``question`` about the image file: {"question", "answer", "score", "top": [{"answer", "score"}]}."""
        from tasks.inputs import encode_text_batch, load_image

        if not isinstance(question, str) or not question.strip():
            raise ValueError("predict vqa needs a non-empty --question")
        image = load_image(image_path, self.config.image_size).to(self.device)
        ids, pad = encode_text_batch(self, [question])
        with eval_mode(self):
            scores_1K, idx_1K = self.predict_batch({"image": image, "text_ids": ids, "text_pad_mask": pad}, top_k)
        top = [{"answer": self.answers[i], "score": round(float(s), 4)}
               for s, i in zip(scores_1K[0].tolist(), idx_1K[0].tolist())]
        return {"question": question, "answer": top[0]["answer"], "score": top[0]["score"], "top": top}
