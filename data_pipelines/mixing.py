"""Weighted mixing of several shard sets of one data kind (e.g. COCO + a web image-text set).

A data kind that takes shards (``image_text`` or ``image`` of ``PretrainDataModule``) also takes a
mapping of named shard sets with sampling weights::

    image_text:
      coco: {shards: data/coco-pretrain.manifest.json, weight: 0.3}
      web:  {shards: "data/cc-{000000..000999}.tar", weight: 0.7}
      # or  coco: data/coco-pretrain.manifest.json   (weight 1)

Each set is read by its own reader stages (shard list -> split by node / worker, or resampled ->
tar -> shuffle -> decode); :class:`MixedSource` then draws every sample from one set with
probability proportional to its weight, with a generator seeded by (seed, epoch, rank, worker), so
every rank and DataLoader worker draws its own sequence, reproducibly. The weights are sample
proportions: over N samples a set gets weight x N of them up to binomial noise (a few tenths of a
point at N = 10,000). With epoch readers (``resampled=False``) a set that runs out leaves the mix
and the others are renormalised, so an epoch still reads every sample once (the proportions then
follow the data once the small sets are done); resampled readers (the pretraining default) never
run out.

Every sample carries ``source`` (its set's name) into the batch; :class:`MixProportionsCallback`
counts them and logs the realised proportions as ``mix/<kind>/<set>`` (and ``mix/text/<lang>``
for the language mix of text batches, whose languages are sampled with the exponent-smoothed
weights p_l ~ n_l ** alpha of ``readers.text_pipeline``).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import webdataset as wds
import webdataset.filters as wds_filters

from data_pipelines import readers

Urls = Union[str, Iterable[str]]
SOURCE_KEY = "source"


def parse_mix(spec: Any, where: str = "shards") -> Optional[Dict[str, Tuple[Any, float]]]:
    """``{name: (urls, weight)}`` of a mapping of shard sets, or None for plain urls (one set).

    Each value is urls (weight 1) or ``{"shards": urls, "weight": w}``; weights must be > 0."""
    if spec is None or isinstance(spec, (str, list, tuple)):
        return None
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"{where}: expected shard urls or a non-empty mapping of named shard sets, got {spec!r}")
    out: Dict[str, Tuple[Any, float]] = {}
    for name, value in spec.items():
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"shards", "weight"})
            if unknown or "shards" not in value:
                raise ValueError(f"{where}.{name}: expected {{shards: URLS, weight: W}}, got keys {sorted(value)}")
            urls, weight = value["shards"], value.get("weight", 1.0)
        else:
            urls, weight = value, 1.0
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or math.isinf(weight):
            raise ValueError(f"{where}.{name}: weight must be a positive number, got {weight!r}")
        out[str(name)] = (urls, float(weight))
    return out


class MixedSource(readers.WeightedMix):
    """Draw each sample from one of several sample streams with fixed weights, tagging it with
    ``source`` (:class:`readers.WeightedMix`, streams in name order)."""

    def __init__(self, sources: Mapping[str, Iterable[Dict[str, Any]]], weights: Mapping[str, float], seed: int = 0):
        super().__init__({k: sources[k] for k in sorted(sources)}, weights, seed=seed, tag=SOURCE_KEY)


def mixed_pipeline(builder: Callable[..., readers.Pipeline], spec: Any, seed: int = 0,
                   epoch_samples: Optional[int] = None, where: str = "shards", **kwargs: Any) -> readers.Pipeline:
    """``builder(urls, ..., **kwargs)`` (a ``readers.*_pipeline``) for plain urls; for a mapping of
    shard sets (see ``parse_mix``), one reader per set mixed by weight, then batched as
    ``builder`` batches."""
    mix = parse_mix(spec, where)
    if mix is None:
        return builder(spec, seed=seed, epoch_samples=epoch_samples, **kwargs)
    skips = kwargs.pop("skips", None) or readers.SkipCounter(where)
    streams: Dict[str, Any] = {}
    batcher = None
    for i, (name, (urls, _)) in enumerate(sorted(mix.items())):
        # each set: its own shard order and shuffle (seed + i), the builder's stages up to decoding
        pipe = builder(urls, seed=seed + 7919 * i, epoch_samples=None, skips=skips, **kwargs)
        *stages, last = pipe.pipeline
        if getattr(last, "f", None) is not wds_filters._batched:
            raise TypeError(f"{getattr(builder, '__name__', builder)} does not end with wds.batched: cannot mix it")
        # a nested readers.Pipeline: set_epoch reaches the set's shard list and shuffle, and its
        # decoders draw from generators seeded by (its seed, epoch, rank, worker)
        streams[name] = readers.Pipeline(*stages, skips=skips, seed=pipe.seed, random_stages=pipe.random_stages,
                                         nested=True)
        batcher = last
    resampled = bool(kwargs.get("resampled", False))
    batch_size = int(kwargs.get("batch_size", 32))
    epoch_batches = readers.epoch_batches(epoch_samples, batch_size, resampled)
    tail = [wds.pipelinefilter(readers.limit_per_reader)(epoch_batches)] if epoch_batches is not None else []
    return readers.Pipeline(MixedSource(streams, {n: w for n, (_, w) in mix.items()}, seed=seed), batcher, *tail,
                            skips=skips)


# ------------------------------------------------------------------------------ realised proportions
def count_sources(batch: Any, counts: Dict[str, Counter]) -> None:
    """Add the ``source`` (or, for text, ``lang``) tags of a (combined) batch to ``counts[kind]``."""
    if not isinstance(batch, Mapping):
        return
    parts = batch.items() if batch and all(isinstance(v, Mapping) or v is None for v in batch.values()) else [("batch", batch)]
    for kind, b in parts:
        if not isinstance(b, Mapping):
            continue
        tags = b.get(SOURCE_KEY)
        if tags is None and kind == "text":
            tags = b.get("lang")
        if tags:
            counts.setdefault(kind, Counter()).update(tags)


def proportions(counts: Mapping[str, Counter]) -> Dict[str, float]:
    """``{"mix/<kind>/<set>": share}`` of the counted samples."""
    out = {}
    for kind, c in counts.items():
        total = sum(c.values())
        for name, n in sorted(c.items()):
            out[f"mix/{kind}/{name}"] = n / total
    return out


try:
    import pytorch_lightning as pl

    class MixProportionsCallback(pl.Callback):
        """Logs the realised share of every shard set (and text language) among the training
        samples seen so far on this rank, every ``every_n_steps`` steps and at each epoch end."""

        def __init__(self, every_n_steps: int = 50):
            super().__init__()
            if every_n_steps < 1:
                raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
            self.every_n_steps = every_n_steps
            self.counts: Dict[str, Counter] = {}

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            count_sources(batch, self.counts)
            if (trainer.global_step % self.every_n_steps == 0) and self.counts:
                self._log(pl_module, on_step=True)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if self.counts:
                self._log(pl_module, on_step=False)

        def _log(self, pl_module: Any, on_step: bool) -> None:
            for key, value in proportions(self.counts).items():
                pl_module.log(key, value, on_step=on_step, on_epoch=not on_step, rank_zero_only=True)

except ImportError:  # pragma: no cover - Lightning is a dependency of the training side only
    pass
