"""The file side of a resumable download: part files and their running sha256, Content-Range, and a
lock so two workers sharing a cache never write one part file. Used by client.Client.download.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None] | None:
    """`bytes 0-9/100` -> (0, 9, 100); `bytes */100` -> (None, None, 100); anything else -> None."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None
    start, end, total = (None if g in (None, "*") else int(g) for g in m.groups())
    if start is not None and end is not None and (end < start or (total is not None and end >= total)):
        return None
    return start, end, total


def hash_file(path: Path) -> tuple[Any, int]:
    hasher, n = hashlib.sha256(), 0
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
            n += len(chunk)
    return hasher, n


def restart(part: Path) -> tuple[Any, int]:
    part.unlink(missing_ok=True)
    return hashlib.sha256(), 0


def verified(path: Path, sha256: str, size: int | None) -> bool:
    if not path.is_file() or (size is not None and path.stat().st_size != size):
        return False
    return hash_file(path)[0].hexdigest() == sha256


@contextlib.contextmanager
def file_lock(path: Path, stop: threading.Event) -> Iterator[bool]:
    """Hold an exclusive lock on path; yields False (holding nothing) if stop is set while waiting."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): no cross-process sharing guard
        yield True
        return
    with open(path, "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if stop.wait(0.1):
                    yield False
                    return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
