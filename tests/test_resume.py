"""Reproducible and exactly resumable training (issue #14), end to end through ``mmmoe fit``.

* Two runs of the same tiny pretraining config and seed end with bitwise-equal parameters, with
  0 and with 1 DataLoader workers (and the two worker counts give the same run).
* A run SIGKILLed at a random step after a checkpoint and resumed with ``--ckpt_path last`` ends
  with the same parameters, bit for bit, as the uninterrupted run: pretraining (three streams,
  across an epoch boundary) and VQA fine-tuning, each with 0 and 1 workers. The interrupted runs
  are real ``python -m tasks.cli fit`` processes, started together before the in-process runs.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.fit_cli import MMMoECLI
from tasks.robust import newest_loadable_checkpoint
from tests.fitruns import assert_bitwise_equal, kill_callback, make_config, weights

REPO = Path(__file__).resolve().parents[1]
STEPS = {"pretrain": 10, "vqa": 8}
EVERY = 3  # a checkpoint (and last.ckpt) every 3 steps; pretraining epochs are 5 steps
CASES = [("pretrain", 0), ("pretrain", 1), ("vqa", 0), ("vqa", 1)]
KILL_TIMEOUT_S = 300


def fit(config: Path, *extra: str) -> Path:
    cli = MMMoECLI(args=["fit", "--config", str(config), *extra])
    return Path(cli.trainer.checkpoint_callback.dirpath)


@pytest.fixture(scope="module")
def interrupted(small_synth, tmp_path_factory):
    """Start the four runs to be killed (subprocesses, in parallel): {case: (step, out, process)}."""
    tmp = tmp_path_factory.mktemp("interrupted")
    rng = random.Random()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    runs = {}
    for kind, workers in CASES:
        step = rng.randint(EVERY + 1, STEPS[kind] - 1)  # after the first checkpoint, before the end
        out = tmp / f"{kind}{workers}"
        cfg = make_config(kind, out, small_synth, STEPS[kind], workers, every=EVERY,
                          extra_callbacks=[kill_callback(step)], name="killed")
        logf = open(tmp / f"{kind}{workers}.log", "w")
        cmd = [sys.executable, "-c", "import sys, torch; torch.set_num_threads(1); from tasks.cli import main; "
               "sys.exit(main())", "fit", "--config", str(cfg)]
        runs[(kind, workers)] = (step, out, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT))
    yield runs
    for _, _, proc in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(small_synth, tmp_path_factory, interrupted):
    """The reference runs, in this process: {(kind, workers, repeat): final parameters}."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out = {}
    for kind, workers, repeat in [("pretrain", 0, 0), ("pretrain", 0, 1), ("pretrain", 1, 0), ("pretrain", 1, 1),
                                  ("vqa", 0, 0), ("vqa", 1, 0)]:
        cfg = make_config(kind, tmp / f"{kind}{workers}-{repeat}", small_synth, STEPS[kind], workers, every=EVERY)
        out[(kind, workers, repeat)] = weights(fit(cfg) / "last.ckpt")
    return out


@pytest.mark.parametrize("workers", [0, 1])
def test_same_seed_same_weights(uninterrupted, workers):
    assert_bitwise_equal(uninterrupted[("pretrain", workers, 0)], uninterrupted[("pretrain", workers, 1)])
    # a stream is a function of (seed, reader, epoch, rank, worker stream), not of the process
    assert_bitwise_equal(uninterrupted[("pretrain", 0, 0)], uninterrupted[("pretrain", 1, 0)])


def test_a_different_seed_gives_different_weights(small_synth, tmp_path, uninterrupted):
    cfg = make_config("pretrain", tmp_path / "seed1", small_synth, 3, 0, every=EVERY)
    ref = make_config("pretrain", tmp_path / "seed0", small_synth, 3, 0, every=EVERY)
    a = weights(fit(cfg, "--seed_everything", "1") / "last.ckpt")
    b = weights(fit(ref) / "last.ckpt")
    assert not torch.equal(a["mlm_head.bias"], b["mlm_head.bias"])


@pytest.mark.parametrize("kind,workers", CASES)
def test_resume_after_sigkill_is_exact(interrupted, uninterrupted, small_synth, kind, workers):
    step, out, proc = interrupted[(kind, workers)]
    print(f"{kind}, {workers} workers: SIGKILL at step {step}")  # shown when the test fails
    try:
        rc = proc.wait(timeout=KILL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    log = (out.parent / f"{kind}{workers}.log").read_text()
    assert rc == -signal.SIGKILL, f"the run to interrupt exited with {rc}:\n{log[-3000:]}"
    ckpts = out / "checkpoints"
    saved = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert 0 < saved <= step < STEPS[kind], (saved, step)
    if (kind, workers) == ("pretrain", 0):
        # a damaged last.ckpt: --ckpt_path last falls back to the newest checkpoint that loads
        data = (ckpts / "last.ckpt").read_bytes()
        (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])
    cfg = make_config(kind, out, small_synth, STEPS[kind], workers, every=EVERY)
    fit(cfg, "--ckpt_path", "last")
    # (resumed from an early step checkpoint, Lightning may write last-v1.ckpt next to the damaged one)
    newest = newest_loadable_checkpoint([ckpts])
    assert torch.load(newest, map_location="cpu", weights_only=True)["global_step"] == STEPS[kind]
    assert_bitwise_equal(uninterrupted[(kind, workers, 0)], weights(newest))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_loader_resume_continues_the_stream(small_synth, workers):
    """``EpochLoader.resume(epoch, k)`` yields exactly the batches after the first k of that pass
    (same samples, crops and masks), with the worker streams rotated when there are several."""
    from data_pipelines.tokenizer import Tokenizer
    from data_pipelines.readers import EpochLoader, image_text_pipeline

    pipe = image_text_pipeline(str(small_synth / "shards" / "pretrain-image-text.manifest.json"),
                               Tokenizer(str(small_synth / "tokenizer.model")), image_size=64, batch_size=4,
                               max_len=16, resampled=True, epoch_samples=24, shuffle_buffer=10, seed=5)

    def run(loader):
        return [(b["key"], b["image"], b["image_mask"], b["text_ids"], b["mlm_labels"]) for b in loader]

    def same(a, b):
        return len(a) == len(b) and all(x[0] == y[0] and all(torch.equal(u, v) for u, v in zip(x[1:], y[1:]))
                                        for x, y in zip(a, b))

    loader = EpochLoader(pipe, num_workers=workers)
    first, second = run(loader), run(loader)
    assert len(first) == 6 and not same(first, second)  # epochs differ
    resumed = EpochLoader(pipe, num_workers=workers)
    resumed.resume(0, 3)
    assert same(run(resumed), first[3:])
    assert same(run(resumed), second)  # and the next pass is epoch 1
