"""The task data modules end to end on the built-in dataset, with 0 and 2 DataLoader workers."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import pytorch_lightning as pl
import torch

from data_pipelines import datamodules as D
from data_pipelines.builtin import make_builtin_dataset
from data_pipelines.shards import iter_tar_samples, manifest_shard_paths, write_karpathy_shards
from data_pipelines.tokenizer import Tokenizer, train_tokenizer
from data_pipelines.readers import SKIP_KINDS

IMAGE = 32  # the built-in images are drawn at 32 px here; every reader resizes to this

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec")  # raised inside Lightning


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    index = make_builtin_dataset(root, num_images=24, seed=1, image_size=IMAGE, shard_size=8)
    model = train_tokenizer([root / "text", root / "text" / "multilingual"], root / "tok", vocab_size=300)
    manifests = {name: d["manifest"] for name, d in index["datasets"].items()}
    val = write_karpathy_shards(  # held-out image-text pairs, as `mmmoe fit` makes them
        root / "coco" / "dataset_coco.json", root / "coco", root / "shards", splits=("val",), kind="image_text",
        prefix="pretrain-image-text-val",
    )
    assert val["total"] > 0
    manifests["pretrain-image-text-val"] = str(root / "shards" / "pretrain-image-text-val.manifest.json")
    return root, manifests, Tokenizer(model)


def keys_in(manifest):
    return sorted(s["__key__"] for p in manifest_shard_paths(manifest) for s in iter_tar_samples(p))


def drain(loader):
    batches = list(loader)
    return batches, sorted(k for b in batches for k in b["key"])


def answer_vocab(manifest):
    answers = set()
    for p in manifest_shard_paths(manifest):
        for s in iter_tar_samples(p):
            answers.update(json.loads(s["json"])["answers"])
    return sorted(answers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_task_data_modules_read_every_sample_once(synth, num_workers):
    root, m, tok = synth
    common = dict(batch_size=5, image_size=IMAGE, num_workers=num_workers, pin_memory=False, shuffle_buffer=10)
    vocab = answer_vocab(m["vqa-train2014"])
    modules = {
        "vqa": D.VQADataModule(tok, vocab, train=m["vqa-train2014"], val=m["vqa-val2014"], **common),
        "nlvr2": D.NLVR2DataModule(tok, train=m["nlvr2-train"], val=m["nlvr2-dev"], test=m["nlvr2-test1"], **common),
        "caption": D.CaptionDataModule(
            tok, train=m["caption-train"], val=m["caption-val"], test=m["caption-test"], **common
        ),
        "text": D.TextDataModule(
            str(root / "tok.model"),  # a model path works as well as a Tokenizer
            train={"de": m["pretrain-text-ml-de"], "fr": m["pretrain-text-ml-fr"]},
            val=m["pretrain-text-en"],
            mlm_ratio=0.15,
            batch_size=16,
            num_workers=num_workers,
            pin_memory=False,
        ),
    }
    fields = {
        "vqa": {"key", "image", "text_ids", "text_pad_mask", "question_id", "vqa_targets", "answers"},
        "nlvr2": {"key", "image_left", "image_right", "text_ids", "text_pad_mask", "label", "identifier"},
        "caption": {"key", "image", "image_id", "caption_ids", "caption_pad_mask", "captions"},
        "text": {"key", "text_ids", "text_pad_mask", "mlm_labels", "lang"},
    }
    splits = {
        "vqa": {"train": "vqa-train2014", "val": "vqa-val2014"},
        "nlvr2": {"train": "nlvr2-train", "val": "nlvr2-dev", "test": "nlvr2-test1"},
        "caption": {"train": "caption-train", "val": "caption-val", "test": "caption-test"},
        "text": {"val": "pretrain-text-en"},
    }
    for task, dm in modules.items():
        dm.setup("fit")
        loaders = {"train": dm.train_dataloader(), "val": dm.val_dataloader(), "test": dm.test_dataloader()}
        for split, name in splits[task].items():
            batches, keys = drain(loaders[split])
            assert keys == keys_in(m[name]), (task, split)  # each sample exactly once
            for b in batches:
                assert set(b) == fields[task], (task, split)
                for f in ("image", "image_left", "image_right"):
                    if f in b:
                        assert b[f].dtype == torch.float32 and b[f].shape[1:] == (3, IMAGE, IMAGE)
        if task == "text":
            batches, keys = drain(loaders["train"])
            assert keys == sorted(keys_in(m["pretrain-text-ml-de"]) + keys_in(m["pretrain-text-ml-fr"]))
            assert {lang for b in batches for lang in b["lang"]} == {"de", "fr"}
        if task == "caption":  # eval batches carry the first reference: a tokenizer round trip
            for b in drain(loaders["test"])[0]:
                for ids, pad, refs in zip(b["caption_ids"], b["caption_pad_mask"], b["captions"]):
                    kept = ids[~pad].tolist()
                    assert kept[0] == tok.bos_id and kept[-1] == tok.eos_id
                    assert tok.decode(kept[1:-1]) == refs[0]
        if task == "vqa":
            assert loaders["test"] == []  # no test split configured
        assert all(sum(c.values()) == 0 for c in dm.skip_report().values())
    vqa_batch = next(iter(modules["vqa"].train_dataloader()))
    assert vqa_batch["vqa_targets"].shape[1] == len(vocab) and (vqa_batch["vqa_targets"].max(1).values > 0).all()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pretrain_data_module(synth, num_workers):
    _, m, tok = synth
    common = dict(batch_size=8, image_size=IMAGE, patch_size=8, max_len=24, text_max_len=24, num_workers=num_workers, pin_memory=False)
    # epoch mode: every sample of every kind once per pass
    dm = D.PretrainDataModule(
        tok, image_text=m["pretrain-image-text"], image=m["pretrain-image"], text={"en": m["pretrain-text-en"]},
        val_image_text=m["pretrain-image-text-val"], resampled=False, **common,
    )
    dm.setup("fit")
    combined = dm.train_dataloader()
    assert dm.combined_mode == "max_size_cycle"
    for kind, name in (("image_text", "pretrain-image-text"), ("image", "pretrain-image"), ("text", "pretrain-text-en")):
        batches, keys = drain(combined.iterables[kind])
        assert keys == keys_in(m[name])
        b = batches[0]
        if kind != "text":
            assert b["image"].shape[1:] == (3, IMAGE, IMAGE)
            assert b["image_mask"].shape[1:] == (4, 4) and (b["image_mask"].flatten(1).sum(1) == round(0.4 * 16)).all()
        if kind != "image":
            ratio = 0.5 if kind == "image_text" else 0.15
            special = torch.isin(b["text_ids"], torch.tensor([0, 2, 3]))  # pad, bos, eos
            chosen = b["mlm_labels"] != -100
            n = (~special & ~(chosen & (b["text_ids"] == tok.mask_id))).sum(1)  # maskable before masking
            n = n + (chosen & (b["text_ids"] == tok.mask_id)).sum(1)
            assert torch.equal(chosen.sum(1), torch.round(n.double() * ratio).long().clamp(min=1))
    _, keys = drain(dm.val_dataloader())
    assert keys == keys_in(m["pretrain-image-text-val"])
    # resampled (the default): fixed epoch length, the same for every kind, so min_size ends it
    dm = D.PretrainDataModule(
        tok, image_text=m["pretrain-image-text"], image=m["pretrain-image"], text=m["pretrain-text-en"],
        epoch_samples=40, **common,
    )
    dm.setup("fit")
    assert dm.combined_mode == "min_size"
    steps = list(dm.train_dataloader())
    readers = max(num_workers, 1)  # each reader yields ceil(40 / 8 / readers) batches
    assert len(steps) == -(-5 // readers) * readers
    batch, _, _ = steps[0]
    assert set(batch) == {"image_text", "image", "text"}
    assert set(batch["image_text"]) == {"key", "image", "image_mask", "text_ids", "text_pad_mask", "mlm_labels"}
    assert set(batch["image"]) == {"key", "image", "image_mask"}


class Probe(pl.LightningModule):
    """Sums a weight times each batch's mean image: enough to run fit() over a combined loader."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.extend(k for b in batch.values() if b is not None for k in b["key"])
        return sum(self.w * b["image"].mean() for b in batch.values() if b is not None)

    def validation_step(self, batch, batch_idx):
        self.log("val/x", batch["image"].mean(), batch_size=len(batch["key"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Metrics(pl.Callback):
    def __init__(self):
        self.epochs = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("skipped/")})


def bad_shard(path, good_sample):
    """A shard with one undecodable image, one sample without a caption and one good sample."""
    members = [
        ("bad0.jpg", b"\xff\xd8 not a jpeg" * 20), ("bad0.txt", b"a caption"),
        ("bad1.jpg", good_sample["jpg"]),
        ("good.jpg", good_sample["jpg"]), ("good.txt", good_sample["txt"]),
    ]
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def test_fit_logs_skips_per_epoch(synth, tmp_path):
    _, m, tok = synth
    good = next(iter_tar_samples(manifest_shard_paths(m["pretrain-image-text"])[0]))
    urls = manifest_shard_paths(m["pretrain-image-text"]) + [bad_shard(tmp_path / "bad-000000.tar", good)]
    dm = D.PretrainDataModule(
        tok, image_text=urls, image=m["pretrain-image"], val_image_text=m["pretrain-image-text-val"], resampled=False,
        batch_size=8, image_size=IMAGE, patch_size=8, max_len=24, num_workers=2, pin_memory=False,
    )
    probe, metrics = Probe(), Metrics()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[D.SkipReportCallback(), metrics],
        default_root_dir=tmp_path,
    )
    trainer.fit(probe, datamodule=dm)
    want = {f"skipped/train/image_text/{k}": 0.0 for k in SKIP_KINDS}
    want.update({"skipped/train/image_text/corrupt_image": 1.0, "skipped/train/image_text/missing_field": 1.0})
    for epoch in metrics.epochs:  # the same counts each epoch: per-epoch, not cumulative
        assert {k: v for k, v in epoch.items() if k.startswith("skipped/train/image_text/")} == want
        assert sum(v for k, v in epoch.items() if k.startswith("skipped/train/image/")) == 0
    assert len(metrics.epochs) == 2
    # image_text is the longest kind: max_size_cycle passes over it exactly once per epoch
    image_text = keys_in(m["pretrain-image-text"]) + ["good"]  # and the good sample of the bad shard
    seen = sorted(k for k in probe.seen if k in set(image_text))
    assert seen == sorted(image_text * 2)
