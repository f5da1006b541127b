"""Crash-safe file writing: the one way iota writes anything that must never be half-written.

A reader sees the old file or the whole new one, never a part: bytes go to a temp file, which is fsynced
and renamed over the destination, and the directory is fsynced so the rename itself survives a crash.
Three ways in, by how the bytes arrive:

    atomic_write(path, data)             # all the bytes at hand
    with atomic_writer(path) as f: ...   # streamed (large or chunked); an exception leaves path alone
    commit(part, dest)                   # a temp file written and checked elsewhere (downloads, uploads)

Try it: python -c "from iota_cli.core.files import atomic_write; atomic_write('/tmp/x', b'hi')"
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Persist a rename: fsync the directory that holds it (a no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit(part: str | Path, dest: str | Path, *, durable: bool = True) -> None:
    """Make a finished temp file the file at dest: fsync it, rename it over dest, fsync the directory.

    `durable=False` keeps the rename (readers still never see a half file) but skips both fsyncs, for
    data that is cheap to make again after a power loss. part must be on dest's file system.
    """
    dest = Path(dest)
    if durable:
        with open(part, "rb+") as f:  # writable: Windows refuses to flush a read-only handle
            os.fsync(f.fileno())
    os.replace(part, dest)
    if durable:
        fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_writer(
    path: str | Path, mode: int = 0o600, *, durable: bool = True, tmp_dir: Path | None = None
) -> Iterator[BinaryIO]:
    """Write path as a stream: the file appears whole when the block exits, and not at all if it raises.

    The temp file is `.<name>.<random>.tmp` beside path (or in tmp_dir, on the same file system), so a
    crash mid-write leaves only that behind for its owner to sweep.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=tmp_dir or path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, mode)
        commit(tmp, path, durable=durable)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | Path, data: bytes, mode: int = 0o600) -> None:
    """Write all of data to path, durably (see atomic_writer)."""
    with atomic_writer(path, mode) as f:
        f.write(data)
