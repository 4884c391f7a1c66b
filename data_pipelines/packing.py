"""Packed language-model data: documents -> one token stream -> fixed-length sequences.

A *document* is a non-empty line, a paragraph (lines up to a blank line, joined by spaces), a
whole file, or one field of a JSON-lines record (``text_field``, default "text"); from WebDataset
text shards (``data_pipelines.shards.write_text_shards``) it is one sample's ``txt`` member.
Each document is tokenized and followed by EOS, and the documents are joined into one stream

    d1 EOS d2 EOS d3 EOS ...

Training and masked-LM sequences (``pack_sequences``) cut that stream into consecutive pieces of
``context`` tokens: reading the sequences back to back gives the stream exactly (no token lost or
repeated at a boundary; a document may run across two sequences). The last, shorter piece is
padded by the collator (``last="pad"``, the default) or dropped (``last="drop"``).

Held-out causal-LM evaluation (``sliding_windows``) scores every token of the stream exactly once,
the standard strided evaluation: the stream is preceded by one EOS (the "end of a previous
document" that gives the first token something to be predicted from); window k reads the inputs
``ext[k*stride : k*stride + context]`` and scores only the targets not scored by an earlier window,
so with ``stride == context`` the windows are disjoint chunks, and with a smaller stride every
target after the first window has at least ``context - stride`` tokens of history. Window samples
carry ``lm_targets`` (the next token of each input position, -100 where not scored).

Everything streams (a bounded buffer per reader) and is deterministic: documents are assigned to
(rank, DataLoader worker) readers by index, and shuffled (train) with ``readers.SeededShuffle`` seeded
by (seed, epoch, rank, worker); packing happens per reader and per language.

Plain-text sources (``TextFileSource``): files, folders (every ``*.txt``, ``*.md``, ``*.rst``,
``*.jsonl`` under them, sorted) or lists of them; ``.jsonl`` files are JSON lines. A range of
document indices (``start``, ``stop``) selects a split, so a held-out tail of a corpus can be cut
off without copying it (``count_documents`` gives the total).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import webdataset as wds

from . import readers
from .masking import IGNORE_INDEX

PathLike = Union[str, "os.PathLike[str]"]
DOC_UNITS = ("line", "paragraph", "file")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl")
LAST_MODES = ("pad", "drop")


# ------------------------------------------------------------------------------ plain text files
def is_text_source(urls: Any) -> bool:
    """True when ``urls`` names plain text (a folder, or files that are not shards / manifests)."""
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    if not items:
        return False
    for u in items:
        s = str(u)
        if s.endswith(".tar") or s.endswith(".manifest.json") or "{" in s or "::" in s:
            return False
        if not (Path(s).is_dir() or Path(s).is_file()):
            return False
    return True


def text_files(paths: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    """Files of ``paths``: a folder means every text file under it (``TEXT_SUFFIXES``), sorted."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise ValueError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under folder {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"text file or folder not found: {p}")
    return out


def _lines(path: Path, skips: Optional[readers.SkipCounter]) -> Iterator[Tuple[int, str]]:
    """(line number, text without the newline); lines that are not UTF-8 are skipped and counted."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                if skips is not None:
                    skips.add("bad_utf8", readers.SampleError("bad_utf8", f"{path}:{lineno}: {e.reason}"))


def iter_documents(
    paths: Union[PathLike, Sequence[PathLike]],
    unit: str = "line",
    text_field: str = "text",
    skips: Optional[readers.SkipCounter] = None,
) -> Iterator[Tuple[str, str]]:
    """(key, document text) of every document of ``paths`` in order (see the module doc)."""
    if unit not in DOC_UNITS:
        raise ValueError(f"doc_unit must be one of {DOC_UNITS}, got {unit!r}")
    for fi, path in enumerate(text_files(paths)):
        stem = path.stem
        if path.suffix.lower() == ".jsonl":
            for lineno, line in _lines(path, skips):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    if skips is not None:
                        skips.add("bad_json", readers.SampleError("bad_json", f"{path}:{lineno}: {e}"))
                    continue
                text = rec.get(text_field) if isinstance(rec, dict) else None
                if not isinstance(text, str) or not text.strip():
                    if skips is not None:
                        skips.add("missing_field", readers.SampleError(
                            "missing_field", f"{path}:{lineno}: no non-empty string field {text_field!r}"))
                    continue
                yield f"{fi}_{stem}_{lineno}", text.strip()
        elif unit == "line":
            for lineno, line in _lines(path, skips):
                if line.strip():
                    yield f"{fi}_{stem}_{lineno}", line.strip()
        elif unit == "paragraph":
            block: List[str] = []
            start = 0
            for lineno, line in _lines(path, skips):
                if line.strip():
                    if not block:
                        start = lineno
                    block.append(line.strip())
                elif block:
                    yield f"{fi}_{stem}_{start}", " ".join(block)
                    block = []
            if block:
                yield f"{fi}_{stem}_{start}", " ".join(block)
        else:  # file
            text = "\n".join(line for _, line in _lines(path, skips)).strip()
            if text:
                yield f"{fi}_{stem}", text


def count_documents(paths: Union[PathLike, Sequence[PathLike]], unit: str = "line", text_field: str = "text") -> int:
    """How many documents ``iter_documents`` yields (one pass over the files)."""
    return sum(1 for _ in iter_documents(paths, unit, text_field))


class TextFileSource(torch.utils.data.IterableDataset):
    """A pipeline source of ``{"__key__", "text", "lang"}`` samples from plain text files.

    Documents ``start`` .. ``stop - 1`` (all by default) are read; document i goes to the reader
    ``i % (world_size * num_workers)`` (rank-major), so every document is read once per epoch over
    all ranks and workers."""

    def __init__(
        self,
        paths: Union[PathLike, Sequence[PathLike]],
        lang: str = "und",
        unit: str = "line",
        text_field: str = "text",
        start: int = 0,
        stop: Optional[int] = None,
        skips: Optional[readers.SkipCounter] = None,
    ):
        self.files = text_files(paths)  # fails early on a missing path
        if unit not in DOC_UNITS:
            raise ValueError(f"doc_unit must be one of {DOC_UNITS}, got {unit!r}")
        self.lang, self.unit, self.text_field = lang, unit, text_field
        self.start, self.stop, self.skips = start, stop, skips

    def set_epoch(self, epoch: int) -> None:  # order is fixed; shuffling happens downstream
        pass

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        rank, world = readers.node_info()
        worker, workers = readers.worker_info()
        me, n = rank * workers + worker, world * workers
        for i, (key, text) in enumerate(iter_documents(self.files, self.unit, self.text_field, self.skips)):
            if i < self.start:
                continue
            if self.stop is not None and i >= self.stop:
                return
            if (i - self.start) % n == me:
                yield {"__key__": key, "text": text, "lang": self.lang}


class DecodeDocument:
    """A document sample (a shard's ``txt`` member, or a ``TextFileSource`` sample) -> ``{"key",
    "ids": tokens + [eos], "lang"}``. The whole document is tokenized (no truncation)."""

    def __init__(self, tokenizer: Any, lang: str):
        self.tokenizer, self.lang = tokenizer, lang

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        if isinstance(sample.get("text"), str):
            text, lang = sample["text"], sample.get("lang") or self.lang
        else:
            text = readers.text_member(sample)
            lang = readers.meta_member(sample, required=False).get("lang") or self.lang
        return {"key": sample["__key__"], "ids": [*self.tokenizer.encode(text), self.tokenizer.eos_id], "lang": str(lang)}


# ------------------------------------------------------------------------------ packing
def pack_sequences(docs: Iterable[Dict[str, Any]], context: int, last: str = "pad") -> Iterator[Dict[str, Any]]:
    """Cut the stream of the documents' ``ids`` (each already ending in EOS) into consecutive
    sequences of ``context`` tokens: ``{"key", "text": ids, "lang"}``. The last shorter piece is
    kept (``last="pad"``; the collator pads it) or dropped (``last="drop"``)."""
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    if last not in LAST_MODES:
        raise ValueError(f"last must be one of {LAST_MODES}, got {last!r}")
    buf: List[int] = []
    lang, first_key, n = "und", None, 0
    for doc in docs:
        if first_key is None:
            first_key = doc["key"]
        lang = doc.get("lang", lang)
        buf.extend(doc["ids"])
        if len(buf) >= context:
            full = len(buf) // context * context
            for s in range(0, full, context):
                yield {"key": f"{first_key}+{n}", "text": buf[s : s + context], "lang": lang}
                n += 1
            del buf[:full]
    if buf and last == "pad":
        yield {"key": f"{first_key}+{n}", "text": buf, "lang": lang}


def sliding_windows(docs: Iterable[Dict[str, Any]], context: int, stride: Optional[int], start_id: int) -> Iterator[Dict[str, Any]]:
    """Strided causal-LM evaluation windows over ``[start_id] + stream`` (see the module doc):
    ``{"key", "text": inputs (<= context ids), "lm_targets": next token per input or -100, "lang"}``.
    Every token of the stream is a scored target exactly once."""
    stride = context if stride is None else stride
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    buf: List[int] = [start_id]  # ext[base:] (ext = [start_id] + stream)
    base, begin, scored, n = 0, 0, 0, 0  # scored: index in ext of the last scored target
    lang, first_key = "und", None

    def windows(final: bool) -> Iterator[Dict[str, Any]]:
        nonlocal base, begin, scored, n
        while True:
            known = base + len(buf)  # ext[0 : known] has been read
            end = begin + context  # inputs ext[begin:end], targets ext[begin + 1 : end + 1]
            clipped = end + 1 > known
            if clipped:
                if not final:
                    return
                end = known - 1  # the last window: up to the end of the stream
            if end <= scored:
                return
            inputs = buf[begin - base : end - base]
            targets = [t if begin + 1 + j > scored else IGNORE_INDEX
                       for j, t in enumerate(buf[begin + 1 - base : end + 1 - base])]
            yield {"key": f"{first_key}@{n}", "text": inputs, "lm_targets": targets, "lang": lang}
            n += 1
            scored = end
            if clipped:
                return
            begin += stride
            del buf[: begin - base]
            base = begin

    for doc in docs:
        if first_key is None:
            first_key = doc["key"]
        lang = doc.get("lang", lang)
        buf.extend(doc["ids"])
        yield from windows(final=False)
    yield from windows(final=True)


class PackedCollate(readers.Collate):
    """``Collate`` plus ``lm_targets`` (B x L, padded with -100) when the samples carry them."""

    def __call__(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch = super().__call__(samples)
        if "lm_targets" in samples[0]:
            L = batch["text_ids"].shape[1]
            t = torch.full((len(samples), L), IGNORE_INDEX, dtype=torch.long)
            for i, s in enumerate(samples):
                t[i, : len(s["lm_targets"])] = torch.as_tensor(s["lm_targets"], dtype=torch.long)
            batch["lm_targets"] = t
        return batch


def _stage(fn, *args: Any) -> Any:
    return wds.pipelinefilter(fn)(*args)


def packed_text_pipeline(
    sources_by_lang: Mapping[str, Any],
    tokenizer: Any,
    context: int,
    train: bool = True,
    batch_size: int = 32,
    mlm_ratio: Optional[float] = None,
    stride: Optional[int] = None,
    last: str = "pad",
    weights: Optional[Mapping[str, float]] = None,
    alpha: float = 0.5,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    doc_unit: str = "line",
    text_field: str = "text",
    doc_ranges: Optional[Mapping[str, Tuple[int, Optional[int]]]] = None,
    skips: Optional[readers.SkipCounter] = None,
    resampled: bool = False,
    epoch_samples: Optional[int] = None,
) -> readers.Pipeline:
    """Packed LM batches per language, mixed per sequence (languages sampled like ``text_pipeline``).

    ``sources_by_lang``: {lang: shard urls, or text files / folders}. Train and masked-LM data are
    ``pack_sequences`` of ``context`` tokens; causal-LM evaluation data (``train=False`` and
    ``mlm_ratio=None``) are ``sliding_windows`` with ``stride`` (default ``context``). Batches:
    text_ids, text_pad_mask, lang, key, and mlm_labels (masked LM) or lm_targets (evaluation).

    ``resampled`` (shard sources only; what the data modules use for training under data
    parallelism): shards are drawn with replacement forever and every reader stops after its share
    of ``ceil(epoch_samples / batch_size)`` batches, so all ranks run the same number of steps."""
    skips = skips or readers.SkipCounter("text")
    sizes: Dict[str, float] = {}
    sources: Dict[str, Any] = {}
    windows = not train and mlm_ratio is None
    for lang, urls in sources_by_lang.items():
        # one seed per language (as readers.text_pipeline): two languages must not draw the same shards
        lang_seed = readers.stream_seed("lang", seed, lang) if len(sources_by_lang) > 1 else seed
        if is_text_source(urls):
            if resampled:
                raise ValueError(f"{urls!r}: resampled (multi-process) training reads WebDataset text shards; "
                                 "write them with `mmmoe data shards text`")
            start, stop = (doc_ranges or {}).get(lang, (0, None))
            head: List[Any] = [TextFileSource(urls, lang, doc_unit, text_field, start, stop, skips)]
            if train and shuffle_buffer > 0:
                head.append(readers.SeededShuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=lang_seed))
            sizes[lang] = float(stop - start) if stop is not None else float(sum(f.stat().st_size for f in head[0].files) or 1)
        else:
            head = readers.reader_stages(urls, skips, ("txt", "json"), ("txt",), train, resampled, shuffle_buffer,
                                         lang_seed)
            sizes[lang] = float(readers.manifest_total(urls) or len(readers.expand_urls(urls)))
        tail = (_stage(sliding_windows, context, stride, tokenizer.eos_id) if windows
                else _stage(pack_sequences, context, last))
        # a nested readers.Pipeline: set_epoch reaches its shard list and shuffle buffer
        sources[lang] = readers.Pipeline(*head, wds.map(DecodeDocument(tokenizer, lang), handler=skips), tail,
                                         skips=skips, nested=True)
    probs = readers.language_probs(weights, 1.0) if weights is not None else readers.language_probs(sizes, alpha)
    collate = PackedCollate(tokenizer, mlm_ratio=mlm_ratio)
    return readers.Pipeline(
        readers.WeightedMix(sources, probs, seed=seed),
        *readers.batch_stages(collate, batch_size, readers.epoch_batches(epoch_samples, batch_size, resampled)),
        skips=skips, seed=seed, random_stages=(collate,),
    )


def heldout_split(paths: Any, fraction: float, unit: str = "line", text_field: str = "text") -> Tuple[int, int]:
    """(first held-out document, total documents): the last ``fraction`` of the documents (at
    least one, and at least one left for training)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    total = count_documents(paths, unit, text_field)
    if total < 2:
        raise ValueError(f"{paths}: {total} document(s) ({unit}s); a held-out split needs at least 2")
    held = min(total - 1, max(1, math.ceil(total * fraction)))
    return total - held, total
