"""data_pipelines.formats: each official format written then read back, the official answer
normalisation on known cases, malformed files -> an error naming the file and the problem, and the
atomic write keeping the previous file when a write fails."""

import json
import os

import pytest

from data_pipelines.formats import FormatError, captions, io, nlvr2, vqa


# ------------------------------------------------------------------------------ io
def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "sub" / "f.json"
    io.write_json(p, {"a": "é", "b": [1, 2]})
    assert p.read_text(encoding="utf-8") == '{\n "a": "é",\n "b": [\n  1,\n  2\n ]\n}\n'
    io.atomic_write(p, b"\x00bytes", fsync=True)
    assert p.read_bytes() == b"\x00bytes"
    assert sorted(os.listdir(p.parent)) == ["f.json"]


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "f.json"
    io.write_json(p, [1])

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        io.write_json(p, [2])
    assert json.loads(p.read_text()) == [1]
    assert os.listdir(tmp_path) == ["f.json"]  # the temporary file is gone too


def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,\n oops}')
    with pytest.raises(FormatError, match=rf"^{bad}: not valid JSON .* line 2 column 2"):
        io.read_json(bad)
    with pytest.raises(FormatError, match=r"no such file"):
        io.read_json(tmp_path / "missing.json", "file")


# ------------------------------------------------------------------------------ captions
IMAGES = [
    {"split": "test", "filepath": "val2014", "filename": "COCO_val2014_000000000007.jpg", "cocoid": 7, "imgid": 0,
     "sentences": [{"raw": "A cat on a mat.", "sentid": 70}, {"tokens": ["a", "black", "cat"], "sentid": 71}]},
    {"split": "train", "filepath": "train2014", "filename": "COCO_train2014_000000000008.jpg", "cocoid": 8,
     "imgid": 1, "sentences": [{"raw": "Two dogs.", "sentid": 80}]},
    {"split": "test", "filename": "x.jpg", "imgid": 9, "sentences": [{"raw": "Flickr style, no cocoid.", "sentid": 90}]},
]


def test_karpathy_round_trip(tmp_path):
    p = tmp_path / "dataset_coco.json"
    captions.write_karpathy(p, IMAGES)
    assert json.loads(p.read_text())["dataset"] == "coco"
    # raw text, the tokens joined when there is no raw; imgid stands in for a missing cocoid
    assert captions.load_references(p, "test") == {7: ["A cat on a mat.", "a black cat"], 9: ["Flickr style, no cocoid."]}
    assert captions.load_references(p, "train") == {8: ["Two dogs."]}
    gt = captions.karpathy_to_coco(p, "test")
    assert gt["annotations"][:2] == [{"image_id": 7, "caption": "A cat on a mat.", "id": 70},
                                     {"image_id": 7, "caption": "a black cat", "id": 71}]
    assert captions.load_references(gt) == captions.load_references(p, "test")  # COCO format read back
    rec = captions.karpathy_image(IMAGES[0], "x")
    assert (rec.image_id, rec.split, rec.filepath, rec.filename) == (7, "test", "val2014", IMAGES[0]["filename"])


def test_caption_results_round_trip_and_refusal(tmp_path):
    p = tmp_path / "caption_results.json"
    captions.write_caption_results(p, {7: "a cat", 9: ""})
    assert json.loads(p.read_text()) == [{"image_id": 7, "caption": "a cat"}, {"image_id": 9, "caption": ""}]
    assert captions.load_captions(p) == {7: "a cat", 9: ""}
    q = tmp_path / "dup.json"
    with pytest.raises(FormatError, match="more than one caption"):
        captions.write_caption_results(q, [{"image_id": 7, "caption": "a"}, {"image_id": 7, "caption": "b"}])
    assert not q.exists()  # an unscorable file is never written


@pytest.mark.parametrize("broken, fragment", [
    ({"images": [IMAGES[0], "oops"]}, "images[1] is string 'oops', expected an object"),
    ({"images": [{**IMAGES[0], "cocoid": "7"}]}, "images[0]: 'cocoid' must be an integer"),
    ({"images": [{**IMAGES[0], "sentences": []}]}, "image 7: 'sentences' must be a non-empty list"),
    ({"images": [{**IMAGES[0], "sentences": [{"sentid": 1}]}]}, "image 7: sentences[0] has no string 'raw'"),
    ({"imgs": []}, "neither a Karpathy split file"),
])
def test_malformed_karpathy_file_names_file_and_problem(tmp_path, broken, fragment):
    p = tmp_path / "dataset_coco.json"
    p.write_text(json.dumps(broken))
    with pytest.raises(FormatError) as info:
        captions.load_references(p, "test")
    assert str(info.value).startswith(str(p)) and fragment in str(info.value)


# ------------------------------------------------------------------------------ VQA
@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),  # number words to digits, lower case
    ("none", "0"),
    ("a Dog", "dog"),  # articles dropped
    ("dont", "don't"),  # contractions fixed
    ("2.5", "2.5"),  # a period before a digit stays
    ("yes.", "yes"),  # other periods go
    ("1,000", "1000"),  # a comma between digits: every mark deleted
    ("t-shirt", "t shirt"),  # a mark touching no space becomes a space
    ("hello ,world", "hello world"),  # a mark touching a space is deleted
    (" red\n", "red"),
])
def test_official_answer_normalisation(raw, expected):
    assert vqa.normalize_answer(raw) == expected


def _vqa_files(tmp_path):
    qs = [{"image_id": 1, "question": "what?", "question_id": 10},
          {"image_id": 1, "question": "how many?", "question_id": 11}]
    anns = [
        {"question_id": qid, "image_id": 1, "question_type": "what", "answer_type": t, "multiple_choice_answer": mc,
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}
        for qid, t, mc, answers in ((10, "other", "Red", ["Red"] * 9 + ["blue"]), (11, "number", "two", ["two"] * 10))]
    qp, ap = tmp_path / "q.json", tmp_path / "a.json"
    vqa.write_questions(qp, qs, "val2014")
    vqa.write_annotations(ap, anns, "val2014")
    assert json.loads(qp.read_text())["data_subtype"] == json.loads(ap.read_text())["data_subtype"] == "val2014"
    return qp, ap


def test_vqa_files_results_and_vocabulary_round_trip(tmp_path):
    qp, ap = _vqa_files(tmp_path)
    assert vqa.load_question_ids(qp) == [10, 11]
    assert [a["question_id"] for a in vqa.load_annotations(ap)] == [10, 11]
    rp = tmp_path / "vqa_results.json"
    vqa.write_results(rp, {10: "red", 11: "2"})
    assert rp.read_text().count("\n") == 1  # one line, like the official files
    assert vqa.load_results(rp) == {10: "red", 11: "2"}
    answers = vqa.build_answer_vocab(ap, min_freq=1)
    assert answers == ["2", "red"]  # normalised, ties alphabetical
    vp = tmp_path / "vocab.json"
    vqa.write_answer_vocab(vp, answers)
    assert vqa.read_answer_vocab(vp) == answers
    assert vqa.answer_index(vp) == vqa.answer_index({"red": 1, "2": 0}) == {"2": 0, "red": 1}


@pytest.mark.parametrize("what, broken, fragment", [
    ("annotations", {"annotations": [{"question_id": 1, "question_type": "x", "answer_type": "y", "answers": []}]},
     "question 1: 'answers' must be a non-empty list"),
    ("questions", {"questions": [{"question_id": 1}, {"question_id": 1}]}, "1 duplicate question ids: 1"),
    ("results", [{"question_id": True, "answer": "x"}], "entry 0: 'question_id' must be an integer, got boolean"),
    ("results", {"question_id": 1, "answer": "x"}, "results must be a JSON array"),
    ("vocab", {"yes": 0, "no": 2}, "indices of an {answer: index} vocabulary must be 0..1"),
])
def test_malformed_vqa_files_name_file_and_problem(tmp_path, what, broken, fragment):
    p = tmp_path / f"{what}.json"
    p.write_text(json.dumps(broken))
    load = {"annotations": vqa.load_annotations, "questions": vqa.load_question_ids,
            "results": vqa.load_results, "vocab": vqa.read_answer_vocab}[what]
    with pytest.raises(FormatError) as info:
        load(p)
    assert str(info.value).startswith(str(p)) and fragment in str(info.value)


# ------------------------------------------------------------------------------ NLVR2
def test_nlvr2_labels_and_predictions_round_trip(tmp_path):
    data = tmp_path / "dev.json"
    recs = [{"identifier": "dev-1-0-0", "sentence": "s", "label": "True"},
            {"identifier": "dev-1-1-0", "sentence": "s", "label": "False"}]
    nlvr2.write_records(data, recs)
    assert [json.loads(line) for line in data.read_text().splitlines()] == recs  # JSON lines
    assert nlvr2.load_labels(data) == {"dev-1-0-0": True, "dev-1-1-0": False}
    p = tmp_path / "nlvr2_predictions.json"
    nlvr2.write_predictions(p, {"dev-1-0-0": True, "dev-1-1-0": "false"})
    assert json.loads(p.read_text()) == [{"identifier": "dev-1-0-0", "prediction": "True"},
                                         {"identifier": "dev-1-1-0", "prediction": "False"}]
    assert nlvr2.load_predictions(p) == {"dev-1-0-0": True, "dev-1-1-0": False}
    assert nlvr2.sentence_key("dev-850-1-0") == "dev-850-0"
    assert [nlvr2.parse_truth_value(v) for v in ("True", " false ", True)] == [True, False, True]
    with pytest.raises(ValueError, match="expected 'True' or 'False'"):
        nlvr2.parse_truth_value("maybe")


def test_malformed_nlvr2_file_names_file_and_line(tmp_path):
    data = tmp_path / "dev.json"
    data.write_text(json.dumps({"identifier": "dev-1-0-0", "label": "True"}) + "\n{broken\n")
    with pytest.raises(FormatError, match=rf"^{data}: line 2 is not valid JSON"):
        nlvr2.load_labels(data)
    data.write_text(json.dumps({"identifier": "dev-1-0-0", "label": "yes"}) + "\n")
    with pytest.raises(FormatError, match=r"record 1 \(dev-1-0-0\): expected 'True' or 'False'"):
        nlvr2.load_labels(data)


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    """A named pipe given as an annotation file would block a plain read forever."""
    fifo = tmp_path / "annotations.json"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        io.read_json(fifo)
