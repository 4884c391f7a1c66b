"""The benchmark and GPU-check scripts run end to end (tiny sizes), so a GPU session or a user's
benchmark does not start with a Python error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=ENV)


def test_benchmark_moe_tiny_run_matches_flops(tmp_path):
    out = tmp_path / "rows.json"
    res = _run("benchmark_moe.py", "--tokens", "128", "--d-model", "64", "--hidden", "96", "--experts", "2",
               "--repeats", "2", "--warmup", "0", "--threads", "1", "--json", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["args"]["d_model"] == 64
    rows = report["rows"]
    names = [r["variant"] for r in rows]
    assert names[0] == "dense" and any(n.startswith("mh-moe h=4") for n in names), names
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        assert r["time_ms"] > 0 and r["saved_mib"] > 0
        if r["variant"].startswith("mh-moe"):
            # compared with the dense FFN of (to one hidden unit) the same multiply-adds per token
            h = int(r["variant"].split("h=")[1].split()[0])
            dense = next(n for n in names if n.endswith(f"(= h={h} MACs)"))
            assert abs(by_name[dense]["macs_per_token"] - r["macs_per_token"]) <= 3 * 64 / 2
            assert r["matched_ratio"] is not None and r["matched_ratio"] > 0
        elif r["variant"].startswith("dense"):
            assert r["matched_ratio"] is None
    assert "x matched" in res.stdout and "fused CPU kernels=" in res.stdout
    assert report["threads"] == 1 and report["allocator"].startswith(("glibc", "jemalloc", "tcmalloc", "mimalloc"))
    assert f"allocator={report['allocator']}" in res.stdout


def test_gpu_check_cpu_dry_run():
    res = _run("gpu_check.py", "--cpu-dry-run")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("SUMMARY "))
    summary = json.loads(line[len("SUMMARY "):])
    assert summary["fast_grouped_path"] is True
    assert summary["pretrain"]["tokens_per_s"] > 0 and summary["pretrain"]["preset"] == "tiny"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run for real")
def test_gpu_check_without_cuda_says_so():
    res = _run("gpu_check.py", "--skip-benchmark")
    assert res.returncode == 2
    assert "no CUDA device" in res.stderr and "--cpu-dry-run" in res.stderr


def test_gpu_check_notices_the_fallback_loop(monkeypatch):
    """The fast-path check reports False (with the reason) when the grouped kernel is not used."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_under_test", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cpu = torch.device("cpu")
    assert mod.check_syncs_and_fast_path(cpu, d=64, tokens=64)["fast_grouped_path"] is True
    monkeypatch.setattr(mod.experts_mod, "_fast_path_ok", lambda *a, **k: False)
    result = mod.check_syncs_and_fast_path(cpu, d=64, tokens=64)
    assert result["fast_grouped_path"] is False and "fallback loop" in result["fast_path_error"]
