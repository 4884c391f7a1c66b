"""The shard tar parser against tarfile-written archives and damaged ones."""

import bz2
import gzip
import io
import lzma
import os
import tarfile

import pytest

from data_pipelines import tario


def build(members, fmt=tarfile.PAX_FORMAT, extra=None):
    """members: [(name, bytes)] as regular files; extra(tf) may add other member types."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        if extra is not None:
            extra(tf)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_all(raw, **kw):
    return list(tario.iter_members(io.BytesIO(raw), **kw))


MEMBERS = [
    ("a/k0.jpg", os.urandom(1000)),
    ("a/k0.txt", "a caption é".encode()),
    ("a/k1.jpg", b""),  # empty member
    ("a/k1.txt", os.urandom(512)),  # exactly one block, no padding
    ("d" * 120 + "/k2.json", b"{}"),  # long name: pax path / GNU long name / ustar prefix
    ("caf\u00e9/k3.txt", b"x" * 3000),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_same_members_as_tarfile(fmt):
    raw = build(MEMBERS, fmt=fmt)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        expected = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    assert read_all(raw) == expected == MEMBERS


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_other_member_types_are_skipped_and_big_members_read(fmt):
    def extra(tf):
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        link = tarfile.TarInfo("link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "a/" + "l" * 150 + "/k0.jpg"  # long target: a GNU "K" or a pax linkpath record
        tf.addfile(link)

    big = os.urandom(3 * (1 << 20) + 17)  # over the chunked-read threshold
    raw = build([("big.bin", big), *MEMBERS], fmt=fmt, extra=extra)
    got = read_all(raw)
    assert [n for n, _ in got] == ["big.bin"] + [n for n, _ in MEMBERS]
    assert got[0][1] == big


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_compressed_shards(compress):
    raw = build(MEMBERS)
    assert read_all(compress(raw)) == MEMBERS


def test_unwanted_members_are_not_returned():
    got = read_all(build(MEMBERS), want=lambda name: name.endswith(".txt"))
    assert [(n, d is not None) for n, d in got] == [(n, n.endswith(".txt")) for n, _ in MEMBERS]
    assert all(d == dict(MEMBERS)[n] for n, d in got if d is not None)


class Trickle(io.RawIOBase):
    """A pipe-like stream: at most 100 bytes per read, not seekable."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def readable(self):
        return True

    def read(self, n=-1):
        n = 100 if n is None or n < 0 else min(n, 100)
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


def test_short_reads_and_unseekable_streams():
    raw = build([("big.bin", os.urandom(5000)), *MEMBERS])
    got = list(tario.iter_members(Trickle(raw), want=lambda name: name != "big.bin"))
    assert got == [("big.bin", None), *MEMBERS]


def test_every_truncation_keeps_a_complete_prefix_and_raises():
    members = [("k0.jpg", os.urandom(700)), ("k0.txt", b"hello"), ("k1.jpg", os.urandom(1100))]
    raw = build(members, fmt=tarfile.GNU_FORMAT)
    end = raw.index(tario.ZERO_BLOCK, 3 * 512 + 700 + 5 + 1100)  # the end-of-archive block
    end = (end + 511) // 512 * 512
    for cut in list(range(0, end + 1, 7)) + [end, end - 1, 512, 1024 + 512]:
        if cut >= end + 512:
            continue
        got = []
        with pytest.raises(tario.TarFormatError):
            for item in tario.iter_members(io.BytesIO(raw[:cut])):
                got.append(item)
        assert got == members[: len(got)], cut
    assert read_all(raw[: end + 512]) == members  # cut after the end-of-archive block: complete


def test_garbage_and_corrupt_headers_raise():
    with pytest.raises(tario.TarFormatError, match="checksum"):
        read_all(os.urandom(4096))
    with pytest.raises(tario.TarFormatError):
        read_all(b"")
    raw = bytearray(build(MEMBERS[:3]))
    second = 512 + 1024  # header of the second member (first data: 1000 bytes -> 2 blocks)
    raw[second + 10] ^= 0xFF
    got = []
    with pytest.raises(tario.TarFormatError, match="checksum"):
        for item in tario.iter_members(io.BytesIO(bytes(raw))):
            got.append(item)
    assert got == MEMBERS[:1]
    with pytest.raises(tario.TarFormatError):  # gzip magic, then garbage
        read_all(b"\x1f\x8b" + os.urandom(2000))


def lying_header(size_field: bytes) -> bytes:
    """A valid header for 'x.jpg' whose size field says ``size_field``, then 600 bytes of data."""
    info = tarfile.TarInfo("x.jpg")
    info.size = 1
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[124:136] = size_field
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % (sum(header))
    return bytes(header) + b"y" * 600


def test_lying_sizes_never_allocate_what_the_header_claims():
    huge = b"\x80" + (1 << 50).to_bytes(11, "big")  # GNU base-256: a petabyte
    got = []
    with pytest.raises(tario.TarFormatError):
        for item in tario.iter_members(io.BytesIO(lying_header(huge)), max_member_bytes=1 << 60):
            got.append(item)
    assert got == []
    # under the default cap the member is reported as oversized and skipped, then the end is missing
    got = []
    with pytest.raises(tario.TarFormatError):
        for item in tario.iter_members(io.BytesIO(lying_header(huge))):
            got.append(item)
    assert len(got) == 1 and isinstance(got[0][1], tario.Oversized)
    with pytest.raises(tario.TarFormatError, match="size"):
        read_all(lying_header(b"9999xyz\x00\x00\x00\x00\x00"))
    with pytest.raises(tario.TarFormatError, match="negative"):
        read_all(lying_header(b"\xff" * 12))


def test_oversized_member_is_skipped_and_reading_goes_on():
    raw = build([("k0.jpg", os.urandom(5000)), ("k0.txt", b"t"), ("k1.txt", b"u")])
    got = read_all(raw, max_member_bytes=4096)
    assert isinstance(got[0][1], tario.Oversized) and got[0][1].size == 5000
    assert got[1:] == [("k0.txt", b"t"), ("k1.txt", b"u")]
