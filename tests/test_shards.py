"""WebDataset shard writers: every sample read back equals what went in; splitting; manifests."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_pipelines.schema import KINDS
from data_pipelines.shards import (
    ShardWriter,
    expand_pattern,
    iter_tar_samples,
    manifest_shard_paths,
    read_manifest,
    write_image_folder_shards,
    write_karpathy_shards,
    write_nlvr2_shards,
    write_text_shards,
    write_vqa_shards,
)
from tasks.cli import main

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# fixtures and readers
# ---------------------------------------------------------------------------------------------


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    img = Image.new("RGB", (8, 6), ((37 * seed) % 256, (91 * seed) % 256, (53 * seed) % 256))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def put(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def read_with_tarfile(out_dir: Path, manifest: dict) -> list:
    """All samples of a manifest, read with tarfile only: [{"__key__", member: bytes}]."""
    samples = []
    for shard in manifest["shards"]:
        in_shard = []
        with tarfile.open(out_dir / shard["name"]) as tar:
            for info in tar:
                assert info.isfile() and "/" not in info.name
                key, ext = info.name.split(".", 1)
                if not in_shard or in_shard[-1]["__key__"] != key:
                    in_shard.append({"__key__": key})
                in_shard[-1][ext] = tar.extractfile(info).read()
        assert len(in_shard) == shard["samples"]
        samples.extend(in_shard)
    return samples


def read_with_webdataset(out_dir: Path, manifest: dict) -> list:
    """All samples read with webdataset (raw bytes, no decoders, so nothing is unpickled)."""
    import webdataset as wds

    urls = [str(out_dir / n) for n in expand_pattern(manifest["pattern"])]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"} for s in ds]


def check_manifest(out_dir: Path, prefix: str, manifest: dict, kind: str, per_shard: list) -> None:
    assert manifest["kind"] == kind and kind in KINDS
    assert manifest["created_by"] == "mmmoe"
    assert [s["samples"] for s in manifest["shards"]] == per_shard
    assert manifest["total"] == sum(per_shard)
    n = len(per_shard)
    assert manifest["pattern"] == f"{prefix}-{{000000..{n - 1:06d}}}.tar"
    names = [f"{prefix}-{i:06d}.tar" for i in range(n)]
    assert expand_pattern(manifest["pattern"]) == names
    assert [s["name"] for s in manifest["shards"]] == names
    mpath = out_dir / f"{prefix}.manifest.json"
    assert read_manifest(mpath) == manifest == json.loads(mpath.read_text())
    assert manifest_shard_paths(mpath) == [str(out_dir / n) for n in names]
    assert not list(out_dir.glob("*.tmp")), "temporary files left behind"


# ---------------------------------------------------------------------------------------------
# ShardWriter
# ---------------------------------------------------------------------------------------------


def test_shard_writer_splits_by_count_and_round_trips(tmp_path):
    written = []
    with ShardWriter(tmp_path, "p", "image_text", max_samples=3) as w:
        for i in range(7):
            s = {"__key__": f"s{i}", "jpg": image_bytes(i), "txt": f"caption {i} ünï",
                 "json": {"image_id": i}}
            w.write(s)
            written.append(s)
    m = w.close()
    check_manifest(tmp_path, "p", m, "image_text", [3, 3, 1])
    assert m["skipped"] == 0
    for got in (read_with_tarfile(tmp_path, m), read_with_webdataset(tmp_path, m)):
        assert len(got) == 7
        for g, s in zip(got, written):
            assert g["__key__"] == s["__key__"]
            assert g["jpg"] == s["jpg"]
            assert g["txt"].decode("utf-8") == s["txt"]
            assert json.loads(g["json"]) == s["json"]
    assert [s["__key__"] for s in iter_tar_samples(tmp_path / "p-000001.tar")] == ["s3", "s4", "s5"]


def test_shard_writer_max_bytes(tmp_path):
    blob = b"\xff\xd8\xff" + b"x" * 3000  # each sample: 2 headers + 3584 + 512 data bytes
    with ShardWriter(tmp_path, "b", "image", max_samples=100, max_bytes=10_000) as w:
        for i in range(5):
            w.write({"__key__": f"k{i}", "jpg": blob, "json": {"image_id": i}})
    m = w.close()
    check_manifest(tmp_path, "b", m, "image", [2, 2, 1])
    for shard in m["shards"]:
        assert (tmp_path / shard["name"]).stat().st_size <= 10_000 + 10240  # + tar end padding


def test_shard_writer_rejects_bad_samples_and_aborts_cleanly(tmp_path):
    w = ShardWriter(tmp_path, "bad", "text")
    with pytest.raises(ValueError):
        w.write({"__key__": "a.b", "txt": "x"})
    with pytest.raises(TypeError):
        w.write({"__key__": "a", "txt": 3})
    with pytest.raises(TypeError):
        w.write({"__key__": "a", "txt": {"not": "json member"}})
    with pytest.raises(ValueError):
        ShardWriter(tmp_path, "x", "no_such_kind")
    w.write({"__key__": "a", "txt": "x"})
    with pytest.raises(ValueError, match="duplicate"):
        w.write({"__key__": "a", "txt": "y"})
    w.close()

    with ShardWriter(tmp_path, "dup", "text", rename_duplicate_keys=True) as w3:
        for t in "xyz":
            w3.write({"__key__": "a", "txt": t})
    assert [s["__key__"] for s in iter_tar_samples(tmp_path / "dup-000000.tar")] == [
        "a", "a_dup1", "a_dup2"]

    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "abort", "text") as w2:
            w2.write({"__key__": "a", "txt": "x", "json": {"lang": "en"}})
            raise RuntimeError("boom")
    assert not (tmp_path / "abort.manifest.json").exists()
    assert not list(tmp_path.glob("abort-*"))


def test_empty_writer_writes_empty_manifest(tmp_path):
    with ShardWriter(tmp_path, "empty", "text") as w:
        pass
    m = w.close()
    assert m["shards"] == [] and m["total"] == 0 and m["pattern"] == ""
    assert expand_pattern(m["pattern"]) == []
    assert read_manifest(tmp_path / "empty.manifest.json") == m


# ---------------------------------------------------------------------------------------------
# Karpathy COCO captions
# ---------------------------------------------------------------------------------------------


def make_karpathy(tmp_path: Path):
    root = tmp_path / "coco"
    images, data = [], {}
    splits = ["train", "restval", "val", "test", "train"]
    sentid = 0
    for i, split in enumerate(splits):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        fname = f"COCO_{folder}_{i + 1:012d}.jpg"
        cocoid = 1000 + i
        if i != 4:  # the last train image is missing on disk
            data[cocoid] = put(root / folder / fname, image_bytes(i))
        sents = []
        for j in range(2):
            raw = f"A photo number {i} caption {j}. "
            sents.append({"tokens": raw.lower().split(), "raw": raw, "imgid": i, "sentid": sentid})
            sentid += 1
        images.append({"filepath": folder, "filename": fname, "imgid": i, "split": split,
                       "sentids": [s["sentid"] for s in sents], "sentences": sents,
                       "cocoid": cocoid})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path, root, images, data


def test_karpathy_image_text(tmp_path):
    path, root, images, data = make_karpathy(tmp_path)
    out = tmp_path / "out"
    m = write_karpathy_shards(path, root, out, shard_size=3, prefix="cc")
    # train + restval images 0, 1 (present) and 4 (missing): 4 captions written, 2 skipped
    check_manifest(out, "cc", m, "image_text", [3, 1])
    assert m["skipped"] == 2
    got = read_with_webdataset(out, m)
    expected = [(img, s) for img in images[:2] for s in img["sentences"]]
    assert len(got) == len(expected)
    for g, (img, s) in zip(got, expected):
        assert g["jpg"] == data[img["cocoid"]]
        assert g["txt"].decode() == s["raw"].strip()
        assert json.loads(g["json"]) == {"image_id": img["cocoid"]}
    assert len({g["__key__"] for g in got}) == len(got)


def test_karpathy_caption_kind(tmp_path):
    path, root, images, data = make_karpathy(tmp_path)
    out = tmp_path / "out"
    m = write_karpathy_shards(path, root, out, splits=("val", "test"), kind="caption")
    check_manifest(out, "coco-caption-val-test", m, "caption", [2])
    got = read_with_tarfile(out, m)
    for g, img in zip(got, images[2:4]):
        assert g["jpg"] == data[img["cocoid"]]
        assert json.loads(g["json"]) == {
            "image_id": img["cocoid"], "split": img["split"],
            "captions": [s["raw"].strip() for s in img["sentences"]],
        }
    assert set(g.keys()) == {"__key__", "jpg", "json"}


def test_missing_input_file_raises_with_path(tmp_path):
    missing = tmp_path / "nope" / "dataset_coco.json"
    (tmp_path / "imgs").mkdir()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        write_karpathy_shards(missing, tmp_path / "imgs", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nlvr2.json"):
        write_nlvr2_shards(tmp_path / "nlvr2.json", tmp_path / "imgs", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        write_text_shards([tmp_path / "missing.txt"], tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------------


def test_image_folder_jsonl_tsv_and_plain(tmp_path):
    d = tmp_path / "imgs"
    data = {f"a{i}.jpg": put(d / f"a{i}.jpg", image_bytes(i)) for i in range(3)}
    data["sub/b.png"] = put(d / "sub" / "b.png", image_bytes(7, "PNG"))
    put(d / "broken.jpg", b"<html>not found</html>")  # not an image: skipped in plain mode

    jsonl = tmp_path / "caps.jsonl"
    recs = [{"image": "a0.jpg", "caption": "first"}, {"file_name": "a1.jpg", "text": "second"},
            {"filename": "sub/b.png", "caption": "third", "image_id": 77},
            {"image": "gone.jpg", "caption": "missing image"}]
    jsonl.write_text("\n".join(json.dumps(r) for r in recs) + "\n{not json\n\n")
    m = write_image_folder_shards(d, jsonl, tmp_path / "o1", prefix="j", shard_size=2)
    check_manifest(tmp_path / "o1", "j", m, "image_text", [2, 1])
    assert m["skipped"] == 2
    got = read_with_tarfile(tmp_path / "o1", m)
    assert [g["jpg"] for g in got] == [data["a0.jpg"], data["a1.jpg"], data["sub/b.png"]]
    assert [g["txt"].decode() for g in got] == ["first", "second", "third"]
    assert [json.loads(g["json"]) for g in got] == [
        {"image_id": "a0.jpg"}, {"image_id": "a1.jpg"}, {"image_id": 77}]

    tsv = tmp_path / "caps.tsv"
    tsv.write_text("filename\tcaption\na2.jpg\ta dog\tand a tab\na0.jpg\tcat\nno_tab_line\n")
    m = write_image_folder_shards(d, tsv, tmp_path / "o2", prefix="t")
    check_manifest(tmp_path / "o2", "t", m, "image_text", [2])
    assert m["skipped"] == 1
    got = read_with_tarfile(tmp_path / "o2", m)
    assert [(g["jpg"], g["txt"].decode()) for g in got] == [
        (data["a2.jpg"], "a dog\tand a tab"), (data["a0.jpg"], "cat")]

    m = write_image_folder_shards(d, None, tmp_path / "o3")
    check_manifest(tmp_path / "o3", "images", m, "image", [4])
    assert m["skipped"] == 1
    got = read_with_tarfile(tmp_path / "o3", m)
    assert {json.loads(g["json"])["image_id"]: g["jpg"] for g in got} == data


# ---------------------------------------------------------------------------------------------
# VQAv2
# ---------------------------------------------------------------------------------------------


def vqa_answers(words):
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1}
            for i, w in enumerate(words)]


def test_vqa_with_annotations(tmp_path):
    root = tmp_path / "coco"
    img = {1: put(root / "val2014" / "COCO_val2014_000000000001.jpg", image_bytes(1)),
           2: put(root / "COCO_val2014_000000000002.jpg", image_bytes(2))}  # directly in root
    questions = [
        {"image_id": 1, "question": "What color is it?", "question_id": 10},
        {"image_id": 1, "question": "Is it square?", "question_id": 11},
        {"image_id": 2, "question": "How many?", "question_id": 20},
        {"image_id": 3, "question": "Where is the image?", "question_id": 30},  # missing image
        {"image_id": 2, "question": "No annotation?", "question_id": 21},  # no annotation
    ]
    anns = []
    for qid, atype, words in [(10, "other", ["red"] * 7 + ["pink"] * 3),
                              (11, "yes/no", ["yes"] * 10), (20, "number", ["2"] * 9 + ["3"]),
                              (30, "other", ["x"] * 10)]:
        shuffled = vqa_answers(words)[::-1]  # answer_id order must be restored
        anns.append({"question_type": "what", "multiple_choice_answer": words[0],
                     "answers": shuffled, "image_id": qid // 10, "answer_type": atype,
                     "question_id": qid})
    qf, af = tmp_path / "q.json", tmp_path / "a.json"
    qf.write_text(json.dumps({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                              "license": {}, "data_subtype": "val2014", "questions": questions}))
    af.write_text(json.dumps({"info": {}, "license": {}, "data_subtype": "val2014",
                              "annotations": anns}))
    out = tmp_path / "out"
    m = write_vqa_shards(qf, af, root, out, shard_size=2)
    check_manifest(out, "vqa-val2014", m, "vqa", [2, 1])
    assert m["skipped"] == 2
    got = read_with_webdataset(out, m)
    by_qid = {a["question_id"]: a for a in anns}
    for g, q in zip(got, questions[:3]):
        a = by_qid[q["question_id"]]
        assert g["jpg"] == img[q["image_id"]]
        assert json.loads(g["json"]) == {
            "question_id": q["question_id"], "image_id": q["image_id"], "question": q["question"],
            "answers": [x["answer"] for x in sorted(a["answers"], key=lambda x: x["answer_id"])],
            "answer_type": a["answer_type"], "question_type": a["question_type"],
            "multiple_choice_answer": a["multiple_choice_answer"],
        }

    bad = tmp_path / "a_train.json"
    bad.write_text(json.dumps({"data_subtype": "train2014", "annotations": anns}))
    with pytest.raises(ValueError, match="different splits"):
        write_vqa_shards(qf, bad, root, tmp_path / "o2")
    with pytest.raises(FileNotFoundError, match="missing_q.json"):
        write_vqa_shards(tmp_path / "missing_q.json", af, root, tmp_path / "o3")


def test_vqa_test_dev_without_annotations(tmp_path):
    root = tmp_path / "coco"
    jpg = put(root / "test2015" / "COCO_test2015_000000000005.jpg", image_bytes(5))
    qf = tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    qs = [{"image_id": 5, "question": "What is this?", "question_id": 50},
          {"image_id": 5, "question": "Why?", "question_id": 51}]
    qf.write_text(json.dumps({"data_subtype": "test-dev2015", "questions": qs}))
    m = write_vqa_shards(qf, None, root, tmp_path / "out", prefix="td")
    check_manifest(tmp_path / "out", "td", m, "vqa", [2])
    got = read_with_tarfile(tmp_path / "out", m)
    assert [g["jpg"] for g in got] == [jpg, jpg]
    assert [json.loads(g["json"]) for g in got] == [
        {"question_id": q["question_id"], "image_id": 5, "question": q["question"]} for q in qs]


# ---------------------------------------------------------------------------------------------
# NLVR2
# ---------------------------------------------------------------------------------------------


def test_nlvr2(tmp_path):
    root = tmp_path / "nlvr2"
    # train images in numbered subfolders; one ".png" that holds JPEG bytes, one real PNG
    tl = put(root / "train" / "7" / "train-10-0-img0.png", image_bytes(1))
    tr = put(root / "train" / "7" / "train-10-0-img1.png", image_bytes(2, "PNG"))
    dl = put(root / "dev" / "dev-3-1-img0.png", image_bytes(3))
    dr = put(root / "dev" / "dev-3-1-img1.png", image_bytes(4))
    put(root / "dev" / "dev-4-0-img0.png", image_bytes(5))  # right image missing
    common = {"left_url": "http://x/l.jpg", "right_url": "http://x/r.jpg", "writer": "w1",
              "validation": {}, "synset": "dog", "query": "dogs"}
    lines = [
        dict(common, sentence="Two dogs.", label="True", identifier="train-10-0-0", directory=7),
        dict(common, sentence="One dog.", label="False", identifier="train-10-0-1", directory=7),
        dict(common, sentence="A cat.", label="False", identifier="dev-3-1-2", extra_validations={}),
        dict(common, sentence="No label.", identifier="dev-3-1-3"),
        dict(common, sentence="Missing right.", label="True", identifier="dev-4-0-0"),
    ]
    jf = tmp_path / "mixed.json"
    jf.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken json\n")
    m = write_nlvr2_shards(jf, root, tmp_path / "out", shard_size=3)
    check_manifest(tmp_path / "out", "nlvr2-mixed", m, "nlvr2", [3, 1])
    assert m["skipped"] == 2
    got = read_with_webdataset(tmp_path / "out", m)
    pairs = [(tl, tr), (tl, tr), (dl, dr), (dl, dr)]
    labels = [True, False, False, None]
    for g, rec, (left, right), label in zip(got, lines, pairs, labels):
        assert g["left.jpg"] == left and g["right.jpg"] == right
        assert json.loads(g["json"]) == {"identifier": rec["identifier"],
                                         "sentence": rec["sentence"], "label": label}
        assert g["__key__"] == rec["identifier"]


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------


def test_text_shards(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "de.txt").write_text("Ein Hund läuft.\n\n  Zwei Katzen schlafen.  \n")
    (d / "en.txt").write_bytes(b"A dog runs.\n\xff\xfe bad bytes\nTwo cats sleep.\n\n")
    (d / "notes.md").write_text("ignored\n")
    m = write_text_shards(d, tmp_path / "out", shard_size=3)
    check_manifest(tmp_path / "out", "text", m, "text", [3, 1])
    assert m["skipped"] == 1
    got = read_with_tarfile(tmp_path / "out", m)
    assert [(g["txt"].decode(), json.loads(g["json"])) for g in got] == [
        ("Ein Hund läuft.", {"lang": "de"}), ("Zwei Katzen schlafen.", {"lang": "de"}),
        ("A dog runs.", {"lang": "en"}), ("Two cats sleep.", {"lang": "en"})]

    m = write_text_shards([d / "en.txt"], tmp_path / "out2", lang="xx", prefix="en")
    got = read_with_tarfile(tmp_path / "out2", m)
    assert [json.loads(g["json"]) for g in got] == [{"lang": "xx"}] * 2


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_text_and_karpathy(tmp_path, capsys):
    (tmp_path / "fr.txt").write_text("Bonjour.\nSalut.\nMerci.\n")
    out = tmp_path / "out"
    rc = main(["data", "shards", "text", "--input", str(tmp_path / "fr.txt"), "--out", str(out),
               "--prefix", "fr", "--shard-size", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "samples:  3" in text and "fr-{000000..000001}.tar" in text
    m = read_manifest(out / "fr.manifest.json")
    assert [s["samples"] for s in m["shards"]] == [2, 1]

    path, root, images, data = make_karpathy(tmp_path)
    rc = main(["data", "shards", "karpathy", "--dataset-json", str(path), "--image-root", str(root),
               "--out", str(out), "--kind", "caption", "--splits", "train", "--json"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert m["kind"] == "caption" and m["total"] == 1 and m["skipped"] == 1
    assert (out / "coco-caption-train.manifest.json").is_file()

    rc = main(["data", "shards", "vqa", "--questions", str(tmp_path / "nope.json"),
               "--image-root", str(root), "--out", str(out)])
    assert rc == 2
    assert "nope.json" in capsys.readouterr().err

    assert main(["data"]) == 2
    assert "shards" in capsys.readouterr().out


def test_make_shards_script(tmp_path):
    (tmp_path / "it.txt").write_text("Ciao.\n")
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_shards.py"), "text", "--input",
         str(tmp_path / "it.txt"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert read_manifest(tmp_path / "o" / "text.manifest.json")["total"] == 1
