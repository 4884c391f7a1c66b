"""A small streaming tar reader for shards, written for speed and for hostile input.

``tarfile`` in stream mode spends ~50 us of Python per member (header objects, a buffered
``_Stream`` that joins chunks); with three members per sample that is ~5-7% of the time it takes
to decode and resize a 640x480 JPEG. This reader parses the 512-byte headers itself (~40 us per
three-member sample against ~120-160 us) and reads member data with a single ``read``.

Formats: ustar / POSIX (with the name prefix field), GNU (``L`` long names, ``K`` long link
targets, base-256 sizes) and pax (``x`` records: ``path`` and ``size``; ``g`` global records are
ignored). Regular files (type ``0``, NUL, ``7``) are yielded; directories are skipped; links,
devices, FIFOs, sparse and vendor members are skipped with their data and, with ``specials=True``,
reported as a ``Special`` (never followed, never created). gzip / bzip2 / xz compressed shards are
detected by content.

Nothing is trusted: every header checksum is verified, numeric fields are range-checked, a
member's size is capped (``max_member_bytes``), long names and pax blocks are capped, and data is
never read past what the header announces (nor, for a file, past its end: a header that claims
more than the file holds is found out before anything is allocated). Nothing is ever written: names
(absolute, ``../``, control characters) are returned as they are, for the caller to judge. Memory is
bounded by ``max_member_bytes`` for one member's data plus ``MAX_PAX_BYTES`` for headers. Any
inconsistency raises ``TarFormatError``; members yielded before it are complete. A shard must end with an all-zero block: end of file anywhere
else (also exactly between two members) counts as truncation.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import zlib
from typing import BinaryIO, Callable, Iterator, Optional, Tuple, Union

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
MAX_MEMBER_BYTES = 256 << 20  # larger members are skipped unread (see OversizedMember)
MAX_NAME_BYTES = 64 << 10  # GNU long-name members
MAX_PAX_BYTES = 1 << 20  # pax extended headers
_SKIP_CHUNK = 1 << 20
_REGULAR = (b"0", b"\x00", b"7")
_PAX_RECORD = re.compile(rb"(\d{1,9}) ")  # a record is at most MAX_PAX_BYTES long

# decompression errors that are not OSError / EOFError
DECOMPRESSION_ERRORS: Tuple[type, ...] = (zlib.error, lzma.LZMAError)


class TarFormatError(Exception):
    """The stream is not a well-formed tar from here on (truncated, corrupt header, ...)."""


class Oversized:
    """Stands in for the data of a regular member larger than ``max_member_bytes`` (skipped)."""

    __slots__ = ("size", "limit")

    def __init__(self, size: int, limit: int):
        self.size = size
        self.limit = limit

    def __repr__(self) -> str:
        return f"Oversized({self.size} bytes > {self.limit})"


class Special:
    """Stands in for a member that is not a regular file (link, device, FIFO, sparse, vendor type);
    its data, if any, was skipped. ``target`` is the link target for links ("" otherwise)."""

    __slots__ = ("type", "target")

    def __init__(self, type: bytes, target: str = ""):
        self.type = type
        self.target = target

    @property
    def what(self) -> str:
        return _SPECIAL_NAMES.get(self.type, f"member of type {self.type!r}")

    def __repr__(self) -> str:
        return f"Special({self.what}" + (f" -> {self.target!r})" if self.target else ")")


_SPECIAL_NAMES = {
    b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
    b"6": "FIFO", b"S": "GNU sparse file", b"D": "GNU dump directory", b"M": "GNU multi-volume part",
    b"V": "GNU volume label",
}


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes; fewer only at end of file (loops over short reads of pipes/sockets)."""
    data = f.read(n)
    if data is None:
        data = b""
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = f.read(min(n - got, _SKIP_CHUNK))
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _read_member(f: BinaryIO, n: int) -> bytes:
    """Exactly ``n`` bytes or TarFormatError; large reads go in chunks so that a header that lies
    about its size cannot make us allocate more than the file holds."""
    if n <= _SKIP_CHUNK:
        data = _read_exact(f, n)
    elif (left := _remaining(f)) is not None:  # a plain file: check its length, then one read, one buffer
        if left < n:
            raise TarFormatError(f"file ends inside member data ({left} of {n} bytes)")
        data = _read_exact(f, n)
    else:
        buf = bytearray()
        while len(buf) < n:
            chunk = _read_exact(f, min(_SKIP_CHUNK, n - len(buf)))
            if not chunk:
                break
            buf += chunk
        data = bytes(buf)
    if len(data) != n:
        raise TarFormatError(f"file ends inside member data ({len(data)} of {n} bytes)")
    return data


def _remaining(f: BinaryIO) -> Optional[int]:
    """Bytes left in ``f`` when it is a seekable plain file (else None)."""
    try:
        if not f.seekable():
            return None
        return max(0, os.fstat(f.fileno()).st_size - f.tell())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _skip(f: BinaryIO, n: int) -> None:
    """Skip ``n`` bytes. Seeking (when possible) does not notice the end of the file; the next
    header read then finds it and reports the truncation."""
    if n <= 0:
        return
    seekable = getattr(f, "seekable", None)
    if n > _SKIP_CHUNK:
        left = _remaining(f)
        if left is not None and left < n:
            raise TarFormatError(f"file ends inside skipped member data ({left} of {n} bytes)")
    if seekable is not None and n > 4 * BLOCK:
        try:
            if seekable():
                f.seek(n, io.SEEK_CUR)
                return
        except (OSError, ValueError, OverflowError):  # OverflowError: a size beyond any file
            pass
    while n > 0:
        chunk = f.read(min(n, _SKIP_CHUNK))
        if not chunk:
            raise TarFormatError("file ends inside skipped member data")
        n -= len(chunk)


def _number(field: bytes, what: str) -> int:
    """Octal (NUL/space terminated) or GNU base-256 numeric field; negative values rejected."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise TarFormatError(f"negative {what} field")
    text = field.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        value = int(text, 8)
    except ValueError:
        raise TarFormatError(f"bad {what} field {field!r}") from None
    if value < 0:
        raise TarFormatError(f"negative {what} field")
    return value


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _number(header[148:156], "checksum")
    except TarFormatError:
        return False
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    # some old writers summed signed chars
    signed = unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b > 127)
    return stored == signed


def _name(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "replace")


def _pax(data: bytes) -> dict:
    """Parse ``"<len> key=value\\n"`` records (only ``path`` and ``size`` are used)."""
    out = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] != b"\x00":
        m = _PAX_RECORD.match(data, pos)
        if m is None:
            raise TarFormatError("malformed pax record")
        length = int(m.group(1))
        record = data[pos:pos + length]
        if length <= len(m.group(0)) or len(record) != length or not record.endswith(b"\n") or b"=" not in record:
            raise TarFormatError("malformed pax record")
        key, _, value = record[len(m.group(0)):-1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value
        pos += length
    return out


class _Prefixed(io.RawIOBase):
    """``prefix`` bytes followed by the rest of ``f`` (to re-read what compression sniffing read)."""

    def __init__(self, prefix: bytes, f: BinaryIO):
        self._prefix = prefix
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if self._prefix:
            n = min(len(b), len(self._prefix))
            b[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._f.read(len(b))
        if not data:
            return 0
        b[: len(data)] = data
        return len(data)


def _decompressed(f: BinaryIO, first: bytes) -> Optional[BinaryIO]:
    """A decompressing reader when ``first`` starts with a gzip / bzip2 / xz signature."""
    if first.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=io.BufferedReader(_Prefixed(first, f)), mode="rb")
    if first.startswith(b"BZh"):
        return bz2.BZ2File(io.BufferedReader(_Prefixed(first, f)), mode="rb")
    if first.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(io.BufferedReader(_Prefixed(first, f)), mode="rb")
    return None


def iter_members(
    f: BinaryIO,
    want: Callable[[str], bool] = lambda name: True,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    specials: bool = False,
) -> Iterator[Tuple[str, Union[bytes, None, Oversized, Special]]]:
    """Yield ``(name, data)`` for every regular member, in stream order.

    ``data`` is the member's bytes; None when ``want(name)`` is false (the bytes are skipped, not
    read); an ``Oversized`` when the member is larger than ``max_member_bytes`` (skipped too).
    With ``specials=True`` links, devices, FIFOs and other non-regular members other than
    directories are yielded too, as a ``Special`` (their data skipped).
    Raises TarFormatError where the stream stops being a valid tar, after yielding every complete
    member before that point; read errors of the stream or its decompressor become one too.
    """
    try:
        yield from _iter(f, want, max_member_bytes, specials)
    except (OSError, EOFError, *DECOMPRESSION_ERRORS) as exn:
        raise TarFormatError(f"{type(exn).__name__}: {exn}") from exn


def _iter(f, want, max_member_bytes, specials):
    header = _read_exact(f, BLOCK)
    unpacked = _decompressed(f, header) if len(header) >= 3 else None
    if unpacked is not None:
        f = unpacked
        header = _read_exact(f, BLOCK)
    long_name: Optional[str] = None
    long_link: Optional[str] = None
    pax: dict = {}
    while True:
        if len(header) != BLOCK:
            raise TarFormatError("file ends before the end-of-archive block" if not header else "file ends inside a header")
        if header == ZERO_BLOCK:
            return
        if not _checksum_ok(header):
            raise TarFormatError("header checksum mismatch (not a tar, or corrupt)")
        kind = header[156:157]
        size = _number(header[124:136], "size")
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise TarFormatError("bad pax size") from None
            if size < 0:
                raise TarFormatError("negative pax size")
        padded = -(-size // BLOCK) * BLOCK
        if kind == b"L":  # GNU long name of the next member
            if size > MAX_NAME_BYTES:
                raise TarFormatError(f"GNU long name of {size} bytes")
            long_name = _name(_read_member(f, padded)[:size])
        elif kind == b"K":  # GNU long link target of the next member: not used
            if size > MAX_NAME_BYTES:
                raise TarFormatError(f"GNU long link of {size} bytes")
            long_link = _name(_read_member(f, padded)[:size])
        elif kind in (b"x", b"X"):  # pax extended header of the next member
            if size > MAX_PAX_BYTES:
                raise TarFormatError(f"pax header of {size} bytes")
            pax = _pax(_read_member(f, padded)[:size])
        elif kind == b"g":  # global pax header: nothing we use
            if size > MAX_PAX_BYTES:
                raise TarFormatError(f"global pax header of {size} bytes")
            _read_member(f, padded)
        else:
            if "path" in pax:
                name = pax["path"].decode("utf-8", "replace")
            elif long_name is not None:
                name = long_name
            else:
                name = _name(header[0:100])
                if header[257:263] == b"ustar\x00" and header[345:346] != b"\x00":
                    name = _name(header[345:500]) + "/" + name
            pax_link, gnu_link = pax.get("linkpath"), long_link  # link targets (links only)
            long_name, long_link, pax = None, None, {}
            if kind not in _REGULAR:
                _skip(f, padded)  # links, devices, FIFOs, ...: never followed or created
                if specials and kind != b"5":  # directories are not worth a word
                    target = ""
                    if kind in (b"1", b"2"):
                        if pax_link is not None:
                            target = pax_link.decode("utf-8", "replace")
                        else:
                            target = gnu_link if gnu_link is not None else _name(header[157:257])
                    yield name, Special(kind, target)
            elif size > max_member_bytes:
                yield name, Oversized(size, max_member_bytes)
                _skip(f, padded)  # (after the yield: a file too short for the claim still reports it)
            elif want(name):
                data = _read_member(f, size)
                if padded != size:
                    _read_member(f, padded - size)
                yield name, data
            else:
                _skip(f, padded)
                yield name, None
        header = _read_exact(f, BLOCK)
