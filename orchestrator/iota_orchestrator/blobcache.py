"""Local copies of the objects the orchestrator reads from an object store (s3blobs.py).

The orchestrator checks every upload it accepts (integrity.py decodes the tensors; merges read byte
ranges, headers, whole weights), and that code reads files. The object store hands out each object's
ETag; a copy is used again while the store says the ETag has not changed (a conditional GET, one round
trip), or without asking for FRESH_S after it was last confirmed, since whoever reads it next compares
what it reads with the sha256 the database recorded anyway.

Each process has a folder of its own under `<data-dir>/blob-cache` (several API replicas may share a data
dir), removed when the process ends; folders of processes that died are removed at the next start. Past
budget_bytes the least recently used copies are dropped.

    cache = ObjectCache(Path("/tmp/c"), budget_bytes=1 << 30)
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from iota_cli.core.files import commit
from iota_orchestrator.errors import TooLarge

FRESH_S = 1.0


@dataclass
class Entry:
    etag: str
    size: int
    sha256: str
    confirmed: float  # time.monotonic() when the store last said the copy is current


class ObjectCache:
    def __init__(self, parent: Path, budget_bytes: int) -> None:
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _remove_dead(parent)
        self.root = parent / f"{os.getpid()}-{secrets.token_hex(4)}"
        self.root.mkdir(mode=0o700)
        self.budget = budget_bytes
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        atexit.register(self.close)

    def file(self, key: str) -> Path:
        # Flat names: a key's folders need not exist, and no key can reach outside the folder.
        return self.root / hashlib.sha256(key.encode()).hexdigest()

    def current(self, key: str) -> Entry | None:
        """The entry for key if it was confirmed within FRESH_S and its file is there."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or time.monotonic() - e.confirmed > FRESH_S:
                return None
            self._entries.move_to_end(key)
        return e if self.file(key).exists() else None

    def entry(self, key: str) -> Entry | None:
        with self._lock:
            return self._entries.get(key)

    def confirm(self, key: str) -> None:
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                e.confirmed = time.monotonic()
                self._entries.move_to_end(key)

    def fill(self, key: str, etag: str, chunks: Iterable[bytes], max_size: int | None = None) -> Entry:
        """Write chunks as key's copy, hashing as they come; TooLarge (nothing kept) past max_size."""
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".part")
        h, n = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    n += len(chunk)
                    if max_size is not None and n > max_size:
                        raise TooLarge(f"the upload exceeds its limit of {max_size} bytes")
                    h.update(chunk)
                    f.write(chunk)
            commit(tmp, self.file(key), durable=False)  # a copy: the store keeps the durable one
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        e = Entry(etag, n, h.hexdigest(), time.monotonic())
        with self._lock:
            self._entries[key] = e
            self._entries.move_to_end(key)
            self._evict(keep=key)
        return e

    def drop(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            self.file(key).unlink()

    def _evict(self, keep: str) -> None:
        total = sum(e.size for e in self._entries.values())
        for key in list(self._entries):
            if total <= self.budget:
                break
            if key != keep:
                total -= self._entries.pop(key).size
                with contextlib.suppress(FileNotFoundError):
                    self.file(key).unlink()

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def _remove_dead(parent: Path) -> None:
    """Remove the folders of processes that are gone (killed before they could remove their own)."""
    for d in parent.iterdir():
        pid = d.name.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
