"""Masked image-text pretraining (BEiT-3 style, pixel-regression MIM): ``PretrainModule``.

Every training step receives ``{"image_text": batch, "image": batch, "text": batch}`` from
``data_pipelines.datamodules.PretrainDataModule`` (a CombinedLoader; any subset of the kinds may be
present, a kind whose loader is exhausted may be None). Each kind runs one forward of the shared
backbone with bidirectional attention:

    image_text   MLM on the corrupted caption (``mlm_labels``) + MIM on the masked patches
    image        MIM on the masked patches
    text         MLM on the corrupted text

MLM: ``TokenHead`` on the masked text positions, cross-entropy against the original ids (the
output projection optionally tied to the backbone's token embedding). MIM: ``MIMHead`` regresses
the per-patch normalised pixels of the masked patches; the masked patches enter the backbone as
the learned mask token (SimMIM: the backbone's ``image_mask`` argument). The total loss is the
weighted sum of the four losses plus the MoE aux losses of every forward (already weighted).

Logged: ``train/<kind>_mlm``, ``train/<kind>_mim`` (and MLM accuracy), ``train/loss``,
``train/tokens_per_s``, the MoE statistics of ``MMMoEModule.moe_loss_and_log`` (expert activation
per layer and way under ``activation/<kind>/<layer>.<way>``); validation on image-text batches
logs the same losses under ``val/`` and ``val/loss`` (task losses only, no aux, so variants compare).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

from torch import Tensor

from mmmoe.models import TokenHead
from mmmoe.models.heads import MIMHead
from tasks.base import MMMoEModule
from tasks.losses import masked_token_loss

KINDS = ("image_text", "image", "text")


def kind_of(batch: Mapping[str, Any]) -> str:
    """Which pretraining kind a single (not combined) batch dict is."""
    has_image, has_text = "image" in batch, "text_ids" in batch
    if has_image and has_text:
        return "image_text"
    if has_image:
        return "image"
    if has_text:
        return "text"
    raise ValueError(f"a pretraining batch needs 'image' and/or 'text_ids'; got keys {sorted(batch)}")


def split_kinds(batch: Mapping[str, Any]) -> Dict[str, Mapping[str, Any]]:
    """``{kind: batch}`` from a combined batch (keys among KINDS, values may be None) or from a
    single batch dict of one kind."""
    if batch and set(batch) <= set(KINDS):
        return {k: b for k, b in batch.items() if b is not None}
    return {kind_of(batch): batch}


class PretrainModule(MMMoEModule):
    """Masked language + masked image modelling on a multiway MH-MoE backbone.

    Takes the arguments of ``MMMoEModule`` (backbone, optim, tokenizer, init_from) and these.

    Args:
        tie_mlm_head: share the MLM output projection with the backbone's token embedding
            (``backbone.text_embed.token_embed``); the head then owns only a bias.
        image_text_mlm_weight: weight of the caption MLM loss of image-text batches.
        image_text_mim_weight: weight of the MIM loss of image-text batches.
        image_mim_weight: weight of the MIM loss of image-only batches.
        text_mlm_weight: weight of the MLM loss of text-only batches.
    """

    masked_images = True  # masked image modelling

    def input_kinds(self) -> Tuple[str, ...]:
        """The data kinds the data module provides (all three unless some are not configured)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        h = getattr(dm, "hparams", None)
        if h and all(k in h for k in ("image_text", "image", "text")):
            kinds = tuple(k for k in ("image_text", "image", "text") if h[k] is not None)
            if kinds:
                return kinds
        return tuple(self.backbone_inputs)

    def __init__(
        self,
        tie_mlm_head: bool = True,
        image_text_mlm_weight: float = 1.0,
        image_text_mim_weight: float = 1.0,
        image_mim_weight: float = 1.0,
        text_mlm_weight: float = 1.0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        for name, w in (("image_text_mlm_weight", image_text_mlm_weight), ("image_text_mim_weight", image_text_mim_weight),
                        ("image_mim_weight", image_mim_weight), ("text_mlm_weight", text_mlm_weight)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"PretrainModule.{name}={w!r} is invalid: must be a number >= 0")
        c = self.config
        tied = self.backbone.text_embed.token_embed if tie_mlm_head else None
        self.mlm_head = TokenHead(c.dim, c.vocab_size, tied=tied, eps=c.norm_eps)
        self.mim_head = MIMHead(c.dim, c.patch_size, c.in_chans)
        self.loss_weights = {
            "image_text_mlm": float(image_text_mlm_weight), "image_text_mim": float(image_text_mim_weight),
            "image_mim": float(image_mim_weight), "text_mlm": float(text_mlm_weight),
        }
        self._finish_init()

    # ------------------------------------------------------------------ losses
    def mlm_loss(self, text_hidden_BLD: Tensor, labels_BL: Tensor) -> Tuple[Tensor, Tensor]:
        """Cross-entropy on the positions with a label (!= -100) and their accuracy. Only those
        positions go through the head."""
        loss, logits_MV, target_M, _ = masked_token_loss(self.mlm_head, text_hidden_BLD, labels_BL)
        if logits_MV is None:
            return loss, loss.detach()
        acc = (logits_MV.argmax(-1) == target_M).float().mean()
        return loss, acc.detach()

    def mim_loss(self, image_hidden_BND: Tensor, image_BCHW: Tensor, mask: Tensor) -> Tensor:
        """Normalised-pixel regression on the masked patches (the CLS position is skipped)."""
        return self.mim_head.loss(image_hidden_BND[:, 1:], image_BCHW, mask)

    def kind_losses(self, kind: str, b: Mapping[str, Any]) -> Tuple[Dict[str, Tensor], Tensor, int]:
        """One forward of one kind: ({loss name: value}, aux loss, batch size)."""
        image = b.get("image") if kind in ("image_text", "image") else None
        text = b.get("text_ids") if kind in ("image_text", "text") else None
        if kind == "image_text" and (image is None or text is None):
            raise ValueError("an image_text batch needs 'image' and 'text_ids'")
        image_mask = b.get("image_mask") if image is not None else None
        if image is not None and image_mask is None:
            raise ValueError(f"the {kind} batch has no 'image_mask': the reader must draw patch masks for MIM")
        if text is not None and "mlm_labels" not in b:
            raise ValueError(f"the {kind} batch has no 'mlm_labels': the reader must mask the text for MLM")
        pad = b.get("text_pad_mask") if text is not None else None
        out = self.backbone.forward_features(
            image=image, text_ids=text, text_pad_mask=pad, image_mask=image_mask, attn_mode="bidirectional"
        )
        B = out.hidden.shape[0]
        losses: Dict[str, Tensor] = {}
        if text is not None:
            losses[f"{kind}_mlm"], losses[f"{kind}_mlm_acc"] = self.mlm_loss(out.text_hidden, b["mlm_labels"])
        if image is not None:
            losses[f"{kind}_mim"] = self.mim_loss(out.image_hidden, image, image_mask)
        aux = self.moe_loss_and_log(out, kind, B)
        return losses, aux, B

    def shared_step(self, batch: Mapping[str, Any], stage: str) -> Dict[str, Tensor]:
        parts = split_kinds(batch)
        if not parts:
            raise ValueError("empty pretraining batch: no image_text, image or text part")
        task = None
        aux_total = None
        metrics: Dict[str, Tensor] = {}
        sizes: Dict[str, int] = {}
        for kind, b in parts.items():
            if kind not in KINDS:
                raise ValueError(f"unknown pretraining batch kind {kind!r}; expected {KINDS}")
            losses, aux, B = self.kind_losses(kind, b)
            for name, value in losses.items():
                metrics[name] = value
                sizes[name] = B
                if name in self.loss_weights:
                    term = self.loss_weights[name] * value
                    task = term if task is None else task + term
            aux_total = aux if aux_total is None else aux_total + aux
        task_loss = task if task is not None else aux_total * 0.0
        total = task_loss + aux_total
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value.detach(), batch_size=sizes[name], prog_bar=False,
                     on_step=stage == "train", on_epoch=stage != "train", sync_dist=stage != "train")
        bsz = max(sizes.values()) if sizes else 1
        if stage == "train":
            self.log("train/loss", total.detach(), batch_size=bsz, prog_bar=True)
        else:
            self.log(f"{stage}/loss", task_loss.detach(), batch_size=bsz, prog_bar=True, sync_dist=True)
        return {"loss": total, "task_loss": task_loss.detach(), **{k: v.detach() for k, v in metrics.items()}}

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        """Fail early (with the field names) when the data module's shapes do not fit the model;
        freeze what the configured data kinds never reach (``MMMoEModule.setup``)."""
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        h = getattr(dm, "hparams", None)
        if not h:
            return
        c = self.config
        checks = [("image_size", c.image_size, "ModelConfig.image_size"), ("patch_size", c.patch_size, "ModelConfig.patch_size")]
        for key, want, what in checks:
            if key in h and h[key] != want:
                raise ValueError(f"data.{key}={h[key]} does not match the model's {what}={want}")
        for key in ("max_len", "text_max_len"):
            if key in h and h[key] is not None and h[key] > c.max_text_len:
                raise ValueError(
                    f"data.{key}={h[key]} exceeds the model's max_text_len={c.max_text_len} "
                    "(lower it, or raise model.init_args.backbone.max_text_len)"
                )

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Dict[str, Tensor]:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Dict[str, Tensor]:
        return self.shared_step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Dict[str, Tensor]:
        return self.shared_step(batch, "test")
