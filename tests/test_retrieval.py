"""Image-text retrieval: Karpathy-protocol recalls against a brute-force reference, the exact
random-ranking baseline against enumeration, the contrastive loss (and its gradient) against a
plain formula, the gradient of the loss gathered over 2 gloo ranks (uneven batches) equal to one
process's over the whole batch, and fine-tuning on the built-in data beating random ranking."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from mmmoe.parallel import free_port as _free_port
from tasks.contrastive import contrastive_loss, random_recall, recall_at_k
from tests.gloo_contrastive_worker import problem, rank_grads


# ------------------------------------------------------------------------------ metrics
def brute_recalls(sim, text_image, ks=(1, 5, 10)):
    I, T = sim.shape
    out = {}
    for k in ks:
        hit = 0
        for i in range(I):
            ranked = sorted(range(T), key=lambda t: (-float(sim[i, t]), t))[:k]
            hit += any(int(text_image[t]) == i for t in ranked)
        out[f"retrieval_i2t_r{k}"] = 100.0 * hit / I
        hit = 0
        for t in range(T):
            ranked = sorted(range(I), key=lambda i: (-float(sim[i, t]), i))[:k]
            hit += int(text_image[t]) in ranked
        out[f"retrieval_t2i_r{k}"] = 100.0 * hit / T
    return out


def test_recall_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    I, per = 12, [5] * 10 + [3, 4]
    text_image = torch.tensor([i for i, n in enumerate(per) for _ in range(n)])
    sim = torch.randn(I, len(text_image), generator=g)
    sim[:, 7] = sim[:, 3]  # ties are broken by index in both
    got, want = recall_at_k(sim, text_image), brute_recalls(sim, text_image)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k]), k
    # a perfect ranking: every image's own texts first
    perfect = (text_image[None, :] == torch.arange(I)[:, None]).float()
    assert all(v == 100.0 for v in recall_at_k(perfect, text_image).values())


def test_random_baseline_is_the_exact_expectation():
    per = [2, 1, 3]  # 3 images, 6 texts
    text_image = [i for i, n in enumerate(per) for _ in range(n)]
    T, I = len(text_image), len(per)
    for k in (1, 2, 5):
        # i2t: average over all orders of the texts
        hits = [sum(any(text_image[t] == i for t in order[:k]) for i in range(I)) / I
                for order in itertools.permutations(range(T))]
        # t2i: average over all orders of the images
        t2i = [sum(text_image[t] in order[:k] for t in range(T)) / T for order in itertools.permutations(range(I))]
        got = random_recall(I, per, ks=(k,))
        assert got[f"retrieval_i2t_r{k}_random"] == pytest.approx(100 * sum(hits) / len(hits))
        assert got[f"retrieval_t2i_r{k}_random"] == pytest.approx(100 * sum(t2i) / len(t2i))


# ------------------------------------------------------------------------------ loss
def test_contrastive_loss_matches_clip_formula_and_handles_shared_images():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(10.0)
    loss, acc = contrastive_loss(img, txt, scale)
    logits = scale * img @ txt.t()
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6)))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    g1 = torch.autograd.grad(loss, (img, txt))
    g2 = torch.autograd.grad(ref, (img, txt))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
    assert acc["i2t_acc"].item() == pytest.approx((logits.argmax(1) == torch.arange(6)).float().mean().item())
    # two captions of image 7 in the batch: both are positives of both (targets 1/2 each)
    ids = torch.tensor([1, 7, 7, 3, 4, 5])
    loss2, _ = contrastive_loss(img, txt, scale, ids)
    pos = (ids[:, None] == ids[None, :]).float()
    tgt = pos / pos.sum(1, keepdim=True)
    ref2 = 0.5 * (-(tgt * logits.log_softmax(1)).sum(1).mean() - (tgt * logits.t().log_softmax(1)).sum(1).mean())
    assert loss2.item() == pytest.approx(ref2.item(), rel=1e-6)
    local, _ = contrastive_loss(img, txt, scale, ids, gather=False)  # one process: the same
    assert local.item() == pytest.approx(loss2.item(), rel=1e-6)




def test_gathered_loss_gradient_over_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_grads, args=(r, 2, port, str(tmp_path / f"r{r}.pt"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    x_img, x_txt, ids, enc_i, enc_t = problem()
    img, txt = F.normalize(enc_i(x_img), dim=-1), F.normalize(enc_t(x_txt), dim=-1)
    res = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2)]
    # one process, whole batch: each rank's loss is the mean over its rows (3 and 2 of the 5)
    # against all 5 columns; DDP averages the two
    logits = 5.0 * img @ txt.t()
    pos = (ids[:, None] == ids[None, :]).float()
    tgt = pos / pos.sum(1, keepdim=True)
    per_row = 0.5 * (-(tgt * logits.log_softmax(1)).sum(1) - (tgt * logits.t().log_softmax(1)).sum(1))
    assert res[0]["loss"].item() == pytest.approx(per_row[:3].mean().item(), rel=1e-5)
    assert res[1]["loss"].item() == pytest.approx(per_row[3:].mean().item(), rel=1e-5)
    (0.5 * (per_row[:3].mean() + per_row[3:].mean())).backward()
    want = [p.grad for p in (*enc_i.parameters(), *enc_t.parameters())]
    for g_rank in (res[0]["grads"], res[1]["grads"]):
        for a, b in zip(g_rank, want):
            assert torch.allclose(a, b, atol=1e-6)


# ------------------------------------------------------------------------------ built-in data, CLI
@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    from data_pipelines.builtin import make_builtin_dataset
    from data_pipelines.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("retrieval")
    data = root / "data"
    make_builtin_dataset(data, num_images=BUILTIN_IMAGES, seed=0, image_size=64)
    tok = str(train_tokenizer([data / "text" / "en.txt"], data / "tokenizer", vocab_size=300))
    shards = data / "shards"
    return {"root": root, "data": data, "tokenizer": tok,
            **{s: str(shards / f"caption-{s}.manifest.json") for s in ("train", "val", "test")}}


BUILTIN_IMAGES = 300  # Karpathy test split: 30 images, 150 captions
FIT_STEPS = 200  # from scratch (dense, depth 1, mean pooling): the CPU suite cannot afford a pretraining


@pytest.fixture(scope="module")
def finetuned(builtin):
    import pytorch_lightning as pl
    import yaml

    from data_pipelines.datamodules import CaptionDataModule
    from tasks.retrieval import RetrievalModule

    root = builtin["root"]
    model_args = dict(backbone=dict(preset="tiny", variant="dense", depth=1), tokenizer=builtin["tokenizer"],
                      pooling="mean", optim=dict(lr=1e-3, warmup_steps=10, weight_decay=0.01))
    data_args = dict(tokenizer=builtin["tokenizer"], train=builtin["train"], test=builtin["test"], batch_size=32,
                     image_size=64, max_len=32, shuffle_buffer=200, num_workers=0, pin_memory=False)
    pl.seed_everything(0, verbose=False)
    module = RetrievalModule(**model_args)
    trainer = pl.Trainer(max_steps=FIT_STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    trainer.fit(module, CaptionDataModule(**data_args))
    ckpt = root / "retrieval.ckpt"
    trainer.save_checkpoint(str(ckpt))
    cfg = root / "retrieval.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"class_path": "tasks.retrieval.RetrievalModule", "init_args": model_args},
                                   "data": {"class_path": "data_pipelines.datamodules.CaptionDataModule",
                                            "init_args": data_args}}))
    return {"ckpt": str(ckpt), "config": str(cfg)}


def test_finetuned_on_builtin_beats_random_ranking(builtin, finetuned, tmp_path, capsys):
    from tasks.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "retrieval", "--config", finetuned["config"], "--ckpt", finetuned["ckpt"],
                 "--split", "test", "--out", str(out), "--trainer.accelerator", "cpu"]) == 0
    capsys.readouterr()
    m = json.loads((out / "metrics.json").read_text())
    res = json.loads((out / "retrieval_results.json").read_text())
    coco = json.loads((builtin["data"] / "coco" / "dataset_coco.json").read_text())
    test_ids = {im["cocoid"] for im in coco["images"] if im["split"] == "test"}
    assert {r["image_id"] for r in res["image_to_text"]} == test_ids
    assert m["retrieval_num_images"] == len(test_ids) and m["retrieval_num_texts"] == 5 * len(test_ids)
    texts = {t["text_id"]: t for t in res["texts"]}
    # the file's rankings give the metrics: R@1 image->text = share of images whose first text is theirs
    i2t1 = sum(texts[r["ranked_text_ids"][0]]["image_id"] == r["image_id"] for r in res["image_to_text"])
    t2i1 = sum(r["ranked_image_ids"][0] == texts[r["text_id"]]["image_id"] for r in res["text_to_image"])
    assert m["retrieval_i2t_r1"] == pytest.approx(100 * i2t1 / len(test_ids))
    assert m["retrieval_t2i_r1"] == pytest.approx(100 * t2i1 / len(texts))
    for d in ("i2t", "t2i"):
        # measured: R@1 26.7 / 12.0 and R@5 66.7 / 48.0 against 3.3 / 3.3 and 15.8 / 16.7 at random
        assert m[f"retrieval_{d}_r1"] >= 2.5 * m[f"retrieval_{d}_r1_random"], (d, m)
        assert m[f"retrieval_{d}_r5"] > m[f"retrieval_{d}_r5_random"] + 20, (d, m)


def test_predict_ranks_texts_from_checkpoint_and_folder(builtin, finetuned, tmp_path, capsys):
    from tasks.cli import main

    coco = json.loads((builtin["data"] / "coco" / "dataset_coco.json").read_text())
    im = next(i for i in coco["images"] if i["split"] == "test")
    image = builtin["data"] / "coco" / im["filepath"] / im["filename"]
    texts = [im["sentences"][0]["raw"], "three large green circles", "a purple triangle on a white background"]
    args = ["--image", str(image), "--texts", *texts, "--json", "--device", "cpu"]
    assert main(["predict", "retrieval", "--ckpt", finetuned["ckpt"], *args]) == 0
    got = json.loads(capsys.readouterr().out)
    assert sorted(r["text"] for r in got["ranking"]) == sorted(texts)
    scores = [r["score"] for r in got["ranking"]]
    assert scores == sorted(scores, reverse=True) and sum(r["probability"] for r in got["ranking"]) == pytest.approx(1, abs=1e-3)
    folder = tmp_path / "model"
    assert main(["export", "--ckpt", finetuned["ckpt"], "--out", str(folder)]) == 0
    capsys.readouterr()
    assert main(["predict", "retrieval", "--model", str(folder), *args]) == 0
    assert json.loads(capsys.readouterr().out)["ranking"] == got["ranking"]
    assert main(["predict", "retrieval", "--ckpt", finetuned["ckpt"], "--image", str(image), "--texts", " "]) == 2
    assert "non-empty" in capsys.readouterr().err
