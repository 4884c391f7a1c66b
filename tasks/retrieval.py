"""Image-text retrieval (BEiT-3's COCO / Flickr30k retrieval fine-tuning): the multiway backbone as a
dual encoder.

Model: an image-only pass (vision way) and a text-only pass (language way) of the same backbone;
``mmmoe.models.dual_encoder.RetrievalHead`` projects the image CLS and the text BOS and L2-normalises
them; similarities are cosines times a learnable ``exp(logit_scale)`` (CLIP's temperature,
initialised at 1 / 0.07, clamped at 100).

Training: the symmetric contrastive (InfoNCE) loss over the *global* batch. Under DDP the
embeddings of every rank are gathered with :func:`all_gather_with_grad` (its backward sums the
gradients of every rank's loss into the local slice), each rank scores its own rows against all
columns, and DDP's gradient averaging then gives exactly the gradient of one process that saw the
whole batch. Pairs that share an image (``image_id``) are all positives (their targets share the
probability mass).

Data: ``data_pipelines.datamodules.CaptionDataModule`` (Karpathy caption shards; training draws one
of the image's captions per visit).

Evaluation protocol (``evaluate_split``, see tasks/evaluate_cli.py): every image of the split and
its first ``captions_per_image`` (5, the Karpathy protocol) reference captions are embedded; the
full image x text similarity matrix ranks texts for every image and images for every text. Metrics
(percent): ``retrieval_i2t_r{1,5,10}`` (an image is right at K when any of its captions is in its
top K), ``retrieval_t2i_r{1,5,10}`` (a caption is right at K when its image is in its top K),
``retrieval_rsum`` and the random-ranking baselines ``retrieval_{i2t,t2i}_r{K}_random`` (the exact
expectation: 1 - C(T - P, K) / C(T, K) for an image with P of T texts, K / I for a text). Written
files: ``retrieval_results.json`` (the texts, and for every image its top-10 texts, for every text
its top-10 images) and the metrics.

Shape legend: B batch, G global batch (all ranks), E embedding width, I images, T texts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from data_pipelines.formats.io import write_json
from mmmoe.models import MultiwayTransformer
from mmmoe.models.dual_encoder import RetrievalHead
from tasks.base import MMMoEModule
from tasks.contrastive import RECALL_KS, contrastive_loss, random_recall, recall_at_k

log = logging.getLogger(__name__)

RESULTS_FILE = "retrieval_results.json"
TOP_SAVED = 10


# ------------------------------------------------------------------------------ the module
class RetrievalModule(MMMoEModule):
    """Image-text retrieval: backbone as a dual encoder + ``RetrievalHead``; contrastive loss.

    Args (besides those of ``MMMoEModule``):
        embed_dim: width of the shared embedding space (default: the model width).
        init_temperature: initial softmax temperature (CLIP / BEiT-3: 0.07); learned.
        pooling: ``cls`` (image CLS / text BOS, BEiT-3) or ``mean`` (mean of the patches / of the
            non-padding text positions).
        captions_per_image: captions per image at evaluation (Karpathy protocol: 5; the first ones).
    """

    TASK = "retrieval"

    backbone_inputs = ("image", "text")  # a dual encoder: image-only and text-only passes

    def __init__(
        self,
        model: str = "tiny",
        variant: Optional[str] = None,
        model_args: Optional[Dict[str, Any]] = None,
        tokenizer: Optional[str] = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: Tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.01,
        init_from: Optional[str] = None,
        embed_dim: Optional[int] = None,
        init_temperature: float = 0.07,
        pooling: str = "cls",
        captions_per_image: int = 5,
    ):
        super().__init__(model, variant, model_args, tokenizer, lr, weight_decay, betas, eps, warmup_steps,
                         min_lr_ratio, init_from)
        if isinstance(captions_per_image, bool) or not isinstance(captions_per_image, int) or captions_per_image < 1:
            raise ValueError(f"captions_per_image must be a positive integer, got {captions_per_image!r}")
        self.save_hyperparameters()
        self.head = RetrievalHead(self.config.dim, embed_dim, init_temperature, pooling)
        self.head.image_proj.apply(MultiwayTransformer._init_weights)
        self.head.text_proj.apply(MultiwayTransformer._init_weights)
        self._finish_init()

    # ------------------------------------------------------------------ encoders
    def encode_image(self, image: Tensor, stage: Optional[str] = None) -> Tensor:
        out = self.backbone.forward_features(image=image)
        if stage is not None:
            self._aux = self._aux + self.moe_loss_and_log(out, "image", image.shape[0])
        return self.head.embed_image(out.hidden)

    def encode_text(self, text_ids: Tensor, text_pad_mask: Optional[Tensor] = None, stage: Optional[str] = None) -> Tensor:
        out = self.backbone.forward_features(text_ids=text_ids, text_pad_mask=text_pad_mask)
        if stage is not None:
            self._aux = self._aux + self.moe_loss_and_log(out, "text", text_ids.shape[0])
        return self.head.embed_text(out.hidden, text_pad_mask)

    def forward(self, image: Tensor, text_ids: Tensor, text_pad_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Normalised (image, text) embeddings, B x E each."""
        return self.encode_image(image), self.encode_text(text_ids, text_pad_mask)

    # ------------------------------------------------------------------ training
    def _step(self, batch: Mapping[str, Any], stage: str) -> Tensor:
        self._aux = 0.0
        ids, pad = batch["caption_ids"], batch.get("caption_pad_mask")
        img = self.encode_image(batch["image"], stage)
        txt = self.encode_text(ids, pad, stage)
        B = img.shape[0]
        # training: the global batch of every rank (gathered with gradient); validation: this rank's
        loss, acc = contrastive_loss(img, txt, self.head.scale(), batch.get("image_id"), gather=stage == "train")
        self.log(f"{stage}/retrieval_loss", loss.detach(), batch_size=B, prog_bar=stage == "train")
        self.log(f"{stage}/i2t_acc", acc["i2t_acc"], batch_size=B)
        self.log(f"{stage}/t2i_acc", acc["t2i_acc"], batch_size=B, prog_bar=stage == "val")
        if stage == "train":
            self.log("train/temperature", 1.0 / self.head.scale().detach(), batch_size=B)
        return loss + self._aux

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        self.log("train/loss", loss.detach(), batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss = self._step(batch, "val")
        self.log("val/loss", loss, batch_size=batch["image"].shape[0], sync_dist=True)
        return loss

    # ------------------------------------------------------------------ evaluation protocol
    @torch.no_grad()
    def embed_split(self, datamodule: Any, split: str) -> Tuple[Tensor, Tensor, List[int], List[Dict[str, Any]]]:
        """(image embeddings I x E, text embeddings T x E, image ids, texts [{"text_id", "image_id",
        "caption"}]) of every image of ``split`` once and its first ``captions_per_image`` captions."""
        from tasks.evaluate_cli import encode_text_batch, prepare_batch, split_loader

        loader = split_loader(datamodule, split)
        k = int(self.hparams.captions_per_image)
        img_parts: List[Tensor] = []
        image_ids: List[int] = []
        texts: List[Dict[str, Any]] = []
        seen = set()
        self._use_tokenizer_of(datamodule)
        for batch in loader:
            batch = prepare_batch(self, batch)
            keep = [i for i, iid in enumerate(batch["image_id"].tolist()) if iid not in seen]
            if not keep:
                continue
            caps = batch.get("captions")
            if caps is None:
                raise ValueError(f"the {split} batches carry no 'captions': retrieval needs the caption shards")
            img_parts.append(self.encode_image(batch["image"][keep]).cpu())
            for i in keep:
                iid = int(batch["image_id"][i])
                seen.add(iid)
                refs = [c for c in caps[i] if isinstance(c, str)][:k]
                if not refs:
                    raise ValueError(f"image {iid} of the {split} split has no caption")
                for j, c in enumerate(refs):
                    texts.append({"text_id": len(texts), "image_id": iid, "caption": c})
                image_ids.append(iid)
        if not image_ids:
            raise ValueError(f"the {split!r} split gave no images (empty shards?)")
        txt_parts = []
        for s in range(0, len(texts), 256):
            ids, pad = encode_text_batch(self, [t["caption"] for t in texts[s: s + 256]])
            txt_parts.append(self.encode_text(ids, pad).cpu())
        return torch.cat(img_parts), torch.cat(txt_parts), image_ids, texts

    def _use_tokenizer_of(self, datamodule: Any) -> None:
        if not self.hparams.get("tokenizer") and getattr(self, "_predict_tokenizer", None) is None:
            tok = getattr(datamodule, "tokenizer", None)
            if tok is not None and not isinstance(tok, str):
                self._predict_tokenizer = tok

    @torch.no_grad()
    def evaluate_split(self, datamodule: Any, split: str, out_dir: Union[str, os.PathLike]) -> Dict[str, float]:
        """Rank every text for every image of ``split`` and every image for every text; write
        ``retrieval_results.json`` and return the recalls and their random baselines."""
        was_training = self.training
        self.eval()
        try:
            img_IE, txt_TE, image_ids, texts = self.embed_split(datamodule, split)
        finally:
            self.train(was_training)
        index = {iid: i for i, iid in enumerate(image_ids)}
        text_image_T = torch.tensor([index[t["image_id"]] for t in texts])
        sim_IT = img_IE @ txt_TE.t()
        metrics = recall_at_k(sim_IT, text_image_T)
        per_image = torch.bincount(text_image_T, minlength=len(image_ids)).tolist()
        metrics.update(random_recall(len(image_ids), per_image))
        metrics["retrieval_rsum"] = sum(metrics[f"retrieval_{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
        metrics["retrieval_num_images"] = float(len(image_ids))
        metrics["retrieval_num_texts"] = float(len(texts))
        top_t = torch.argsort(-sim_IT, dim=1, stable=True)[:, :TOP_SAVED]
        top_i = torch.argsort(-sim_IT.t(), dim=1, stable=True)[:, :TOP_SAVED]
        results = {
            "split": split, "texts": texts,
            "image_to_text": [{"image_id": iid, "ranked_text_ids": top_t[i].tolist(),
                               "scores": [round(float(sim_IT[i, j]), 5) for j in top_t[i].tolist()]}
                              for i, iid in enumerate(image_ids)],
            "text_to_image": [{"text_id": t["text_id"], "ranked_image_ids": [image_ids[j] for j in top_i[n].tolist()]}
                              for n, t in enumerate(texts)],
        }
        write_json(Path(out_dir) / RESULTS_FILE, results, indent=None)
        return metrics

    @torch.no_grad()
    def predict_one(self, image_path: Union[str, os.PathLike], texts: Sequence[str]) -> Dict[str, Any]:
        """Rank ``texts`` for the image file: {"ranking": [{"text", "score", "probability"}], best first}
        (score: cosine similarity; probability: softmax over the given texts at the learned temperature)."""
        from tasks.evaluate_cli import encode_text_batch, load_image

        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError("predict retrieval needs --texts with at least one non-empty text")
        was_training = self.training
        self.eval()
        try:
            img = self.encode_image(load_image(image_path, self.config.image_size).to(self.device))
            ids, pad = encode_text_batch(self, list(texts))
            txt = self.encode_text(ids, pad)
        finally:
            self.train(was_training)
        sim = (img @ txt.t())[0]
        prob = torch.softmax(self.head.scale() * sim, dim=-1)
        order = torch.argsort(-sim, stable=True).tolist()
        return {"image": str(image_path),
                "ranking": [{"text": texts[i], "score": round(float(sim[i]), 4), "probability": round(float(prob[i]), 4)}
                            for i in order]}
