"""The built-in synthetic dataset: official file layouts, determinism, and answers that need the image."""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import synthetic as syn

N_IMAGES, N_PAIRS, SIZE, SEED = 120, 60, 64, 3

Q_FILE_KEYS = {"info", "task_type", "data_type", "license", "data_subtype", "questions"}
Q_KEYS = {"image_id", "question", "question_id"}
A_FILE_KEYS = {"info", "license", "data_subtype", "annotations"}
A_KEYS = {"question_type", "multiple_choice_answer", "answers", "image_id", "answer_type", "question_id"}
ANS_KEYS = {"answer", "answer_confidence", "answer_id"}
K_IMAGE_KEYS = {"filepath", "filename", "imgid", "split", "sentids", "sentences", "cocoid"}
K_SENT_KEYS = {"tokens", "raw", "imgid", "sentid"}
NLVR2_KEYS = {"sentence", "left_url", "right_url", "label", "identifier", "writer", "validation", "synset", "query"}


def _gen(path, **kw):
    args = dict(num_images=N_IMAGES, seed=SEED, image_size=SIZE, num_pairs=N_PAIRS)
    args.update(kw)
    return syn.generate(path, **args)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = _gen(root)
    return root, summary


def _load(root, rel):
    with open(Path(root) / rel, encoding="utf-8") as f:
        return json.load(f)


def _nlvr2(root, split):
    with open(Path(root) / "nlvr2" / f"{split}.json", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _vqa(root, sub):
    return (_load(root, f"vqav2/v2_OpenEnded_mscoco_{sub}_questions.json"),
            _load(root, f"vqav2/v2_mscoco_{sub}_annotations.json"))


def test_summary_paths_and_counts(ds):
    root, s = ds
    assert s["cached"] is False
    assert s["params"]["num_images"] == N_IMAGES and s["params"]["num_pairs"] == N_PAIRS
    for key, p in s["paths"].items():
        assert os.path.exists(p), key
    c = s["counts"]
    assert sum(c["coco"][k] for k in ("train", "restval", "val", "test")) == N_IMAGES
    assert sum(c["nlvr2"][k]["pairs"] for k in syn.NLVR2_SPLITS) == N_PAIRS
    assert c["vqav2"]["train2014"]["images"] + c["vqav2"]["val2014"]["images"] == N_IMAGES
    assert (root / "synth_meta.json").is_file()


def test_karpathy_format(ds):
    root, _ = ds
    d = _load(root, "coco/dataset_coco.json")
    assert set(d) == {"images", "dataset"} and d["dataset"] == "coco"
    images = d["images"]
    assert len(images) == N_IMAGES
    splits = Counter(im["split"] for im in images)
    assert set(splits) == {"train", "restval", "val", "test"}
    assert 0.7 <= (splits["train"] + splits["restval"]) / N_IMAGES <= 0.9
    all_sentids = []
    for idx, im in enumerate(images):
        assert set(im) == K_IMAGE_KEYS
        assert im["imgid"] == idx
        want_fp = "train2014" if im["split"] in ("train", "restval") else "val2014"
        assert im["filepath"] == want_fp
        assert im["filename"] == f"COCO_{want_fp}_{im['cocoid']:012d}.jpg"
        assert (root / "coco" / im["filepath"] / im["filename"]).is_file()
        assert len(im["sentences"]) == 5
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        assert len({s["raw"] for s in im["sentences"]}) == 5
        for s in im["sentences"]:
            assert set(s) == K_SENT_KEYS
            assert s["imgid"] == idx
            assert s["tokens"] and all(re.fullmatch(r"[a-z0-9]+", t) for t in s["tokens"])
            assert s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower())
        all_sentids += im["sentids"]
    assert len(set(all_sentids)) == len(all_sentids)
    assert len({im["cocoid"] for im in images}) == N_IMAGES


def test_vqa_format(ds):
    root, _ = ds
    karpathy = _load(root, "coco/dataset_coco.json")["images"]
    ids_by_sub = {"train2014": {im["cocoid"] for im in karpathy if im["split"] in ("train", "restval")},
                  "val2014": {im["cocoid"] for im in karpathy if im["split"] in ("val", "test")}}
    types, disagree, total = Counter(), 0, 0
    for sub in ("train2014", "val2014"):
        qf, af = _vqa(root, sub)
        assert set(qf) == Q_FILE_KEYS and set(af) == A_FILE_KEYS
        assert qf["task_type"] == "Open-Ended" and qf["data_type"] == "mscoco"
        assert qf["data_subtype"] == af["data_subtype"] == sub
        assert {q["question_id"] for q in qf["questions"]} == {a["question_id"] for a in af["annotations"]}
        assert len({q["question_id"] for q in qf["questions"]}) == len(qf["questions"])
        per_image = Counter(q["image_id"] for q in qf["questions"])
        assert set(per_image) == ids_by_sub[sub]
        assert all(3 <= n <= 5 for n in per_image.values())
        for q in qf["questions"]:
            assert set(q) == Q_KEYS and isinstance(q["question_id"], int) and q["question"].endswith("?")
        for image_id in per_image:
            assert (root / "coco" / sub / f"COCO_{sub}_{image_id:012d}.jpg").is_file()
        for a in af["annotations"]:
            assert set(a) == A_KEYS
            assert len(a["answers"]) == 10
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            for x in a["answers"]:
                assert set(x) == ANS_KEYS and x["answer_confidence"] in ("yes", "maybe", "no")
            counts = Counter(x["answer"] for x in a["answers"])
            assert a["multiple_choice_answer"] == counts.most_common(1)[0][0]
            assert a["answer_type"] in ("yes/no", "number", "other")
            types[a["answer_type"]] += 1
            disagree += len(counts) > 1
            total += 1
    assert set(types) == {"yes/no", "number", "other"}
    assert 0.05 <= disagree / total <= 0.3


def test_nlvr2_format_and_balance(ds):
    root, _ = ds
    formats = Counter()
    for split in syn.NLVR2_SPLITS:
        rows = _nlvr2(root, split)
        assert rows
        extra = {"directory"} if split == "train" else {"extra_validations"}
        groups = defaultdict(list)
        for r in rows:
            assert set(r) == NLVR2_KEYS | extra
            assert r["label"] in ("True", "False")
            m = re.fullmatch(rf"{split}-(\d+)-(\d+)-(\d+)", r["identifier"])
            assert m, r["identifier"]
            sset, pair, sent = m.groups()
            groups[(sset, sent)].append(r)
            for side in (0, 1):
                img = root / "nlvr2" / "images" / split / f"{split}-{sset}-{pair}-img{side}.png"
                assert img.is_file()
                if split == "dev":
                    with Image.open(img) as im:
                        formats[im.format] += 1
        true_share = sum(r["label"] == "True" for r in rows) / len(rows)
        assert 0.35 <= true_share <= 0.65, (split, true_share)
        # consistency is meaningful: a sentence is tested against several pairs, one sentence per group
        assert sum(len(g) > 1 for g in groups.values()) >= len(groups) // 2
        assert all(len({r["sentence"] for r in g}) == 1 for g in groups.values())
    assert set(formats) == {"JPEG", "PNG"}


def test_text_corpora(ds):
    root, s = ds
    en = (root / "text" / "en.txt").read_text(encoding="utf-8").splitlines()
    assert len(en) == s["counts"]["text"]["en"] >= 1000 and all(en)
    ml = {lang: (root / "text" / "multilingual" / f"{lang}.txt").read_text(encoding="utf-8").splitlines()
          for lang in ("en", "de", "fr", "es")}
    assert len({len(v) for v in ml.values()}) == 1
    joined = {k: "\n".join(v) for k, v in ml.items()}
    assert "grün" in joined["de"] and "groß" in joined["de"]
    assert "vert" in joined["fr"] and "à gauche" in joined["fr"]
    assert "pequeño" in joined["es"] and "círculo" in joined["es"]
    assert len(set(ml["en"])) > len(ml["en"]) // 2


def test_images_match_scenes(ds):
    root, _ = ds
    scenes = _load(root, "scenes.json")
    palette = {**syn.COLOURS, **syn.BACKGROUNDS}
    names, rgb = list(palette), np.array(list(palette.values()), dtype=np.float32)
    karpathy = _load(root, "coco/dataset_coco.json")["images"]
    for im in karpathy[:40]:
        with Image.open(root / "coco" / im["filepath"] / im["filename"]) as f:
            assert f.format == "JPEG" and f.size == (SIZE, SIZE)
            arr = np.asarray(f.convert("RGB"), dtype=np.float32)
        scene = scenes["coco"][str(im["cocoid"])]
        assert 1 <= len(scene["objects"]) <= 4
        for o in scene["objects"]:
            px = arr[int(round(o["y"])), int(round(o["x"]))]
            assert names[int(np.argmin(((rgb - px) ** 2).sum(1)))] == o["colour"]
        corner = arr[1, 1]
        assert names[int(np.argmin(((rgb - corner) ** 2).sum(1)))] == scene["background"]
    for p in sorted((root / "nlvr2" / "images" / "train").iterdir())[:10]:
        with Image.open(p) as f:
            assert f.size == (SIZE, SIZE)


def test_answers_and_labels_follow_from_scene(ds):
    root, _ = ds
    scenes = _load(root, "scenes.json")
    for sub in ("train2014", "val2014"):
        qf, af = _vqa(root, sub)
        for q, a in zip(qf["questions"], af["annotations"]):
            assert q["question_id"] == a["question_id"]
            assert syn.answer_question(scenes["coco"][str(q["image_id"])], q["question"]) == \
                a["multiple_choice_answer"]
    for split in syn.NLVR2_SPLITS:
        for r in _nlvr2(root, split):
            pair = scenes["nlvr2"][r["identifier"].rsplit("-", 1)[0]]
            assert syn.evaluate_statement(pair["left"], pair["right"], r["sentence"]) == (r["label"] == "True")


def _vqa_acc(pred, answers):
    return min(1.0, sum(x["answer"] == pred for x in answers) / 3.0)


def test_question_only_baseline_is_clearly_worse(ds):
    root, _ = ds
    scenes = _load(root, "scenes.json")
    qtr, atr = _vqa(root, "train2014")
    by_q = defaultdict(Counter)
    for q, a in zip(qtr["questions"], atr["annotations"]):
        by_q[q["question"]][a["multiple_choice_answer"]] += 1
    fallback = Counter(a["multiple_choice_answer"] for a in atr["annotations"]).most_common(1)[0][0]
    qva, ava = _vqa(root, "val2014")
    blind = oracle = 0.0
    blind_yn = []
    for q, a in zip(qva["questions"], ava["annotations"]):
        guess = by_q[q["question"]].most_common(1)[0][0] if q["question"] in by_q else fallback
        acc = _vqa_acc(guess, a["answers"])
        blind += acc
        oracle += _vqa_acc(syn.answer_question(scenes["coco"][str(q["image_id"])], q["question"]), a["answers"])
        if a["answer_type"] == "yes/no":
            blind_yn.append(acc)
    n = len(qva["questions"])
    blind, oracle = blind / n, oracle / n
    assert oracle > 0.97
    assert blind < 0.65 and blind < oracle - 0.3, (blind, oracle)
    assert np.mean(blind_yn) < 0.75


def test_deterministic_and_seed_dependent(ds, tmp_path):
    root, _ = ds
    again = tmp_path / "again"
    _gen(again)
    files = _load(root, "synth_meta.json")["files"]
    assert files == _load(again, "synth_meta.json")["files"]
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel

    other = tmp_path / "other"
    _gen(other, seed=SEED + 1)
    for rel in ("coco/dataset_coco.json", "vqav2/v2_OpenEnded_mscoco_train2014_questions.json",
                "nlvr2/train.json", "text/en.txt", "text/multilingual/de.txt"):
        assert (root / rel).read_bytes() != (other / rel).read_bytes(), rel
    first = lambda r: sorted((r / "coco" / "train2014").iterdir())[0].read_bytes()  # noqa: E731
    assert first(root) != first(other)
    first_pair = lambda r: (r / "nlvr2" / "images" / "train" / "train-0-0-img0.png").read_bytes()  # noqa: E731
    assert first_pair(root) != first_pair(other)


def test_idempotent_and_regenerates_on_change(tmp_path):
    out = tmp_path / "d"
    s1 = _gen(out, num_images=40, num_pairs=12)
    assert not s1["cached"]
    meta = out / "synth_meta.json"
    mtime = meta.stat().st_mtime_ns
    s2 = _gen(out, num_images=40, num_pairs=12)
    assert s2["cached"] and s2["counts"] == s1["counts"] and meta.stat().st_mtime_ns == mtime

    # other parameters: regenerated, and images of the old run that are no longer listed are gone
    s3 = _gen(out, num_images=30, num_pairs=12)
    assert not s3["cached"]
    on_disk = sum(len(list((out / "coco" / sub).glob("*.jpg"))) for sub in ("train2014", "val2014"))
    assert on_disk == 30

    # an interrupted run (meta not marked complete, a stray temporary file) is redone and cleaned
    stray = out / "coco" / "train2014" / "COCO_train2014_000000000001.jpg.999.tmp"
    stray.write_bytes(b"partial")
    data = json.loads(meta.read_text())
    data["complete"] = False
    meta.write_text(json.dumps(data))
    s4 = _gen(out, num_images=30, num_pairs=12)
    assert not s4["cached"] and not stray.exists()
    assert _gen(out, num_images=30, num_pairs=12)["cached"]

    # a missing file makes the dataset incomplete
    victim = next((out / "nlvr2" / "images" / "dev").iterdir())
    victim.unlink()
    assert not _gen(out, num_images=30, num_pairs=12)["cached"]
    assert victim.exists()
