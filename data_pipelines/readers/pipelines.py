"""Pipelines: the reader of each data kind as one explicit list of stages, and its loader.

Each ``*_pipeline`` is ``reader_stages`` (shard list -> split by node -> split by worker -> tar ->
shuffle) + a decode map + ``batch_stages`` (collate, optional epoch length), wrapped in a
``Pipeline`` that seeds its random stages per pass; ``EpochLoader`` runs it epoch by epoch.
"""

from __future__ import annotations

import math
import random
from itertools import islice
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import webdataset as wds

from .. import schema
from ..masking import IMAGE_MASK_RATIO, IMAGE_TEXT_MASK_RATIO, TEXT_ONLY_MASK_RATIO
from ..transforms import ImageTransform, eval_transform, train_transform
from . import shardlists
from .collate import Collate
from .decode import (
    DecodeCaption,
    DecodeImage,
    DecodeImageText,
    DecodeNLVR2,
    DecodeText,
    DecodeVQA,
    StreamRandom,
)
from .errors import SkipCounter
from .shardlists import (
    EpochShardList,
    EvalNodeSplit,
    SeededResampledShards,
    Urls,
    expand_urls,
    manifest_total,
    split_by_node,
    split_by_worker,
    stream_seed,
)
from .tars import tar_to_samples

class Pipeline(wds.DataPipeline):
    """A wds.DataPipeline that carries its SkipCounter (``skips``), forwards ``set_epoch`` to its
    stages, seeds its random stages, and can resume a pass mid-way.

    ``random_stages`` (``StreamRandom`` objects: decoders and the collate) get, at the start of
    every pass, a torch generator seeded by (seed, epoch, rank, worker, stage index). With the
    seeded shard list and shuffle buffer, every batch is then a function of (seed, epoch, rank,
    worker) and its position in the pass, whatever the process or the global RNG state.

    ``resume_batches = k`` (set by ``EpochLoader.resume``, consumed by the next pass) makes the
    next pass start after the first ``k`` batches of the loader: in a DataLoader worker ``j`` of
    ``n``, batch ``i`` of the pass came from stream ``i % n``, so stream ``j`` drops the
    ``ceil((k - j) / n)`` batches it produced and the streams are rotated by ``k % n`` (see
    ``worker_info``). Dropped batches are made in full and thrown away (the same decode, shuffle
    and random draws as the first time), so the rest of the pass is bitwise what it would have
    been without the interruption."""

    def __init__(self, *stages: Any, skips: SkipCounter, seed: int = 0, random_stages: Sequence[StreamRandom] = (),
                 nested: bool = False):
        super().__init__(*stages)
        self.skips = skips
        self.seed = seed
        self.epoch = 0
        self.random_stages = list(random_stages)
        self.resume_batches = 0
        self.nested = nested  # a source inside another pipeline: leaves the worker rotation alone

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for stage in self.pipeline:
            if hasattr(stage, "set_epoch"):
                stage.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        skip, self.resume_batches = self.resume_batches, 0  # once (also in a persistent worker's copy)
        info = torch.utils.data.get_worker_info()
        if info is not None and not self.nested:
            shardlists._WORKER_ROTATION = skip % info.num_workers
        epoch = self.epoch
        self.set_epoch(epoch)
        self.epoch = epoch + 1  # the next pass of a persistent worker's copy (EpochLoader sets it in the main process)
        rank, _ = shardlists.node_info()
        worker, num_workers = shardlists.worker_info()
        for i, stage in enumerate(self.random_stages):
            stage.generator = torch.Generator().manual_seed(stream_seed("stage", self.seed, epoch, rank, worker, i))
        mine = -(-(skip - worker) // num_workers) if skip > worker else 0  # batches i < skip with i % n == worker
        batches = super().__iter__()
        return islice(batches, mine, None) if mine else batches


class EpochLoader(torch.utils.data.DataLoader):
    """DataLoader for pipelines that batch themselves (batch_size=None). Before each pass it sets
    the pipeline's epoch (shard order changes per epoch even with non-persistent workers); after
    each complete pass it closes the epoch's skip count (``pipeline.skips.report()``: one log
    line, kept in ``last_skips`` and in ``pipeline.skips.history``).

    ``resume(epoch, batches)`` makes the next pass epoch ``epoch`` starting after its first
    ``batches`` batches (exact resume, see ``Pipeline``). The loader has its own torch generator,
    so making an iterator never draws from the global RNG (which would shift the model's draws
    between an interrupted and an uninterrupted run)."""

    def __init__(
        self,
        dataset: Pipeline,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: Optional[int] = None,
    ):
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(stream_seed("loader", getattr(dataset, "seed", 0))),
        )
        self.epoch = 0
        self.last_skips: Optional[Dict[str, int]] = None
        self._resume_batches = 0

    def resume(self, epoch: int, batches: int = 0) -> None:
        """The next pass is epoch ``epoch``, without its first ``batches`` batches."""
        if epoch < 0 or batches < 0:
            raise ValueError(f"resume(epoch={epoch}, batches={batches}): both must be >= 0")
        self.epoch, self._resume_batches = int(epoch), int(batches)

    def __iter__(self):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        if hasattr(self.dataset, "resume_batches"):
            self.dataset.resume_batches = self._resume_batches
        self._resume_batches = 0
        self.epoch += 1
        try:
            it = super().__iter__()  # workers start (and take their copy of the dataset) here
        finally:
            if hasattr(self.dataset, "resume_batches"):
                self.dataset.resume_batches = 0
        return self._pass(it)

    def _pass(self, batches: Iterator[Any]) -> Iterator[Any]:
        yield from batches
        skips = getattr(self.dataset, "skips", None)
        if skips is not None:
            self.last_skips = skips.report()


def make_loader(pipeline: Pipeline, num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False) -> EpochLoader:
    return EpochLoader(pipeline, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers)


def limit_per_reader(src: Iterable[Any], total: int) -> Iterator[Any]:
    """Epoch length for infinite (resampled) readers: ceil(total / (world_size x workers)) items
    from each reader, so one epoch is about ``total`` items over the whole job."""
    _, world_size = shardlists.node_info()
    _, num_workers = shardlists.worker_info()
    yield from islice(src, math.ceil(total / (world_size * num_workers)))


def reader_stages(
    urls: Urls,
    skips: SkipCounter,
    keep: Iterable[str],
    required: Iterable[str],
    train: bool,
    resampled: bool,
    shuffle_buffer: int,
    seed: int,
) -> List[Any]:
    """shard list -> split by node -> split by worker -> tar -> shuffle: raw byte samples."""
    if resampled:
        stages: List[Any] = [SeededResampledShards(urls, seed=seed)]
    else:
        split = split_by_node if train else EvalNodeSplit()
        stages = [EpochShardList(urls, seed=seed if train else None), split if train else split.shards, split_by_worker]
    stages.append(tar_to_samples(handler=skips, keep=keep, required=required))
    if not resampled and not train:
        stages.append(split.samples)
    if train and shuffle_buffer > 0:
        stages.append(SeededShuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed))
    return stages


class SeededShuffle:
    """Sample shuffle buffer whose order depends only on (seed, epoch, rank, worker), so a run
    repeats exactly with the same seed (webdataset's own shuffle seeds itself from pid and time).

    The buffer fills to ``initial`` samples before the first one leaves, then grows towards
    ``bufsize`` while emitting: each incoming sample swaps places with a random buffered one,
    which is emitted."""

    def __init__(self, bufsize: int, initial: int = 100, seed: int = 0):
        self.bufsize, self.initial, self.seed = bufsize, max(1, min(initial, bufsize)), seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        rank, _ = shardlists.node_info()
        worker, _ = shardlists.worker_info()
        rng = random.Random(stream_seed("shuffle", self.seed, self.epoch, rank, worker))
        buf: List[Any] = []
        for sample in src:
            if len(buf) < self.initial or (len(buf) < self.bufsize and rng.random() < 0.5):
                buf.append(sample)  # still filling (half the time once past ``initial``)
                continue
            i = rng.randrange(len(buf))
            out, buf[i] = buf[i], sample
            yield out
        rng.shuffle(buf)
        yield from buf


def batch_stages(collate: Collate, batch_size: int, epoch_batches: Optional[int]) -> List[Any]:
    stages: List[Any] = [wds.batched(batch_size, collation_fn=collate, partial=True)]
    if epoch_batches is not None:
        stages.append(wds.pipelinefilter(limit_per_reader)(epoch_batches))
    return stages


def epoch_batches(epoch_samples: Optional[int], batch_size: int, resampled: bool) -> Optional[int]:
    if epoch_samples is None:
        return None
    if not resampled:
        raise ValueError("epoch_samples applies to resampled=True readers; epoch readers end with the data")
    return math.ceil(epoch_samples / batch_size)


def _transform(image_size: int, train: bool, hflip: bool) -> ImageTransform:
    return train_transform(image_size, hflip=hflip) if train else eval_transform(image_size)


def image_text_pipeline(
    urls: Urls,
    tokenizer: Any,
    image_size: int = 224,
    train: bool = True,
    batch_size: int = 32,
    max_len: int = 64,
    patch_size: int = 16,
    image_mask_ratio: Optional[float] = IMAGE_MASK_RATIO,
    mlm_ratio: Optional[float] = IMAGE_TEXT_MASK_RATIO,
    hflip: bool = False,
    resampled: bool = False,
    epoch_samples: Optional[int] = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    skips: Optional[SkipCounter] = None,
    normalize: bool = True,
) -> Pipeline:
    """Image-text pretraining pairs (``jpg`` + ``txt``): image, image_mask, text_ids, text_pad_mask,
    mlm_labels. ``image_mask_ratio=None`` / ``mlm_ratio=None`` leave out the masks."""
    skips = skips or SkipCounter("image_text")
    transform = _transform(image_size, train, hflip)
    collate = Collate(
        tokenizer,
        transform.normalizer,
        patch_grid=_grid(image_size, patch_size) if image_mask_ratio is not None else None,
        image_mask_ratio=image_mask_ratio or 0.0,
        mlm_ratio=mlm_ratio,
        normalize=normalize,
    )
    decode = DecodeImageText(tokenizer, transform, max_len)
    return Pipeline(
        *reader_stages(urls, skips, ("jpg", "txt", "json"), ("jpg", "txt"), train, resampled, shuffle_buffer, seed),
        wds.map(decode, handler=skips),
        *batch_stages(collate, batch_size, epoch_batches(epoch_samples, batch_size, resampled)),
        skips=skips, seed=seed, random_stages=(decode, collate),
    )


def image_pipeline(
    urls: Urls,
    image_size: int = 224,
    train: bool = True,
    batch_size: int = 32,
    patch_size: int = 16,
    image_mask_ratio: Optional[float] = IMAGE_MASK_RATIO,
    hflip: bool = False,
    resampled: bool = False,
    epoch_samples: Optional[int] = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    skips: Optional[SkipCounter] = None,
    normalize: bool = True,
) -> Pipeline:
    """Image-only pretraining (``jpg``): image, image_mask."""
    skips = skips or SkipCounter("image")
    transform = _transform(image_size, train, hflip)
    collate = Collate(
        _NoTokenizer(),
        transform.normalizer,
        patch_grid=_grid(image_size, patch_size) if image_mask_ratio is not None else None,
        image_mask_ratio=image_mask_ratio or 0.0,
        normalize=normalize,
    )
    decode = DecodeImage(transform)
    return Pipeline(
        *reader_stages(urls, skips, ("jpg", "json"), ("jpg",), train, resampled, shuffle_buffer, seed),
        wds.map(decode, handler=skips),
        *batch_stages(collate, batch_size, epoch_batches(epoch_samples, batch_size, resampled)),
        skips=skips, seed=seed, random_stages=(decode, collate),
    )


def language_probs(sizes: Mapping[str, float], alpha: float) -> Dict[str, float]:
    """XLM-style sampling: p_l proportional to n_l ** alpha (alpha = 1: by size; 0: uniform)."""
    if not sizes:
        raise ValueError("no languages")
    if any(n <= 0 for n in sizes.values()):
        raise ValueError(f"language sizes must be positive, got {dict(sizes)}")
    w = {lang: float(n) ** alpha for lang, n in sizes.items()}
    total = sum(w.values())
    return {lang: x / total for lang, x in w.items()}


class WeightedMix(torch.utils.data.IterableDataset):
    """Draw each sample from one of several pipelines with fixed probabilities (any positive
    weights; normalised here). In epoch mode a finished source drops out and the others are
    renormalised, so each sample still comes once. The generator is seeded by (seed, epoch, rank,
    worker). With ``tag``, each sample (a dict) gets its source's name under that key."""

    def __init__(self, sources: Mapping[str, Iterable[Any]], probs: Mapping[str, float], seed: Optional[int] = None,
                 tag: Optional[str] = None):
        if set(sources) != set(probs) or not sources:
            raise ValueError(f"sources {sorted(sources)} and weights {sorted(probs)} must name the same sets")
        total = sum(probs.values())
        self.sources = dict(sources)
        self.probs = {k: float(w) / total for k, w in probs.items()}
        self.seed = seed
        self.tag = tag
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for src in self.sources.values():
            if hasattr(src, "set_epoch"):
                src.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        rank, _ = shardlists.node_info()
        worker, _ = shardlists.worker_info()
        rng = random.Random(stream_seed("mix", self.seed or 0, self.epoch, rank, worker))
        self.epoch += 1
        live = {name: iter(src) for name, src in self.sources.items()}
        while live:
            names = list(live)
            name = rng.choices(names, weights=[self.probs[n] for n in names])[0]
            try:
                sample = next(live[name])
            except StopIteration:
                del live[name]
                continue
            if self.tag is not None:
                sample[self.tag] = name
            yield sample


def text_pipeline(
    urls_by_lang: Union[Mapping[str, Urls], Urls],
    tokenizer: Any,
    train: bool = True,
    batch_size: int = 32,
    max_len: int = 128,
    mlm_ratio: Optional[float] = TEXT_ONLY_MASK_RATIO,
    weights: Optional[Mapping[str, float]] = None,
    alpha: float = 0.5,
    sizes: Optional[Mapping[str, int]] = None,
    resampled: bool = False,
    epoch_samples: Optional[int] = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    skips: Optional[SkipCounter] = None,
) -> Pipeline:
    """Text-only (``txt``), one shard set per language, mixed per sample: text_ids, text_pad_mask,
    mlm_labels (``mlm_ratio=None`` for causal LM), lang.

    Language probabilities: ``weights`` if given, else p_l proportional to n_l ** alpha where n_l
    is ``sizes[l]``, else the manifest's total, else the language's shard count.
    """
    if isinstance(urls_by_lang, (str, list, tuple)):
        urls_by_lang = {"und": urls_by_lang}
    skips = skips or SkipCounter("text")
    if weights is not None:
        probs = language_probs(weights, 1.0)
    else:
        n = {}
        for lang, urls in urls_by_lang.items():
            n[lang] = (sizes or {}).get(lang) or manifest_total(urls) or len(expand_urls(urls))
        probs = language_probs(n, alpha)
    sources = {
        # one seed per language: two languages' readers must not draw the same shard sequence
        lang: Pipeline(
            *reader_stages(urls, skips, ("txt", "json"), ("txt",), train, resampled, shuffle_buffer,
                            stream_seed("lang", seed, lang) if len(urls_by_lang) > 1 else seed),
            wds.map(DecodeText(tokenizer, max_len, lang), handler=skips),
            skips=skips, nested=True,
        )
        for lang, urls in urls_by_lang.items()
    }
    collate = Collate(tokenizer, mlm_ratio=mlm_ratio)
    return Pipeline(
        WeightedMix(sources, probs, seed=seed),
        *batch_stages(collate, batch_size, epoch_batches(epoch_samples, batch_size, resampled)),
        skips=skips, seed=seed, random_stages=(collate,),
    )


def vqa_pipeline(
    urls: Urls,
    tokenizer: Any,
    answer_vocab: Mapping[str, int],
    image_size: int = 384,
    train: bool = True,
    batch_size: int = 32,
    max_len: int = 64,
    with_answers: bool = True,
    normalize_answer: Optional[Callable[[str], str]] = None,
    resampled: bool = False,
    epoch_samples: Optional[int] = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    skips: Optional[SkipCounter] = None,
    normalize: bool = True,
) -> Pipeline:
    """VQAv2 (``jpg`` + ``json``): image, text_ids, text_pad_mask, question_id, and with_answers:
    vqa_targets (B, len(answer_vocab)) with min(1, n/3) for an answer given n times, answers.
    ``normalize_answer`` maps raw answers to vocabulary entries (identity when None)."""
    skips = skips or SkipCounter("vqa")
    transform = _transform(image_size, train, hflip=False)
    num_answers = max(answer_vocab.values(), default=-1) + 1
    collate = Collate(tokenizer, transform.normalizer, num_answers=num_answers, normalize=normalize)
    decode = DecodeVQA(tokenizer, transform, max_len, answer_vocab, with_answers, normalize_answer)
    return Pipeline(
        *reader_stages(urls, skips, ("jpg", "json"), ("jpg", "json"), train, resampled, shuffle_buffer, seed),
        wds.map(decode, handler=skips),
        *batch_stages(collate, batch_size, epoch_batches(epoch_samples, batch_size, resampled)),
        skips=skips, seed=seed, random_stages=(decode, collate),
    )


def nlvr2_pipeline(
    urls: Urls,
    tokenizer: Any,
    image_size: int = 384,
    train: bool = True,
    batch_size: int = 32,
    max_len: int = 64,
    resampled: bool = False,
    epoch_samples: Optional[int] = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    skips: Optional[SkipCounter] = None,
    normalize: bool = True,
) -> Pipeline:
    """NLVR2 (``left.jpg`` + ``right.jpg`` + ``json``): image_left, image_right, text_ids,
    text_pad_mask, label, identifier. Never flipped (the statements talk about left and right)."""
    skips = skips or SkipCounter("nlvr2")
    transform = _transform(image_size, train, hflip=False)
    collate = Collate(tokenizer, transform.normalizer, normalize=normalize)
    keep = (schema.LEFT_IMAGE_KEY, schema.RIGHT_IMAGE_KEY, schema.META_KEY)
    decode = DecodeNLVR2(tokenizer, transform, max_len)
    return Pipeline(
        *reader_stages(urls, skips, keep, keep, train, resampled, shuffle_buffer, seed),
        wds.map(decode, handler=skips),
        *batch_stages(collate, batch_size, epoch_batches(epoch_samples, batch_size, resampled)),
        skips=skips, seed=seed, random_stages=(decode, collate),
    )


def caption_pipeline(
    urls: Urls,
    tokenizer: Any,
    image_size: int = 384,
    train: bool = True,
    batch_size: int = 32,
    max_len: int = 32,
    hflip: bool = False,
    resampled: bool = False,
    epoch_samples: Optional[int] = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    skips: Optional[SkipCounter] = None,
    normalize: bool = True,
) -> Pipeline:
    """COCO captioning (``jpg`` + ``json``): image, image_id, caption_ids, caption_pad_mask (train:
    a random one of the image's captions each time; eval: the first), captions (all)."""
    skips = skips or SkipCounter("caption")
    transform = _transform(image_size, train, hflip)
    collate = Collate(tokenizer, transform.normalizer, text_prefix="caption", normalize=normalize)
    decode = DecodeCaption(tokenizer, transform, max_len, train)
    return Pipeline(
        *reader_stages(urls, skips, ("jpg", "json"), ("jpg", "json"), train, resampled, shuffle_buffer, seed),
        wds.map(decode, handler=skips),
        *batch_stages(collate, batch_size, epoch_batches(epoch_samples, batch_size, resampled)),
        skips=skips, seed=seed, random_stages=(decode, collate),
    )


def _grid(image_size: int, patch_size: int) -> Tuple[int, int]:
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    return image_size // patch_size, image_size // patch_size


class _NoTokenizer:
    """Stand-in for readers without text."""

    pad_id = 0
    vocab_size = 0
