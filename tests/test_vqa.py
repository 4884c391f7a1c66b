"""VQAv2 fine-tuning: answer vocabulary, official soft targets and loss, fine-tuning on the built-in
dataset beats the majority-answer baseline on the held-out split, official result file."""

import contextlib
import json
from collections import Counter
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from data_pipelines.builtin import make_builtin_dataset
from data_pipelines.datamodules import VQADataModule
from data_pipelines.tokenizer import train_tokenizer
from data_pipelines.formats.vqa import normalize_answer
from tasks.metrics.vqa import vqa_accuracy
from tasks.vqa import VQAModule, ensure_answer_vocab, read_answer_vocab

NUM_IMAGES = 100
SMALL = dict(backbone=dict(preset="tiny", variant="dense", depth=2))


# ------------------------------------------------------------------------------ shared helpers
def make_task_data(root: Path, num_images: int = NUM_IMAGES) -> dict:
    """The built-in dataset (64 px images) and a ~300-piece tokenizer in ``root/data``: the layout of
    ``data/synth`` that the configs in configs/finetune expect."""
    data = root / "data"
    make_builtin_dataset(data, num_images=num_images, seed=0, image_size=64)
    tok = train_tokenizer([data / "text" / "en.txt"], data / "tokenizer", vocab_size=300)  # data/tokenizer.model
    vqav2, shards = data / "vqav2", data / "shards"
    return {
        "root": root, "data": data, "tokenizer": str(tok),
        "vqa_train": str(shards / "vqa-train2014.manifest.json"),
        "vqa_val": str(shards / "vqa-val2014.manifest.json"),
        "train_questions": str(vqav2 / "v2_OpenEnded_mscoco_train2014_questions.json"),
        "train_annotations": str(vqav2 / "v2_mscoco_train2014_annotations.json"),
        "val_questions": str(vqav2 / "v2_OpenEnded_mscoco_val2014_questions.json"),
        "val_annotations": str(vqav2 / "v2_mscoco_val2014_annotations.json"),
        "nlvr2_train": str(shards / "nlvr2-train.manifest.json"),
        "nlvr2_dev": str(shards / "nlvr2-dev.manifest.json"),
        "nlvr2_test1": str(shards / "nlvr2-test1.manifest.json"),
        "nlvr2_train_json": str(data / "nlvr2" / "train.json"),
        "nlvr2_dev_json": str(data / "nlvr2" / "dev.json"),
        "nlvr2_test1_json": str(data / "nlvr2" / "test1.json"),
    }


@contextlib.contextmanager
def one_thread():
    """Tiny models train faster on one thread than on several competing ones (shared CI cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quiet_trainer(max_steps: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        **kwargs,
    )


def vqa_module(d: dict, **kwargs) -> VQAModule:
    args = dict(
        answer_vocab=str(d["root"] / "answers.json"), train_annotations=d["train_annotations"], min_answer_freq=1,
        eval_questions=d["val_questions"], eval_annotations=d["val_annotations"], tokenizer=d["tokenizer"],
        optim=dict(warmup_steps=10, weight_decay=0.01),
    )
    args.update(kwargs)
    return VQAModule(**args)


def vqa_data(d: dict, module: VQAModule, **kwargs) -> VQADataModule:
    args = dict(train=d["vqa_train"], val=d["vqa_val"], batch_size=32, image_size=64, max_len=24, num_workers=0,
                pin_memory=False)
    args.update(kwargs)
    return VQADataModule(d["tokenizer"], module.answers, **args)


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    return make_task_data(tmp_path_factory.mktemp("vqa"))


def write_annotations(path: Path, rows):
    """rows: (question_id, multiple_choice_answer, [10 answers])."""
    anns = [{"question_type": "what", "multiple_choice_answer": mc, "image_id": 1, "answer_type": "other",
             "question_id": qid,
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}
            for qid, mc, answers in rows]
    path.write_text(json.dumps({"info": {}, "license": {}, "data_subtype": "train2014", "annotations": anns}))
    return str(path)


# ------------------------------------------------------------------------------ vocabulary
def test_answer_vocab_built_normalised_and_frequency_sorted(tmp_path):
    mcs = ["yes", "Yes", "yes.", "two", "2", "a dog", "dog", "no", "cat"]
    ann = write_annotations(tmp_path / "ann.json", [(i, mc, [mc] * 10) for i, mc in enumerate(mcs)])
    path = tmp_path / "sub" / "answers.json"
    answers = ensure_answer_vocab(path, ann, min_freq=2)
    # normalised counts: yes 3, 2 2, dog 2, no 1, cat 1 -> kept >= 2, ties alphabetical
    assert answers == ["yes", "2", "dog"]
    assert json.loads(path.read_text()) == answers
    assert ensure_answer_vocab(path) == answers  # an existing file is read, annotations not needed
    assert read_answer_vocab(path) == answers
    with pytest.raises(FileNotFoundError, match="train_annotations"):
        ensure_answer_vocab(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="min_answer_freq"):
        ensure_answer_vocab(tmp_path / "none.json", ann, min_freq=50)


def test_answer_vocab_formats_and_errors(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"no": 1, "yes": 0}))
    assert read_answer_vocab(tmp_path / "map.json") == ["yes", "no"]
    (tmp_path / "gap.json").write_text(json.dumps({"no": 2, "yes": 0}))
    with pytest.raises(ValueError, match="0..1"):
        read_answer_vocab(tmp_path / "gap.json")
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_answer_vocab(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="duplicated"):
        VQAModule(answer_vocab=["yes", "yes"], **SMALL)
    with pytest.raises(ValueError, match="empty"):
        VQAModule(answer_vocab=[], **SMALL)
    with pytest.raises(ValueError, match="loss_reduction"):
        VQAModule(answer_vocab=["yes", "no"], loss_reduction="sum", **SMALL)


def test_module_keeps_vocabulary_and_majority_answer(tmp_path):
    rows = [(0, "no", ["no"] * 10), (1, "No", ["no"] * 10), (2, "yes", ["yes"] * 10), (3, "red", ["red"] * 10)]
    ann = write_annotations(tmp_path / "ann.json", rows)
    m = VQAModule(answer_vocab=str(tmp_path / "a.json"), train_annotations=ann, min_answer_freq=1, **SMALL)
    assert m.answers == ["no", "red", "yes"] and m.num_answers == 3
    assert m.hparams["answer_vocab"] == ["no", "red", "yes"]  # the checkpoint holds the list itself
    assert m.hparams["majority_answer"] == "no"
    assert m.head.classifier[-1].out_features == 3
    # without annotations the first (most frequent) vocabulary entry is the baseline answer
    assert VQAModule(answer_vocab=["b", "a"], **SMALL).hparams["majority_answer"] == "b"


# ------------------------------------------------------------------------------ targets and loss
def test_soft_targets_use_official_normalisation():
    m = VQAModule(answer_vocab=["2", "dog", "yes", "no"], **SMALL)
    answers = [
        ["two"] * 3 + ["2"] * 2 + ["a dog"] * 5,   # "two" -> "2": 5 annotators -> 1.0; "a dog" -> "dog"
        ["yes"] + ["no"] * 9,
        ["Yes"] * 2 + ["cat"] * 8,                 # "Yes" -> "yes": 2/3; "cat" is not a class
    ]
    t = m.targets({"answers": answers})
    expected = torch.tensor([[1.0, 1.0, 0, 0], [0, 0, 1 / 3, 1.0], [0, 0, 2 / 3, 0]])
    torch.testing.assert_close(t, expected)
    # reference: the normalised counts
    counts = Counter(normalize_answer(a) for a in answers[2])
    assert counts["yes"] == 2
    # a batch without raw answers uses the data module's targets, which must match the vocabulary
    torch.testing.assert_close(m.targets({"vqa_targets": expected}), expected)
    with pytest.raises(ValueError, match="vocabular"):
        m.targets({"vqa_targets": torch.zeros(1, 7)})


def test_loss_reductions():
    logits, targets = torch.randn(3, 4), torch.rand(3, 4)
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    m = VQAModule(answer_vocab=["a", "b", "c", "d"], **SMALL)
    torch.testing.assert_close(m.loss(logits, targets), bce * 4)  # BEiT-3: sum over answers, batch mean
    manual = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).sum(1).mean()
    torch.testing.assert_close(m.loss(logits, targets), manual)
    m2 = VQAModule(answer_vocab=["a", "b", "c", "d"], loss_reduction="mean", **SMALL)
    torch.testing.assert_close(m2.loss(logits, targets), bce)


def test_init_from_loads_backbone_only(tmp_path):
    src = VQAModule(answer_vocab=["a", "b"], **SMALL)
    ckpt = tmp_path / "pre.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in src.backbone.state_dict().items()}}, ckpt)
    dst = VQAModule(answer_vocab=["a", "b", "c"], init_from=str(ckpt), **SMALL)
    for k, v in src.backbone.state_dict().items():
        torch.testing.assert_close(dst.backbone.state_dict()[k], v)
    assert any(k.startswith("head.") for k in dst.load_report["missing"])
    assert not dst.load_report["unexpected"]


# ------------------------------------------------------------------------------ fine-tuning
@pytest.fixture(scope="module")
def trained(task_data):
    pl.seed_everything(0)
    # default MoE variant (mhmoe-h2), 2 blocks: ~300 steps leave the answer-prior plateau behind
    m = vqa_module(task_data, optim=dict(lr=1e-3, min_lr_ratio=0.5, warmup_steps=20, weight_decay=0.01),
                   backbone=dict(depth=2))
    dm = vqa_data(task_data, m)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = quiet_trainer(300, callbacks=[Record()])
    with one_thread():
        trainer.fit(m, dm)
    return m, dm, losses, trainer


def test_finetune_beats_majority_baseline(trained, task_data, tmp_path):
    m, dm, losses, _ = trained
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20, losses
    metrics = m.evaluate_split(dm, "val", str(tmp_path))
    # the official result file: every val question exactly once, answers from the vocabulary
    results = json.loads((tmp_path / "vqa_results.json").read_text())
    questions = json.loads(Path(task_data["val_questions"]).read_text())["questions"]
    assert sorted(r["question_id"] for r in results) == sorted(q["question_id"] for q in questions)
    assert all(set(r) == {"question_id", "answer"} and r["answer"] in m.answers for r in results)
    # the metrics are the official scorer's on that file
    official = vqa_accuracy(task_data["val_questions"], task_data["val_annotations"], results)
    assert metrics["vqa_accuracy"] == official["overall"]
    assert metrics["vqa_num_questions"] == len(questions)
    assert metrics["vqa_accuracy_yes_no"] == official["perAnswerType"]["yes/no"]
    # the baseline: always the most common (normalised) training answer
    train = json.loads(Path(task_data["train_annotations"]).read_text())["annotations"]
    counts = Counter(normalize_answer(a["multiple_choice_answer"]) for a in train)
    majority = min(counts, key=lambda a: (-counts[a], a))  # ties: alphabetical first
    assert m.hparams["majority_answer"] == majority
    base = vqa_accuracy(task_data["val_questions"], task_data["val_annotations"],
                        [{"question_id": q["question_id"], "answer": majority} for q in questions])
    assert metrics["vqa_majority_baseline"] == base["overall"]
    print("VQA val", metrics)
    assert metrics["vqa_accuracy"] > metrics["vqa_majority_baseline"] + 5.0


def test_evaluate_without_ground_truth_writes_results_only(trained, tmp_path):
    m, dm, _, _ = trained
    old = m.hparams["eval_questions"], m.hparams["eval_annotations"]
    m.hparams["eval_questions"], m.hparams["eval_annotations"] = None, None
    try:
        metrics = m.evaluate_split(dm, "val", str(tmp_path))
    finally:
        m.hparams["eval_questions"], m.hparams["eval_annotations"] = old
    assert set(metrics) == {"vqa_num_questions"}
    assert (tmp_path / "vqa_results.json").is_file() and not (tmp_path / "vqa_scores.json").exists()


def test_evaluate_errors(trained, tmp_path):
    m, dm, _, _ = trained
    with pytest.raises(ValueError, match="no test split"):
        m.evaluate_split(dm, "test", str(tmp_path))
    old = m.hparams["eval_annotations"]
    m.hparams["eval_annotations"] = str(tmp_path / "nope.json")
    try:
        with pytest.raises(FileNotFoundError, match="nope.json"):
            m.evaluate_split(dm, "val", str(tmp_path))
        m.hparams["eval_annotations"] = None
        with pytest.raises(ValueError, match="both eval_questions and eval_annotations"):
            m.evaluate_split(dm, "val", str(tmp_path))
    finally:
        m.hparams["eval_annotations"] = old


def test_predict_one(trained, task_data):
    m, _, _, _ = trained
    img = next((task_data["data"] / "coco" / "val2014").glob("*.jpg"))
    out = m.predict_one(img, "how many shapes are there?")
    assert out["answer"] == out["top"][0]["answer"] and out["answer"] in m.answers
    scores = [t["score"] for t in out["top"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    with pytest.raises(ValueError, match="question"):
        m.predict_one(img, "  ")
    with pytest.raises(FileNotFoundError):
        m.predict_one(img.with_name("missing.jpg"), "what?")
