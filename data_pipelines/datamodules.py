"""One LightningDataModule per task, each a thin shell around the readers in ``data_pipelines.readers``.

A data module takes shard sets (brace patterns, ``<prefix>.manifest.json`` paths, or lists of
either; see ``schema.py``), a tokenizer (a
``data_pipelines.tokenizer.Tokenizer`` or the path of its model file), batch size, workers and
image size; ``setup()`` builds the pipelines, the ``*_dataloader()`` methods wrap them in
``EpochLoader`` (batch_size=None: batching happens in the pipeline).

Images: float32, ImageNet-normalised (B, 3, H, W) by default. ``normalize=False`` hands over
uint8 images instead (a quarter of the bytes to allocate in shared memory, to pass from the
workers and to copy to the GPU; with DataLoader workers it is the faster setting in
``scripts/benchmark_data.py``); the model then calls ``data_pipelines.readers.normalize_images(batch)``,
e.g. in ``on_after_batch_transfer``, which gives the same float32 tensors on the device.

Data parallelism: the task data modules (VQA, NLVR2, captions, text) read each training shard
once per epoch in one process. Under DDP (world size > 1) their training reader instead resamples
shards with an epoch of the shard set's sample count (from its manifest), split evenly over the
ranks: every rank then runs the same number of steps, where epoch readers would hand ranks
different numbers of batches and leave the others waiting in the gradient all-reduce forever.

Skipped samples: each loader logs one summary line per reader at the end of every complete pass
(epoch); ``skip_report()`` returns the counts of the epochs closed since its previous call; add
``SkipReportCallback()`` to the Trainer to log them as metrics ``skipped/<reader>/<kind>`` at the
end of every train and validation epoch.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import pytorch_lightning as pl
from pytorch_lightning.utilities import CombinedLoader

from . import readers
from .formats.vqa import answer_index, normalize_answer
from .mixing import mixed_pipeline
from .masking import IMAGE_MASK_RATIO, IMAGE_TEXT_MASK_RATIO, TEXT_ONLY_MASK_RATIO

log = logging.getLogger(__name__)

Urls = Union[str, Sequence[str]]
TextUrls = Union[Urls, Mapping[str, Urls]]
#: one shard set, or named sets with sampling weights: {name: urls | {shards: urls, weight: w}}
MixUrls = Union[Urls, Dict[str, Union[Urls, Dict[str, Any]]]]


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as is, or a SentencePiece model path loaded with data_pipelines.tokenizer."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from .tokenizer import Tokenizer

        return Tokenizer(tokenizer)
    return tokenizer


def load_answer_vocab(answer_vocab: Union[str, Mapping[str, int], Sequence[str]]) -> Dict[str, int]:
    """{answer: index} from a mapping, a list of answers (index = position) or a JSON file of either
    (``formats.vqa.answer_index``: indices must be 0..A-1, answers unique)."""
    return answer_index(answer_vocab)


class ReaderDataModule(pl.LightningDataModule):
    """What the task data modules share: loaders, skip reports, seeds and the stream position.

    Seeds: every reader is seeded by the run's seed (``seed_everything`` of the config, which
    Lightning exports as ``PL_GLOBAL_SEED``; 0 without one) and its name, and within a reader by
    epoch, rank and worker (``data_pipelines.readers``): the same config and seed give the same
    batches in every run, with any number of workers.

    Exact resume: the module counts the training batches the training loop has taken in the
    current epoch (``on_before_batch_transfer``: batches the loader or its workers prefetched are
    not counted) and saves ``{"epoch", "batches"}`` in checkpoints (``state_dict``). Restored from a
    checkpoint, the next training loaders continue that epoch after that many batches, so no
    sample is seen twice or skipped (``EpochLoader.resume``). Every training loader advances one
    batch per step, as with a single loader or resampled pretraining readers (CombinedLoader
    "min_size"); with "max_size_cycle" the cycled loaders resume approximately."""

    def __init__(self, num_workers: int = 4, pin_memory: bool = True, persistent_workers: bool = False):
        super().__init__()
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.pipelines: Dict[str, readers.Pipeline] = {}
        self._reported: Dict[str, int] = {}  # reader name -> len(skips.history) at the last skip_report
        self._position = {"epoch": 0, "batches": 0}  # training batches taken in the current epoch
        self._resume_from: Optional[Dict[str, int]] = None

    def reader_seed(self, name: str) -> int:
        """The seed of reader ``name``: the run's seed (``PL_GLOBAL_SEED``, else 0) and the name."""
        return readers.stream_seed("reader", int(os.environ.get("PL_GLOBAL_SEED", 0)), name)

    def _loader(self, name: str) -> Optional[readers.EpochLoader]:
        pipe = self.pipelines.get(name)
        if pipe is None:
            return None
        loader = readers.make_loader(pipe, self.num_workers, self.pin_memory, self.persistent_workers)
        if name.startswith("train") and self.trainer is not None:
            # the loader's pass numbers follow the trainer's epochs; after a restore, the first pass
            # continues the saved epoch after the batches already taken
            epoch, skip = self.trainer.current_epoch, 0
            if self._resume_from is not None and self._resume_from["epoch"] == epoch:
                skip = self._resume_from["batches"]
                if skip:
                    log.info("%s: resuming epoch %d after its first %d batches (replayed, not trained on)",
                             name, epoch, skip)
            loader.resume(epoch, skip)
        return loader

    # ------------------------------------------------------------------ stream position
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            epoch = trainer.current_epoch
            if epoch != self._position["epoch"]:
                self._position = {"epoch": epoch, "batches": 0}
            self._position["batches"] += 1
        return batch

    def state_dict(self) -> Dict[str, Any]:
        """``{"epoch", "batches"}``: the training batches taken in the current epoch."""
        return {"train_position": dict(self._position)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        pos = state_dict.get("train_position")
        if pos is not None:
            self._position = {"epoch": int(pos["epoch"]), "batches": int(pos["batches"])}
            self._resume_from = dict(self._position)

    def skip_report(self, prefix: Optional[str] = None) -> Dict[str, Dict[str, int]]:
        """{reader name: {kind: count}} for the readers whose name starts with ``prefix`` (all
        when None): the skips of the epochs closed since the previous call (a loader closes one
        at the end of each complete pass), or, when no pass ended since then (an epoch cut short
        by ``limit_*_batches`` / ``max_steps``), the skips so far, which closes that epoch."""
        out = {}
        for name, pipe in self.pipelines.items():
            if prefix is not None and not name.startswith(prefix):
                continue
            skips = pipe.skips
            seen = self._reported.get(name, 0)
            if len(skips.history) == seen:
                skips.report()
            totals = {kind: 0 for kind in readers.SKIP_KINDS}
            for counts in skips.history[seen:]:
                for kind, n in counts.items():
                    totals[kind] += n
            self._reported[name] = len(skips.history)
            out[name] = totals
        return out


class SkipReportCallback(pl.Callback):
    """Logs the data module's skip counts as ``skipped/<reader>/<kind>`` (summed over ranks) at
    the end of every train and validation epoch."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    @staticmethod
    def _log(trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, ReaderDataModule):
            return
        metrics = {
            f"skipped/{name}/{kind}": float(n)
            for name, counts in dm.skip_report(prefix).items()
            for kind, n in counts.items()
        }
        if metrics:
            pl_module.log_dict(metrics, reduce_fx="sum", sync_dist=True)


class PretrainDataModule(ReaderDataModule):
    """Masked image-text pretraining: each training step gets ``{"image_text": batch, "image":
    batch, "text": batch}`` (the kinds that have shards; BEiT-3 uses equal shares). By default
    the readers resample shards forever and ``epoch_samples`` sets the epoch length, so every
    rank gets the same number of steps; ``resampled=False`` reads each sample once per epoch
    (CombinedLoader ``mode`` then decides what happens when one kind runs out; default
    "max_size_cycle" there, "min_size" for resampled readers, see ``combined_mode``).

    ``image_text`` and ``image`` take one shard set, or several named sets with sampling weights
    (``{coco: {shards: ..., weight: 0.3}, web: {shards: ..., weight: 0.7}}``, mixed per sample by
    ``data_pipelines.mixing``; batches then carry ``source``, logged by its
    ``MixProportionsCallback``); ``text`` takes one set per language, sampled with p ~ n ** alpha
    (``language_alpha``)."""

    def __init__(
        self,
        tokenizer: Any,
        image_text: Optional[MixUrls] = None,
        image: Optional[MixUrls] = None,
        text: Optional[TextUrls] = None,
        val_image_text: Optional[Urls] = None,
        batch_size: int = 32,
        image_size: int = 224,
        patch_size: int = 16,
        max_len: int = 64,
        text_max_len: int = 128,
        image_mask_ratio: float = IMAGE_MASK_RATIO,
        image_text_mlm_ratio: float = IMAGE_TEXT_MASK_RATIO,
        text_mlm_ratio: float = TEXT_ONLY_MASK_RATIO,
        language_alpha: float = 0.5,
        resampled: bool = True,
        epoch_samples: Optional[int] = 100_000,
        mode: Optional[str] = None,
        shuffle_buffer: int = 1000,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        normalize: bool = True,
    ):
        super().__init__(num_workers, pin_memory, persistent_workers)
        if image_text is None and image is None and text is None:
            raise ValueError("PretrainDataModule needs at least one of image_text, image, text")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer

    def setup(self, stage: Optional[str] = None) -> None:
        if self.pipelines:  # setup() runs once per fit / validate / test call: keep the readers
            return
        h = self.hparams
        tok = self.tokenizer = load_tokenizer(self.tokenizer)
        epoch = h.epoch_samples if h.resampled else None
        common = dict(batch_size=h.batch_size, resampled=h.resampled, epoch_samples=epoch, shuffle_buffer=h.shuffle_buffer)
        if h.image_text is not None:  # one shard set, or several mixed by weight (data_pipelines.mixing)
            self.pipelines["train/image_text"] = mixed_pipeline(
                readers.image_text_pipeline, h.image_text, where="image_text", tokenizer=tok, image_size=h.image_size,
                train=True, max_len=h.max_len, patch_size=h.patch_size, image_mask_ratio=h.image_mask_ratio,
                mlm_ratio=h.image_text_mlm_ratio, normalize=h.normalize, seed=self.reader_seed("train/image_text"),
                **common,
            )
        if h.image is not None:
            self.pipelines["train/image"] = mixed_pipeline(
                readers.image_pipeline, h.image, where="image", image_size=h.image_size, train=True,
                patch_size=h.patch_size, image_mask_ratio=h.image_mask_ratio, normalize=h.normalize,
                seed=self.reader_seed("train/image"), **common,
            )
        if h.text is not None:
            self.pipelines["train/text"] = readers.text_pipeline(
                h.text, tok, train=True, max_len=h.text_max_len, mlm_ratio=h.text_mlm_ratio,
                alpha=h.language_alpha, seed=self.reader_seed("train/text"), **common,
            )
        if h.val_image_text is not None:
            self.pipelines["val/image_text"] = readers.image_text_pipeline(
                h.val_image_text, tok, image_size=h.image_size, train=False, batch_size=h.batch_size,
                max_len=h.max_len, patch_size=h.patch_size, image_mask_ratio=h.image_mask_ratio,
                mlm_ratio=h.image_text_mlm_ratio, normalize=h.normalize, seed=self.reader_seed("val/image_text"),
            )

    def train_dataloader(self) -> CombinedLoader:
        loaders = {name.split("/", 1)[1]: self._loader(name) for name in self.pipelines if name.startswith("train/")}
        return CombinedLoader(loaders, mode=self.combined_mode)

    @property
    def combined_mode(self) -> str:
        """``mode`` when set; else "min_size" for resampled readers (their passes have the same
        length, and min_size ends the epoch without restarting the others, as max_size_cycle
        would) and "max_size_cycle" for epoch readers."""
        if self.hparams.mode is not None:
            return self.hparams.mode
        return "min_size" if self.hparams.resampled else "max_size_cycle"

    def val_dataloader(self) -> List[readers.EpochLoader]:
        loader = self._loader("val/image_text")
        return [] if loader is None else loader


class _TaskDataModule(ReaderDataModule):
    """train / val / test shard sets of one task reader."""

    def __init__(
        self,
        train: Optional[Urls],
        val: Optional[Urls],
        test: Optional[Urls],
        num_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
    ):
        super().__init__(num_workers, pin_memory, persistent_workers)
        self.splits = {"train": train, "val": val, "test": test}

    def _build(self, urls: Urls, split: str) -> readers.Pipeline:
        raise NotImplementedError

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(getattr(trainer, "world_size", 1) or 1)

    def _stream_args(self, split: str) -> Dict[str, Any]:
        """Reader options of ``split``: under data parallelism the training reader resamples
        shards, with an epoch of the shard set's sample count (see the module docstring)."""
        world = self._world_size()
        if split != "train" or world <= 1:
            return {}
        urls = self.splits["train"]
        sets = list(urls.values()) if isinstance(urls, Mapping) else [urls]
        totals = [readers.manifest_total(u) for u in sets]
        if any(t is None for t in totals):
            raise ValueError(
                f"data.train={urls!r}: training on {world} processes needs the shard set's sample count, "
                "to give every rank the same number of steps; name the shards by their manifest "
                "(<prefix>.manifest.json, written by `mmmoe data shards`)"
            )
        total = sum(totals)
        log.info("%d processes: the training reader resamples shards, %d samples per epoch over all ranks", world, total)
        return dict(resampled=True, epoch_samples=total)

    def setup(self, stage: Optional[str] = None) -> None:
        self.tokenizer = load_tokenizer(self.tokenizer)
        for split, urls in self.splits.items():
            if urls is not None and split not in self.pipelines:
                self.pipelines[split] = self._build(urls, split)

    def train_dataloader(self):
        return self._loader("train")

    # (no ``loader or []``: the truth value of a DataLoader asks the iterable pipeline for a len())
    def val_dataloader(self):
        loader = self._loader("val")
        return [] if loader is None else loader

    def test_dataloader(self):
        loader = self._loader("test")
        return [] if loader is None else loader

    def predict_dataloader(self):
        return self.test_dataloader()


class VQADataModule(_TaskDataModule):
    """VQAv2: soft-score targets over ``answer_vocab`` (a mapping, a list, or a JSON file of
    either). The test split carries no answers (``test_with_answers=False``)."""

    def __init__(
        self,
        tokenizer: Any,
        answer_vocab: Union[str, Mapping[str, int], Sequence[str]],
        train: Optional[Urls] = None,
        val: Optional[Urls] = None,
        test: Optional[Urls] = None,
        test_with_answers: bool = False,
        batch_size: int = 32,
        image_size: int = 384,
        max_len: int = 64,
        shuffle_buffer: int = 1000,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        normalize: bool = True,
    ):
        super().__init__(train, val, test, num_workers, pin_memory, persistent_workers)
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.answer_vocab = load_answer_vocab(answer_vocab)

    def _build(self, urls: Urls, split: str) -> readers.Pipeline:
        h = self.hparams
        with_answers = split != "test" or h.test_with_answers
        return readers.vqa_pipeline(
            urls, self.tokenizer, self.answer_vocab, image_size=h.image_size, train=split == "train", **self._stream_args(split),
            batch_size=h.batch_size, max_len=h.max_len, with_answers=with_answers, shuffle_buffer=h.shuffle_buffer,
            normalize_answer=normalize_answer, seed=self.reader_seed(split),
            normalize=h.normalize,
        )


class NLVR2DataModule(_TaskDataModule):
    """NLVR2: two images and a statement, a true/false label."""

    def __init__(
        self,
        tokenizer: Any,
        train: Optional[Urls] = None,
        val: Optional[Urls] = None,
        test: Optional[Urls] = None,
        batch_size: int = 32,
        image_size: int = 384,
        max_len: int = 64,
        shuffle_buffer: int = 1000,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        normalize: bool = True,
    ):
        super().__init__(train, val, test, num_workers, pin_memory, persistent_workers)
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer

    def _build(self, urls: Urls, split: str) -> readers.Pipeline:
        h = self.hparams
        return readers.nlvr2_pipeline(
            urls, self.tokenizer, image_size=h.image_size, train=split == "train", **self._stream_args(split), batch_size=h.batch_size,
            max_len=h.max_len, shuffle_buffer=h.shuffle_buffer, normalize=h.normalize, seed=self.reader_seed(split),
        )


class CaptionDataModule(_TaskDataModule):
    """COCO captioning (Karpathy splits): train on a random reference per image per visit."""

    def __init__(
        self,
        tokenizer: Any,
        train: Optional[Urls] = None,
        val: Optional[Urls] = None,
        test: Optional[Urls] = None,
        batch_size: int = 32,
        image_size: int = 384,
        max_len: int = 32,
        shuffle_buffer: int = 1000,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        normalize: bool = True,
    ):
        super().__init__(train, val, test, num_workers, pin_memory, persistent_workers)
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer

    def _build(self, urls: Urls, split: str) -> readers.Pipeline:
        h = self.hparams
        return readers.caption_pipeline(
            urls, self.tokenizer, image_size=h.image_size, train=split == "train", **self._stream_args(split), batch_size=h.batch_size,
            max_len=h.max_len, shuffle_buffer=h.shuffle_buffer, normalize=h.normalize, seed=self.reader_seed(split),
        )


class TextDataModule(_TaskDataModule):
    """Text-only LM data, one source per language (or one): masked LM with ``mlm_ratio``, causal LM
    with ``mlm_ratio=None``. Languages are sampled by ``weights`` or p ~ n ** alpha.

    Sources are shard sets (``mmmoe data shards text``) or, with ``context`` set, also plain text
    files / folders / JSON lines (``data_pipelines.packing``).

    ``context=None``: one sample per line, ``[bos] + tokens + [eos]`` cut at ``max_len``.
    ``context=N`` (packing): documents (``doc_unit``: line, paragraph or file; the ``text_field``
    of JSON lines) are joined with EOS and cut into sequences of N tokens (the last one padded);
    the causal-LM val / test splits are strided windows (``stride``, default N) that score every
    held-out token once. ``val_fraction`` (> 0, plain-text train sources, no ``val`` given): the
    last fraction of each language's documents is held out as the val and test split and never
    trained on. ``seed`` seeds the shuffle and language mix (with epoch, rank and worker)."""

    def __init__(
        self,
        tokenizer: Any,
        train: Optional[TextUrls] = None,
        val: Optional[TextUrls] = None,
        test: Optional[TextUrls] = None,
        mlm_ratio: Optional[float] = None,
        weights: Optional[Dict[str, float]] = None,
        alpha: float = 0.5,
        batch_size: int = 32,
        max_len: int = 256,
        context: Optional[int] = None,
        stride: Optional[int] = None,
        doc_unit: str = "line",
        text_field: str = "text",
        val_fraction: float = 0.0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = False,
    ):
        super().__init__(train, val, test, num_workers, pin_memory, persistent_workers)
        if context is not None and not 2 <= int(context):
            raise ValueError(f"context must be >= 2 tokens, got {context}")
        if stride is not None and (context is None or not 1 <= stride <= context):
            raise ValueError(f"stride must be in [1, context] and needs context set, got stride={stride}, context={context}")
        if val_fraction and (context is None or val is not None or train is None):
            raise ValueError("val_fraction needs context (packing), plain-text train sources and no val split")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.doc_ranges: Dict[str, Dict[str, Any]] = {}

    @property
    def max_text_positions(self) -> int:
        """The longest text a batch holds (``context`` when packing, else ``max_len``): the model's
        ``max_text_len`` must be at least this."""
        return int(self.hparams.context if self.hparams.context is not None else self.hparams.max_len)

    def setup(self, stage: Optional[str] = None) -> None:
        h = self.hparams
        if h.val_fraction and self.splits["val"] is None:
            from .packing import heldout_split, is_text_source

            train = h.train if isinstance(h.train, Mapping) else {"und": h.train}
            for lang, urls in train.items():
                if not is_text_source(urls):
                    raise ValueError(f"val_fraction needs plain text files, but train[{lang!r}] = {urls!r} are shards")
                first, total = heldout_split(urls, h.val_fraction, h.doc_unit, h.text_field)
                self.doc_ranges[lang] = {"train": (0, first), "val": (first, total), "test": (first, total)}
            self.splits["val"] = self.splits["test"] = h.train
        super().setup(stage)

    def _build(self, urls: TextUrls, split: str) -> readers.Pipeline:
        h = self.hparams
        seed = readers.stream_seed("text", h.seed, self.reader_seed(split))
        if h.context is None:
            return readers.text_pipeline(
                urls, self.tokenizer, train=split == "train", **self._stream_args(split), batch_size=h.batch_size,
                max_len=h.max_len, mlm_ratio=h.mlm_ratio, weights=h.weights, alpha=h.alpha,
                shuffle_buffer=h.shuffle_buffer, seed=seed,
            )
        from .packing import packed_text_pipeline

        by_lang = dict(urls) if isinstance(urls, Mapping) else {"und": urls}
        ranges = {lang: r[split] for lang, r in self.doc_ranges.items()}
        return packed_text_pipeline(
            by_lang, self.tokenizer, int(h.context), train=split == "train", **self._stream_args(split),
            batch_size=h.batch_size, mlm_ratio=h.mlm_ratio, stride=h.stride, weights=h.weights, alpha=h.alpha,
            shuffle_buffer=h.shuffle_buffer, seed=seed, doc_unit=h.doc_unit, text_field=h.text_field,
            doc_ranges=ranges or None,
        )
