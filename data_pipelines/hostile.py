"""Hostile shards for the tests and ``scripts/fuzz_shards.py``: hand-built tar members of every
kind a reader must survive, mutations of good shards, and a checker that runs a real reader over
a shard and reports what came out.

Nothing here is used by training; it exists so the readers' guarantees (``readers.tar_to_samples``:
no crash, nothing written, bounded memory, every good sample delivered, every bad one counted by
kind) can be pinned down and fuzzed with the same code.

Members are built byte by byte (``header``), not with ``tarfile``, so that they can say anything:
absolute and ``../`` names, links and devices, sizes of petabytes, pax records with absurd
lengths. Every ``HOSTILE`` entry builds one sample's worth of members plus the skip kinds the
image-text reader must count for it (``structural`` ones break the tar itself: the reader keeps
the samples before them and counts one ``truncated_tar``).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import struct
import tempfile
import tracemalloc
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from . import tario

BLOCK = tario.BLOCK


# ------------------------------------------------------------------------------ raw tar members
def _octal(n: int, width: int) -> bytes:
    return (b"%0*o" % (width - 1, n)) + b"\x00"


def header(
    name: str,
    size: int = 0,
    type: bytes = b"0",
    linkname: str = "",
    size_field: Optional[bytes] = None,
    raw_name: Optional[bytes] = None,
) -> bytes:
    """One 512-byte ustar header with a valid checksum. ``size_field`` (12 bytes) overrides the
    octal size (e.g. GNU base-256); ``raw_name`` sets the name bytes as they are (at most 100)."""
    h = bytearray(BLOCK)
    nb = raw_name if raw_name is not None else name.encode("utf-8", "surrogateescape")
    h[0:100] = nb[:100].ljust(100, b"\x00")
    h[100:108] = _octal(0o644, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = size_field if size_field is not None else _octal(size, 12)
    h[136:148] = _octal(1_700_000_000, 12)
    h[156:157] = type
    h[157:257] = linkname.encode("utf-8")[:100].ljust(100, b"\x00")
    h[257:263] = b"ustar\x00"
    h[263:265] = b"00"
    if type in (b"3", b"4"):
        h[329:337] = _octal(1, 8)
        h[337:345] = _octal(3, 8)
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: str, data: bytes = b"", type: bytes = b"0", linkname: str = "") -> bytes:
    """Header + padded data; names longer than 100 bytes get a GNU long-name record first."""
    raw = name.encode("utf-8", "surrogateescape")
    prefix = b""
    if len(raw) > 100:
        prefix = header("././@LongLink", len(raw) + 1, b"L") + pad(raw + b"\x00")
    size = len(data) if type in (b"0", b"7") else 0
    return prefix + header(name, size, type, linkname) + pad(data if size else b"")


def pax_member(records: bytes) -> bytes:
    return header("././@PaxHeader", len(records), b"x") + pad(records)


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


END = bytes(2 * BLOCK)


def tar(members: Sequence[bytes], end: bool = True) -> bytes:
    return b"".join(members) + (END if end else b"")


# ------------------------------------------------------------------------------ images
def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def pixels(seed: int, h: int = 16, w: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header for a ``width`` x ``height`` RGB image whose (all-zero) data compresses
    to almost nothing: a decompression bomb, a few hundred bytes long."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    comp = zlib.compressobj(9)
    row = bytes(1 + 3 * min(width, 4096))
    idat = b"".join(comp.compress(row) for _ in range(8)) + comp.flush()  # the start of the data only
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def bomb_jpeg(width: int = 60_000, height: int = 60_000) -> bytes:
    """A small real JPEG whose frame header (SOF0) claims ``width`` x ``height``."""
    data = bytearray(jpeg(pixels(0)))
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bomb_gif(width: int = 65_535, height: int = 65_535) -> bytes:
    """A GIF whose logical screen and only frame claim ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.fromarray(pixels(0)[:, :, 0], "L").save(buf, "GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", width, height)
    i = data.index(b"\x2c")  # image descriptor
    data[i + 5 : i + 9] = struct.pack("<HH", width, height)
    return bytes(data)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"


# ------------------------------------------------------------------------------ good samples
def good_sample(key: str, seed: int, size: int = 16) -> List[Tuple[str, bytes]]:
    img = png(pixels(seed, size, size)) if seed % 2 else jpeg(pixels(seed, size, size))
    return [
        (f"{key}.jpg", img),
        (f"{key}.txt", f"caption of {key}".encode()),
        (f"{key}.json", json.dumps({"image_id": seed}).encode()),
    ]


def good_shard(n: int, seed: int = 0, prefix: str = "g") -> Tuple[bytes, Dict[str, str], List[Tuple[int, int]]]:
    """(tar bytes, {key: caption}, [(start, end) byte range of each sample]) for ``n`` samples."""
    parts, texts, ranges, pos = [], {}, [], 0
    for i in range(n):
        key = f"{prefix}{seed:03d}_{i:04d}"
        start = pos
        for name, data in good_sample(key, seed * 10_000 + i):
            m = member(name, data)
            parts.append(m)
            pos += len(m)
        texts[key] = f"caption of {key}"
        ranges.append((start, pos))
    return tar(parts), texts, ranges


# ------------------------------------------------------------------------------ hostile members
@dataclass
class Hostile:
    """One hostile sample: its members and what the image-text reader must count for it."""

    build: Callable[[str], bytes]
    kinds: Dict[str, int]
    structural: bool = False  # breaks the tar from here on (placed last)
    doc: str = ""
    delivers: Optional[Callable[[str], str]] = None  # odd but good: the key it is delivered under


def _noise(key: str, n: int) -> bytes:
    return random.Random(key).randbytes(n)  # repeatable per key (a fuzz run repeats for its seed)


def _txt(key: str) -> bytes:
    return member(f"{key}.txt", b"a caption")


def _img(key: str) -> bytes:
    return member(f"{key}.jpg", png(pixels(1)))


GIB = 1 << 30
HOSTILE: Dict[str, Hostile] = {
    "absolute_name": Hostile(lambda k: member(f"/tmp/mmmoe-evil/{k}.jpg", png(pixels(1))) + member(f"/tmp/mmmoe-evil/{k}.txt", b"x"),
                             {"unsafe_name": 1}, doc="members named by absolute paths"),
    "dotdot_name": Hostile(lambda k: member(f"../../mmmoe-evil/{k}.jpg", png(pixels(1))) + member(f"../../mmmoe-evil/{k}.txt", b"x"),
                           {"unsafe_name": 1}, doc="members named ../../x"),
    "control_name": Hostile(lambda k: member(f"{k}\nWARNING forged.jpg", png(pixels(1))), {"unsafe_name": 1},
                            doc="a newline in a name (log forging)"),
    "bare_unsafe": Hostile(lambda k: member("/etc/passwd", b"root:x:0:0") + member("../outside", b"x"),
                           {"unsafe_name": 2}, doc="unsafe names that are no sample members"),
    "symlink": Hostile(lambda k: member(f"{k}.jpg", type=b"2", linkname="/etc/passwd") + _txt(k),
                       {"special_member": 1}, doc="the image is a symlink to /etc/passwd"),
    "symlink_dir": Hostile(lambda k: member(f"{k}_dir", type=b"2", linkname="/") + member(f"{k}_dir/etc/{k}.jpg", png(pixels(1))) + member(f"{k}_dir/etc/{k}.txt", b"t"),
                           {}, doc="a symlinked folder, then members under it: read as plain names, "
                           "nothing is followed (the sample is delivered)", delivers=lambda k: f"{k}_dir/etc/{k}"),
    "hardlink": Hostile(lambda k: member(f"{k}.jpg", type=b"1", linkname="g000_0000.jpg") + _txt(k),
                        {"special_member": 1}, doc="the image is a hard link to another member"),
    "char_device": Hostile(lambda k: member(f"{k}.jpg", type=b"3") + _txt(k), {"special_member": 1}),
    "block_device": Hostile(lambda k: member(f"{k}.jpg", type=b"4") + _txt(k), {"special_member": 1}),
    "fifo": Hostile(lambda k: member(f"{k}.txt", type=b"6") + _img(k), {"special_member": 1}),
    "unused_special": Hostile(lambda k: member(f"{k}.lnk", type=b"2", linkname="/") + member("somedir/", type=b"5"),
                              {"missing_field": 1}, doc="a link nobody reads: only the empty sample is counted"),
    "zero_byte_image": Hostile(lambda k: member(f"{k}.jpg", b"") + _txt(k), {"corrupt_image": 1}),
    "zero_byte_text": Hostile(lambda k: _img(k) + member(f"{k}.txt", b""), {"missing_field": 1}),
    "not_an_image": Hostile(lambda k: member(f"{k}.jpg", b"GIF89a? no: " + _noise(k, 200)) + _txt(k), {"corrupt_image": 1}),
    "eps_image": Hostile(lambda k: member(f"{k}.jpg", EPS) + _txt(k), {"corrupt_image": 1},
                         doc="PostScript: never handed to Ghostscript"),
    "truncated_jpeg": Hostile(lambda k: member(f"{k}.jpg", jpeg(pixels(3, 64, 64))[:300]) + _txt(k), {"corrupt_image": 1}),
    "bomb_png": Hostile(lambda k: member(f"{k}.jpg", bomb_png()) + _txt(k), {"corrupt_image": 1}),
    "bomb_jpeg": Hostile(lambda k: member(f"{k}.jpg", bomb_jpeg()) + _txt(k), {"corrupt_image": 1}),
    "bomb_gif": Hostile(lambda k: member(f"{k}.jpg", bomb_gif()) + _txt(k), {"corrupt_image": 1}),
    "pickle": Hostile(lambda k: _img(k) + _txt(k) + member(f"{k}.pyd", b"\x80\x04cos\nsystem\n."), {},
                      doc="a pickle member: never read, the sample is delivered", delivers=lambda k: k),
    "duplicate": Hostile(lambda k: _img(k) + _txt(k) + member(f"{k}.txt", b"again"), {"duplicate_member": 1}),
    "long_name": Hostile(lambda k: member("d" * 3000 + f"/{k}.jpg", png(pixels(1))) + member("d" * 3000 + f"/{k}.txt", b"t"),
                         {}, doc="a 3 kB GNU long name: allowed, delivered", delivers=lambda k: "d" * 3000 + f"/{k}"),
    # structural: the tar is broken from here on
    "huge_long_name": Hostile(lambda k: header("././@LongLink", tario.MAX_NAME_BYTES + 1, b"L") + bytes(4 * BLOCK),
                              {"truncated_tar": 1}, structural=True, doc="a GNU long name over the cap"),
    "huge_pax": Hostile(lambda k: header("././@PaxHeader", tario.MAX_PAX_BYTES + 1, b"x") + bytes(4 * BLOCK),
                        {"truncated_tar": 1}, structural=True, doc="a pax header over the cap"),
    "pax_digits": Hostile(lambda k: pax_member(b"9" * 5000 + b" path=x\n") + _img(k),
                          {"truncated_tar": 1}, structural=True, doc="a pax record length of 5000 digits"),
    "pax_bad_size": Hostile(lambda k: pax_member(pax_record("size", "1" * 5000)) + _img(k),
                            {"truncated_tar": 1}, structural=True, doc="a pax size of 5000 digits"),
    "claims_gigabytes": Hostile(lambda k: header(f"{k}.jpg", 4 * GIB) + bytes(8 * BLOCK),
                                {"oversized_member": 1, "truncated_tar": 1}, structural=True,
                                doc="a member that claims 4 GiB (the file ends long before)"),
    "claims_petabytes": Hostile(lambda k: header(f"{k}.jpg", size_field=b"\x80" + (1 << 87).to_bytes(11, "big")) + bytes(BLOCK),
                                {"oversized_member": 1, "truncated_tar": 1}, structural=True,
                                doc="a GNU base-256 size of 2^87 bytes"),
    "claims_negative": Hostile(lambda k: header(f"{k}.jpg", size_field=b"\xff" * 12) + bytes(BLOCK),
                               {"truncated_tar": 1}, structural=True),
    "garbage_header": Hostile(lambda k: _noise(k, BLOCK), {"truncated_tar": 1}, structural=True),
    "no_end_block": Hostile(lambda k: b"", {"truncated_tar": 1}, structural=True, doc="the shard just stops"),
}


def hostile_shard(names: Sequence[str], n_good: int = 2, seed: int = 0) -> Tuple[bytes, Dict[str, str], Dict[str, int]]:
    """``n_good`` good samples before each hostile one (a structural one goes last; at most one):
    (tar bytes, {key: caption} of every sample that must be delivered, expected skip counts)."""
    structural = [n for n in names if HOSTILE[n].structural]
    if len(structural) > 1:
        raise ValueError(f"at most one structural entry per shard, got {structural}")
    members: List[bytes] = []
    texts: Dict[str, str] = {}
    counts: Dict[str, int] = {}
    for j, name in enumerate([n for n in names if not HOSTILE[n].structural] + structural):
        for i in range(n_good):
            key = f"g{seed:03d}_{j:03d}_{i}"
            members += [member(n, d) for n, d in good_sample(key, seed * 1000 + j * 10 + i)]
            texts[key] = f"caption of {key}"
        h = HOSTILE[name]
        key = f"h{j:03d}_{name}"
        members.append(h.build(key))
        if h.delivers is not None:  # odd, but a good sample
            texts[h.delivers(key)] = "a caption" if name == "pickle" else "t"
        for kind, n in h.kinds.items():
            counts[kind] = counts.get(kind, 0) + n
    return tar(members, end=not structural), texts, counts


def many_tiny_members(n: int = 100_000, key: str = "many", unread: bool = True) -> bytes:
    """``n`` zero-byte members (no end block): ``<key>.x000000`` ... (one sample of members nobody
    reads) when ``unread``, else ``<key>000000.jpg`` ... (one empty-image sample each). Headers are
    patched from one template (digits and checksum), ~1 us each."""
    width = max(6, len(str(n - 1)))
    template = header(f"{key}.x{0:0{width}d}" if unread else f"{key}{0:0{width}d}.jpg")
    at = len(key) + 2 if unread else len(key)
    base = sum(template) - sum(template[148:156]) + 8 * 32 - sum(template[at:at + width])
    out = bytearray(template * n)
    for i in range(n):
        digits = b"%0*d" % (width, i)
        o = i * BLOCK
        out[o + at:o + at + width] = digits
        out[o + 148:o + 156] = b"%06o\x00 " % (base + sum(digits))
    return bytes(out)


# ------------------------------------------------------------------------------ mutations
def mutate(raw: bytes, rng: random.Random) -> Tuple[bytes, int, str]:
    """One random mutation of a shard: (new bytes, first changed offset, description)."""
    n = len(raw)
    if n < 2 * BLOCK:  # too little left to mutate block-wise
        return raw + rng.randbytes(rng.randrange(1, 600)), n, "append random bytes"
    op = rng.choice(["flip", "flips", "byte", "truncate", "insert", "delete", "dup_block", "splice",
                     "header_field", "zero_block", "gzip", "gzip_flip"])
    b = bytearray(raw)
    if op == "flip":
        i = rng.randrange(n)
        b[i] ^= 1 << rng.randrange(8)
        return bytes(b), i, f"flip bit at {i}"
    if op == "flips":
        idx = sorted(rng.randrange(n) for _ in range(rng.randint(2, 32)))
        for i in idx:
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b), idx[0], f"flip {len(idx)} bits from {idx[0]}"
    if op == "byte":
        i = rng.randrange(n)
        b[i] = rng.choice([0, 0xFF, 0x80, ord("0"), ord("7"), ord("/"), ord("."), rng.randrange(256)])
        return bytes(b), (i if b[i] != raw[i] else n), f"set byte {i}"
    if op == "truncate":
        i = rng.randrange(n)
        return raw[:i], i, f"truncate at {i}"
    if op == "insert":
        i = rng.randrange(n)
        return raw[:i] + rng.randbytes(rng.choice([1, 7, 512, 1000])) + raw[i:], i, f"insert at {i}"
    if op == "delete":
        i = rng.randrange(n)
        k = rng.choice([1, 100, 512, 2048])
        return raw[:i] + raw[i + k:], i, f"delete {k} at {i}"
    if op == "dup_block":
        i = rng.randrange(n // BLOCK) * BLOCK
        return raw[:i] + raw[i:i + BLOCK] + raw[i:], i, f"duplicate block at {i}"
    if op == "zero_block":
        i = rng.randrange(n // BLOCK) * BLOCK
        b[i:i + BLOCK] = bytes(BLOCK)
        return bytes(b), (i if raw[i:i + BLOCK] != bytes(BLOCK) else n), f"zero block at {i}"
    if op == "splice":  # a hostile member (any kind) at a block boundary that starts a header
        starts = header_offsets(raw)
        i = rng.choice(starts) if starts else 0
        name = rng.choice(sorted(HOSTILE))
        return raw[:i] + HOSTILE[name].build(f"x{rng.randrange(1000)}") + raw[i:], i, f"splice {name} at {i}"
    if op == "header_field":  # rewrite a header field and fix the checksum: parses, but lies
        starts = header_offsets(raw)
        if not starts:
            return raw, n, "no header"
        i = rng.choice(starts)
        h = bytearray(raw[i:i + BLOCK])
        what = rng.choice(["size", "type", "name", "prefix", "base256"])
        if what == "size":
            h[124:136] = _octal(rng.choice([0, 1, 511, 513, 1 << 20, 1 << 33, 8**11 - 1]), 12)
        elif what == "type":
            h[156:157] = rng.choice([b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"L", b"K", b"x", b"g", b"S", b"Z", b"\x00"])
        elif what == "name":
            h[0:100] = rng.choice([b"/abs/x.jpg", b"../../x.jpg", b"a\x00b.jpg", b"\xff\xfe.jpg", b"", b".jpg", b"k.", b"x" * 100])[:100].ljust(100, b"\x00")
        elif what == "prefix":
            h[345:500] = rng.choice([b"../..", b"/etc", b"p" * 155])[:155].ljust(155, b"\x00")
        else:
            h[124:136] = b"\x80" + rng.randrange(1 << 88).to_bytes(11, "big")
        h[148:156] = b" " * 8
        h[148:156] = b"%06o\x00 " % sum(h)
        return raw[:i] + bytes(h) + raw[i + BLOCK:], i, f"header {what} at {i}"
    if op == "gzip":
        return gzip.compress(raw, mtime=0), 0, "gzip"
    z = bytearray(gzip.compress(raw, mtime=0))  # gzip_flip
    i = rng.randrange(len(z))
    z[i] ^= 1 << rng.randrange(8)
    return bytes(z), 0, f"gzip, flip bit at {i}"


def header_offsets(raw: bytes) -> List[int]:
    """Offsets of the headers of a well-formed tar (for splicing and field rewrites)."""
    out = []
    try:
        f = io.BytesIO(raw)
        pos = 0
        while pos + BLOCK <= len(raw):
            h = raw[pos:pos + BLOCK]
            if h == tario.ZERO_BLOCK or not tario._checksum_ok(h):
                break
            out.append(pos)
            size = tario._number(h[124:136], "size")
            pos += BLOCK + -(-size // BLOCK) * BLOCK
        del f
    except tario.TarFormatError:
        pass
    return out


# ------------------------------------------------------------------------------ running a reader
class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids (no model file needed)."""

    pad_id, bos_id, eos_id, mask_id, vocab_size = 0, 1, 2, 3, 260

    def encode(self, text: str) -> List[int]:
        return [b + 4 for b in text.encode("utf-8", "replace")]


@dataclass
class ReadResult:
    texts: Dict[str, str] = field(default_factory=dict)  # delivered key -> decoded caption
    skips: Dict[str, int] = field(default_factory=dict)  # non-zero skip counts by kind
    samples: int = 0
    error: Optional[BaseException] = None  # anything that escaped the reader: a crash
    heap_peak: int = 0  # bytes: Python heap peak while reading, above what was held (when tracemalloc runs)


def read_shard(raw: bytes, folder: str, image_size: int = 16, batch_size: int = 8) -> ReadResult:
    """Write ``raw`` as a shard in ``folder`` and read it with the image-text reader (eval mode:
    no shuffling, no augmentation); what came out, and whether anything escaped."""
    from . import readers as W

    path = os.path.join(folder, "fuzz-000000.tar")
    with open(path, "wb") as f:
        f.write(raw)
    out = ReadResult()
    tok = ByteTokenizer()
    pipe = W.image_text_pipeline(path, tok, image_size=image_size, patch_size=4, batch_size=batch_size,
                                 train=False, image_mask_ratio=None, mlm_ratio=None)
    del raw  # (the caller's copy may live on; this one need not)
    tracing = tracemalloc.is_tracing()
    if tracing:
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
    try:
        for batch in pipe:
            assert batch["image"].shape[1:] == (3, image_size, image_size)
            for key, ids, pad_ in zip(batch["key"], batch["text_ids"].tolist(), batch["text_pad_mask"].tolist()):
                body = [i - 4 for i, p in zip(ids, pad_) if not p and i >= 4]
                out.texts[key] = bytes(body).decode("utf-8", "replace")
                out.samples += 1
    except Exception as exn:  # noqa: BLE001 - the point: report it, the caller counts crashes
        out.error = exn
    if tracing:
        out.heap_peak = max(0, tracemalloc.get_traced_memory()[1] - held)
    out.skips = {k: v for k, v in pipe.skips.counts().items() if v}
    return out


def check_mutation(base_texts: Dict[str, str], ranges: Sequence[Tuple[int, int]], keys: Sequence[str],
                   first_changed: int, result: ReadResult) -> List[str]:
    """What is wrong with a reader's output for a mutated shard ([] when nothing): anything that
    escaped; a sample wholly before the first changed byte not delivered, or delivered changed; a
    key delivered twice."""
    problems = []
    if result.error is not None:
        problems.append(f"crash: {type(result.error).__name__}: {result.error}")
    for key, (start, end) in zip(keys, ranges):
        if end <= first_changed:
            if result.texts.get(key) != base_texts[key]:
                problems.append(f"intact sample {key} (bytes {start}..{end} < {first_changed}) "
                                f"{'changed' if key in result.texts else 'lost'}")
    if len(result.texts) != result.samples:
        problems.append(f"{result.samples} samples delivered under {len(result.texts)} keys")
    return problems


def fuzz_hostile(rng: random.Random, scratch: str, it: int) -> Tuple[str, ReadResult, List[str]]:
    """One fuzz iteration: good samples around 1-4 random hostile ones (+ a structural break half
    the time), checked exactly. (description, result, problems)."""
    names = [n for n in HOSTILE if not HOSTILE[n].structural]
    chosen = rng.sample(names, rng.randint(1, 4))
    if rng.random() < 0.5:
        chosen.append(rng.choice([n for n in HOSTILE if HOSTILE[n].structural]))
    raw, texts, counts = hostile_shard(chosen, n_good=rng.randint(1, 3), seed=it % 1000)
    result = read_shard(raw, scratch)
    problems = []
    if result.error is not None:
        problems.append(f"crash: {type(result.error).__name__}: {result.error}")
    if result.texts != texts:
        lost = sorted(set(texts) - set(result.texts))[:3]
        extra = sorted(set(result.texts) - set(texts))[:3]
        problems.append(f"delivered samples differ (lost {lost}, unexpected {extra})")
    if result.skips != counts:
        problems.append(f"skips {result.skips} != expected {counts}")
    return f"hostile {'+'.join(chosen)}", result, problems


def fuzz_mutated(rng: random.Random, scratch: str, it: int) -> Tuple[str, ReadResult, List[str]]:
    """One fuzz iteration: a good shard after 1-3 random mutations, checked with
    ``check_mutation``. (description, result, problems)."""
    raw, texts, ranges = good_shard(rng.randint(1, 6), seed=it % 1000)
    keys = list(texts)
    first, what = len(raw), []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        raw, at, desc = mutate(raw, rng)
        first = min(first, at)
        what.append(desc)
    result = read_shard(raw, scratch)
    return f"mutated {'; '.join(what)}", result, check_mutation(texts, ranges, keys, first, result)


def fuzz_many(rng: random.Random, scratch: str, it: int) -> Tuple[str, ReadResult, List[str]]:
    """One fuzz iteration: 100,000 tiny members (unread ones in one sample, or 20,000 empty-image
    samples) between good samples; all good ones delivered, the rest counted."""
    first = [member(n, d) for n, d in good_sample("first", it)]
    last = [member(n, d) for n, d in good_sample("last", it + 1)]
    unread = rng.random() < 0.5
    tiny = many_tiny_members(100_000 if unread else 20_000, unread=unread)
    result = read_shard(b"".join(first) + tiny + b"".join(last) + END, scratch)
    problems = []
    if result.error is not None:
        problems.append(f"crash: {type(result.error).__name__}: {result.error}")
    if sorted(result.texts) != ["first", "last"]:
        problems.append(f"delivered {sorted(result.texts)[:5]}")
    want = {"missing_field": 1 if unread else 20_000}  # no caption member: counted before the image
    if result.skips != want:
        problems.append(f"skips {result.skips} != {want}")
    return f"many {'unread members' if unread else 'empty samples'}", result, problems


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="mmmoe-fuzz-")
