"""Which files a run trains on: the one rule the orchestrator (data.py) and `iota swarm`'s check share.

A source is a file, a directory (walked recursively, hidden files and folders skipped) or a glob; of
what it names, only text files count: non-empty, with no NUL byte in the first 4 KiB. Try it:
    python -c "from iota_cli.core.textfiles import *; print(sum(1 for _ in text_files('iota_cli')))"
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path


def is_text(path: Path) -> bool:
    """A non-empty file without a NUL byte in its first 4 KiB."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return bool(head) and b"\0" not in head


def text_files(source: str) -> Iterator[Path]:
    """The text files source names, lazily and in no particular order (sort them for a stable one)."""
    if not source:
        return
    p = Path(source).expanduser()
    if p.is_file():
        candidates: Iterator[Path] = iter([p])
    elif p.is_dir():
        candidates = _walk(p)
    else:
        candidates = (Path(x) for x in glob.glob(os.path.expanduser(source), recursive=True))
    yield from (f for f in candidates if f.is_file() and is_text(f))


def _walk(top: Path) -> Iterator[Path]:
    for root, dirs, names in os.walk(top):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        yield from (Path(root) / name for name in names if not name.startswith("."))
