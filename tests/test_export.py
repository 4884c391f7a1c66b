"""``mmmoe export`` and ``mmmoe.models.from_pretrained``: for every task head, a checkpoint exported to
a folder and loaded back (pure torch, and as the Lightning task module) gives bit-identical outputs;
altered or inconsistent folders give a clear error; nothing is unpickled on the loading path."""

import json
import pickle
from pathlib import Path

import pytest
import torch

from mmmoe.models import PretrainedFolderError, from_pretrained
from tasks.cli import main
from tasks.export import export, load_task_module_from_folder

TINY = dict(backbone=dict(preset="tiny", variant="mhmoe-h2", depth=2, vocab_size=300))
ANSWERS = ["yes", "no", "red", "blue", "two"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from data_pipelines.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    words = "red blue green square circle triangle left right small big the a is there two one three".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(300)]
    (root / "t.txt").write_text("\n".join(lines) + "\n")
    return str(train_tokenizer([root / "t.txt"], root / "tok", vocab_size=60))


def make_module(task: str, tokenizer: str):
    torch.manual_seed(0)
    args = dict(backbone=dict(preset="tiny", variant="mhmoe-h2", depth=2), tokenizer=tokenizer)
    if task == "vqa":
        from tasks.vqa import VQAModule
        return VQAModule(answer_vocab=ANSWERS, **args)
    if task == "nlvr2":
        from tasks.nlvr2 import NLVR2Module
        m = NLVR2Module(**args)
        m.train_label_counts += torch.tensor([3, 5])
        return m
    if task == "caption":
        from tasks.captioning import CaptionModule
        return CaptionModule(**args)
    if task == "lm":
        from tasks.lm import CausalLMModule
        return CausalLMModule(**args)
    if task == "mlm":
        from tasks.lm import MaskedLMModule
        return MaskedLMModule(tie_embeddings=False, **args)
    if task == "pretrain":
        from tasks.pretrain import PretrainModule
        return PretrainModule(**args)
    if task == "retrieval":
        from tasks.retrieval import RetrievalModule
        return RetrievalModule(pooling="mean", **args)
    raise AssertionError(task)


def save_ckpt(module, path: Path) -> str:
    """What a Trainer checkpoint holds for loading: state_dict, hyper_parameters, the class."""
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return str(path)


def reference_outputs(task: str, m, x) -> dict:
    """The task module's own outputs on ``x``."""
    bb = m.backbone
    if task == "vqa":
        return {"logits": m(x["image"], x["text_ids"], x["text_pad_mask"])[0]}
    if task == "nlvr2":
        return {"logits": m(x["image_left"], x["image_right"], x["text_ids"], x["text_pad_mask"])[0]}
    if task == "caption":
        out = bb(image=x["image"], text_ids=x["text_ids"], text_pad_mask=x["text_pad_mask"], attn_mode="prefix_causal")
        return {"logits": m.head(out.text_hidden).float()}
    if task == "lm":
        out = bb(text_ids=x["text_ids"], text_pad_mask=x["text_pad_mask"], attn_mode="prefix_causal")
        return {"logits": m.head(out.text_hidden).float()}
    if task == "mlm":
        out = bb(text_ids=x["text_ids"], text_pad_mask=x["text_pad_mask"])
        return {"logits": m.head(out.text_hidden).float()}
    if task == "pretrain":
        out = bb.forward_features(image=x["image"], text_ids=x["text_ids"], text_pad_mask=x["text_pad_mask"],
                                  image_mask=x["image_mask"])
        return {"mlm_logits": m.mlm_head(out.text_hidden).float(), "mim_pred": m.mim_head(out.image_hidden[:, 1:]).float()}
    if task == "retrieval":
        img, txt = m.encode_image(x["image"]), m.encode_text(x["text_ids"], x["text_pad_mask"])
        return {"image_embeds": img, "text_embeds": txt, "logits_per_image": m.head(img, txt)[0]}
    raise AssertionError(task)


def task_inputs(task: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (3, 9), generator=g)
    ids[:, 0] = 2
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    img = torch.randn(3, 3, 64, 64, generator=g)
    if task == "nlvr2":
        return dict(image_left=img, image_right=torch.randn(3, 3, 64, 64, generator=g), text_ids=ids, text_pad_mask=pad)
    if task in ("lm", "mlm"):
        return dict(text_ids=ids, text_pad_mask=pad)
    if task == "pretrain":
        return dict(image=img, text_ids=ids, text_pad_mask=pad, image_mask=torch.rand(3, 16, generator=g) < 0.4)
    return dict(image=img, text_ids=ids, text_pad_mask=pad)


def no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


TASKS = ["vqa", "nlvr2", "caption", "lm", "mlm", "pretrain", "retrieval"]


@pytest.mark.parametrize("task", TASKS)
def test_round_trip_identical_outputs(task, tokenizer, tmp_path, monkeypatch):
    module = make_module(task, tokenizer).eval()
    ckpt = save_ckpt(module, tmp_path / "m.ckpt")
    (tmp_path / "metrics.json").write_text(json.dumps({f"{task}_score": 12.5, "note": "text is skipped"}))
    folder = export(ckpt, tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.model"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["task"] == task and cfg["variant"] == "mhmoe-h2" and cfg["model_config"]["depth"] == 2
    card = (folder / "README.md").read_text()
    assert f"{task}_score | 12.5" in card and "| mhmoe-h2 | 2 | 40 | 96 | 2 |" in card
    x = task_inputs(task)
    with torch.no_grad():
        want = reference_outputs(task, module, x)
        with monkeypatch.context() as mp:
            no_unpickling(mp)
            pm = from_pretrained(folder)
            got = pm(**x)
            back = load_task_module_from_folder(folder)  # the Lightning module, for predict / evaluate
        again = reference_outputs(task, back, x)
    assert type(pm.backbone).__module__.startswith("mmmoe.")
    assert set(want) <= set(got)
    for k in want:
        assert torch.equal(got[k], want[k]), k
        assert torch.equal(again[k], want[k]), k
    sd, sd_back = module.state_dict(), back.state_dict()
    assert sd.keys() == pm.state_dict().keys() == sd_back.keys()
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd)
    if task == "vqa":
        assert pm.labels == ANSWERS
        ids, pad = pm.encode_text(["is there a red square"])
        assert ids[0, 0].item() == 2 and ids[0, -1].item() == 3 and not pad.any()


@pytest.fixture(scope="module")
def vqa_folder(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("vqaexp")
    ckpt = save_ckpt(make_module("vqa", tokenizer), root / "m.ckpt")
    return ckpt, export(ckpt, root / "export")


def copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_altered_files_are_refused(vqa_folder, tmp_path):
    _, folder = vqa_folder
    f = copy_folder(folder, tmp_path / "a")
    data = bytearray((f / "model.safetensors").read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    (f / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(PretrainedFolderError, match=r"model.safetensors has been altered: sha256"):
        from_pretrained(f)
    f = copy_folder(folder, tmp_path / "b")
    (f / "tokenizer.model").unlink()
    with pytest.raises(PretrainedFolderError, match="tokenizer.model is missing"):
        from_pretrained(f)
    f = copy_folder(folder, tmp_path / "c")
    with open(f / "README.md", "a") as fh:
        fh.write("x")
    with pytest.raises(PretrainedFolderError, match="README.md has been altered: .* bytes"):
        from_pretrained(f)


def test_config_inconsistent_with_weights(vqa_folder, tmp_path):
    _, folder = vqa_folder
    f = copy_folder(folder, tmp_path / "a")
    cfg = json.loads((f / "config.json").read_text())
    cfg["heads"]["head"]["args"]["num_answers"] = 7
    (f / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PretrainedFolderError, match=r"shapes/dtypes differ.*head.classifier.3.weight \(5, 192\)"):
        from_pretrained(f)
    cfg["heads"]["head"]["args"]["num_answers"] = 5
    cfg["model_config"]["depth"] = 3
    (f / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PretrainedFolderError, match="missing: backbone.blocks.2"):
        from_pretrained(f)
    # a broken safetensors header whose hashes were updated to match
    f = copy_folder(folder, tmp_path / "b")
    (f / "model.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
    from mmmoe.models.pretrained import sha256_file

    cfg = json.loads((f / "config.json").read_text())
    cfg["files"]["model.safetensors"] = {"size": 17, "sha256": sha256_file(f / "model.safetensors")}
    (f / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PretrainedFolderError, match="not a readable safetensors file"):
        from_pretrained(f)
    (f / "config.json").write_text("{")
    with pytest.raises(PretrainedFolderError, match="config.json is not valid JSON"):
        from_pretrained(f)
    with pytest.raises(FileNotFoundError):
        from_pretrained(tmp_path / "nothing")


def test_export_refuses_to_overwrite(vqa_folder, tmp_path, capsys):
    ckpt, _ = vqa_folder
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", "--ckpt", ckpt, "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_export_and_predict_with_folder(vqa_folder, tmp_path, capsys):
    from PIL import Image

    ckpt, _ = vqa_folder
    out = tmp_path / "m"
    assert main(["export", "--ckpt", ckpt, "--out", str(out)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert main(["export", "--ckpt", ckpt, "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    img = tmp_path / "x.png"
    Image.new("RGB", (80, 70), (200, 30, 30)).save(img)
    common = ["--image", str(img), "--question", "is there a red square", "--json", "--device", "cpu"]
    assert main(["predict", "vqa", "--ckpt", ckpt, *common]) == 0
    from_ckpt = json.loads(capsys.readouterr().out)
    assert main(["predict", "vqa", "--model", str(out), *common]) == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert from_folder == from_ckpt and from_ckpt["answer"] in ANSWERS
    assert main(["predict", "nlvr2", "--model", str(out), "--image", str(img), "--sentence", "x"]) == 2
    assert "holds a vqa model" in capsys.readouterr().err


def test_card_lists_training_data_of_the_run_config(tmp_path):
    import yaml

    from tasks.export import data_manifests, find_run_config

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "csv" / "version_0").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    cfg = {"model": {"init_args": {"tokenizer": "t.model"}}, "data": {"class_path": "X", "init_args": {
        "image_text": {"coco": {"shards": "s/coco-pretrain.manifest.json", "weight": 1}, "web": "s/web-{000..009}.tar"},
        "text": {"en": "s/text-en.manifest.json"}, "val_image_text": "s/val.manifest.json"}}}
    (run / "csv" / "version_0" / "config.yaml").write_text(yaml.safe_dump(cfg))
    found = find_run_config(ckpt)
    assert found == run / "csv" / "version_0" / "config.yaml"
    assert data_manifests(found) == ["image_text.coco.shards: coco-pretrain", "image_text.web: web-{000..009}.tar",
                                     "text.en: text-en", "val_image_text: val"]
