"""Hostile input folders and JSON for the shard writers (``mmmoe data shards ...``) and hostile image
files for ``mmmoe predict``'s image loading: symlink loops, FIFOs, files that are not images, paths
escaping the input folder, garbage / huge / deeply nested JSON, wrong types, lone surrogates.
Every case ends in a clear error or a counted skip, never a crash trace, a hang or a write outside
the output folder. (The CLI round trip of predict with a real checkpoint: test_evaluate_cli.)"""

import json
import os
from pathlib import Path

import pytest

from data_pipelines import hostile as H
from data_pipelines import shards as S
from tasks.cli import main
from tasks.inputs import load_image

JPEG = H.jpeg(H.pixels(0, 8, 8))


def files_under(path: Path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def samples_of(out: Path, manifest):
    got = []
    for shard in manifest["shards"]:
        got += list(S.iter_tar_samples(out / shard["name"]))
    return got


@pytest.fixture
def world(tmp_path):
    """<tmp>/outside.jpg (a real image outside the input folder), <tmp>/in (the input folder),
    <tmp>/out (the output folder)."""
    (tmp_path / "outside.jpg").write_bytes(JPEG)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_image_folder_walk_survives_loops_fifos_and_escaping_links(world):
    root = world / "in"
    (root / "a").mkdir()
    (root / "a" / "good.jpg").write_bytes(JPEG)
    (root / "a" / "up").symlink_to("..")  # a folder loop: not descended into
    (root / "self.jpg").symlink_to("self.jpg")  # a symlink loop
    (root / "dangling.jpg").symlink_to("nowhere.jpg")
    (root / "escape.jpg").symlink_to(world / "outside.jpg")  # a real image, outside the folder
    (root / "inside.jpg").symlink_to(root / "a" / "good.jpg")  # a link that stays inside: fine
    fifo(root / "pipe.jpg")  # would block a plain open() forever
    (root / "text.jpg").write_bytes(b"just text, not an image")
    (root / "empty.png").write_bytes(b"")
    m = S.write_image_folder_shards(root, None, world / "out")
    assert m["total"] == 2 and m["skipped"] == 6
    got = samples_of(world / "out", m)
    assert sorted(json.loads(s["json"])["image_id"] for s in got) == ["a/good.jpg", "inside.jpg"]
    assert all(s["jpg"] == JPEG for s in got)
    assert files_under(world / "out") == ["images-000000.tar", "images.manifest.json"]


def test_captions_file_paths_cannot_escape_and_bad_lines_are_counted(world, monkeypatch):
    root = world / "in"
    (root / "ok.jpg").write_bytes(JPEG)
    fifo(root / "pipe.jpg")
    monkeypatch.setattr(S, "MAX_LINE_BYTES", 4096)
    lines = [
        json.dumps({"image": "ok.jpg", "caption": "a good one"}).encode(),
        json.dumps({"image": "../outside.jpg", "caption": "escapes"}).encode(),
        json.dumps({"image": str(world / "outside.jpg"), "caption": "absolute"}).encode(),
        json.dumps({"image": "ok.jpg\u0000x", "caption": "NUL byte"}).encode(),
        json.dumps({"image": "pipe.jpg", "caption": "a FIFO"}).encode(),
        json.dumps({"image": "ok.jpg", "caption": "lone \ud800 surrogate"}).encode(),  # valid JSON, not UTF-8-able
        json.dumps({"image": 5, "caption": ["wrong", "types"]}).encode(),
        b"[" * 50_000 + b"]" * 50_000,  # nested too deeply for json
        b'{"image": "ok.jpg", "caption": "big", "image_id": ' + b"9" * 5000 + b"}",  # int digit limit
        b'{"image": "ok.jpg", "caption": "caf\xe9"}',  # latin-1, not UTF-8
        b'{"image": "ok.jpg", "caption": "' + b"x" * 10_000 + b'"}',  # longer than MAX_LINE_BYTES
        b"{not json",
        json.dumps({"image": "ok.jpg", "caption": "the last good one"}).encode(),
    ]
    caps = world / "caps.jsonl"
    caps.write_bytes(b"\n".join(lines) + b"\n")
    m = S.write_image_folder_shards(root, caps, world / "out")
    assert m["total"] == 2 and m["skipped"] == len(lines) - 2
    got = samples_of(world / "out", m)
    assert [s["txt"].decode() for s in got] == ["a good one", "the last good one"]
    assert files_under(world / "out") == ["images-000000.tar", "images.manifest.json"]


def vqa_files(world, questions, annotations=None, subtype="val2014"):
    (world / "in" / subtype).mkdir(exist_ok=True)
    (world / "in" / subtype / f"COCO_{subtype}_{1:012d}.jpg").write_bytes(JPEG)
    q = world / "q.json"
    q.write_text(json.dumps({"data_subtype": subtype, "questions": questions}))
    a = None
    if annotations is not None:
        a = world / "a.json"
        a.write_text(json.dumps({"data_subtype": subtype, "annotations": annotations}))
    return q, a


def ann(qid):
    return {"question_id": qid, "answers": [{"answer": "yes", "answer_id": 1}], "answer_type": "yes/no",
            "question_type": "is", "multiple_choice_answer": "yes"}


def test_vqa_wrong_types_are_skipped(world):
    questions = [
        {"question_id": 1, "image_id": 1, "question": "ok?"},
        {"question_id": [1, 2], "image_id": 1, "question": "unhashable id"},
        {"question_id": 3, "image_id": "9" * 5000, "question": "huge image id"},
        {"question_id": 4, "image_id": {"x": 1}, "question": "object id"},
        "not even an object",
        {"question_id": 6, "image_id": 1, "question": "lone \ud800"},
        {"question_id": "x" * 100_000, "image_id": 1, "question": "a 100 kB id"},
    ]
    annotations = [ann(1), ann([1, 2]), ann(6), ann("x" * 100_000), "junk", {"question_id": {"a": 1}}]
    q, a = vqa_files(world, questions, annotations)
    m = S.write_vqa_shards(q, a, world / "in", world / "out")
    assert m["total"] == 2 and m["skipped"] == 5
    keys = [s["__key__"] for s in samples_of(world / "out", m)]
    assert keys[0] == "1" and keys[1] == "x" * S.MAX_KEY_CHARS  # keys capped: readers cap names at 64 kB


@pytest.mark.parametrize("content, message", [
    (b"{garbage", "is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "is not usable JSON"),
    (b'{"questions": [], "data_subtype": "caf\xe9"}', "is not UTF-8"),
    (b'{"data_subtype": "../../etc", "questions": []}', "cannot name an image folder"),
    (b'{"data_subtype": "/etc", "questions": []}', "cannot name an image folder"),
    (b'{"questions": {"not": "a list"}}', "expected a VQA questions file"),
    (b"x" * 300_001, "larger than 300000 bytes"),
])
def test_vqa_hostile_json_files_are_clear_cli_errors(world, capsys, monkeypatch, content, message):
    monkeypatch.setattr(S, "MAX_JSON_BYTES", 300_000)
    (world / "q.json").write_bytes(content)
    rc = main(["data", "shards", "vqa", "--questions", str(world / "q.json"), "--image-root", str(world / "in"),
               "--out", str(world / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mmmoe: error:") and message in err and "Traceback" not in err
    assert "q.json" in err
    assert files_under(world / "out") == []


def test_json_input_that_is_a_fifo_or_folder_is_a_clear_error(world, capsys):
    fifo(world / "q.json")
    for path in (world / "q.json", world / "in"):
        rc = main(["data", "shards", "vqa", "--questions", str(path), "--image-root", str(world / "in"),
                   "--out", str(world / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and "not a regular file" in err and "Traceback" not in err


def test_nlvr2_identifiers_and_folders_cannot_escape(world):
    root = world / "in"
    (root / "dev").mkdir()
    for base in ("dev-1-0",):
        (root / "dev" / f"{base}-img0.png").write_bytes(JPEG)
        (root / "dev" / f"{base}-img1.png").write_bytes(JPEG)
    (world / "dev-9-9-img0.png").write_bytes(JPEG)  # outside the image root
    (world / "dev-9-9-img1.png").write_bytes(JPEG)
    rows = [
        json.dumps({"identifier": "dev-1-0-0", "sentence": "ok", "label": "True"}).encode(),
        json.dumps({"identifier": "../dev-9-9-0", "sentence": "escapes", "label": "True"}).encode(),
        json.dumps({"identifier": "dev-9-9-0", "directory": "..", "sentence": "escapes", "label": "True"}).encode(),
        json.dumps({"identifier": "dev-9-9-0", "directory": str(world), "sentence": "absolute", "label": "True"}).encode(),
        json.dumps({"identifier": "dev-1-0-1", "sentence": "lone \ud800", "label": "True"}).encode(),
        json.dumps({"identifier": ["dev"], "sentence": 1, "label": {"x": 1}}).encode(),
        b"[" * 50_000,
        b"\xff\xfe not UTF-8",
        json.dumps({"identifier": "dev-1-0-2", "sentence": "ok too", "label": "False"}).encode(),
    ]
    src = world / "dev.json"
    src.write_bytes(b"\n".join(rows))
    m = S.write_nlvr2_shards(src, root, world / "out")
    assert m["total"] == 2 and m["skipped"] == len(rows) - 2
    assert [s["__key__"] for s in samples_of(world / "out", m)] == ["dev-1-0-0", "dev-1-0-2"]


def test_karpathy_paths_cannot_escape(world):
    root = world / "in"
    (root / "val2014").mkdir()
    (root / "val2014" / "a.jpg").write_bytes(JPEG)
    images = [
        {"split": "train", "cocoid": 1, "filepath": "val2014", "filename": "a.jpg", "sentences": [{"raw": "ok"}]},
        {"split": "train", "cocoid": 2, "filepath": "..", "filename": "outside.jpg", "sentences": [{"raw": "up"}]},
        {"split": "train", "cocoid": 3, "filename": str(world / "outside.jpg"), "sentences": [{"raw": "abs"}]},
        {"split": "train", "cocoid": 4, "filepath": ["x"], "filename": 7, "sentences": [{"raw": "types"}]},
        {"split": "train", "cocoid": 5, "filepath": "val2014", "filename": "a.jpg", "sentences": "not a list"},
    ]
    src = world / "dataset_coco.json"
    src.write_text(json.dumps({"images": images}))
    m = S.write_karpathy_shards(src, root, world / "out", splits=("train",))
    assert m["total"] == 1 and m["skipped"] == 4


def test_text_inputs_fifo_and_overlong_lines(world, capsys, monkeypatch):
    monkeypatch.setattr(S, "MAX_LINE_BYTES", 1000)
    src = world / "en.txt"
    src.write_bytes(b"first line\n" + b"y" * 5000 + b"\nsecond line\n" + b"z" * 1500)
    m = S.write_text_shards(src, world / "out")
    assert m["total"] == 2 and m["skipped"] == 2
    fifo(world / "pipe.txt")
    rc = main(["data", "shards", "text", "--input", str(world / "pipe.txt"), "--out", str(world / "out2")])
    err = capsys.readouterr().err
    assert rc == 2 and "not a regular file" in err and "Traceback" not in err


def test_manifest_shard_names_cannot_escape(world):
    for name in ("../evil.tar", "/etc/passwd", "..", "a\u0000b"):
        path = world / "x.manifest.json"
        path.write_text(json.dumps({"kind": "text", "pattern": "", "total": 1,
                                    "shards": [{"name": name, "samples": 1}]}))
        with pytest.raises(ValueError, match="not a file name next to the manifest"):
            S.manifest_shard_paths(path)
    path.write_text(json.dumps({"kind": "text", "pattern": "", "total": 1, "shards": [{"samples": "many"}]}))
    with pytest.raises(ValueError, match="malformed shards list"):
        S.read_manifest(path)


def test_writer_does_not_follow_a_planted_symlink(world):
    victim = world / "victim.txt"
    victim.write_text("keep me")
    (world / "out" / "text-000000.tar.tmp").symlink_to(victim)
    with S.ShardWriter(world / "out", "text", "text") as w:
        w.write({"__key__": "a", "txt": "hello"})
    assert victim.read_text() == "keep me"
    assert [s["txt"] for s in S.iter_tar_samples(world / "out" / "text-000000.tar")] == [b"hello"]


# ------------------------------------------------------------------------------ predict's image loading
def test_predict_image_loading_refuses_hostile_files(tmp_path, monkeypatch):
    cases = {
        "bomb.png": H.bomb_png(),
        "bomb.jpg": H.bomb_jpeg(),
        "bomb.gif": H.bomb_gif(),
        "cut.jpg": H.jpeg(H.pixels(0, 64, 64))[:400],
        "empty.jpg": b"",
        "text.jpg": b"hello, not an image",
        "eps.jpg": H.EPS,
    }
    expected = {
        "bomb.png": "DecompressionBombError", "bomb.jpg": "DecompressionBombError", "bomb.gif": "DecompressionBombError",
        "cut.jpg": "could not be decoded", "empty.jpg": "is an empty file", "text.jpg": "could not be decoded",
        "eps.jpg": "could not be decoded",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=expected[name]) as info:
            load_image(tmp_path / name, 32)
        assert name in str(info.value)
    fifo(tmp_path / "pipe.jpg")
    with pytest.raises(ValueError, match="not a regular file"):
        load_image(tmp_path / "pipe.jpg", 32)
    with pytest.raises(ValueError, match="is a folder"):
        load_image(tmp_path, 32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "missing.jpg", 32)
    import data_pipelines.transforms as T

    monkeypatch.setattr(T, "MAX_IMAGE_FILE_BYTES", 100)
    (tmp_path / "big.jpg").write_bytes(H.jpeg(H.pixels(0, 64, 64)))
    with pytest.raises(ValueError, match="larger than 100 bytes"):
        load_image(tmp_path / "big.jpg", 32)
    monkeypatch.undo()
    assert tuple(load_image(tmp_path / "big.jpg", 32).shape) == (1, 3, 32, 32)
