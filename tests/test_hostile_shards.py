"""Hostile shards against the readers (data_pipelines.hostile builds them byte by byte): every
hostile member kind is counted by kind while every good sample still arrives, nothing is written,
truncation and bit flips at every offset, 100,000 tiny members, decompression bombs, bounded
memory, and a seeded fuzz run (scripts/fuzz_shards.py runs the same iterations for minutes)."""

import gzip
import io
import logging
import os
import random
import tracemalloc

import pytest
from PIL import Image, UnidentifiedImageError

from data_pipelines import hostile as H
from data_pipelines import tario
from data_pipelines import readers as W
from data_pipelines.transforms import decode_image

STRUCTURAL = sorted(n for n, h in H.HOSTILE.items() if h.structural)
MEMBER_LEVEL = sorted(n for n, h in H.HOSTILE.items() if not h.structural)
ESCAPES = ("/tmp/mmmoe-evil", "mmmoe-evil", "../mmmoe-evil", "../../mmmoe-evil")


@pytest.fixture(autouse=True)
def quiet_skips():
    log = logging.getLogger("data_pipelines.readers")
    old = log.level
    log.setLevel(logging.ERROR)
    yield
    log.setLevel(old)


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A folder that is also the working directory (where relative hostile names would land)."""
    d = tmp_path / "run" / "a" / "b"
    d.mkdir(parents=True)
    monkeypatch.chdir(d)
    return d


def assert_nothing_written(scratch):
    assert sorted(os.listdir(scratch)) == ["fuzz-000000.tar"]
    assert sorted(os.listdir(scratch.parent.parent)) == ["a"]
    for target in ESCAPES:
        assert not os.path.lexists(target) and not os.path.lexists(scratch / target), target


@pytest.mark.parametrize("name", sorted(H.HOSTILE))
def test_each_hostile_kind_is_counted_and_every_good_sample_delivered(name, scratch):
    raw, texts, counts = H.hostile_shard([name], n_good=2)
    result = H.read_shard(raw, str(scratch))
    assert result.error is None
    assert result.texts == texts  # every good sample, with its caption (and only those)
    assert result.skips == counts  # counted by kind
    assert counts or H.HOSTILE[name].delivers is not None  # bad, or odd but good (and delivered)
    assert_nothing_written(scratch)


@pytest.mark.parametrize("compress", [False, True])
def test_all_hostile_kinds_in_one_shard(scratch, compress):
    raw, texts, counts = H.hostile_shard(MEMBER_LEVEL + ["claims_gigabytes"], n_good=1, seed=3)
    if compress:
        raw = gzip.compress(raw)
    result = H.read_shard(raw, str(scratch))
    assert result.error is None and result.texts == texts and result.skips == counts
    assert len(texts) == len(MEMBER_LEVEL) + 1 + 3  # one good sample per hostile entry, plus the odd-but-good ones
    assert_nothing_written(scratch)


def test_links_and_devices_are_reported_never_followed():
    raw = H.tar([
        H.member("k.jpg", type=b"2", linkname="/etc/passwd"),
        H.member("h.jpg", type=b"1", linkname="k.jpg"),
        H.header("././@LongLink", 301, b"K") + H.pad(b"t" * 300 + b"\x00"),
        H.member("long.jpg", type=b"2", linkname="ignored"),
        H.pax_member(H.pax_record("linkpath", "/pax/target")),
        H.member("p.jpg", type=b"2"),
        H.member("c.jpg", type=b"3"), H.member("f.jpg", type=b"6"), H.member("d/", type=b"5"),
        H.member("ok.txt", b"fine"),
    ])
    got = list(tario.iter_members(io.BytesIO(raw), specials=True))
    assert [(n, d.what, d.target) if isinstance(d, tario.Special) else (n, d) for n, d in got] == [
        ("k.jpg", "symbolic link", "/etc/passwd"), ("h.jpg", "hard link", "k.jpg"),
        ("long.jpg", "symbolic link", "t" * 300), ("p.jpg", "symbolic link", "/pax/target"),
        ("c.jpg", "character device", ""), ("f.jpg", "FIFO", ""), ("ok.txt", b"fine"),
    ]
    assert list(tario.iter_members(io.BytesIO(raw))) == [("ok.txt", b"fine")]  # default: skipped silently


def test_claims_beyond_the_file_allocate_nothing(tmp_path):
    path = tmp_path / "liar.tar"
    path.write_bytes(H.header("x.jpg", 200 << 20) + bytes(4 * H.BLOCK))  # claims 200 MiB (under the cap)
    tracemalloc.start()
    try:
        with open(path, "rb") as f, pytest.raises(tario.TarFormatError, match="ends inside member data"):
            list(tario.iter_members(f))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (4 << 20)  # never allocated what the header claims


def sample_layout(raw):
    """[(header start, data start, data end padded)] of each member of a well-formed shard."""
    out = []
    for start in H.header_offsets(raw):
        size = tario._number(raw[start + 124:start + 136], "size")
        out.append((start, start + H.BLOCK, start + H.BLOCK + -(-size // H.BLOCK) * H.BLOCK))
    return out


def small_shard():
    parts, keys = [], []
    for i in range(3):
        key = f"k{i}"
        parts += [H.member(f"{key}.jpg", H.png(H.pixels(i, 1, 1))), H.member(f"{key}.txt", f"t{i}".encode())]
        keys.append(key)
    return H.tar(parts), keys


@pytest.fixture
def in_memory(monkeypatch):
    """Shards served from memory (the disk here is slow to rewrite thousands of times): the
    readers open urls through ``wds.gopen``; everything after the open is the real code."""
    store = {}
    monkeypatch.setattr(W.tars.wds, "gopen", lambda url, *a, **k: io.BytesIO(store[url]))
    return store


def read_raw_samples(raw, store, skips=W.SkipCounter("t")):
    store["mem.tar"] = raw
    before = skips.counts()
    stage = W.tar_to_samples(handler=skips, keep=("jpg", "txt"), required=("jpg", "txt"))
    got = list(stage(iter([{"url": "mem.tar"}])))
    delta = {k: v - before[k] for k, v in skips.counts().items() if v != before[k]}
    return {s["__key__"]: (s.get("jpg"), s.get("txt")) for s in got}, delta, len(got)


def test_truncation_at_every_offset(in_memory):
    raw, keys = small_shard()
    layout = sample_layout(raw)
    full, _, _ = read_raw_samples(raw, in_memory)
    end_block = layout[-1][2]  # the first end-of-archive block starts here
    for cut in range(len(raw) + 1):
        got, skips, n = read_raw_samples(raw[:cut], in_memory)
        assert n == len(got)
        for i, key in enumerate(keys):
            complete = layout[2 * i + 1][2] <= cut  # its txt (its last member) is wholly there
            if complete:
                assert got.get(key) == full[key], (cut, key)
            else:
                assert key not in got, (cut, key)
        assert skips == ({} if cut >= end_block + H.BLOCK else {"truncated_tar": 1}), cut


def test_bit_flip_at_every_offset(in_memory):
    raw, keys = small_shard()
    layout = sample_layout(raw)
    full, _, _ = read_raw_samples(raw, in_memory)
    unchanged_headers = 0
    for at in range(len(raw)):
        flipped = bytearray(raw)
        flipped[at] ^= 1 << (at % 8)
        got, skips, n = read_raw_samples(bytes(flipped), in_memory)
        assert n == len(got)
        hit = next((m for m, (h, d, e) in enumerate(layout) if h <= at < e), None)
        if hit is None:  # the end blocks: a damaged first one is a truncation, samples all kept
            assert got == full and skips == ({"truncated_tar": 1} if at < layout[-1][2] + H.BLOCK else {}), at
        elif at < layout[hit][1]:  # a header: detected (checksum); the samples before it are kept
            if not skips:  # a flip the header does not notice: a space for a "0" in the checksum field
                assert 148 <= at - layout[hit][0] < 156 and got == full, at
                unchanged_headers += 1
                continue
            assert skips == {"truncated_tar": 1}, at
            for i, key in enumerate(keys):
                if 2 * i + 1 < hit:
                    assert got[key] == full[key], (at, key)
                elif 2 * i > hit - 1 and key in got:
                    pytest.fail(f"sample {key} after a broken header at {at}")
        else:  # data or padding: only the sample it lands in can differ, nothing is lost
            assert set(got) == set(keys) and skips == {}, at
            assert sum(got[k] != full[k] for k in keys) <= 1, at
    assert unchanged_headers <= len(layout) * 8  # a few checksum-field bits per header at most


def test_100000_tiny_members(in_memory):
    """100,000 zero-byte members (one sample's worth of members nobody reads) between two good
    samples: both good samples arrive and the member-less sample is counted once. (Memory under
    such shards: scripts/fuzz_shards.py, which checks each iteration's heap peak.)"""
    good = [H.member(n, d) for n, d in H.good_sample("first", 1)]
    tail = [H.member(n, d) for n, d in H.good_sample("last", 2)]
    tiny = H.many_tiny_members(100_000)
    assert [n for n, _ in tario.iter_members(io.BytesIO(tiny[:3 * H.BLOCK] + H.END))] == [f"many.x{i:06d}" for i in range(3)]
    in_memory["many-000000.tar"] = b"".join(good) + tiny + b"".join(tail) + H.END
    del tiny
    pipe = W.image_text_pipeline("many-000000.tar", H.ByteTokenizer(), image_size=16, patch_size=4, batch_size=4,
                                 train=False, image_mask_ratio=None, mlm_ratio=None)
    keys = [k for batch in pipe for k in batch["key"]]
    assert keys == ["first", "last"]
    assert {k: v for k, v in pipe.skips.counts().items() if v} == {"missing_field": 1}


def test_decompression_bombs_are_refused_before_decoding(monkeypatch):
    for bomb in (H.bomb_png(), H.bomb_jpeg(), H.bomb_gif()):
        tracemalloc.start()
        try:
            with pytest.raises(Image.DecompressionBombError):
                decode_image(bomb, 224)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < (1 << 20)
    # between the limit and PIL's own 2x refusal: refused here, without a warning
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Image.DecompressionBombError, match="more than 300 pixels"):
            decode_image(H.png(H.pixels(0, 20, 20)))  # 400 pixels
    assert decode_image(H.png(H.pixels(0, 16, 16))).size == (16, 16)  # 256: fine


def test_only_the_writers_image_formats_are_decoded():
    with pytest.raises(UnidentifiedImageError):  # PIL could open it (and would run Ghostscript to load it)
        decode_image(H.EPS)
    buf = io.BytesIO()
    Image.fromarray(H.pixels(0)).save(buf, "PPM")  # PIL reads PPM; the writers do not write it
    with pytest.raises(UnidentifiedImageError):
        decode_image(buf.getvalue())
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(H.pixels(0)).save(buf, fmt)
        assert decode_image(buf.getvalue()).size == (16, 16), fmt


def test_unsafe_names_are_recognised():
    unsafe = ["/abs.jpg", "../k.jpg", "a/../../k.jpg", "k\n.jpg", "k\x1b[31m.jpg", "a/..", "k\x7f.jpg"]
    safe = ["k.jpg", "./k.jpg", "a/b/k.jpg", "a..b.jpg", "..k.jpg", "k..jpg", "caf\u00e9.jpg"]
    assert [W.tars._unsafe_name(n) for n in unsafe] == [True] * len(unsafe)
    assert [W.tars._unsafe_name(n) for n in safe] == [False] * len(safe)


def test_seeded_fuzz(scratch):
    """60 fuzz iterations (half hostile, half mutated shards), as scripts/fuzz_shards.py runs them:
    no crash, no problem, nothing written, the Python heap peak of each under 32 MB."""
    rng = random.Random(1234)
    tracemalloc.start()
    try:
        for it in range(60):
            label, result, problems = (H.fuzz_hostile if it % 2 == 0 else H.fuzz_mutated)(rng, str(scratch), it)
            assert problems == [], label
            assert 0 < result.heap_peak < (32 << 20), label
            assert_nothing_written(scratch)
    finally:
        tracemalloc.stop()


def test_fuzz_script_reports(tmp_path, capsys):
    import json
    import sys

    sys.path.insert(0, str(tmp_path))  # nothing there: just keep sys.path restorable
    try:
        from scripts.fuzz_shards import main
    finally:
        sys.path.remove(str(tmp_path))
    out = tmp_path / "fuzz.json"
    assert main(["--iterations", "6", "--seed", "5", "--json", str(out), "--progress", "0"]) == 0
    # tracing is stopped again: left on, it slowed the rest of the session and could deadlock a
    # later fork (DataLoader workers)
    assert not tracemalloc.is_tracing()
    text = capsys.readouterr().out
    assert "crashes:            0" in text and "PASS" in text
    report = json.loads(out.read_text())
    assert report["iterations"] == 6 and report["crashes"] == 0 and report["problems"] == 0
    assert report["samples_delivered"] > 0 and report["max_rss_mb"] > 0
