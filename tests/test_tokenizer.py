"""SentencePiece tokenizer: training offline on a tiny corpus, fixed special ids, round trips."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines.tokenizer import (
    BOS_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    train_tokenizer,
)
from tasks.cli import main

ROOT = Path(__file__).resolve().parents[1]

SUBJECTS = ["a man", "two dogs", "the small cat", "a woman", "three children", "an old bus"]
VERBS = ["is riding", "are sitting on", "runs across", "looks at", "stands near", "jumps over"]
OBJECTS = ["a red bicycle.", "the green grass.", "a wooden bench.", "the busy street.",
           "a large table.", "the sandy beach."]
SENTENCES = [f"{s.capitalize()} {v} {o}" for s in SUBJECTS for v in VERBS for o in OBJECTS[:3]]
GERMAN = ["Ein Hund läuft über die Wiese.", "Zwei Kinder spielen im Park.",
          "Die Straße ist nass.", "Ein Mann fährt Fahrrad."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    (d / "en.txt").write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    (d / "de.txt").write_text("\n".join(GERMAN * 3) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def trained(request, corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / f"tok_{request.param}"
    model = train_tokenizer([corpus / "en.txt", corpus / "de.txt"], prefix, vocab_size=150,
                            model_type=request.param)
    return model, Tokenizer(model)


def test_training_writes_model_and_vocab(trained):
    model, tok = trained
    assert model.is_file() and model.suffix == ".model"
    assert model.with_suffix(".vocab").is_file()
    assert 5 < tok.vocab_size <= 150
    assert len(tok) == tok.vocab_size


def test_special_ids_fixed_layout(trained):
    _, tok = trained
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID) == (0, 1, 2, 3, 4)
    assert [tok.id_to_piece(i) for i in range(5)] == ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
    assert tok.piece_to_id("<mask>") == 4
    assert 4 in tok.encode("a <mask> dog")


def test_round_trip(trained):
    _, tok = trained
    for s in SENTENCES + GERMAN:
        ids = tok.encode(s)
        assert ids and all(isinstance(i, int) for i in ids)
        assert all(i > MASK_ID for i in ids), "ordinary text should use no special ids"
        assert tok.decode(ids) == s
    ids = tok.encode(SENTENCES[0], add_bos=True, add_eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert tok.decode(ids + [PAD_ID, PAD_ID]) == SENTENCES[0]


def test_pickle(trained):
    _, tok = trained
    tok2 = pickle.loads(pickle.dumps(tok))
    assert tok2.encode(SENTENCES[3]) == tok.encode(SENTENCES[3])


def test_garbage_model_file_is_value_error(tmp_path):
    bad = tmp_path / "garbage.model"
    bad.write_bytes(b"this is not a sentencepiece model\x00\x01\x02")
    with pytest.raises(ValueError, match="garbage.model"):
        Tokenizer(bad)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.model"):
        Tokenizer(empty)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")


def test_foreign_layout_rejected(corpus, tmp_path):
    import sentencepiece as spm

    # SentencePiece's own default layout: unk=0, bos=1, eos=2, no pad, no <mask>
    spm.SentencePieceTrainer.train(input=str(corpus / "en.txt"), model_prefix=str(tmp_path / "f"),
                                   vocab_size=60, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="layout"):
        Tokenizer(tmp_path / "f.model")


def test_bad_arguments(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_tokenizer([tmp_path / "nope.txt"], tmp_path / "t")
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer([corpus / "en.txt"], tmp_path / "t", model_type="wordpiece")
    with pytest.raises(ValueError):  # fewer pieces than the corpus has characters
        train_tokenizer([corpus / "en.txt"], tmp_path / "t", vocab_size=10)


def test_cli_tokenizer_train(corpus, tmp_path, capsys):
    out = tmp_path / "cli" / "tok"
    rc = main(["tokenizer", "train", "--input", str(corpus), "--out", str(out),
               "--vocab-size", "120", "--model-type", "bpe"])
    assert rc == 0
    assert "mask=4" in capsys.readouterr().out
    tok = Tokenizer(str(out) + ".model")
    assert tok.decode(tok.encode(GERMAN[0])) == GERMAN[0]
    assert main(["tokenizer", "train", "--input", str(tmp_path / "none.txt"), "--out",
                 str(out)]) == 2
    assert "none.txt" in capsys.readouterr().err


def test_train_tokenizer_script(corpus, tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_tokenizer.py"), "--input",
         str(corpus / "en.txt"), "--out", str(tmp_path / "s"), "--vocab-size", "100"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert Tokenizer(tmp_path / "s.model").vocab_size <= 100
