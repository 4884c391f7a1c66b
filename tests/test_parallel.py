"""Expert parallelism (mmmoe.parallel) in gloo process groups on CPU: one start of 2 and one of 4
processes, each running every case of tests/parallel_workers.py (EP MHMoE vs the single-process
layer for h in {1,2,3}, top-1/2, dropless / capacity per group / capacity per rank, padding, a
rank without tokens and experts without tokens from some rank; a multiway backbone whose ranks use
different ways; gradient reduction with replicas (4 ranks, EP degree 2); layout-independent
checkpoints and optimiser state)."""

import queue as queue_mod
import time

import pytest
import torch.multiprocessing as mp

from mmmoe.parallel import free_port as _free_port
from tests import parallel_workers




@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_single_process(world):
    # forkserver: the server imports torch, timm and the workers once for both tests; each worker
    # is then a fork of a clean single-threaded process (cheap, and safe unlike forking pytest)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.parallel_workers", "mmmoe.layers.multiway"])
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=parallel_workers.run, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + 240
    try:
        while len(results) < world:
            try:
                rank, errors, seen = queue.get(timeout=2)
                results[rank] = (errors, seen)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead or time.monotonic() > deadline:
                    pytest.fail(f"worker(s) {dead} died (see stderr) or the run timed out; results of {sorted(results)}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    problems = [f"rank {r}: {e}" for r, (errs, _) in sorted(results.items()) for e in errs]
    assert not problems, "\n".join(problems[:20])
    seen = results[0][1]
    # the cases really covered what they claim
    assert seen["expert_idle_on_a_rank"] > 0 and seen["dropped"] > 0, seen
