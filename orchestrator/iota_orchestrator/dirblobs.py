"""The directory blob store (the default): files under `<data-dir>/blobs`, reached through HMAC-signed,
expiring URLs that the orchestrator serves itself (api/blobs.py). See blobs.py for the interface.

    python -c "from pathlib import Path; from iota_orchestrator.dirblobs import DirStore; \
print(DirStore(Path('/tmp/b'), b'k' * 32).download_url('runs/r/x.bin'))"
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from iota_cli.core.files import atomic_writer, commit
from iota_orchestrator.blobs import BlobStore, Stored, check_key
from iota_orchestrator.errors import BadRequest, Forbidden, TooLarge, Unauthorized

SIG_RE = re.compile(r"[0-9a-f]{40}")
URL_PREFIX = "/v1/blobs/"


class DirStore(BlobStore):
    presigned = False

    def __init__(self, root: Path, secret: bytes, fsync: bool = False, ttl_s: float = 6 * 3600) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(mode=0o700, exist_ok=True)
        self.secret = secret
        self.fsync = fsync
        self.ttl_s = ttl_s

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    # --- URLs ------------------------------------------------------------------------------------------

    def _sig(self, op: str, key: str, exp: int, max_size: int) -> str:
        msg = f"{op}\n{key}\n{exp}\n{max_size}".encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()[:40]

    def download_url(self, key: str, now: float | None = None) -> str:
        exp = int((now or time.time()) + self.ttl_s)
        return f"{URL_PREFIX}{quote(key)}?exp={exp}&sig={self._sig('get', key, exp, 0)}"

    def upload_url(self, key: str, max_size: int, now: float | None = None) -> str:
        exp = int((now or time.time()) + self.ttl_s)
        sig = self._sig("put", key, exp, max_size)
        return f"{URL_PREFIX}{quote(key)}?exp={exp}&max={max_size}&sig={sig}"

    def verify(self, op: str, key: str, exp: str | None, sig: str | None, max_size: str | None = None) -> int:
        """Check a URL's signature and expiry; return its size limit (0 for downloads)."""
        if not sig or not exp:
            raise Unauthorized("blob URL is not signed; use the URL the orchestrator issued")
        try:
            exp_i, max_i = int(exp), int(max_size or 0)
        except ValueError:
            raise Forbidden("malformed blob URL signature") from None
        if not SIG_RE.fullmatch(sig):  # compare_digest refuses non-ASCII text (a TypeError, not a no)
            raise Forbidden("malformed blob URL signature")
        if not hmac.compare_digest(sig, self._sig(op, key, exp_i, max_i)):
            raise Forbidden("bad blob URL signature")
        if exp_i < time.time():
            raise Forbidden("blob URL expired; ask the orchestrator for a fresh one")
        return max_i

    # --- bytes -----------------------------------------------------------------------------------------

    def open_temp(self) -> tuple[int, str]:
        return tempfile.mkstemp(dir=self.tmp, suffix=".part")

    def commit(self, tmp: str, key: str) -> None:
        """Move a fully written temp file into place (fsynced only when durability is 'full')."""
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        commit(tmp, dest, durable=self.fsync)

    def write(self, key: str, data: bytes) -> Stored:
        with atomic_writer(self.path(key), durable=self.fsync, tmp_dir=self.tmp) as f:
            f.write(data)
        return Stored(key, hashlib.sha256(data).hexdigest(), len(data))

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def delete_tree(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def take_in(self, key: str, max_size: int) -> Stored | None:
        return None  # uploads came through put_blob (api/blobs.py), which checked and recorded them


class UploadSink:
    """Receives an upload chunk by chunk: enforces the size limit and hashes as it writes."""

    def __init__(self, store: DirStore, max_size: int) -> None:
        self.store, self.max_size = store, max_size
        fd, self.tmp = store.open_temp()
        self.file = os.fdopen(fd, "wb")
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_size:
            raise TooLarge(f"blob exceeds its limit of {self.max_size} bytes")
        self.hash.update(chunk)
        self.file.write(chunk)

    def finish(self, key: str, want_sha: str) -> Stored:
        self.file.close()
        got = self.hash.hexdigest()
        if got != want_sha:
            raise BadRequest(f"sha256 mismatch: body hashes to {got}, header says {want_sha}; nothing stored")
        self.store.commit(self.tmp, key)
        return Stored(key, got, self.size)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)
