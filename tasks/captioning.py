"""COCO captioning: a prefix LM over the image, decoded with beam search and scored with CIDEr.

Model: the backbone with ``attn_mode="prefix_causal"`` (image tokens attend among themselves, text
tokens to the whole image and causally to earlier text) and a ``TokenHead`` (tied to the token
embedding by default). Training is next-token prediction on ``[bos] + caption + [eos]`` (BEiT-3
fine-tunes with masked LM on the caption instead; next-token is the simpler equivalent),
optionally with label smoothing (BEiT-3: 0.1).

Decoding (``mmmoe.generation``): beam search with the key/value cache, by default BEiT-3's settings
(beam 3, length penalty 0.6 as ``score / length ** 0.6``, at most 32 tokens); ``beam_size=1`` is
greedy search.

Evaluation (the test loop, see ``tasks/evaluation.py``; ``mmmoe evaluate caption``,
``evaluate_split``): decode every image of the split once, write
``caption_results.json`` = ``[{"image_id": int, "caption": str}]`` (the official COCO results
format), score it with ``tasks.metrics.caption`` (pycocoevalcap: PTB tokenizer, BLEU-1..4, METEOR,
ROUGE-L, CIDEr-D; raw values, CIDEr 1.336 = "133.6" in papers). The references are the Karpathy
split ``eval_split`` (loader "test") or "val" (loader "val") of ``eval_coco`` (dataset_coco.json)
when given, else the reference captions carried by the shards themselves.

Baselines (constant captions: the same caption for every image, scored against the same
references with the same tokenizer; training captions = Karpathy train + restval of ``eval_coco``,
or the data module's train split):

* ``caption_baseline_cider``: the most frequent training caption (exact string; ties go to the
  first seen). Cheap and fixed, but weak when captions rarely repeat (the built-in data).
* ``caption_baseline_consensus_cider``: a "consensus" caption chosen on training data only: of the
  most frequent caption and 24 other training captions drawn at random (seed 0), the one with the
  best CIDEr-D on up to 100 training images (drawn with seed 0). Generic captions score well under
  CIDEr-D on data whose captions share most n-grams; a model has to beat this one to show that
  it reads the image. Both, with their captions, go to ``caption_baselines.json``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from mmmoe.generation import GenerationOutput, PENALTY_STYLES, generate, strip_special
from mmmoe.models import TokenHead
from data_pipelines.formats.captions import coco_captions, load_references, write_caption_results
from tasks.base import MMMoEModule, eval_mode
from tasks.evaluation import split_loader, unique_sorted
from tasks.lm import next_token_labels, token_losses

log = logging.getLogger(__name__)

RESULTS_FILE = "caption_results.json"
CONSENSUS_IMAGES = 100
CONSENSUS_CANDIDATES = 25
METRIC_NAMES = {"Bleu_1": "caption_bleu1", "Bleu_2": "caption_bleu2", "Bleu_3": "caption_bleu3",
                "Bleu_4": "caption_bleu4", "METEOR": "caption_meteor", "ROUGE_L": "caption_rouge_l",
                "CIDEr": "caption_cider", "SPICE": "caption_spice"}


# ------------------------------------------------------------------------------ scoring helpers
def most_frequent_caption(captions: List[str]) -> str:
    """The most frequent string (ties: the first seen)."""
    if not captions:
        raise ValueError("no training captions to choose a constant baseline caption from")
    return Counter(captions).most_common(1)[0][0]


def karpathy_references(coco_file: str, splits: Tuple[str, ...] = ("train", "restval")) -> Dict[int, List[str]]:
    """``{image id: raw captions}`` of the images of ``splits`` of a Karpathy dataset_coco.json."""
    refs: Dict[int, List[str]] = {}
    for split in splits:
        try:
            refs.update(load_references(coco_file, split))
        except ValueError:  # a split with no images (restval is often empty)
            continue
    return refs


def references_from_batches(refs: Dict[int, List[str]]) -> Dict[str, Any]:
    """COCO-format ground truth from the reference captions carried by the caption shards."""
    return coco_captions((image_id, [(cap, None) for cap in caps]) for image_id, caps in refs.items())


def constant_baselines(
    eval_refs: Dict[int, List[str]],
    train_refs: Dict[int, List[str]],
    max_images: int = CONSENSUS_IMAGES,
    max_candidates: int = CONSENSUS_CANDIDATES,
    seed: int = 0,
) -> Dict[str, Any]:
    """The two constant-caption baselines (see the module docstring), scored on ``eval_refs``.

    Returns ``{"frequent": (caption, cider), "consensus": (caption, cider, train_cider)}``. One
    PTB tokenizer call (Java) for everything; CIDEr-D from pycocoevalcap."""
    from pycocoevalcap.cider.cider import Cider

    from tasks.metrics.caption import ptb_tokenize

    frequent = most_frequent_caption([c for caps in train_refs.values() for c in caps])
    rng = random.Random(seed)
    image_ids = sorted(train_refs)
    if len(image_ids) > max_images:
        image_ids = sorted(rng.sample(image_ids, max_images))
    pool = sorted({c for caps in train_refs.values() for c in caps} - {frequent})
    candidates = [frequent] + (rng.sample(pool, max_candidates - 1) if len(pool) >= max_candidates else pool)
    request: Dict[Any, List[str]] = {("eval", i): refs for i, refs in eval_refs.items()}
    request.update({("train", i): train_refs[i] for i in image_ids})
    request.update({("cand", j): [c] for j, c in enumerate(candidates)})
    tok = ptb_tokenize(request)

    def cider(refs_ids: List[Any], kind: str, j: int) -> float:
        gts = {i: tok[(kind, i)] for i in refs_ids}
        return float(Cider().compute_score(gts, {i: tok[("cand", j)] for i in refs_ids})[0])

    on_train = [cider(image_ids, "train", j) for j in range(len(candidates))]
    best = max(range(len(candidates)), key=lambda j: (on_train[j], -j))
    eval_ids = list(eval_refs)
    return {
        "frequent": (frequent, cider(eval_ids, "eval", 0)),
        "consensus": (candidates[best], cider(eval_ids, "eval", best), on_train[best]),
    }


def quick_scores(references: Dict[int, List[str]], captions: Dict[int, str]) -> Dict[str, float]:
    """CIDEr-D and BLEU-4 only (one PTB tokenizer call, no METEOR): for validation during training."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from tasks.metrics.caption import ptb_tokenize

    if not captions:
        raise ValueError("no validation captions to score (do the val images have references?)")
    request: Dict[Any, List[str]] = {("ref", i): references[i] for i in captions}
    request.update({("res", i): [c] for i, c in captions.items()})
    tok = ptb_tokenize(request)
    gts = {i: tok[("ref", i)] for i in captions}
    res = {i: tok[("res", i)] for i in captions}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length ratio
        bleu, _ = Bleu(4).compute_score(gts, res)
    return {"CIDEr": float(Cider().compute_score(gts, res)[0]), "Bleu_4": float(bleu[3])}


def score_results(
    results: List[Dict[str, Any]],
    batch_refs: Dict[int, List[str]],
    coco_file: Optional[str],
    split: str,
    train_refs: Optional[Dict[int, List[str]]] = None,
) -> Tuple[Dict[str, float], Dict[str, Any]]:
    """Official caption metrics of ``results`` (+ the constant-caption baselines when
    ``train_refs`` is given) as flat floats, and the baseline details."""
    from tasks.metrics.caption import caption_scores

    gt: Any = coco_file if coco_file else references_from_batches(batch_refs)
    scores = caption_scores(gt, results, split=split, allow_subset=True)
    out = {METRIC_NAMES[k]: float(v) for k, v in scores.items() if k in METRIC_NAMES}
    out["caption_num_images"] = float(scores["num_images"])
    if coco_file:
        all_refs = load_references(coco_file, split)
        if len(results) < len(all_refs):
            log.warning("captions for %d of the %d images of split %r of %s: scored on those only",
                        len(results), len(all_refs), split, coco_file)
        refs = {r["image_id"]: all_refs[r["image_id"]] for r in results}
    else:
        refs = {r["image_id"]: batch_refs[r["image_id"]] for r in results}
    details: Dict[str, Any] = {}
    if train_refs:
        base = constant_baselines(refs, train_refs)
        out["caption_baseline_cider"] = base["frequent"][1]
        out["caption_baseline_consensus_cider"] = base["consensus"][1]
        details = {
            "frequent": {"caption": base["frequent"][0], "cider": base["frequent"][1],
                         "rule": "the most frequent training caption, for every image"},
            "consensus": {"caption": base["consensus"][0], "cider": base["consensus"][1],
                          "train_cider": base["consensus"][2],
                          "rule": f"of the most frequent and {CONSENSUS_CANDIDATES - 1} random training captions "
                                  f"(seed 0), the one with the best CIDEr-D on up to {CONSENSUS_IMAGES} "
                                  "training images, for every image"},
        }
    return out, details


def _number(value: Any, kind: type, name: str) -> Any:
    """A decoding option given as a number or a numeric string (command lines pass strings)."""
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if kind is int and out != float(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return out


# ------------------------------------------------------------------------------ the module
class CaptionModule(MMMoEModule):
    """Image captioning (COCO Karpathy splits) on the multiway backbone.

    Takes the arguments of ``MMMoEModule`` (backbone, optim, tokenizer, init_from) and these.

    Args:
        tie_embeddings: the output projection shares the token embedding.
        label_smoothing: of the training loss (BEiT-3: 0.1); the validation loss has none.
        beam_size, max_len, length_penalty, length_penalty_style: decoding defaults (BEiT-3: 3,
            32, 0.6, "power" = score / length ** alpha; "gnmt" = score / ((5 + length) / 6) ** alpha).
            ``max_len`` counts generated tokens (EOS included) and is capped by the model's
            ``max_text_len``.
        eval_coco: Karpathy dataset_coco.json for the references (None: the shards' captions).
        eval_split: the Karpathy split the "test" loader holds (default "test").
        cider_every_n_epochs: decode the validation images and log ``val/cider`` and
            ``val/bleu4`` every N epochs (0 = never; PTB tokenizer in Java, about a second; no
            METEOR). References: the Karpathy "val" split of eval_coco, else the shards' captions.
    """

    TASK = "caption"
    RECORD_KEY = "image_id"

    backbone_inputs = ("image_text",)  # image-text pairs only (see MMMoEModule.backbone_inputs)

    def __init__(
        self,
        tie_embeddings: bool = True,
        label_smoothing: float = 0.1,
        beam_size: int = 3,
        max_len: int = 32,
        length_penalty: float = 0.6,
        length_penalty_style: str = "power",
        eval_coco: Optional[str] = None,
        eval_split: str = "test",
        cider_every_n_epochs: int = 0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
            raise ValueError(f"beam_size must be a positive integer, got {beam_size!r}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        if length_penalty_style not in PENALTY_STYLES:
            raise ValueError(f"length_penalty_style={length_penalty_style!r} is invalid: allowed {', '.join(PENALTY_STYLES)}")
        if eval_coco is not None and not Path(eval_coco).is_file():
            raise FileNotFoundError(f"eval_coco {eval_coco!r} does not exist (the Karpathy dataset_coco.json)")
        c = self.config
        tied = self.backbone.text_embed.token_embed if tie_embeddings else None
        self.head = TokenHead(c.dim, c.vocab_size, tied=tied, eps=c.norm_eps)
        self._tokenizer: Any = None
        self._val_results: List[Dict[str, Any]] = []
        self._val_refs: Dict[int, List[str]] = {}
        self._finish_init()

    # ------------------------------------------------------------------ tokenizer
    @property
    def text_tokenizer(self) -> Any:
        """The tokenizer of ``hparams.tokenizer`` (loaded on first use), or one set by evaluation."""
        if self._tokenizer is None:
            if not self.hparams.tokenizer:
                raise ValueError("CaptionModule needs its tokenizer path (init arg 'tokenizer') to turn ids into text")
            from data_pipelines.tokenizer import Tokenizer

            self._tokenizer = Tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def _use_tokenizer_of(self, datamodule: Any) -> None:
        if self._tokenizer is None and not self.hparams.tokenizer:
            tok = getattr(datamodule, "tokenizer", None)
            if tok is not None and not isinstance(tok, str):
                self._tokenizer = tok

    # ------------------------------------------------------------------ training
    def _loss(self, batch: Dict[str, Any], label_smoothing: float) -> Tuple[Tensor, Tensor, Any]:
        ids, pad = batch["caption_ids"], batch.get("caption_pad_mask")
        out = self.backbone(image=batch["image"], text_ids=ids, text_pad_mask=pad, attn_mode="prefix_causal")
        labels = next_token_labels(ids, pad)
        loss, nll, _ = token_losses(self.head, out.text_hidden[:, :-1], labels, label_smoothing)
        return loss, nll, out

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> Tensor:
        B = batch["image"].shape[0]
        loss, _, out = self._loss(batch, self.hparams.label_smoothing)
        aux = self.moe_loss_and_log(out, "caption", B)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=B)
        return loss + aux

    # ------------------------------------------------------------------ validation
    def _cider_epoch(self) -> bool:
        n = int(self.hparams.cider_every_n_epochs or 0)
        trainer = self._trainer
        return n > 0 and trainer is not None and not trainer.sanity_checking and (self.current_epoch + 1) % n == 0

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_results, self._val_refs = [], {}

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        B = batch["image"].shape[0]
        loss, nll, out = self._loss(batch, 0.0)
        self.moe_loss_and_log(out, "caption", B)
        self.log("val/loss", loss, prog_bar=True, batch_size=B, sync_dist=True)
        if self._cider_epoch():
            self._collect(batch, self._val_results, self._val_refs)

    def on_validation_epoch_end(self) -> None:
        if not self._cider_epoch():  # the same on every rank (a rank without images still gathers)
            return
        results, refs = self._val_results, self._val_refs
        if self.trainer.world_size > 1:  # every rank's captions (JSON, no pickling); one per image
            from tasks.evaluation import gather_json

            parts = gather_json([results, {str(k): v for k, v in refs.items()}], self)
            results = unique_sorted([r for res, _ in parts for r in res], "image_id")
            refs = {int(k): v for _, rf in parts for k, v in rf.items()}
        if self.global_rank == 0:
            if self.hparams.eval_coco:
                all_refs = load_references(self.hparams.eval_coco, "val")
                refs = {r["image_id"]: all_refs[r["image_id"]] for r in results if r["image_id"] in all_refs}
            scores = quick_scores(refs, {r["image_id"]: r["caption"] for r in results if r["image_id"] in refs})
            self.log("val/cider", scores["CIDEr"], rank_zero_only=True)
            self.log("val/bleu4", scores["Bleu_4"], rank_zero_only=True)
        self._val_results, self._val_refs = [], {}

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(
        self,
        image: Tensor,
        beam_size: Optional[int] = None,
        max_len: Optional[int] = None,
        length_penalty: Optional[float] = None,
        use_cache: bool = True,
    ) -> GenerationOutput:
        """Decode captions of a batch of normalised images (B x 3 x H x W); token ids out."""
        h = self.hparams
        tok = self.text_tokenizer
        beam_size = h.beam_size if beam_size is None else _number(beam_size, int, "beam_size")
        length_penalty = h.length_penalty if length_penalty is None else _number(length_penalty, float, "length_penalty")
        max_len = min(h.max_len if max_len is None else _number(max_len, int, "max_len"), self.config.max_text_len)
        return generate(
            self.backbone, self.head, image=image,
            beam_size=beam_size, max_len=max_len, length_penalty=length_penalty,
            length_penalty_style=h.length_penalty_style, bos_id=tok.bos_id, eos_id=tok.eos_id,
            pad_id=tok.pad_id, use_cache=use_cache, suppress_ids=(tok.pad_id, tok.bos_id, tok.mask_id),
        )

    def decode_text(self, tokens: Tensor) -> List[str]:
        tok = self.text_tokenizer
        return [tok.decode(ids) for ids in strip_special(tokens, tok.eos_id, tok.pad_id, drop=(tok.bos_id,))]

    def caption_images(self, image: Tensor, **decoding: Any) -> List[str]:
        """Captions (text) of a batch of normalised images; ``decoding`` overrides beam_size etc."""
        with eval_mode(self):
            return self.decode_text(self.generate(image.to(self.device), **decoding).tokens)

    def _collect(self, batch: Dict[str, Any], results: List[Dict[str, Any]], refs: Dict[int, List[str]],
                 **decoding: Any) -> None:
        captions = self.caption_images(batch["image"], **decoding)
        for iid, cap, all_refs in zip(batch["image_id"].tolist(), captions, batch.get("captions") or [[]] * len(captions)):
            if iid in refs:
                continue  # one caption per image
            refs[iid] = list(all_refs)
            results.append({"image_id": int(iid), "caption": cap})

    def predict_step(self, batch: Dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> List[Dict[str, Any]]:
        captions = self.caption_images(batch["image"])
        return [{"image_id": int(i), "caption": c} for i, c in zip(batch["image_id"].tolist(), captions)]

    # ------------------------------------------------------------------ evaluation (tasks/evaluation.py)
    def _karpathy_split(self, split: str) -> str:
        return self.hparams.eval_split if split == "test" else split

    def _train_references(self, datamodule: Any) -> Optional[Dict[int, List[str]]]:
        """Training captions per image: Karpathy train + restval of eval_coco, else the train split."""
        if self.hparams.eval_coco:
            refs = karpathy_references(self.hparams.eval_coco)
            if refs:
                return refs
        loader = split_loader(datamodule, "train") if datamodule is not None else None
        if loader is None:
            return None
        refs = {}
        for batch in loader:
            for iid, caps in zip(batch["image_id"].tolist(), batch.get("captions") or []):
                if caps:
                    refs[int(iid)] = list(caps)
        return refs or None

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._use_tokenizer_of(self.trainer.datamodule)

    @torch.no_grad()
    def eval_records(self, batch: Dict[str, Any]) -> List[Dict[str, Any]]:
        """``{"image_id", "caption", "references"}`` per image of the batch (decoding options of the
        evaluation: ``eval_options`` beam_size / max_len / length_penalty)."""
        captions = self.caption_images(batch["image"], **self.eval_options)
        refs = batch.get("captions") or [[]] * len(captions)
        return [{"image_id": int(iid), "caption": cap, "references": list(r)}
                for iid, cap, r in zip(batch["image_id"].tolist(), captions, refs)]

    def score_records(self, records: List[Dict[str, Any]], split: str, out: Any) -> Dict[str, float]:
        """Write ``caption_results.json`` (official COCO results format) and return the official
        metrics plus the constant-caption baselines (see the module docstring)."""
        results = [{"image_id": r["image_id"], "caption": r["caption"]} for r in records]
        refs = {r["image_id"]: r["references"] for r in records}
        write_caption_results(out.path(RESULTS_FILE), results)
        if not self.hparams.eval_coco and not any(refs.values()):
            log.warning("no reference captions (no eval_coco, none in the shards): wrote %s, no scores",
                        out.path(RESULTS_FILE))
            return {"caption_num_images": float(len(results))}
        metrics, baselines = score_results(results, refs, self.hparams.eval_coco, self._karpathy_split(split),
                                           self._train_references(self.trainer.datamodule))
        if baselines:
            out.json("caption_baselines.json", baselines)
        return metrics

    def predict_one(self, image_path: str, **decoding: Any) -> Dict[str, str]:
        """Caption one image file (eval transform at the model's image size, ImageNet
        normalisation, as the data modules do); ``decoding`` overrides beam_size etc."""
        from tasks.inputs import load_image

        image = load_image(image_path, self.config.image_size).to(self.device)
        return {"caption": self.caption_images(image, **decoding)[0]}
