#!/usr/bin/env python
"""Fuzz the shard readers with hostile and damaged shards for a fixed time; report what came out.

Each iteration writes one shard into a scratch folder and reads it with the image-text reader
(``data_pipelines.readers.image_text_pipeline``, eval mode: tar parsing, member grouping, image
decoding, tokenizing, batching), alternating these kinds of shard:

  hostile   good samples around a random set of hostile samples (``data_pipelines.hostile.HOSTILE``:
            absolute / ``../`` / control-character names, symlinks, hard links, devices, FIFOs,
            zero-byte members, truncated and non-image bytes, PostScript, PNG / JPEG / GIF
            decompression bombs, duplicate members, 3 kB names, and one structural break: a long
            name or pax header over its cap, pax records with absurd numbers, sizes of 4 GiB, 2^87
            bytes or negative, a garbage header, no end block). Checked exactly: every good sample
            delivered with its caption, the skips counted by kind equal to what the hostile samples
            call for.
  mutated   a good shard after 1-3 random mutations (bit flips, byte writes, truncation, inserted or
            deleted bytes, duplicated or zeroed blocks, a hostile member spliced in, a header field
            rewritten with a valid checksum, gzip, a bit flip inside gzip). Checked: every sample
            whose bytes lie wholly before the first changed byte is delivered unchanged, and no key
            comes twice.
  many      every 100th shard: 100,000 zero-byte members nobody reads (one sample), or 20,000
            empty-image samples, between two good samples. Checked exactly.

Every iteration also checks that nothing escaped the reader (a crash) and that nothing was written:
the scratch folder holds only the shard, and the places hostile names point at do not exist.
Memory: the Python heap peak while reading each shard, above what was held before (tracemalloc, which
also sees numpy buffers but not PIL's or torch's own; ``--no-tracemalloc`` to skip it) and the
process's peak RSS (ru_maxrss, everything). A run passes when crashes and problems are 0 and the largest
per-iteration heap peak stays under ``--max-peak-mb``.

    python scripts/fuzz_shards.py --minutes 10                # the long run
    python scripts/fuzz_shards.py --iterations 200 --seed 3   # a fixed amount of work
    nice -n 10 python scripts/fuzz_shards.py --minutes 10 --json fuzz.json

Exit status: 0 when the run passes, 1 otherwise (the first problems are printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import sys
import time
import tracemalloc
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from data_pipelines import hostile as H  # noqa: E402
from data_pipelines import readers as _readers  # noqa: E402,F401 - imported before tracing starts

ESCAPE_TARGETS = ("/tmp/mmmoe-evil", "../../mmmoe-evil", "../mmmoe-evil", "mmmoe-evil")


def parse_args(argv=None) -> argparse.Namespace:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--minutes", type=float, default=1.0, help="how long to run")
    p.add_argument("--iterations", type=int, default=None, help="stop after this many shards instead")
    p.add_argument("--seed", type=int, default=0, help="random seed (a run is repeatable for a seed and iteration count)")
    p.add_argument("--max-peak-mb", type=float, default=64.0,
                   help="fail when one iteration's Python heap peak exceeds this (tracemalloc)")
    p.add_argument("--no-tracemalloc", action="store_true", help="do not trace Python allocations (faster)")
    p.add_argument("--progress", type=float, default=15.0, metavar="SECONDS", help="seconds between progress lines")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the summary as JSON")
    return p.parse_args(argv)


def escaped(scratch: str) -> List[str]:
    """Anything a hostile member name could have created, here or in the scratch folder."""
    bad = [t for t in ESCAPE_TARGETS if os.path.lexists(t) or os.path.lexists(os.path.join(scratch, t))]
    extra = sorted(set(os.listdir(scratch)) - {"fuzz-000000.tar"})
    return bad + [f"{scratch}/{x}" for x in extra]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("data_pipelines").setLevel(logging.ERROR)  # the skips are counted, not logged
    # stopped again at the end: left on, tracing would slow every later allocation of a caller's
    # process (the tests run main() in-process) and a later fork could deadlock on its lock
    started_tracing = not args.no_tracemalloc and not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    try:
        return _fuzz(args)
    finally:
        if started_tracing:
            tracemalloc.stop()


def _fuzz(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    budget = args.minutes * 60.0
    totals: Dict[str, int] = {}
    stats = {"iterations": 0, "hostile_shards": 0, "mutated_shards": 0, "many_shards": 0, "samples_delivered": 0,
             "crashes": 0, "problems": 0, "max_iteration_heap_peak_mb": 0.0}
    first_problems: List[str] = []
    worst = ""
    rss_start_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = last = time.monotonic()
    print(f"fuzz_shards: seed {args.seed}, "
          + (f"{args.iterations} iterations" if args.iterations else f"{args.minutes:g} min")
          + f", {len(H.HOSTILE)} hostile sample kinds", flush=True)
    with H.scratch_dir() as scratch:
        old_cwd = os.getcwd()
        os.chdir(scratch)  # relative hostile names would land here if anything extracted them
        try:
            it = 0
            while (args.iterations is None and time.monotonic() - start < budget) or \
                    (args.iterations is not None and it < args.iterations):
                kind = "many" if it % 100 == 99 else "hostile" if it % 2 == 0 else "mutated"
                label, result, problems = {"many": H.fuzz_many, "hostile": H.fuzz_hostile,
                                           "mutated": H.fuzz_mutated}[kind](rng, scratch, it)
                if not args.no_tracemalloc:
                    peak_mb = result.heap_peak / 2**20  # while reading, above what was held before
                    if peak_mb > stats["max_iteration_heap_peak_mb"]:
                        stats["max_iteration_heap_peak_mb"], worst = peak_mb, label
                    if peak_mb > args.max_peak_mb:
                        problems.append(f"heap peak {peak_mb:.1f} MB > {args.max_peak_mb} MB")
                problems += [f"wrote outside: {p}" for p in escaped(scratch)]
                stats["iterations"] += 1
                stats[f"{kind}_shards"] += 1
                stats["samples_delivered"] += result.samples
                stats["crashes"] += result.error is not None
                for k, v in result.skips.items():
                    totals[k] = totals.get(k, 0) + v
                if problems:
                    stats["problems"] += 1
                    if len(first_problems) < 10:
                        first_problems.append(f"[{it}] {label}: {'; '.join(problems)}")
                        print(f"PROBLEM {first_problems[-1]}", flush=True)
                it += 1
                now = time.monotonic()
                if now - last >= args.progress:
                    last = now
                    print(f"  {now - start:6.0f}s  {stats['iterations']} shards  {stats['samples_delivered']} samples "
                          f"delivered  {sum(totals.values())} skipped  crashes {stats['crashes']}  problems "
                          f"{stats['problems']}  heap peak {stats['max_iteration_heap_peak_mb']:.1f} MB", flush=True)
        finally:
            os.chdir(old_cwd)
    stats["seconds"] = round(time.monotonic() - start, 1)
    stats["skipped_by_kind"] = dict(sorted(totals.items()))
    stats["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    stats["rss_at_start_mb"] = round(rss_start_mb, 1)
    stats["max_iteration_heap_peak_mb"] = round(stats["max_iteration_heap_peak_mb"], 2)
    stats["worst_heap_iteration"] = worst
    print(f"\nshards read:        {stats['iterations']} ({stats['hostile_shards']} hostile, "
          f"{stats['mutated_shards']} mutated, {stats['many_shards']} with 20,000-100,000 tiny members) "
          f"in {stats['seconds']} s")
    print(f"samples delivered:  {stats['samples_delivered']}")
    print(f"skipped by kind:    " + ", ".join(f"{k}={v}" for k, v in stats["skipped_by_kind"].items()))
    print(f"crashes:            {stats['crashes']}")
    print(f"other problems:     {stats['problems'] - stats['crashes']}")
    if not args.no_tracemalloc:
        print(f"heap peak / shard:  {stats['max_iteration_heap_peak_mb']} MB (max over iterations; {worst})")
    print(f"peak RSS:           {stats['max_rss_mb']} MB (process; {stats['rss_at_start_mb']} MB after imports)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**stats, "first_problems": first_problems, "seed": args.seed}, f, indent=1)
    ok = stats["problems"] == 0 and stats["crashes"] == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
