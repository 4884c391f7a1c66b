"""COCO caption metrics: equality with pycocoevalcap's own scorers, validation, Java handling, CLI.

The scoring runs Java (PTB tokenizer, METEOR) and takes seconds, so one module-scoped fixture runs
``mmmoe score caption`` once and the pycocoevalcap scorers once, and the tests compare the two.
"""

import contextlib
import io
import json
import shutil

import pytest

from data_pipelines.formats.captions import karpathy_to_coco, load_captions, load_references
from tasks.cli import main
from tasks.metrics import MetricInputError
from tasks.metrics import caption as cap
from tasks.metrics.caption import SCORE_KEYS, CaptionToolError, JavaNotFoundError, caption_scores

TEST_REFS = {
    391895: ["A man with a red helmet on a small moped on a dirt road.",
             "Man riding a motor bike on a dirt road on the countryside.",
             "A man riding on the back of a motorcycle.",
             "A dirt path with a young person on a motor bike rests to the foreground.",
             "A man in a red shirt and a red hat is on a motorcycle on a hill side."],
    522418: ["A woman wearing a net on her head cutting a cake.",
             "A woman cutting a large white sheet cake.",
             "A woman wearing a hair net cutting a large sheet cake.",
             "there is a woman that is cutting a white cake",
             "A woman marking a cake with the back of a chef's knife."],
    184613: ["A child holding a flowered umbrella and petting a yak.",
             "A young man holding an umbrella next to a herd of cattle.",
             "a young boy barefoot holding an umbrella touching the horn of a cow",
             "A young boy with an umbrella who is touching the horn of a cow."],
    318219: ["A young boy standing in front of a computer keyboard.",
             "a little boy wearing headphones and looking at a computer monitor",
             "He is listening intently to the computer at school.",
             "..."],
    554625: ["a boy wearing headphones using one computer in a long row of computers",
             "A little boy with earphones on listening to something.",
             "A group of people sitting at desk using computers."],
}
OTHER_SPLITS = {574769: ("val", ["A woman in a room with a cat."]),
                60623: ("train", ["A man is in a kitchen making pizzas."])}
RESULTS = [
    {"image_id": 391895, "caption": "a man riding a motorcycle on a dirt road"},
    {"image_id": 522418, "caption": "A woman cutting a cake!"},
    {"image_id": 184613, "caption": ""},  # empty captions are allowed and score nothing
    {"image_id": 318219, "caption": "a boy looking at a computer\nscreen"},
    {"image_id": 554625, "caption": "a boy with headphones using a computer"},
]


def karpathy_dataset():
    images = []
    entries = [(iid, "test", refs) for iid, refs in TEST_REFS.items()]
    entries[2:2] = [(iid, split, refs) for iid, (split, refs) in OTHER_SPLITS.items()]
    sentid = 0
    for imgid, (iid, split, refs) in enumerate(entries):
        sents = []
        for raw in refs:
            sents.append({"tokens": raw.lower().strip(".").split(), "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        folder = "train2014" if split == "train" else "val2014"
        images.append({"filepath": folder, "filename": f"COCO_{folder}_{iid:012d}.jpg", "imgid": imgid,
                       "split": split, "sentids": [s["sentid"] for s in sents], "sentences": sents,
                       "cocoid": iid})
    return {"images": images, "dataset": "coco"}


def java_or_skip():
    pytest.importorskip("pycocoevalcap")
    if shutil.which("java") is None:
        pytest.skip("java is not installed")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("caption")
    coco, res = d / "dataset_coco.json", d / "results.json"
    coco.write_text(json.dumps(karpathy_dataset()))
    res.write_text(json.dumps(RESULTS))
    return coco, res


@pytest.fixture(scope="module")
def scored(files):
    java_or_skip()
    import pycocoevalcap.meteor.meteor as meteor_mod
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    started = []

    class RecordingMeteor(Meteor):
        def __init__(self):
            super().__init__()
            started.append(self)

    coco, res = files
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setattr(meteor_mod, "Meteor", RecordingMeteor)
        rc = main(["score", "caption", "--coco", str(coco), "--split", "test", "--results", str(res)])
    assert rc == 0, buf.getvalue()
    cli = json.loads(buf.getvalue())

    # The same evaluation with pycocoevalcap's pieces called directly, as COCOEvalCap does it.
    gts = {iid: [{"caption": c} for c in refs] for iid, refs in TEST_REFS.items()}
    hyp = {r["image_id"]: [{"caption": r["caption"]}] for r in RESULTS}
    gts, hyp = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(hyp)
    direct = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for k, v in zip(SCORE_KEYS[:4], Bleu(4).compute_score(gts, hyp)[0]):
            direct[k] = v
    meteor = Meteor()
    direct["METEOR"] = meteor.compute_score(gts, hyp)[0]
    del meteor
    direct["ROUGE_L"] = Rouge().compute_score(gts, hyp)[0]
    direct["CIDEr"] = Cider().compute_score(gts, hyp)[0]
    return {"cli": cli, "direct": direct, "meteors": started, "tokenized_hyp": hyp}


def test_scores_equal_pycocoevalcap_scorers(scored):
    cli, direct = scored["cli"], scored["direct"]
    assert set(SCORE_KEYS) <= set(cli)
    for key in SCORE_KEYS:
        assert cli[key] == pytest.approx(direct[key], rel=1e-12, abs=1e-12), key
    assert cli["num_images"] == len(TEST_REFS)


def test_scores_are_raw_with_x100_copy(scored):
    cli = scored["cli"]
    for key in SCORE_KEYS:
        assert cli["x100"][key] == pytest.approx(100 * cli[key])
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L"):
        assert 0.0 < cli[key] < 1.0, key
    assert cli["Bleu_1"] > cli["Bleu_2"] > cli["Bleu_3"] > cli["Bleu_4"]
    assert cli["CIDEr"] > 0.0
    assert "raw" in cli["scale"]


def test_fixture_exercises_empty_and_multiline_captions(scored):
    hyp = scored["tokenized_hyp"]
    assert hyp[184613] == [""]
    assert hyp[318219] == ["a boy looking at a computer screen"]
    assert hyp[522418] == ["a woman cutting a cake"]


def test_meteor_java_process_is_closed(scored):
    assert len(scored["meteors"]) == 1
    proc = scored["meteors"][0].meteor_p
    assert proc.returncode is not None  # waited for: no java process left behind
    assert proc.stdin.closed and proc.stdout.closed


def test_ptb_tokenize_keeps_captions_aligned_across_odd_line_breaks():
    java_or_skip()
    out = cap.ptb_tokenize({1: ["one\rtwo", "A\u2028Bee."], 2: ["three"], 3: [""]})
    assert out == {1: ["one two", "a bee"], 2: ["three"], 3: [""]}


# ---------------------------------------------------------------------------------------------
# Ground truth and results (no Java needed)
# ---------------------------------------------------------------------------------------------


def test_karpathy_to_coco_and_references(files):
    coco_path, _ = files
    gt = karpathy_to_coco(coco_path, "test")
    assert [im["id"] for im in gt["images"]] == list(TEST_REFS)
    assert len(gt["annotations"]) == sum(len(v) for v in TEST_REFS.values())
    first = gt["annotations"][0]
    assert first == {"image_id": 391895, "caption": TEST_REFS[391895][0], "id": 0}
    assert len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"])
    assert load_references(coco_path, "test") == TEST_REFS
    assert load_references(coco_path, "val") == {574769: OTHER_SPLITS[574769][1]}
    # the COCO-format file it produces is accepted as ground truth too (split then ignored)
    assert load_references(gt, "ignored") == TEST_REFS


def test_unknown_split_lists_available_ones(files):
    coco_path, _ = files
    with pytest.raises(MetricInputError, match=r"no images in split 'testing'; splits present: test \(5\), train \(1\), val \(1\)"):
        load_references(coco_path, "testing")


@pytest.mark.parametrize(
    "results, fragments",
    [
        (RESULTS + [{"image_id": 574769, "caption": "a cat"}], ["not in split 'test'", "574769"]),
        (RESULTS[:3], ["2 of the 5 images", "no caption", "318219", "554625"]),
        (RESULTS + [{"image_id": 391895, "caption": "again"}], ["more than one caption", "391895"]),
        ([{"image_id": 391895, "caption": None}], ["entry 0", "'caption' must be a string", "null"]),
        ([{"image_id": "391895", "caption": "x"}], ["entry 0", "'image_id' must be an integer"]),
        ({"391895": "x"}, ["JSON array"]),
        ([], ["no captions"]),
    ],
)
def test_bad_results(files, tmp_path, results, fragments):
    coco_path, _ = files
    p = tmp_path / "res.json"
    p.write_text(json.dumps(results))
    with pytest.raises(MetricInputError) as info:
        caption_scores(coco_path, p)
    msg = str(info.value)
    assert msg.startswith(str(p))
    for frag in fragments:
        assert frag in msg


def test_load_captions_keeps_empty_caption():
    assert load_captions([{"image_id": 1, "caption": ""}]) == {1: ""}


def test_subset_evaluates_only_captioned_images(files, monkeypatch):
    coco_path, _ = files
    seen = {}

    def fake_tokenize(captions):
        seen.setdefault("calls", []).append(dict(captions))
        return {k: list(v) for k, v in captions.items()}

    def fake_score(gts, res, spice=False):
        seen["score_keys"] = list(gts)
        return {k: 0.5 for k in SCORE_KEYS}

    monkeypatch.setattr(cap, "require_java", lambda: "java")
    monkeypatch.setattr(cap, "_import_pycocoevalcap", lambda: None)
    monkeypatch.setattr(cap, "ptb_tokenize", fake_tokenize)
    monkeypatch.setattr(cap, "score_tokenized", fake_score)
    out = caption_scores(coco_path, RESULTS[:2], allow_subset=True)
    assert out["num_images"] == 2 and out["x100"]["CIDEr"] == 50.0
    refs_call, res_call = seen["calls"]
    assert refs_call == {391895: TEST_REFS[391895], 522418: TEST_REFS[522418]}
    assert res_call == {391895: [RESULTS[0]["caption"]], 522418: [RESULTS[1]["caption"]]}
    with pytest.raises(MetricInputError, match="not in split"):
        caption_scores(coco_path, [{"image_id": 60623, "caption": "x"}], allow_subset=True)


def test_missing_java_is_reported(files, tmp_path, monkeypatch, capsys):
    coco_path, res_path = files
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    with pytest.raises(JavaNotFoundError, match="Java"):
        caption_scores(coco_path, res_path)
    assert main(["score", "caption", "--coco", str(coco_path), "--results", str(res_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    line = captured.err.strip()
    assert "\n" not in line and line.startswith("mmmoe score caption: error: Java was not found")


def test_spice_failure_is_a_clean_error(monkeypatch):
    pytest.importorskip("pycocoevalcap")
    import pycocoevalcap.spice.spice as spice_mod

    class Broken:
        def __init__(self):
            raise OSError("download failed")

    monkeypatch.setattr(spice_mod, "Spice", Broken)
    with pytest.raises(CaptionToolError, match=r"SPICE failed \(OSError: download failed\)"):
        cap._spice({1: ["a"]}, {1: ["a"]})


def test_meteor_failure_is_a_clean_error_and_releases_the_process(monkeypatch):
    pytest.importorskip("pycocoevalcap")
    import threading

    import pycocoevalcap.meteor.meteor as meteor_mod

    class FakeProc:
        def __init__(self):
            self.stdin, self.stdout = io.BytesIO(), io.BytesIO()
            self.stderr = io.BytesIO(b"Error: could not load paraphrase table\n")
            self.returncode = None
            self.killed = False

        def poll(self):
            return self.returncode

        def kill(self):
            self.killed, self.returncode = True, -9

        def wait(self, timeout=None):
            return self.returncode

    made = []

    class CrashingMeteor:
        def __init__(self):
            self.meteor_p, self.lock = FakeProc(), threading.Lock()
            made.append(self)

        def compute_score(self, gts, res):
            self.lock.acquire()  # like pycocoevalcap: the lock stays held when reading fails
            raise ValueError("could not convert string to float: ''")

    monkeypatch.setattr(meteor_mod, "Meteor", CrashingMeteor)
    monkeypatch.setattr(cap, "require_java", lambda: "java")
    with pytest.raises(CaptionToolError, match="METEOR \\(java\\) failed: Error: could not load paraphrase table"):
        cap.score_tokenized({1: ["a dog"]}, {1: ["a dog"]})
    (meteor,) = made
    assert meteor.meteor_p.killed and meteor.meteor_p.stdin.closed
    assert meteor.lock.acquire(blocking=False)  # released: Meteor.__del__ will not hang


@pytest.mark.parametrize("which", ["missing_coco", "bad_json", "duplicate"])
def test_cli_score_caption_input_errors(files, tmp_path, capsys, which):
    coco_path, res_path = files
    coco, res = str(coco_path), str(res_path)
    if which == "missing_coco":
        coco = named = str(tmp_path / "dataset_coco.json")
    elif which == "bad_json":
        res = named = str(tmp_path / "r.json")
        (tmp_path / "r.json").write_text("[{'image_id': 1}]")
    else:
        res = named = str(tmp_path / "r.json")
        (tmp_path / "r.json").write_text(json.dumps(RESULTS + RESULTS[:1]))
    assert main(["score", "caption", "--coco", coco, "--results", res]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    line = captured.err.strip()
    assert "\n" not in line and line.startswith(f"mmmoe score caption: error: {named}: ")
