"""Packed LM data (data_pipelines/packing.py): no token lost or repeated across sequence boundaries,
EOS between documents, the last partial sequence; strided held-out perplexity counts every token
(against a per-token reference loop over a tiny model); the context check at setup."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from data_pipelines import packing as P
from data_pipelines import readers as W
from data_pipelines.datamodules import TextDataModule
from data_pipelines.shards import write_text_shards

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec")

WORDS = "the a red blue small large circle square sits above below near a an of on".split()


class CharTokenizer:
    """A character tokenizer with the mmmoe special ids (pad 0, unk 1, bos 2, eos 3, mask 4)."""

    pad_id, unk_id, bos_id, eos_id, mask_id = 0, 1, 2, 3, 4
    alphabet = " abcdefghijklmnopqrstuvwxyz.,"
    vocab_size = 5 + len(alphabet)

    def encode(self, text):
        return [5 + self.alphabet.index(c) if c in self.alphabet else self.unk_id for c in text.lower()]


TOK = CharTokenizer()


def _docs(n, seed=0, max_words=12):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) + "." for _ in range(n)]


def _stream(docs):
    out = []
    for d in docs:
        out += TOK.encode(d) + [TOK.eos_id]
    return out


def _unpadded(batches):
    """The non-padding ids of every row of every batch, in order."""
    seqs = []
    for b in batches:
        for ids, pad in zip(b["text_ids"], b["text_pad_mask"]):
            seqs.append(ids[~pad].tolist())
    return seqs


# ------------------------------------------------------------------------------ pack_sequences
@pytest.mark.parametrize("context", [2, 7, 64])
def test_pack_sequences_keeps_every_token_once_with_eos_between_documents(context):
    docs = _docs(30) + ["x" * 150]  # one document longer than several sequences
    samples = [{"key": str(i), "ids": TOK.encode(d) + [TOK.eos_id], "lang": "en"} for i, d in enumerate(docs)]
    seqs = [s["text"] for s in P.pack_sequences(iter(samples), context, last="pad")]
    stream = _stream(docs)
    assert sum(seqs, []) == stream  # back to back: exactly the stream, nothing lost or repeated
    assert all(len(s) == context for s in seqs[:-1])
    assert 0 < len(seqs[-1]) <= context and len(seqs[-1]) == len(stream) - context * (len(seqs) - 1)
    assert stream.count(TOK.eos_id) == len(docs) and stream[-1] == TOK.eos_id
    dropped = [s["text"] for s in P.pack_sequences(iter(samples), context, last="drop")]
    full = len(stream) // context
    assert dropped == seqs[:full] and all(len(s) == context for s in dropped)


def test_pack_sequences_rejects_bad_arguments():
    with pytest.raises(ValueError, match="context"):
        list(P.pack_sequences(iter([]), 1))
    with pytest.raises(ValueError, match="last"):
        list(P.pack_sequences(iter([]), 8, last="keep"))


# ------------------------------------------------------------------------------ sliding windows
@pytest.mark.parametrize("context,stride", [(8, 8), (8, 3), (8, 1), (5, 4), (64, 16)])
def test_sliding_windows_score_every_token_once_with_bounded_history(context, stride):
    docs = _docs(12, seed=1)
    samples = [{"key": str(i), "ids": TOK.encode(d) + [TOK.eos_id]} for i, d in enumerate(docs)]
    ext = [TOK.eos_id] + _stream(docs)
    scored = []
    for k, w in enumerate(P.sliding_windows(iter(samples), context, stride, TOK.eos_id)):
        inputs, targets = w["text"], w["lm_targets"]
        start = k * stride  # window k reads ext[k * stride :][: context]
        assert 0 < len(inputs) <= context and len(targets) == len(inputs)
        assert inputs == ext[start : start + len(inputs)]
        for j, t in enumerate(targets):
            if t != -100:
                pos = start + 1 + j  # index in ext of the scored token
                assert ext[pos] == t
                # history: the whole window before it, at least context - stride tokens (or all there is)
                assert j + 1 >= min(pos, context - stride + 1)
                scored.append(pos)
    assert scored == list(range(1, len(ext)))  # every token of the stream, once, in order


def test_sliding_windows_on_an_empty_stream_and_bad_stride():
    assert list(P.sliding_windows(iter([]), 8, 4, TOK.eos_id)) == []
    with pytest.raises(ValueError, match="stride"):
        list(P.sliding_windows(iter([]), 8, 9, TOK.eos_id))


# ------------------------------------------------------------------------------ from files and shards
def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _dm(train, **kw):
    args = dict(context=16, batch_size=4, num_workers=0, pin_memory=False, shuffle_buffer=0)
    args.update(kw)
    return TextDataModule(TOK, train=train, **args)


def test_documents_from_lines_paragraphs_files_and_json_lines(tmp_path):
    f = _write(tmp_path / "a.txt", ["one two", "three", "", "four", "", ""])
    j = tmp_path / "b.jsonl"
    j.write_text('{"text": "five six"}\n{"other": 1}\nnot json\n{"text": "seven"}\n', encoding="utf-8")
    skips = W.SkipCounter("t")
    assert [t for _, t in P.iter_documents([f, j], "line", skips=skips)] == ["one two", "three", "four", "five six", "seven"]
    assert skips.counts()["bad_json"] == 1 and skips.counts()["missing_field"] == 1
    assert [t for _, t in P.iter_documents(f, "paragraph")] == ["one two three", "four"]
    assert [t for _, t in P.iter_documents(f, "file")] == ["one two\nthree\n\nfour"]
    assert P.count_documents(tmp_path, "line") == 5  # a folder: every text file under it
    with pytest.raises(ValueError, match="doc_unit"):
        list(P.iter_documents(f, "sentence"))


def test_packed_training_data_from_text_files_and_shards_is_the_stream(tmp_path):
    docs = _docs(40, seed=2)
    f = _write(tmp_path / "en.txt", docs)
    stream = _stream(docs)
    from_files = _unpadded(_batches(_dm(str(f))))
    assert sum(from_files, []) == stream and all(len(s) == 16 for s in from_files[:-1])
    write_text_shards(f, tmp_path / "shards", prefix="t", shard_size=1000)
    from_shards = _unpadded(_batches(_dm(str(tmp_path / "shards" / "t.manifest.json"))))
    assert from_shards == from_files


def _batches(dm, split="train"):
    dm.setup("fit")
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return list(loader)


def test_shuffled_packing_is_seeded_and_keeps_every_document(tmp_path):
    docs = _docs(60, seed=3)
    f = _write(tmp_path / "en.txt", docs)
    a = _batches(_dm(str(f), shuffle_buffer=20, seed=1))
    b = _batches(_dm(str(f), shuffle_buffer=20, seed=1))
    c = _batches(_dm(str(f), shuffle_buffer=20, seed=2))
    assert all(torch.equal(x["text_ids"], y["text_ids"]) for x, y in zip(a, b)) and len(a) == len(b)
    assert not all(torch.equal(x["text_ids"], y["text_ids"]) for x, y in zip(a, c))
    stream = sum(_unpadded(a), [])
    assert sorted(stream) == sorted(_stream(docs)) and stream != _stream(docs)  # same tokens, other order


def test_text_files_are_split_over_ranks_without_loss_or_overlap(tmp_path, monkeypatch):
    f = _write(tmp_path / "en.txt", _docs(25, seed=4))
    seen = []
    for rank in range(3):
        monkeypatch.setattr(W, "node_info", lambda r=rank: (r, 3))
        seen += [s["__key__"] for s in P.TextFileSource(f, start=5, stop=22)]
    assert sorted(seen) == sorted(k for i, (k, _) in enumerate(P.iter_documents(f)) if 5 <= i < 22)


def test_val_fraction_holds_out_the_tail_and_training_never_sees_it(tmp_path):
    docs = _docs(40, seed=5)
    f = _write(tmp_path / "en.txt", docs)
    dm = _dm(str(f), val_fraction=0.1)
    train = sum(_unpadded(_batches(dm)), [])
    val_targets = [t for b in dm.val_dataloader() for t in b["lm_targets"][b["lm_targets"] != -100].tolist()]
    assert train == _stream(docs[:36]) and val_targets == _stream(docs[36:])
    with pytest.raises(ValueError, match="val_fraction"):
        TextDataModule(TOK, train=str(f), val=str(f), context=16, val_fraction=0.1)


# ------------------------------------------------------------------------------ held-out perplexity
def _tiny_lm(max_text_len=16):
    from tasks.lm import CausalLMModule

    torch.manual_seed(0)
    return CausalLMModule(backbone=dict(preset="tiny", variant="smoe", vocab_size=TOK.vocab_size, depth=2,
                                        max_text_len=max_text_len), tokenizer=None)


@pytest.mark.parametrize("stride", [16, 5])
def test_heldout_perplexity_counts_every_token_like_a_per_token_loop(tmp_path, stride):
    """exp(mean NLL) over every token of the held-out file (EOS after each document included), each
    predicted from the window that first scores it: a direct per-token computation."""
    context = 16
    docs = _docs(9, seed=6, max_words=6)
    held = _write(tmp_path / "held.txt", docs)
    module = _tiny_lm(context).eval()
    dm = TextDataModule(TOK, val=str(held), context=context, stride=stride, batch_size=3, num_workers=0,
                        pin_memory=False)
    metrics = module.evaluate_split(dm, "val", str(tmp_path / "eval"), baseline=False)
    ext = [TOK.eos_id] + _stream(docs)
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(ext)):  # token t is scored by window k: the first whose inputs reach t - 1
            begin = max(0, math.ceil((t - context) / stride)) * stride
            ids = torch.tensor([ext[begin:t]])
            h = module.backbone(text_ids=ids, attn_mode="prefix_causal").text_hidden
            total -= module.head(h[:, -1]).log_softmax(-1)[0, ext[t]].double().item()
    assert metrics["lm_tokens"] == len(ext) - 1 == len(_stream(docs))
    assert metrics["lm_perplexity"] == pytest.approx(math.exp(total / (len(ext) - 1)), rel=1e-5)
    assert 0 < metrics["expert_activation"] <= 1 and metrics["sub_token_divergence"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "eval" / "lm_metrics.json").read_text())["lm_tokens"] == len(ext) - 1


def test_context_longer_than_the_model_positions_fails_at_setup(tmp_path):
    import pytorch_lightning as pl

    f = _write(tmp_path / "en.txt", _docs(20))
    module = _tiny_lm(max_text_len=16)
    dm = _dm(str(f), context=32, val=str(f))
    with pytest.raises(ValueError, match=r"context=32.*max_text_len=16"):
        module.evaluate_split(dm, "val", str(tmp_path))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"context=32.*max_text_len=16"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 0


def test_packing_with_dataloader_workers_keeps_every_document_once(tmp_path):
    docs = _docs(50, seed=7)
    f = _write(tmp_path / "en.txt", docs)
    seqs = _unpadded(_batches(_dm(str(f), num_workers=2)))
    tokens = sum(seqs, [])
    assert sorted(tokens) == sorted(_stream(docs)) and tokens.count(TOK.eos_id) == len(docs)
    assert sum(len(s) < 16 for s in seqs) <= 2  # at most one partial sequence per worker
