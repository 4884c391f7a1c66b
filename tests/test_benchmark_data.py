"""scripts/benchmark_data.py runs end to end (tiny sizes) and reports every configuration."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark_data.py"


def test_help(capsys):
    spec = importlib.util.spec_from_file_location("benchmark_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "bare" in out and "stock" in out


def test_tiny_run_reports_all_rows(tmp_path):
    args = ["--images", "8", "--per-shard", "4", "--repeats", "1", "--workers", "0", "1", "--batch-size", "4",
            "--data-dir", str(tmp_path), "--json"]
    res = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout[res.stdout.index("\n{") + 1:])
    names = [r["name"] for r in report["rows"]]
    assert names == ["bare x1", "bare-draft x1", "ours w=0", "stock w=0", "ours-u8 w=0", "ours w=1", "stock w=1", "ours-u8 w=1"]
    for r in report["rows"]:
        assert r["samples_per_s"] > 0 and r["cpu_ms_per_sample"] > 0
        if r["name"].startswith("ours"):
            assert r["vs_stock"] > 0 and r["vs_bare_draft_per_worker"] > 0
    assert "ours: >= 1.5x stock:" in res.stdout
