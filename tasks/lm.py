"""Language modelling on the backbone's language way: English causal LM and multilingual masked LM.

Both read text-only batches from ``TextDataModule`` (``text_ids`` = ``[bos] + tokens + [eos]``
right-padded, ``text_pad_mask`` True at padding, ``lang`` per sample) and score tokens with a
``TokenHead`` (tied to the token embedding by default).

* ``CausalLMModule`` (data with ``mlm_ratio=None``): ``attn_mode="prefix_causal"`` on text-only
  input is a plain causal mask; every position predicts the next token (EOS included, padding
  excluded). Perplexity = exp(total NLL / predicted tokens) over the split. With packed data
  (``TextDataModule(context=N)``, ``data_pipelines/packing.py``) the val / test batches are
  strided windows carrying ``lm_targets`` (the target of each position, -100 where an earlier
  window already scored it), so every held-out token is scored exactly once.
* ``MaskedLMModule`` (data with ``mlm_ratio`` set, e.g. 0.15): bidirectional attention; the loss
  and the perplexity are over the masked positions (``mlm_labels`` != -100), overall and per
  language. The masks of the evaluated split are drawn with a fixed seed, so figures repeat.

Evaluation (the test loop, ``tasks/evaluation.py``: ``mmmoe evaluate lm|mlm``, ``evaluate_split``)
writes ``lm_metrics.json``. Baselines (when the data module has a train split): a unigram model of the
training targets with add-one smoothing over the vocabulary (next-token targets for the causal LM;
every non-special token of the original training text, per language, for the masked LM), scored
on exactly the same targets as the model.

Sums of NLL and token counts are accumulated in float64 and summed over processes before the
exponential, so the perplexity is the token-weighted one, not a mean of batch perplexities.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mmmoe.generation import generate, strip_special
from mmmoe.models import TokenHead
from data_pipelines.masking import IGNORE_INDEX
from tasks.base import MMMoEModule, eval_mode
from tasks.evaluation import split_loader
from tasks.losses import masked_token_loss

log = logging.getLogger(__name__)
SPECIAL_IDS = (0, 1, 2, 3, 4)  # pad, unk, bos, eos, mask: the fixed mmmoe tokenizer layout


# ------------------------------------------------------------------------------ shared helpers
def next_token_labels(ids_BL: Tensor, pad_BL: Optional[Tensor]) -> Tensor:
    """Targets of positions 0 .. L-2: the following id, -100 where that id is padding."""
    labels = ids_BL[:, 1:].clone()
    if pad_BL is not None:
        labels[pad_BL[:, 1:]] = IGNORE_INDEX
    return labels


def token_losses(
    head: TokenHead, hidden_BLD: Tensor, labels_BL: Tensor, label_smoothing: float = 0.0
) -> Tuple[Tensor, Tensor, Tensor]:
    """Loss over the labelled positions only (the head runs on those, not on padding).

    Returns ``(loss, nll_N, index_N)``: the mean training loss (with label smoothing), the plain
    per-token NLL (no smoothing, detached, float) and the row of each scored token."""
    loss, logits_NV, targets_N, sel_BL = masked_token_loss(head, hidden_BLD, labels_BL, label_smoothing)
    if logits_NV is None:
        return loss, hidden_BLD.new_zeros(0, dtype=torch.float32), targets_N
    with torch.no_grad():
        nll_N = F.cross_entropy(logits_NV, targets_N, reduction="none")
    rows_N = sel_BL.nonzero()[:, 0]
    return loss, nll_N, rows_N


class PerplexityMeter:
    """Token-weighted NLL sums per group (language); ``perplexity()`` = exp(sum NLL / tokens)."""

    def __init__(self) -> None:
        self.nll: Dict[str, float] = defaultdict(float)
        self.tokens: Dict[str, int] = defaultdict(int)

    def update(self, nll_N: Tensor, groups_N: Optional[List[str]] = None) -> None:
        """Add per-token NLLs; ``groups_N`` names the group of each token (None: one group)."""
        if nll_N.numel() == 0:
            return
        nll_N = nll_N.detach().double()
        if groups_N is None:
            self.nll["all"] += float(nll_N.sum())
            self.tokens["all"] += int(nll_N.numel())
            return
        names = sorted(set(groups_N))
        gid = torch.tensor([names.index(g) for g in groups_N], device=nll_N.device)
        sums = torch.zeros(len(names), dtype=torch.float64, device=nll_N.device).index_add_(0, gid, nll_N)
        counts = torch.bincount(gid, minlength=len(names))
        for i, name in enumerate(names):
            self.nll[name] += float(sums[i])
            self.tokens[name] += int(counts[i])

    def merge_distributed(self, module: Any) -> None:
        """Sum the meters of every process of ``module``'s run (JSON over all_gather; a no-op on one
        process); groups may differ between ranks."""
        from tasks.evaluation import gather_json

        parts = gather_json([dict(self.nll), dict(self.tokens)], module)
        if len(parts) == 1:
            return
        self.reset()
        for nll, tokens in parts:
            self.add(nll, tokens)

    def add(self, nll: Dict[str, float], tokens: Dict[str, int]) -> None:
        """Add sums of another meter (``nll`` and ``tokens`` by group)."""
        for k in nll:
            self.nll[k] += float(nll[k])
            self.tokens[k] += int(tokens[k])

    def total(self) -> Tuple[float, int]:
        return sum(self.nll.values()), sum(self.tokens.values())

    def perplexity(self, group: Optional[str] = None) -> float:
        nll, n = self.total() if group is None else (self.nll[group], self.tokens[group])
        return math.exp(nll / n) if n else float("nan")

    def reset(self) -> None:
        self.nll.clear()
        self.tokens.clear()


class UnigramCounts:
    """Token frequencies (per group) for the add-one-smoothed unigram baseline."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.counts: Dict[str, Tensor] = {}

    def update(self, targets_N: Tensor, groups_N: Optional[List[str]] = None) -> None:
        targets_N = targets_N.detach().cpu()
        if groups_N is None:
            groups_N = ["all"] * targets_N.numel()
        for g in set(groups_N):
            sel = torch.tensor([x == g for x in groups_N], dtype=torch.bool)
            c = torch.bincount(targets_N[sel], minlength=self.vocab_size)[: self.vocab_size].double()
            self.counts[g] = self.counts.get(g, torch.zeros(self.vocab_size, dtype=torch.float64)) + c

    def log_probs(self, group: str = "all") -> Tensor:
        """Add-one smoothed log-probabilities (V,) of ``group`` (uniform for an unseen group)."""
        c = self.counts.get(group, torch.zeros(self.vocab_size, dtype=torch.float64))
        return ((c + 1.0) / (c.sum() + self.vocab_size)).log()

    def nll(self, targets_N: Tensor, groups_N: Optional[List[str]] = None) -> Tensor:
        """Per-token NLL of ``targets_N`` under the unigram of each token's group."""
        targets_N = targets_N.cpu()
        if groups_N is None:
            return -self.log_probs("all")[targets_N]
        out = torch.empty(targets_N.numel(), dtype=torch.float64)
        for g in set(groups_N):
            sel = torch.tensor([x == g for x in groups_N], dtype=torch.bool)
            out[sel] = -self.log_probs(g)[targets_N[sel]]
        return out


def check_text_positions(datamodule: Any, max_text_len: int) -> None:
    """Raise a ValueError naming both values when the data module's sequences (its
    ``max_text_positions``: the packing ``context``, else ``max_len``) are longer than the model's
    ``max_text_len``."""
    n = getattr(datamodule, "max_text_positions", None)
    if n is None or int(n) <= int(max_text_len):
        return
    h = getattr(datamodule, "hparams", {})
    what = f"context={h['context']}" if h.get("context") is not None else f"max_len={h.get('max_len', n)}"
    raise ValueError(
        f"the data's sequences ({what}: {n} tokens) are longer than the model's text positions "
        f"(max_text_len={max_text_len}): set model.init_args.backbone.max_text_len to at least {n}, "
        f"or data.init_args.{what.split('=')[0]} to at most {max_text_len}"
    )


# ------------------------------------------------------------------------------ the modules
class _TextLMModule(MMMoEModule):
    """What the causal and the masked LM share: the head, the step logic, the meters."""

    TASK = "lm"
    METRIC = "lm_perplexity"
    PER_LANGUAGE = False
    backbone_inputs = ("text",)  # text only: the vision side is frozen (see MMMoEModule.backbone_inputs)

    def _build_head(self, tie_embeddings: bool) -> None:
        c = self.config
        tied = self.backbone.text_embed.token_embed if tie_embeddings else None
        self.head = TokenHead(c.dim, c.vocab_size, tied=tied, eps=c.norm_eps)
        self.val_meter = PerplexityMeter()

    def _forward(self, batch: Dict[str, Any]) -> Tuple[Any, Tensor, Tensor]:
        """(backbone output, B x L' hidden states that predict, B x L' target ids or -100)."""
        raise NotImplementedError

    def _step(self, batch: Dict[str, Any]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Any]:
        out, hidden, labels = self._forward(batch)
        loss, nll, rows = token_losses(self.head, hidden, labels, self.hparams.label_smoothing)
        return loss, nll, rows, labels, out

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> Tensor:
        B = batch["text_ids"].shape[0]
        loss, nll, rows, labels, out = self._step(batch)
        aux = self.moe_loss_and_log(out, "text", B)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=B)
        if nll.numel():
            self.log("train/perplexity", nll.mean().exp(), batch_size=B)
        return loss + aux

    def setup(self, stage: Optional[str] = None) -> None:
        """Checks, before any step runs, that the data's sequences fit the model's positions; freezes
        what text-only input never reaches (``MMMoEModule.setup``)."""
        super().setup(stage)
        trainer = self._trainer
        if trainer is not None and getattr(trainer, "datamodule", None) is not None:
            check_text_positions(trainer.datamodule, self.config.max_text_len)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.val_meter.reset()

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        B = batch["text_ids"].shape[0]
        loss, nll, rows, labels, out = self._step(batch)
        self.moe_loss_and_log(out, "text", B)
        self.log("val/loss", loss, batch_size=B, sync_dist=True)
        self.val_meter.update(nll, self._groups(batch, rows))

    def on_validation_epoch_end(self) -> None:
        self.val_meter.merge_distributed(self)
        if self.val_meter.total()[1] == 0:
            return
        self.log("val/perplexity", self.val_meter.perplexity(), prog_bar=True, rank_zero_only=True)
        if self.PER_LANGUAGE:
            for lang in sorted(self.val_meter.nll):
                self.log(f"val/perplexity_{lang}", self.val_meter.perplexity(lang), rank_zero_only=True)

    # ------------------------------------------------------------------ evaluation protocol
    def _targets_of(self, batch: Dict[str, Any]) -> Tensor:
        """B x L' original target ids (-100 = not scored), as the loss sees them."""
        raise NotImplementedError

    def _groups(self, batch: Dict[str, Any], rows_N: Tensor) -> Optional[List[str]]:
        """The language of every scored token (None when not per language)."""
        if not self.PER_LANGUAGE:
            return None
        langs = batch.get("lang") or ["und"] * batch["text_ids"].shape[0]
        return [langs[i] for i in rows_N.tolist()]

    def _unigram(self, datamodule: Any) -> Optional[UnigramCounts]:
        """Unigram counts of the training targets, or None without a train split."""
        loader = split_loader(datamodule, "train") if datamodule is not None else None
        if loader is None:
            return None
        counts = UnigramCounts(self.config.vocab_size)
        for batch in loader:
            labels = self._unigram_targets(batch)
            sel = labels != IGNORE_INDEX
            counts.update(labels[sel], self._groups(batch, sel.nonzero()[:, 0]))
        return counts

    def _unigram_targets(self, batch: Dict[str, Any]) -> Tensor:
        """The training tokens the unigram baseline counts (B x L', -100 = not counted)."""
        return self._targets_of(batch)

    # evaluation (the test loop, tasks/evaluation.py); options: seed (of the evaluated masks, 0),
    # baseline (the unigram baseline, True)
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        dm = self.trainer.datamodule
        if dm is not None:
            check_text_positions(dm, self.config.max_text_len)
        seed = int(self.eval_options.get("seed", 0))
        self._rng_before_eval = torch.get_rng_state()
        torch.manual_seed(seed)  # the masks of the evaluated text are the same every run
        self._unigram_counts = self._unigram(dm) if self.eval_options.get("baseline", True) else None
        torch.manual_seed(seed)

    def on_test_epoch_end(self) -> None:
        try:
            super().on_test_epoch_end()
        finally:
            torch.set_rng_state(self._rng_before_eval)

    def eval_records(self, batch: Dict[str, Any]) -> List[Dict[str, Any]]:
        """One record per batch: NLL sums and token counts by group (model and unigram baseline),
        and the MoE layers' expert loads and sub-token divergence."""
        _, nll, rows, labels, out = self._step(batch)
        groups = self._groups(batch, rows)
        meter = PerplexityMeter()
        meter.update(nll, groups)
        rec: Dict[str, Any] = {"nll": dict(meter.nll), "tokens": dict(meter.tokens)}
        if self._unigram_counts is not None:
            base = PerplexityMeter()
            targets = labels[labels != IGNORE_INDEX].cpu()  # the same order as nll
            base.update(self._unigram_counts.nll(targets, groups), groups)
            rec.update(base_nll=dict(base.nll), base_tokens=dict(base.tokens))
        if out.moe:
            rec["moe"] = {k: [o.expert_load.detach().float().cpu().tolist(), int(o.num_tokens)] for k, o in out.moe.items()}
            rec["divergence"] = float(torch.stack([o.divergence.float() for o in out.moe.values()]).mean())
        return [rec]

    def score_records(self, records: List[Dict[str, Any]], split: str, out: Any) -> Dict[str, float]:
        """Perplexity over all records (and the unigram baseline): ``lm_metrics.json``. MoE models
        also get ``expert_activation`` and ``sub_token_divergence`` (means over the MoE layers of the
        split); ``self.activation_stats`` then holds the per-expert ratios."""
        meter, base = PerplexityMeter(), PerplexityMeter()
        self.activation_stats.reset()
        divs = []
        for rec in records:
            meter.add(rec["nll"], rec["tokens"])
            if "base_nll" in rec:
                base.add(rec["base_nll"], rec["base_tokens"])
            for key, (load, n) in rec.get("moe", {}).items():
                t = torch.tensor(load)
                stats = self.activation_stats
                stats.load[key] = stats.load[key] + t if key in stats.load else t
                stats.tokens[key] = stats.tokens.get(key, 0) + n
            if "divergence" in rec:
                divs.append(rec["divergence"])
        metrics = self._metrics(meter, base if base.tokens else None)
        if divs:
            act = self.activation_stats.activated()
            metrics["expert_activation"] = float(sum(act.values()) / len(act))
            metrics["sub_token_divergence"] = sum(divs) / len(divs)
        out.json("lm_metrics.json", {"task": self.TASK, "split": split, **metrics})
        return metrics

    def _metrics(self, meter: PerplexityMeter, base: Optional[PerplexityMeter]) -> Dict[str, float]:
        prefix = self.METRIC.rsplit("_", 1)[0]  # "lm" / "mlm"
        nll, n = meter.total()
        if n == 0:
            raise ValueError("the evaluated split has no scored tokens (empty shards?)")
        m = {self.METRIC: math.exp(nll / n), f"{prefix}_nll": nll / n, f"{prefix}_tokens": float(n)}
        if base is not None:
            m[f"{prefix}_baseline_perplexity"] = base.perplexity()
        if self.PER_LANGUAGE:
            for lang in sorted(meter.nll):
                m[f"{self.METRIC}_{lang}"] = meter.perplexity(lang)
                if base is not None and lang in base.nll:
                    m[f"{prefix}_baseline_perplexity_{lang}"] = base.perplexity(lang)
        return m


class CausalLMModule(_TextLMModule):
    """English (or any) next-token language model on the language way.

    Takes the arguments of ``MMMoEModule`` (backbone, optim, tokenizer, init_from) and these.

    Args:
        tie_embeddings: the output projection shares the token embedding.
        label_smoothing: training loss smoothing (perplexities never use it).
    Data: ``TextDataModule`` with ``mlm_ratio: null``.
    """

    TASK = "lm"
    METRIC = "lm_perplexity"
    PER_LANGUAGE = False

    def __init__(
        self,
        tie_embeddings: bool = True,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self._build_head(tie_embeddings)
        self._finish_init()

    def _forward(self, batch: Dict[str, Any]) -> Tuple[Any, Tensor, Tensor]:
        if "mlm_labels" in batch:
            raise ValueError("CausalLMModule got masked-LM batches: use TextDataModule(mlm_ratio=None)")
        ids, pad = batch["text_ids"], batch.get("text_pad_mask")
        out = self.backbone(text_ids=ids, text_pad_mask=pad, attn_mode="prefix_causal")
        if "lm_targets" in batch:  # strided evaluation windows: every position, its own target or -100
            return out, out.text_hidden, batch["lm_targets"]
        return out, out.text_hidden[:, :-1], next_token_labels(ids, pad)

    def _targets_of(self, batch: Dict[str, Any]) -> Tensor:
        if "lm_targets" in batch:
            return batch["lm_targets"]
        return next_token_labels(batch["text_ids"], batch.get("text_pad_mask"))

    @torch.no_grad()
    def generate_text(self, prompt: str = "", max_len: int = 32, beam_size: int = 1, length_penalty: float = 0.6) -> str:
        """Continue ``prompt`` (greedy or beam search with the KV cache) and return the new text."""
        from data_pipelines.tokenizer import Tokenizer

        if not self.hparams.tokenizer:
            raise ValueError("generate_text needs the module's tokenizer path (init arg 'tokenizer')")
        tok = Tokenizer(self.hparams.tokenizer)
        ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)], device=self.device)
        max_len = min(max_len, self.config.max_text_len - ids.shape[1] + 1)
        if max_len < 1:
            raise ValueError(f"the prompt is {ids.shape[1]} tokens: no room left in max_text_len={self.config.max_text_len}")
        with eval_mode(self):
            out = generate(self.backbone, self.head, prefix_ids=ids, beam_size=beam_size, max_len=max_len,
                           length_penalty=length_penalty, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
        return tok.decode(strip_special(out.tokens, tok.eos_id, tok.pad_id)[0])


class MaskedLMModule(_TextLMModule):
    """Masked language model (XLM-R style) on the language way, perplexity per language.

    Args as :class:`CausalLMModule`. Data: ``TextDataModule`` with ``mlm_ratio`` (0.15) and one
    shard set per language (``train: {de: ..., en: ..., ...}``)."""

    TASK = "mlm"
    METRIC = "mlm_perplexity"
    PER_LANGUAGE = True

    def __init__(
        self,
        tie_embeddings: bool = True,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self._build_head(tie_embeddings)
        self._finish_init()

    def _forward(self, batch: Dict[str, Any]) -> Tuple[Any, Tensor, Tensor]:
        labels = self._targets_of(batch)
        out = self.backbone(text_ids=batch["text_ids"], text_pad_mask=batch.get("text_pad_mask"))
        return out, out.text_hidden, labels

    def _targets_of(self, batch: Dict[str, Any]) -> Tensor:
        if "mlm_labels" not in batch:
            raise ValueError("MaskedLMModule needs masked batches: set TextDataModule(mlm_ratio=0.15)")
        return batch["mlm_labels"]

    def _unigram_targets(self, batch: Dict[str, Any]) -> Tensor:
        # every maskable token of the original text (not only this pass's random masks): the
        # counts then do not depend on the masking or the order of the training samples
        labels = self._targets_of(batch)
        original = torch.where(labels != IGNORE_INDEX, labels, batch["text_ids"])
        maskable = original > max(SPECIAL_IDS)
        return original.masked_fill(~maskable, IGNORE_INDEX)
