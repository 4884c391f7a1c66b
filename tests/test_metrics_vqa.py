"""VQA accuracy: answer normalisation, leave-one-out accuracy, file validation, vocabulary, CLI."""

import json
import subprocess
import sys

import pytest

from data_pipelines.formats.vqa import build_answer_vocab, normalize_answer, process_digit_article, process_punctuation
from tasks.cli import main
from tasks.metrics import MetricInputError
from tasks.metrics.vqa import question_accuracy, vqa_accuracy


def answers(*texts):
    """Official-style answer records with distinct answer ids."""
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("yes!", "yes "),            # mark not next to a space -> replaced by a space
        ("hot-dog", "hot dog"),
        ("hot - dog", "hot  dog"),   # mark next to a space -> deleted (the spaces stay)
        ("a/b", "a b"),
        ("a/b 1,2", "ab 12"),        # a digit,digit comma anywhere -> every mark deleted
        ("1,000", "1000"),
        ("t.v.", "tv"),              # periods not followed by a digit go
        ("3.5", "3.5"),              # decimal point stays
        ("man's", "man's"),          # apostrophe is not in the list
        ("a:b", "a:b"),              # nor is the colon
        ("(red)", " red "),
    ],
)
def test_process_punctuation(raw, expected):
    assert process_punctuation(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),            # only zero..ten (and none)
        ("the red one", "red 1"),
        ("A Dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("Im", "im"),                    # the table's capitalised keys never match (lower-cased first)
        ("  many   spaces ", "many spaces"),
    ],
)
def test_process_digit_article(raw, expected):
    assert process_digit_article(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Yes!", "yes"),
        (" The  Dog.\n", "dog"),
        ("1,000 people", "1000 people"),
        ("None of the above", "0 of above"),
        ("hot-dog", "hot dog"),
        ("Dont know", "don't know"),
        ("3.5", "3.5"),
        ("\tthe\t", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# ---------------------------------------------------------------------------------------------
# Per-question accuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, expected",
    # k of 10 annotators agree with the prediction. Leaving out one of the k leaves k-1 matches,
    # leaving out one of the others leaves k: acc = (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10.
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_leave_one_out_partial_agreement(k, expected):
    gts = answers(*(["red"] * k + ["blue"] * (10 - k)))
    assert question_accuracy("red", gts) == pytest.approx(expected, abs=1e-12)


def test_number_words_are_normalised_in_the_prediction_only():
    # the prediction always goes through the full normalisation ("two" -> "2") ...
    gts = answers(*(["2"] * 8 + ["3"] * 2))
    assert question_accuracy("two", gts) == pytest.approx(1.0)
    assert question_accuracy("Two.", gts) == pytest.approx(1.0)
    # ... the ground truths of a disagreeing question only through the punctuation step, so a
    # ground-truth number word never matches: (official master behaviour)
    gts = answers("two", "two", *(["3"] * 8))
    assert question_accuracy("2", gts) == 0.0
    assert question_accuracy("two", gts) == 0.0
    assert question_accuracy("3", gts) == pytest.approx(1.0)


def test_contraction_and_article_normalised_in_the_prediction():
    gts = answers(*(["don't know"] * 5 + ["no idea"] * 5))
    assert question_accuracy("dont know", gts) == pytest.approx(1.0)  # dont -> don't
    gts = answers(*(["beach"] * 2 + ["ocean"] * 8))
    # "the beach" -> "beach": 2 matches -> (2 * 1/3 + 8 * 2/3) / 10
    assert question_accuracy("the beach", gts) == pytest.approx(0.6)
    gts = answers(*(["the beach"] * 2 + ["ocean"] * 8))  # ground-truth articles are kept
    assert question_accuracy("the beach", gts) == 0.0


def test_punctuation_step_on_disagreeing_ground_truths():
    gts = answers(*(["hot-dog"] * 4 + ["sausage"] * 6))  # '-' between letters becomes a space
    assert question_accuracy("hot dog", gts) == pytest.approx(1.0)
    gts = answers(*(["yes"] * 9 + ["yes."]))  # not unanimous as written: "yes." -> "yes"
    assert question_accuracy("yes", gts) == pytest.approx(1.0)


def test_unanimous_ground_truths_are_used_as_written():
    assert question_accuracy("yes", answers(*(["yes"] * 10))) == 1.0
    assert question_accuracy(" Yes.\t\n", answers(*(["yes"] * 10))) == 1.0  # prediction normalised
    assert question_accuracy("Yes", answers(*(["Yes"] * 10))) == 0.0      # "yes" != "Yes"
    assert question_accuracy("yes.", answers(*(["yes."] * 10))) == 0.0    # "yes" != "yes."
    assert question_accuracy("two", answers(*(["two"] * 10))) == 0.0      # "2" != "two"
    assert question_accuracy("hot-dog", answers(*(["hot dog"] * 10))) == 1.0


def test_identical_records_leave_together_as_in_official_script():
    # The official script drops every record equal to the left-out one. With no answer_id the ten
    # "yes" records are all equal, so every leave-one-out subset is empty -> 0. Plain strings are
    # distinct annotators.
    same = [{"answer": "yes"}] * 10
    assert question_accuracy("yes", same) == 0.0
    assert question_accuracy("yes", ["yes"] * 10) == 1.0
    # two identical records among distinct ones: leaving out either removes both
    recs = [{"answer": "red", "answer_id": 1}, {"answer": "red", "answer_id": 1}] + answers(*["blue"] * 8)
    # matches = 2; for the 2 "red" records 0 remain -> 0; for the 8 others 2 remain -> 2/3
    assert question_accuracy("red", recs) == pytest.approx(8 * (2 / 3) / 10)


def test_question_accuracy_needs_answers():
    with pytest.raises(ValueError):
        question_accuracy("yes", [])


# ---------------------------------------------------------------------------------------------
# Whole-file accuracy
# ---------------------------------------------------------------------------------------------


def _ann(qid, qtype, atype, texts, mca=None):
    return {"question_type": qtype, "multiple_choice_answer": mca or texts[0], "answers": answers(*texts),
            "image_id": 1000 + qid, "answer_type": atype, "question_id": qid}


def make_vqa():
    anns = [
        _ann(1, "is the", "yes/no", ["yes"] * 10),
        _ann(2, "how many", "number", ["two"] * 2 + ["3"] * 8, mca="3"),
        _ann(3, "what color is the", "other", ["red"] * 3 + ["blue"] * 7, mca="blue"),
        _ann(4, "what is the", "other", ["hot dog"] * 10),
        _ann(5, "how many", "number", ["4"] + ["5"] * 9, mca="5"),
    ]
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                 "data_subtype": "val2014",
                 "questions": [{"image_id": a["image_id"], "question": f"q{a['question_id']}?",
                                "question_id": a["question_id"]} for a in anns]}
    annotations = {"info": {}, "license": {}, "data_subtype": "val2014", "annotations": anns}
    results = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "2"},
               {"question_id": 3, "answer": "Red."}, {"question_id": 4, "answer": "hot-dog"},
               {"question_id": 5, "answer": "four"}]
    return questions, annotations, results


def test_vqa_accuracy_hand_computed():
    q, a, r = make_vqa()
    out = vqa_accuracy(q, a, r)
    # per question: 1.0; 0.0 (ground-truth "two" is never normalised); 0.9 ("Red." -> "red");
    # 1.0 ("hot-dog" -> "hot dog"); 0.3 ("four" -> "4", one annotator)
    assert out["perQuestion"] == {1: 100.0, 2: 0.0, 3: 90.0, 4: 100.0, 5: 30.0}
    assert out["overall"] == 64.0
    assert out["perAnswerType"] == {"yes/no": 100.0, "number": 15.0, "other": 95.0}
    assert out["perQuestionType"] == {"is the": 100.0, "how many": 15.0, "what color is the": 90.0,
                                      "what is the": 100.0}
    assert out["num_questions"] == 5


def test_vqa_accuracy_rounds_to_two_decimals():
    anns = [_ann(i, "is the", "yes/no", ["yes"] * 10) for i in (1, 2, 3)]
    q = {"questions": [{"question_id": i, "image_id": 0, "question": "?"} for i in (1, 2, 3)]}
    r = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "no"}, {"question_id": 3, "answer": "no"}]
    out = vqa_accuracy(q, {"annotations": anns}, r)
    assert out["overall"] == 33.33
    assert vqa_accuracy(q, {"annotations": anns}, r, ndigits=4)["overall"] == 33.3333


def test_vqa_accuracy_from_files(tmp_path):
    q, a, r = make_vqa()
    paths = {}
    for name, obj in (("q", q), ("a", a), ("r", r)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj))
    out = vqa_accuracy(paths["q"], paths["a"], str(paths["r"]))
    assert out["overall"] == 64.0
    # the inputs are not modified in place (the official script normalises its dicts in place)
    assert a["annotations"][1]["answers"][0]["answer"] == "two"


@pytest.mark.parametrize(
    "mutate, fragments",
    [
        (lambda q, a, r: r.pop(), ["no answer", "5"]),
        (lambda q, a, r: r.append({"question_id": 99, "answer": "x"}), ["not in", "99"]),
        (lambda q, a, r: r.append({"question_id": 2, "answer": "x"}), ["more than once", "2"]),
        (lambda q, a, r: r[0].update(question_id="1"), ["entry 0", "'question_id' must be an integer", "string"]),
        (lambda q, a, r: r[0].update(question_id=True), ["must be an integer", "boolean"]),
        (lambda q, a, r: r[1].update(answer=None), ["entry 1", "'answer' must be a string", "null"]),
        (lambda q, a, r: r.__setitem__(2, "yes"), ["entry 2", "expected"]),
        (lambda q, a, r: a["annotations"].pop(), ["without annotation", "5"]),
        (lambda q, a, r: q["questions"].pop(0), ["not in the questions file", "1"]),
        (lambda q, a, r: a["annotations"][0].update(answers=[]), ["question 1", "'answers'"]),
        (lambda q, a, r: a["annotations"][0].pop("answer_type"), ["question 1", "'answer_type'"]),
    ],
)
def test_vqa_accuracy_rejects_bad_inputs(mutate, fragments):
    q, a, r = make_vqa()
    mutate(q, a, r)
    with pytest.raises(MetricInputError) as info:
        vqa_accuracy(q, a, r)
    for frag in fragments:
        assert frag in str(info.value)


def test_vqa_results_must_be_a_list():
    q, a, _ = make_vqa()
    with pytest.raises(MetricInputError, match="JSON array"):
        vqa_accuracy(q, a, {"1": "yes"})


def test_vqa_error_names_the_file(tmp_path):
    q, a, r = make_vqa()
    qp, ap, rp = tmp_path / "q.json", tmp_path / "a.json", tmp_path / "r.json"
    qp.write_text(json.dumps(q))
    ap.write_text(json.dumps(a))
    rp.write_text(json.dumps(r[:-1]))
    with pytest.raises(MetricInputError, match=r"r\.json: .*no answer: 5"):
        vqa_accuracy(qp, ap, rp)
    rp.write_text("[{")
    with pytest.raises(MetricInputError, match=r"r\.json: not valid JSON"):
        vqa_accuracy(qp, ap, rp)
    with pytest.raises(MetricInputError, match=r"nope\.json: no such"):
        vqa_accuracy(qp, ap, tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------
# Answer vocabulary
# ---------------------------------------------------------------------------------------------


def test_build_answer_vocab_counts_normalised_answers():
    anns = [{"question_id": i, "multiple_choice_answer": m, "answers": answers(m)}
            for i, m in enumerate(["Two", "2", "two.", "yes", "Yes", "red", "the", "cat", "cat"])]
    assert build_answer_vocab(anns, min_freq=1) == ["2", "cat", "yes", "red"]
    assert build_answer_vocab({"annotations": anns}, min_freq=2) == ["2", "cat", "yes"]
    assert build_answer_vocab([anns[:4], {"annotations": anns[4:]}], min_freq=3) == ["2"]
    with pytest.raises(ValueError):
        build_answer_vocab(anns, min_freq=0)


def test_build_answer_vocab_all_answers(tmp_path):
    anns = [{"question_id": 1, "multiple_choice_answer": "red", "answers": answers(*["red"] * 6 + ["Blue"] * 4)},
            {"question_id": 2, "multiple_choice_answer": "blue", "answers": answers(*["blue"] * 7 + ["green"] * 3)}]
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"annotations": anns}))
    assert build_answer_vocab(p, min_freq=1, use_all_answers=True) == ["blue", "red", "green"]
    assert build_answer_vocab(p, min_freq=4, use_all_answers=True) == ["blue", "red"]
    assert build_answer_vocab(p, min_freq=1) == ["blue", "red"]


def test_synthetic_vqa_files_are_accepted(tmp_path):
    from data_pipelines.synthetic import generate

    generate(tmp_path, num_images=12)
    vq = tmp_path / "vqav2"
    qfile, afile = vq / "v2_OpenEnded_mscoco_val2014_questions.json", vq / "v2_mscoco_val2014_annotations.json"
    anns = json.loads(afile.read_text())["annotations"]
    results = [{"question_id": x["question_id"], "answer": x["multiple_choice_answer"]} for x in anns]
    out = vqa_accuracy(qfile, afile, results)
    expected = [question_accuracy(x["multiple_choice_answer"], x["answers"]) for x in anns]
    assert out["overall"] == round(100 * sum(expected) / len(expected), 2)
    assert set(out["perAnswerType"]) <= {"yes/no", "number", "other"}
    assert build_answer_vocab([vq / "v2_mscoco_train2014_annotations.json", afile], min_freq=1)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _write_vqa(tmp_path, results=None):
    q, a, r = make_vqa()
    paths = []
    for name, obj in (("questions", q), ("annotations", a), ("results", r if results is None else results)):
        p = tmp_path / f"{name}.json"
        p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        paths.append(str(p))
    return paths


def test_cli_score_vqa(tmp_path, capsys):
    qp, ap, rp = _write_vqa(tmp_path)
    save = tmp_path / "full.json"
    assert main(["score", "vqa", "--questions", qp, "--annotations", ap, "--results", rp, "--save", str(save)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["overall"] == 64.0
    assert out["perAnswerType"] == {"yes/no": 100.0, "number": 15.0, "other": 95.0}
    assert json.loads(save.read_text())["perQuestion"]["3"] == 90.0


@pytest.mark.parametrize(
    "results, fragment",
    [
        ("{not json", "not valid JSON"),
        ({"question_id": 1}, "JSON array"),
        ([{"question_id": 1, "answer": "yes"}], "4 questions have no answer"),
    ],
)
def test_cli_score_vqa_bad_results(tmp_path, capsys, results, fragment):
    qp, ap, rp = _write_vqa(tmp_path, results)
    assert main(["score", "vqa", "--questions", qp, "--annotations", ap, "--results", rp]) == 2
    err = capsys.readouterr()
    assert err.out == ""
    lines = err.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmmoe score vqa: error: ")
    assert rp in lines[0] and fragment in lines[0]


def test_cli_score_vqa_missing_file_subprocess(tmp_path):
    qp, ap, _ = _write_vqa(tmp_path)
    missing = str(tmp_path / "missing.json")
    res = subprocess.run([sys.executable, "-m", "tasks.cli", "score", "vqa", "--questions", qp,
                          "--annotations", ap, "--results", missing], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stdout == ""
    assert "Traceback" not in res.stderr
    assert res.stderr.strip() == f"mmmoe score vqa: error: {missing}: no such results file"


def test_cli_score_without_benchmark_prints_help(capsys):
    assert main(["score"]) == 2
    out = capsys.readouterr().out
    assert "vqa" in out and "nlvr2" in out and "caption" in out
