"""Where the orchestrator keeps blobs: one interface (BlobStore) and two stores, chosen once at start.

- The directory store (dirblobs.py, the default): files under `<data-dir>/blobs`, reached through the
  orchestrator's own HMAC-signed, expiring URLs (api/blobs.py serves them).
- An S3-compatible object store (s3blobs.py, `iota orchestrator serve --blob-store s3://bucket[/prefix]`,
  endpoint and credentials from the environment): presigned URLs, so the bytes go between the workers
  and the store and never through the orchestrator.

Workers only follow the URLs they are handed, so neither store needs a client change. Every blob has a
sha256 and a size limit: the directory store checks both as the bytes come in; the object store when the
orchestrator takes an upload in (uploads.py), before the result it holds is accepted.

    python -c "from iota_orchestrator.blobs import parse_spec; print(parse_spec('s3://bucket/swarm'))"
"""

from __future__ import annotations

import abc
import errno
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from iota_cli.core.protocol import BlobRef, UploadRef
from iota_orchestrator.datadir import DataDirError
from iota_orchestrator.errors import BadRequest

KEY_RE = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
MAX_KEY = 400
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's bucket naming rules, less the rare ones


def check_key(key: str) -> str:
    """Accept `[A-Za-z0-9._/-]` keys without empty, `.` or `..` segments (no path traversal)."""
    if not key or len(key) > MAX_KEY or not KEY_RE.fullmatch(key):  # fullmatch: `$` lets "\n" through
        raise BadRequest(f"invalid blob key {key[:80]!r}")
    if any(part in (".", "..") for part in key.split("/")):
        raise BadRequest(f"invalid blob key {key[:80]!r}")
    return key


@dataclass(frozen=True)
class Stored:
    key: str
    sha256: str
    size: int


class BlobStoreError(DataDirError):
    """The blob store named at start cannot be used (a bad --blob-store, missing credentials, no bucket);
    str() is one line. A DataDirError, so `serve` stops with it as it does for an unusable data dir."""


class StoreUnavailable(OSError):
    """The object store did not answer or failed (a 5xx): requests get a 503 with Retry-After (app.py),
    and code that checks blobs (integrity.intact) must not take it for a missing or damaged blob."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EIO, f"object store: {reason}")


class BlobStore(abc.ABC):
    """Blobs by key: signed URLs for workers, and bytes for the orchestrator's own reads and writes."""

    # True: workers upload straight to the store, and take_in brings an upload in before it is checked.
    # False: uploads come through the orchestrator's own PUT route, which checks and records them.
    presigned: bool = False
    ttl_s: float

    @abc.abstractmethod
    def download_url(self, key: str) -> str:
        """A URL that GETs key (Range honoured) until it expires."""

    @abc.abstractmethod
    def upload_url(self, key: str, max_size: int) -> str:
        """A URL that takes one PUT of up to max_size bytes for key until it expires."""

    def ref(self, key: str, sha256: str, size: int) -> BlobRef:
        """What a worker follows to download key: a signed URL and the bytes' sha256 and size."""
        return BlobRef(url=self.download_url(key), sha256=sha256, size=size)

    def upload_ref(self, key: str, max_size: int) -> UploadRef:
        return UploadRef(url=self.upload_url(key, max_size), max_size=max_size)

    @abc.abstractmethod
    def path(self, key: str) -> Path:
        """A local file holding key's bytes, to read (the object store's is a cached copy); it does not
        exist when the blob does not."""

    @abc.abstractmethod
    def write(self, key: str, data: bytes) -> Stored:
        """Store bytes the orchestrator made itself (weights, token batches)."""

    @abc.abstractmethod
    def read(self, key: str) -> bytes:
        """key's bytes (FileNotFoundError when there is no such blob)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete key (and an upload for it not taken in yet); a missing key is no error."""

    def delete_many(self, keys: list[str]) -> None:
        """delete() each key (an object store deletes a thousand in one request)."""
        for key in keys:
            self.delete(key)

    @abc.abstractmethod
    def delete_tree(self, prefix: str) -> None:
        """Delete every blob whose key starts with `prefix/` (a run's folder, say)."""

    @abc.abstractmethod
    def take_in(self, key: str, max_size: int) -> Stored | None:
        """Bring in what a worker uploaded for key (presigned stores) and say what it holds; None when no
        new upload is there. TooLarge (413) past max_size, and the upload is deleted."""


def parse_spec(spec: str) -> tuple[str, str]:
    """`s3://bucket[/prefix]` -> (bucket, prefix with a trailing `/`, or "")."""
    if "@" in spec or ":" in spec.removeprefix("s3://"):  # never echo what may be a key put in the URL
        raise BlobStoreError(
            "--blob-store takes s3://bucket[/prefix]; keys go in the environment (docs/deploy.md)"
        )
    if not spec.startswith("s3://"):
        raise BlobStoreError(f"--blob-store {spec[:80]!r}: expected s3://bucket[/prefix]")
    bucket, _, prefix = spec[len("s3://") :].partition("/")
    if not BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise BlobStoreError(f"--blob-store {spec[:80]!r}: {bucket[:64]!r} is not a valid bucket name")
    prefix = prefix.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except BadRequest:
            raise BlobStoreError(f"--blob-store {spec[:80]!r}: invalid prefix {prefix[:64]!r}") from None
    return bucket, f"{prefix}/" if prefix else ""


def open_store(
    spec: str | None,
    data_dir: Path,
    secret: bytes,
    *,
    fsync: bool = False,
    ttl_s: float = 6 * 3600,
    environ: Mapping[str, str] | None = None,
) -> BlobStore:
    """The store `--blob-store` names: None for the directory store under data_dir, `s3://...` for an
    object store (endpoint and credentials from environ, default os.environ; see s3blobs.py)."""
    if not spec:
        from iota_orchestrator.dirblobs import DirStore

        return DirStore(data_dir / "blobs", secret, fsync=fsync, ttl_s=ttl_s)
    bucket, prefix = parse_spec(spec)
    from iota_orchestrator.s3blobs import S3Store, settings_from_env

    return S3Store(settings_from_env(bucket, prefix, environ), data_dir / "blob-cache", ttl_s=ttl_s)
