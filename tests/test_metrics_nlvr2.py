"""NLVR2 accuracy / consistency: crafted predictions, input formats, validation, CLI."""

import json

import pytest

from tasks.cli import main
from tasks.metrics import MetricInputError
from data_pipelines.formats.nlvr2 import load_predictions, parse_truth_value, sentence_key
from tasks.metrics.nlvr2 import nlvr2_scores

# identifier -> label. Sentences (identifier without the pair field): dev-1-*-0 (4 image pairs),
# dev-1-*-1 (2), dev-2-*-0 (2), dev-2-*-1 (1).
LABELS = {
    "dev-1-0-0": "True", "dev-1-1-0": "False", "dev-1-2-0": "True", "dev-1-3-0": "False",
    "dev-1-0-1": "True", "dev-1-1-1": "True",
    "dev-2-0-0": "False", "dev-2-1-0": "False",
    "dev-2-0-1": "True",
}
# Wrong: dev-1-1-1 (sentence dev-1-*-1) and dev-2-0-1 (sentence dev-2-*-1).
WRONG = {"dev-1-1-1", "dev-2-0-1"}


def flip(v):
    return "False" if v == "True" else "True"


PREDICTIONS = {k: (flip(v) if k in WRONG else v) for k, v in LABELS.items()}


def record(ident, label):
    return {"sentence": f"sentence {ident}", "left_url": "https://x/l.png", "right_url": "https://x/r.png",
            "label": label, "identifier": ident, "writer": "1", "validation": {}, "synset": "dog.n.01",
            "query": "dogs 1", "extra_validations": {}}


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "dev.json"
    p.write_text("".join(json.dumps(record(k, v)) + "\n" for k, v in LABELS.items()))
    return p


def test_sentence_key_drops_the_pair_field():
    assert sentence_key("dev-850-1-0") == "dev-850-0"
    assert sentence_key("test1-7-3-2") == "test1-7-2"
    assert sentence_key("dev-850-1-0") == sentence_key("dev-850-3-0") != sentence_key("dev-850-1-1")
    with pytest.raises(ValueError):
        sentence_key("dev-850")


def test_parse_truth_value():
    assert parse_truth_value("True") is True
    assert parse_truth_value(" false ") is False
    assert parse_truth_value(True) is True
    for bad in ("yes", 1, None, ""):
        with pytest.raises(ValueError):
            parse_truth_value(bad)


def test_accuracy_and_consistency_hand_computed(data_file):
    preds = [{"identifier": k, "prediction": v} for k, v in PREDICTIONS.items()]
    out = nlvr2_scores(data_file, preds)
    assert out["num_examples"] == 9 and out["num_correct"] == 7
    assert out["accuracy"] == pytest.approx(100 * 7 / 9)
    # sentences dev-1-*-0 and dev-2-*-0 are all right; dev-1-*-1 and dev-2-*-1 are not
    assert out["num_sentences"] == 4 and out["num_consistent"] == 2
    assert out["consistency"] == pytest.approx(50.0)


def test_all_right_and_all_wrong(data_file):
    right = nlvr2_scores(data_file, dict(LABELS))
    assert right["accuracy"] == 100.0 and right["consistency"] == 100.0
    wrong = nlvr2_scores(data_file, {k: flip(v) for k, v in LABELS.items()})
    assert wrong["accuracy"] == 0.0 and wrong["consistency"] == 0.0


def test_one_wrong_example_breaks_its_whole_sentence(data_file):
    preds = dict(LABELS)
    preds["dev-1-3-0"] = flip(preds["dev-1-3-0"])
    out = nlvr2_scores(data_file, preds)
    assert out["num_correct"] == 8
    assert out["num_consistent"] == 3  # only dev-1-*-0 (4 pairs) is lost


@pytest.mark.parametrize("fmt", ["json_list", "json_object", "csv", "csv_header", "jsonl", "bools_lower"])
def test_prediction_file_formats(data_file, tmp_path, fmt):
    p = tmp_path / "preds.txt"
    items = list(PREDICTIONS.items())
    if fmt == "json_list":
        p.write_text(json.dumps([{"identifier": k, "prediction": v} for k, v in items]))
    elif fmt == "json_object":
        p.write_text(json.dumps(dict(items)))
    elif fmt == "csv":
        p.write_text("".join(f"{k},{v}\n" for k, v in items))
    elif fmt == "csv_header":
        p.write_text("identifier,prediction\n" + "".join(f"{k}, {v.lower()}\r\n" for k, v in items) + "\n")
    elif fmt == "jsonl":
        p.write_text("\n".join(json.dumps({"identifier": k, "prediction": v}) for k, v in items))
    else:
        p.write_text(json.dumps({k: v == "True" for k, v in items}))
    out = nlvr2_scores(data_file, p)
    assert (out["num_correct"], out["num_consistent"]) == (7, 2)


def test_data_as_json_array(tmp_path):
    p = tmp_path / "dev_array.json"
    p.write_text(json.dumps([record(k, v) for k, v in LABELS.items()]))
    assert nlvr2_scores(p, dict(LABELS))["num_examples"] == 9


@pytest.mark.parametrize(
    "preds, fragments",
    [
        ({k: v for k, v in PREDICTIONS.items() if k != "dev-2-1-0"}, ["1 examples", "no prediction", "dev-2-1-0"]),
        ({**PREDICTIONS, "dev-9-0-0": "True"}, ["not in", "dev-9-0-0"]),
        ({**PREDICTIONS, "dev-1-0-0": "maybe"}, ["dev-1-0-0", "expected 'True' or 'False'", "maybe"]),
        ([{"identifier": "dev-1-0-0"}], ["entry 0", "no 'prediction'"]),
        ([{"prediction": "True"}], ["entry 0", "'identifier' must be a string"]),
        (42, ["expected a list"]),
    ],
)
def test_bad_predictions(data_file, preds, fragments):
    with pytest.raises(MetricInputError) as info:
        nlvr2_scores(data_file, preds)
    for frag in fragments:
        assert frag in str(info.value)


@pytest.mark.parametrize(
    "content, fragments",
    [
        ("dev-1-0-0,True\ndev-1-0-0,False\n", ["more than once", "dev-1-0-0"]),
        ("dev-1-0-0,True,extra\n", ["line 1", "identifier,prediction"]),
        ("[{\"identifier\": ", ["not valid JSON"]),
        ("{\"a\": 1\n{\"b\"", ["not valid JSON"]),
    ],
)
def test_bad_prediction_files(data_file, tmp_path, content, fragments):
    p = tmp_path / "p.csv"
    p.write_text(content)
    with pytest.raises(MetricInputError) as info:
        load_predictions(p)
    msg = str(info.value)
    assert msg.startswith(str(p))
    for frag in fragments:
        assert frag in msg


@pytest.mark.parametrize(
    "lines, fragments",
    [
        ([record("dev-1-0-0", "yes")], ["record 1", "dev-1-0-0", "expected 'True' or 'False'"]),
        ([{"identifier": "dev-1-0-0"}], ["no 'label'"]),
        ([record("dev-1", "True")], ["split-set-pair-sentence"]),
        ([record("dev-1-0-0", "True"), record("dev-1-0-0", "False")], ["duplicate identifiers", "dev-1-0-0"]),
        ([{"label": "True"}], ["'identifier' must be a string"]),
        ([], ["no examples"]),
    ],
)
def test_bad_data(tmp_path, lines, fragments):
    p = tmp_path / "dev.json"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(MetricInputError) as info:
        nlvr2_scores(p, {"dev-1-0-0": "True"})
    for frag in fragments:
        assert frag in str(info.value)


def test_data_line_not_json(tmp_path):
    p = tmp_path / "dev.json"
    p.write_text(json.dumps(record("dev-1-0-0", "True")) + "\n\n{oops\n")
    with pytest.raises(MetricInputError, match=r"dev\.json: line 3 is not valid JSON"):
        nlvr2_scores(p, {"dev-1-0-0": "True"})


def test_synthetic_nlvr2_dev(tmp_path):
    from data_pipelines.synthetic import generate

    generate(tmp_path, num_images=12)
    dev = tmp_path / "nlvr2" / "dev.json"
    recs = [json.loads(line) for line in dev.read_text().splitlines() if line.strip()]
    assert nlvr2_scores(dev, {r["identifier"]: r["label"] for r in recs})["consistency"] == 100.0
    out = nlvr2_scores(dev, [{"identifier": r["identifier"], "prediction": "True"} for r in recs])
    assert out["num_correct"] == sum(r["label"] == "True" for r in recs)


def test_cli_score_nlvr2(data_file, tmp_path, capsys):
    p = tmp_path / "preds.csv"
    p.write_text("".join(f"{k},{v}\n" for k, v in PREDICTIONS.items()))
    assert main(["score", "nlvr2", "--data", str(data_file), "--results", str(p)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"] == pytest.approx(100 * 7 / 9)
    assert out["consistency"] == pytest.approx(50.0)


@pytest.mark.parametrize("which", ["missing_data", "missing_prediction", "bad_label"])
def test_cli_score_nlvr2_errors(data_file, tmp_path, capsys, which):
    p = tmp_path / "preds.json"
    preds = dict(PREDICTIONS)
    data = str(data_file)
    named = str(p)
    if which == "missing_data":
        data = named = str(tmp_path / "nothing.json")
    elif which == "missing_prediction":
        preds.pop("dev-1-0-0")
    else:
        preds["dev-1-0-0"] = "yes"
    p.write_text(json.dumps(preds))
    assert main(["score", "nlvr2", "--data", data, "--results", str(p)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    line = captured.err.strip()
    assert "\n" not in line and line.startswith("mmmoe score nlvr2: error: ") and named in line
