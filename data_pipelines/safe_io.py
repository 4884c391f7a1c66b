"""Reading files named by untrusted input with bounded memory and without hanging.

Used by the shard writers (image files named in captions / JSON files) and by ``mmmoe predict``
(``transforms.read_image_file``): a FIFO or device is never opened for a blocking read, a file is
never read past a size cap (also when ``st_size`` lies, as for ``/proc`` files), and every failure
is an ``OSError``-free, clear exception naming the path. Standard library only (no torch import).
"""

from __future__ import annotations

import os
import stat
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]


def read_regular_file(path: PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of the regular file ``path`` (symlinks followed).

    Raises ``FileNotFoundError`` when nothing is there (also a dangling symlink), ``ValueError``
    naming the path when it is not a regular file (folder, FIFO, device, socket, symlink loop),
    cannot be read, is empty, or holds more than ``max_bytes`` bytes (at most ``max_bytes + 1``
    bytes are ever read)."""
    p = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {p!r} does not exist") from None
    except ValueError:  # an embedded NUL byte
        raise ValueError(f"{what} path {p!r} is not a valid path") from None
    except OSError as exn:
        raise ValueError(f"{what} {p!r} cannot be opened: {exn.strerror or exn}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (FIFO, device or socket)"
            raise ValueError(f"{what} {p!r} is {kind}")
        if st.st_size > max_bytes:
            raise ValueError(f"{what} {p!r} is larger than {max_bytes} bytes ({st.st_size})")
        chunks = []
        got = 0
        while got <= max_bytes:
            chunk = os.read(fd, min(max_bytes + 1 - got, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exn:
        raise ValueError(f"{what} {p!r} cannot be read: {exn.strerror or exn}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if not data:
        raise ValueError(f"{what} {p!r} is an empty file")
    if len(data) > max_bytes:
        raise ValueError(f"{what} {p!r} is larger than {max_bytes} bytes")
    return data
