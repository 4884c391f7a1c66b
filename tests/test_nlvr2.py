"""NLVR2 fine-tuning: the one 2B forward equals two separate passes, the loss ignores unknown labels,
training lowers the loss and fits the training pairs, official prediction file and scores, the
majority-class baseline. (Beating the baseline on the held-out dev split takes the tiny model
thousands of steps: scripts/finetune_vqa_nlvr2.py measures it.)"""

import json

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from data_pipelines.datamodules import NLVR2DataModule
from tasks.metrics.nlvr2 import load_labels, nlvr2_scores
from tasks.nlvr2 import NLVR2Module
from tests.test_vqa import make_task_data, one_thread, quiet_trainer

SMALL = dict(backbone=dict(preset="tiny", depth=2))


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    return make_task_data(tmp_path_factory.mktemp("nlvr2"), num_images=60)


def nlvr2_module(d, **kwargs):
    args = dict(eval_data=d["nlvr2_dev_json"], test_data=d["nlvr2_test1_json"], train_data=d["nlvr2_train_json"],
                tokenizer=d["tokenizer"], optim=dict(warmup_steps=10, weight_decay=0.0))
    args.update(kwargs)
    return NLVR2Module(**args)


def nlvr2_data(d, **kwargs):
    args = dict(train=d["nlvr2_train"], val=d["nlvr2_dev"], test=d["nlvr2_test1"], batch_size=30, image_size=64,
                max_len=24, num_workers=0, pin_memory=False)
    args.update(kwargs)
    return NLVR2DataModule(d["tokenizer"], **args)


@pytest.mark.parametrize("head_style", ["beit3", "tanh_pooler"])
def test_one_2b_forward_equals_two_passes(head_style):
    torch.manual_seed(0)
    m = NLVR2Module(backbone=dict(depth=2, vocab_size=50), head_style=head_style).eval()  # default MoE, dropless
    if head_style == "beit3":  # BEiT-3 inits its head's linear layers 0.001-scaled: make the logits matter
        with torch.no_grad():
            for p in m.head.parameters():
                p.normal_(0, 0.1)
    B, S = 3, 64
    left, right = torch.randn(B, 3, S, S), torch.randn(B, 3, S, S)
    ids = torch.randint(5, 50, (B, 7))
    pad = torch.zeros(B, 7, dtype=torch.bool)
    pad[0, 5:] = True
    with torch.no_grad():
        logits, out = m(left, right, ids, pad)
        hl = m.backbone.forward_features(image=left, text_ids=ids, text_pad_mask=pad).hidden
        hr = m.backbone.forward_features(image=right, text_ids=ids, text_pad_mask=pad).hidden
        n = m.backbone.num_image_tokens
        if head_style == "beit3":  # the final states themselves, no pooler
            feats = [hl[:, 0], hl[:, n], hr[:, 0], hr[:, n]]
        else:
            feats = [m.head.image_pooler(hl[:, 0]), m.head.text_pooler(hl[:, n]),
                     m.head.image_pooler(hr[:, 0]), m.head.text_pooler(hr[:, n])]
        ref = m.head.classifier(torch.cat(feats, dim=-1))
    assert out.hidden.shape[0] == 2 * B and logits.shape == (B, 2)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
    # swapping the images changes the answer: the head knows which image is left
    with torch.no_grad():
        swapped, _ = m(right, left, ids, pad)
    assert not torch.allclose(swapped, logits)


def test_loss_ignores_unknown_labels():
    m = NLVR2Module(backbone=dict(variant="dense", depth=1, vocab_size=50))
    m.log = lambda *a, **k: None  # no Trainer attached
    torch.manual_seed(1)
    batch = {"image_left": torch.randn(4, 3, 64, 64), "image_right": torch.randn(4, 3, 64, 64),
             "text_ids": torch.randint(5, 50, (4, 6)), "label": torch.tensor([1, -1, 0, -1])}
    m.train()
    loss = m._step(batch, "train")
    with torch.no_grad():
        logits, out = m(batch["image_left"], batch["image_right"], batch["text_ids"])
    ref = F.cross_entropy(logits[[0, 2]], torch.tensor([1, 0])) + out.aux_loss
    torch.testing.assert_close(loss, ref)
    assert m.train_label_counts.tolist() == [1, 1]  # only the known labels are counted
    batch["label"] = torch.tensor([-1, -1, -1, -1])
    loss = m._step(batch, "train")
    assert float(loss.detach()) == 0.0 and loss.requires_grad  # nothing to learn, but backward still works
    loss.backward()


@pytest.fixture(scope="module")
def trained(task_data):
    """Fit one fixed training batch (same batch every step: one batch per epoch, no shuffling)."""
    pl.seed_everything(0)
    m = nlvr2_module(task_data, optim=dict(lr=1e-3, warmup_steps=10, weight_decay=0.0), **SMALL)
    dm = nlvr2_data(task_data, batch_size=16, shuffle_buffer=0)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    with one_thread():
        # 90 steps: BEiT-3's head starts 0.001-scaled, so the untrained backbone learns slowly at first
        quiet_trainer(90, limit_train_batches=1, callbacks=[Record()]).fit(m, dm)
    return m, dm, losses


def test_fits_a_batch_whose_labels_need_the_images(trained):
    m, dm, losses = trained
    batch = next(iter(dm.train_dataloader()))
    # the batch repeats sentences with different labels: only the images can tell them apart
    pairs = list(zip(map(tuple, batch["text_ids"].tolist()), batch["label"].tolist()))
    mixed = {t for t, y in pairs if (t, 1 - y) in pairs}
    assert mixed, "precondition: a sentence with both labels in the batch"
    assert sum(losses[-10:]) / 10 < 0.3 * sum(losses[:10]) / 10, losses
    m.eval()
    with torch.no_grad():
        logits, _ = m(batch["image_left"], batch["image_right"], batch["text_ids"], batch["text_pad_mask"])
    assert torch.equal(logits.argmax(-1), batch["label"])


@pytest.mark.parametrize("split,gt", [("val", "nlvr2_dev_json"), ("test", "nlvr2_test1_json")])
def test_evaluate_split_writes_official_predictions(trained, task_data, tmp_path, split, gt):
    m, dm, _ = trained
    metrics = m.evaluate_split(dm, split, str(tmp_path))
    preds = json.loads((tmp_path / "nlvr2_predictions.json").read_text())
    labels = load_labels(task_data[gt])
    assert sorted(p["identifier"] for p in preds) == sorted(labels)
    assert all(set(p) == {"identifier", "prediction"} and p["prediction"] in ("True", "False") for p in preds)
    scores = nlvr2_scores(task_data[gt], preds)
    assert metrics["nlvr2_accuracy"] == pytest.approx(scores["accuracy"])
    assert metrics["nlvr2_consistency"] == pytest.approx(scores["consistency"])
    assert metrics["nlvr2_num_examples"] == len(labels)
    # majority class of the training labels, scored on this split
    train = list(load_labels(task_data["nlvr2_train_json"]).values())
    majority = sum(train) * 2 > len(train)
    expected = 100.0 * sum(v == majority for v in labels.values()) / len(labels)
    assert metrics["nlvr2_majority_baseline"] == pytest.approx(expected)
    share = sum(labels.values()) / len(labels)
    assert metrics["nlvr2_constant_baseline"] == pytest.approx(100.0 * max(share, 1 - share))


def test_majority_from_counted_labels_without_train_data(trained, task_data):
    m, _, _ = trained
    counts = m.train_label_counts.tolist()
    assert sum(counts) > 0
    m.hparams["train_data"] = None
    try:
        label, source = m.majority_label()
    finally:
        m.hparams["train_data"] = task_data["nlvr2_train_json"]
    assert label == (counts[1] > counts[0]) and "training" in source


def test_evaluate_errors(trained, tmp_path):
    m, dm, _ = trained
    old = m.hparams["eval_data"]
    m.hparams["eval_data"] = str(tmp_path / "missing.json")
    try:
        with pytest.raises(FileNotFoundError, match="missing.json"):
            m.evaluate_split(dm, "val", str(tmp_path))
    finally:
        m.hparams["eval_data"] = old
    with pytest.raises(ValueError, match="split"):
        m.evaluate_split(dm, "train", str(tmp_path))


def test_predict_one(trained, task_data):
    m, _, _ = trained
    imgs = sorted((task_data["data"] / "nlvr2" / "images" / "dev").glob("*.png"))
    out = m.predict_one(imgs[0], "Both images contain a circle.", right_image=imgs[1])
    assert out["prediction"] in ("True", "False") and 0.0 <= out["p_true"] <= 1.0
    assert (out["p_true"] > 0.5) == (out["prediction"] == "True")
    with pytest.raises(ValueError, match="two images"):
        m.predict_one(imgs[0], "Both images contain a circle.")
