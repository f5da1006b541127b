"""Blobs on an S3-compatible object store (`iota orchestrator serve --blob-store s3://bucket[/prefix]`):
presigned URLs, so workers move the bytes to and from the store and never through the orchestrator.

Configured from the environment only (never a config file, never a log line):
  IOTA_S3_ENDPOINT or AWS_ENDPOINT_URL  the store's URL (neither: AWS S3); workers must reach it too
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials)
  AWS_REGION                            default us-east-1
  IOTA_S3_CACHE_GB                      local copies of what the orchestrator reads (default 8; blobcache.py)

Objects: `<prefix>blobs/<key>` holds what was accepted or made here; a worker uploads to
`<prefix>incoming/<key>` (a presigned PUT that signs `Content-Type: application/octet-stream`), and
take_in copies the upload to `blobs/<key>` inside the store before the orchestrator reads and checks it,
so the object others download is never one a worker can still write to (its URL lives ttl_s). A presigned
PUT cannot bound its size: take_in refuses (413) and deletes an upload over its limit.

    IOTA_S3_ENDPOINT=http://127.0.0.1:8333 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
      iota orchestrator serve --blob-store s3://iota/swarm
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from iota_cli.core.protocol import BLOB_CONTENT_TYPE
from iota_orchestrator.blobcache import ObjectCache
from iota_orchestrator.blobs import BlobStore, BlobStoreError, Stored, StoreUnavailable, check_key
from iota_orchestrator.errors import Conflict, TooLarge

CHUNK = 1 << 20
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4's limit on a presigned URL's life
DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys


@dataclass(frozen=True)
class S3Settings:
    bucket: str
    prefix: str  # "" or ending in "/"
    endpoint: str | None  # None: AWS S3 itself
    region: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    cache_bytes: int = 8 << 30


def settings_from_env(bucket: str, prefix: str, environ: Mapping[str, str] | None = None) -> S3Settings:
    env = os.environ if environ is None else environ
    endpoint = env.get("IOTA_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL") or None
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise BlobStoreError(f"IOTA_S3_ENDPOINT / AWS_ENDPOINT_URL {endpoint[:80]!r} is not an http(s) URL")
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise BlobStoreError(
            f"--blob-store s3://{bucket}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
        )
    try:
        cache_gb = float(env.get("IOTA_S3_CACHE_GB") or 8)
    except ValueError:
        raise BlobStoreError("IOTA_S3_CACHE_GB must be a number of gigabytes") from None
    return S3Settings(
        bucket=bucket,
        prefix=prefix,
        endpoint=endpoint.rstrip("/") if endpoint else None,
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        access_key=key,
        secret_key=secret,
        session_token=env.get("AWS_SESSION_TOKEN") or None,
        cache_bytes=max(int(cache_gb * (1 << 30)), 1 << 20),
    )


class _Missing(Exception):
    pass


class _NotModified(Exception):
    pass


class _Changed(Exception):
    pass


class S3Store(BlobStore):
    presigned = True

    def __init__(self, settings: S3Settings, cache_dir: Path, ttl_s: float = 6 * 3600) -> None:
        import boto3
        from botocore.config import Config

        self.settings, self.bucket, self.prefix = settings, settings.bucket, settings.prefix
        self.ttl_s = ttl_s
        self._expires = int(min(max(ttl_s, 1), MAX_PRESIGN_S))
        config = Config(
            signature_version="s3v4",
            # Path-style for a named endpoint (SeaweedFS, MinIO and most others need it), virtual hosts
            # for AWS. Checksums only when an operation needs one: a presigned PUT must not carry the
            # checksum of an empty body (newer botocore adds one by default).
            s3={"addressing_style": "path" if settings.endpoint else "auto"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=32,
        )
        session = boto3.session.Session(
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key,
            aws_session_token=settings.session_token,
            region_name=settings.region,
        )
        self.s3 = session.client("s3", endpoint_url=settings.endpoint, config=config)
        self._check_bucket()
        self._base, self._signer = self._presigner(session)
        self.cache = ObjectCache(cache_dir, settings.cache_bytes)

    def _check_bucket(self) -> None:
        where = f"object store {self.settings.endpoint or 'AWS S3'}, bucket {self.bucket!r}"
        try:
            self._call("HEAD bucket", self.s3.head_bucket)
        except _Missing:
            raise BlobStoreError(f"{where}: no such bucket; create it first") from None
        except StoreUnavailable as e:
            refused = "HTTP 403" in str(e) or "HTTP 401" in str(e)
            keys = "the credentials were refused (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
            why = keys if refused else e.strerror or str(e)
            raise BlobStoreError(f"{where}: {why}", transient=not refused) from None

    # --- names and URLs ---------------------------------------------------------------------------------

    def _obj(self, key: str) -> str:
        return f"{self.prefix}blobs/{check_key(key)}"

    def _incoming(self, key: str) -> str:
        return f"{self.prefix}incoming/{check_key(key)}"

    def _presigner(self, session: Any) -> tuple[str, Any]:
        """The bucket's URL as the client addresses it (path-style or a virtual host), and botocore's
        SigV4 query signer. generate_presigned_url costs about 0.6 ms a URL on this machine (the client's
        request machinery), the signer alone about 0.2: a claim hands out two or three URLs."""
        from botocore.auth import S3SigV4QueryAuth

        probe = urlsplit(
            self.s3.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": "k"})
        )
        base = f"{probe.scheme}://{probe.netloc}{probe.path.removesuffix('/k')}"
        creds = session.get_credentials().get_frozen_credentials()
        return base, S3SigV4QueryAuth(creds, "s3", self.s3.meta.region_name, expires=self._expires)

    def _presign(self, method: str, name: str, headers: dict[str, str] | None = None) -> str:
        from botocore.awsrequest import AWSRequest

        # Keys and the prefix are [A-Za-z0-9._/-] (check_key): nothing in a name needs escaping.
        request = AWSRequest(method=method, url=f"{self._base}/{name}", headers=headers)
        self._signer.add_auth(request)
        return str(request.url)

    def download_url(self, key: str) -> str:
        return self._presign("GET", self._obj(key))

    def upload_url(self, key: str, max_size: int) -> str:
        # Content-Type is signed: a PUT carries no header the signature does not cover (the client sends
        # exactly this one, and its orchestrator-only headers go to the orchestrator alone).
        return self._presign("PUT", self._incoming(key), {"Content-Type": BLOB_CONTENT_TYPE})

    # --- bytes ------------------------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        check_key(key)
        copy = self.cache.file(key)
        if self.cache.current(key) is not None:
            return copy
        known = self.cache.entry(key)
        extra = {"IfNoneMatch": known.etag} if known is not None and copy.exists() else {}
        try:
            r = self._call("GET", self.s3.get_object, Key=self._obj(key), **extra)
        except _NotModified:
            self.cache.confirm(key)
            return copy
        except _Missing:
            self.cache.drop(key)
            return copy
        self._fill(key, r)
        return copy

    def write(self, key: str, data: bytes) -> Stored:
        r = self._call(
            "PUT", self.s3.put_object, Key=self._obj(key), Body=data, ContentType=BLOB_CONTENT_TYPE
        )
        e = self.cache.fill(key, _etag(r), [data])  # it is read back soon (weights, a re-checked batch)
        return Stored(key, e.sha256, e.size)

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        if self.cache.current(key) is not None:
            return True
        try:
            self._call("HEAD", self.s3.head_object, Key=self._obj(key))
        except _Missing:
            return False
        return True

    def delete(self, key: str) -> None:
        self.cache.drop(key)
        self._call("DELETE", self.s3.delete_object, Key=self._obj(key))
        self._call("DELETE", self.s3.delete_object, Key=self._incoming(key))

    def delete_many(self, keys: list[str]) -> None:
        for key in keys:
            self.cache.drop(key)
        self._delete_objects([n for key in keys for n in (self._obj(key), self._incoming(key))])

    def delete_tree(self, prefix: str) -> None:
        check_key(prefix)
        names: list[str] = []
        for space in ("blobs", "incoming"):
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}{space}/{prefix}/"
            )
            try:
                for page in pages:
                    names += [o["Key"] for o in page.get("Contents", [])]
            except Exception as e:  # botocore's errors, raised from the paginator
                raise StoreUnavailable(f"LIST failed ({type(e).__name__})") from None
        for name in names:
            if name.startswith(f"{self.prefix}blobs/"):
                self.cache.drop(name.removeprefix(f"{self.prefix}blobs/"))
        self._delete_objects(names)

    def _delete_objects(self, names: list[str]) -> None:
        for i in range(0, len(names), DELETE_BATCH):
            batch = [{"Key": n} for n in names[i : i + DELETE_BATCH]]
            r = self._call("DELETE", self.s3.delete_objects, Delete={"Objects": batch, "Quiet": True})
            if r.get("Errors"):  # Quiet: only the failures are listed
                raise StoreUnavailable(f"DELETE failed for {len(r['Errors'])} objects")

    def take_in(self, key: str, max_size: int) -> Stored | None:
        """Copy the upload at incoming/<key> to blobs/<key> (inside the store), read that into the cache
        and say what it holds; with no new upload, what blobs/<key> holds (None: nothing)."""
        for _ in range(3):
            try:
                return self._take_in(key, max_size)
            except _Changed:  # the worker uploaded again between our look and the copy: take the new one
                continue
        raise Conflict("the upload kept changing while it was taken in; report it again")

    def _take_in(self, key: str, max_size: int) -> Stored | None:
        src, dst = self._incoming(key), self._obj(key)
        try:
            head = self._call("HEAD", self.s3.head_object, Key=src)
        except _Missing:
            if not self.path(key).exists():
                return None
            e = self.cache.entry(key)
            return Stored(key, e.sha256, e.size) if e is not None else None
        if int(head["ContentLength"]) > max_size:
            self._call("DELETE", self.s3.delete_object, Key=src)
            raise TooLarge(f"the upload of {head['ContentLength']} bytes exceeds its limit of {max_size}")
        source = {"Bucket": self.bucket, "Key": src}
        self._call("COPY", self.s3.copy_object, Key=dst, CopySource=source, CopySourceIfMatch=head["ETag"])
        self.cache.drop(key)
        r = self._call("GET", self.s3.get_object, Key=dst)
        e = self._fill(key, r, max_size)
        with contextlib.suppress(StoreUnavailable):  # left over, it is deleted with the key later
            self._call("DELETE", self.s3.delete_object, Key=src)
        return Stored(key, e.sha256, e.size)

    # --- plumbing ---------------------------------------------------------------------------------------

    def _fill(self, key: str, r: dict[str, Any], max_size: int | None = None) -> Any:
        body = r["Body"]
        try:
            return self.cache.fill(key, _etag(r), _chunks(body), max_size)
        finally:
            body.close()

    def _call(self, what: str, fn: Callable[..., Any], **kw: Any) -> Any:
        """fn(Bucket=bucket, **kw), botocore's errors turned into ours (never with credentials in them)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kw)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            # A bucket gone is the store's failure, not a missing blob (which integrity would act on).
            if code != "NoSuchBucket" and (status == 404 or code in ("NoSuchKey", "NotFound", "404")):
                raise _Missing from None
            if status == 304 or code == "304":
                raise _NotModified from None
            if status == 412:
                raise _Changed from None
            raise StoreUnavailable(f"{what} failed: {code or 'error'} (HTTP {status})") from None
        except BotoCoreError as e:  # could not connect, timed out, cut off
            raise StoreUnavailable(f"{what} failed ({type(e).__name__})") from None


def _etag(r: Mapping[str, Any]) -> str:
    return str(r.get("ETag", "")).strip('"')


def _chunks(body: Any) -> Iterator[bytes]:
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    try:
        yield from body.iter_chunks(CHUNK)
    except (BotoCoreError, HTTPError) as e:
        raise StoreUnavailable(f"download cut off ({type(e).__name__})") from None
