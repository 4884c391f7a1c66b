"""``mmmoe compare`` on a tiny corpus: a complete compare.json for 2 variants x 2 seeds (causal LM),
the table and the curves; the masked-LM path per language; bad arguments."""

from __future__ import annotations

import json
import math
import random

import pytest

from mmmoe.models.registry import get_config
from tasks.cli import build_parser

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec", "ignore:.*does not have many workers",
                                        "ignore:.*IterableDataset")

WORDS = "the a red blue green small large circle square triangle sits above below near left right of".split()


def _corpus(folder, name, n, seed):
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "." for _ in range(n)]
    (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / name


def _run(argv):
    ns = build_parser().parse_args(["compare", *argv])
    return ns.handler(ns)


COMMON = ["--steps", "2", "--context", "64", "--batch-size", "4", "--val-every", "1", "--val-batches", "1",
          "--vocab-size", "60", "--threads", "1", "--preset", "tiny"]


def test_compare_lm_writes_a_complete_compare_json(tmp_path, capsys):
    text = tmp_path / "corpus"
    _corpus(text, "a.txt", 120, 0)
    _corpus(text, "b.txt", 120, 1)
    out = tmp_path / "out"
    assert _run(["lm", "--text", str(text), "--variants", "dense", "mhmoe-h2", "--seeds", "2", "--out", str(out),
                 *COMMON]) == 0
    printed = capsys.readouterr().out
    assert "[run 4/4] mhmoe-h2 seed 1" in printed and "| mhmoe-h2 |" in printed
    res = json.loads((out / "compare.json").read_text())
    assert res["complete"] is True
    runs = {(r["variant"], r["seed"]): r for r in res["runs"]}
    assert set(runs) == {("dense", 0), ("dense", 1), ("mhmoe-h2", 0), ("mhmoe-h2", 1)}
    # the held-out split: the last 5% of the 240 documents (12), every token of them scored
    tokens = {r["metrics"]["lm_tokens"] for r in runs.values()}
    assert len(tokens) == 1 and tokens.pop() > 12
    for (variant, seed), r in runs.items():
        assert r["steps"] == 2 and math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert r["tokens_per_s"] > 0 and r["params"] > 0 and r["macs_per_token"] > 0
        if variant == "dense":
            assert r["activation_per_layer"] == {} and r["expert_activation"] is None
        else:
            cfg = get_config("tiny", variant, max_text_len=64)
            moe_blocks = {f"{i}.language" for i in range(cfg.depth) if cfg.is_moe_layer(i)}
            assert set(r["activation_per_layer"]) == moe_blocks and moe_blocks  # the language way's MoE blocks
            assert all(0 < a <= 1 for a in r["activation_per_layer"].values())
            assert all(len(v) == r["moe"]["num_experts"] for v in r["activation_ratios"].values())
            assert 1.0 <= r["sub_token_divergence"] <= 4.0  # h * k = 2 * 2 sub-token choices at most
        assert (out / "runs" / variant / f"seed{seed}" / "metrics.csv").is_file()
    # matched active FLOPs; different seeds give different models
    assert runs[("dense", 0)]["macs_per_token"] == pytest.approx(runs[("mhmoe-h2", 0)]["macs_per_token"], rel=0.01)
    assert runs[("dense", 0)]["perplexity"] != runs[("dense", 1)]["perplexity"]
    s = res["summary"]["dense"]["perplexity"]
    ppl = [runs[("dense", k)]["perplexity"] for k in (0, 1)]
    assert s["mean"] == pytest.approx(sum(ppl) / 2) and s["std"] == pytest.approx(abs(ppl[0] - ppl[1]) / math.sqrt(2))
    assert res["unigram_baseline_perplexity"] > 1
    assert set(res["ordering"]["worst_to_best"]) == {"dense", "mhmoe-h2"}
    assert "| dense |" in (out / "compare.md").read_text() and (out / "curves.png").stat().st_size > 1000
    # a second call with the same settings reuses the finished runs
    assert _run(["lm", "--text", str(text), "--variants", "dense", "mhmoe-h2", "--seeds", "2", "--out", str(out),
                 *COMMON]) == 0
    assert "reusing" in capsys.readouterr().out
    assert json.loads((out / "compare.json").read_text())["runs"] == res["runs"]


def test_compare_mlm_reports_per_language_perplexity(tmp_path):
    de = _corpus(tmp_path, "de.txt", 80, 2)
    en = _corpus(tmp_path, "en.txt", 80, 3)
    out = tmp_path / "out"
    assert _run(["mlm", "--text", f"de={de}", f"en={en}", "--variants", "smoe", "--seeds", "1", "--out", str(out),
                 *COMMON]) == 0
    (r,) = json.loads((out / "compare.json").read_text())["runs"]
    assert {"mlm_perplexity", "mlm_perplexity_de", "mlm_perplexity_en"} <= set(r["metrics"])
    assert "| smoe |" in (out / "compare.md").read_text()


def test_compare_rejects_bad_arguments(tmp_path):
    text = _corpus(tmp_path, "a.txt", 20, 0)
    with pytest.raises(SystemExit, match="context"):
        _run(["lm", "--text", str(text), "--context", "32", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="unknown variant"):
        _run(["lm", "--text", str(text), "--variants", "moe9", "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        _run(["lm", "--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])
