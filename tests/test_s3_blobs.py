"""The object store (iota_orchestrator/s3blobs.py) against a real SeaweedFS, through the worker's own
HTTP client: presigned PUT and GET, Range resume, refused URLs, take-in, and what the client sends a store.

    .venv/bin/python -m pytest -q tests/test_s3_blobs.py
"""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import requests
from fake_http import Server, fast_client
from iota_orchestrator import blobcache
from iota_orchestrator.blobs import BlobStoreError, open_store, parse_spec
from iota_orchestrator.errors import TooLarge
from iota_orchestrator.s3blobs import S3Store

from iota_cli.core.protocol import PROTOCOL_HEADER, SHA256_HEADER
from iota_cli.train.errors import ApiError, IntegrityError

ORCHESTRATOR = "http://127.0.0.1:9"  # the client's own origin: nothing listens, nothing is sent there


def store_for(seaweed, tmp_path, **kw) -> S3Store:
    s = open_store(seaweed.spec(), tmp_path / "data", b"", environ=seaweed.env(), **kw)
    assert isinstance(s, S3Store)
    return s


def objects(seaweed, s: S3Store) -> list[str]:
    listed = seaweed.client().list_objects_v2(Bucket=s.bucket, Prefix=s.prefix)
    return sorted(o["Key"].removeprefix(s.prefix) for o in listed.get("Contents", []))


def test_presigned_put_then_get_round_trip_with_sha256(seaweed, tmp_path):
    s = store_for(seaweed, tmp_path)
    data = os.urandom(300_000)
    up = s.upload_ref("runs/r/act/1/0.bin", 1 << 20)
    assert up.url.startswith(seaweed.endpoint + "/"), "a presigned URL on the store, not the orchestrator"
    with fast_client(ORCHESTRATOR, token="orchestrator-token") as c:
        digest = c.upload(up.url, data)
        assert objects(seaweed, s) == ["incoming/runs/r/act/1/0.bin"], "a worker writes only incoming/"
        got = s.take_in("runs/r/act/1/0.bin", 1 << 20)
        assert got is not None and (got.sha256, got.size) == (digest, len(data))
        assert objects(seaweed, s) == ["blobs/runs/r/act/1/0.bin"], "copied into place, the upload gone"
        ref = s.ref("runs/r/act/1/0.bin", got.sha256, got.size)
        dest = c.download(ref.url, tmp_path / "out.bin", ref.sha256, ref.size)
        assert dest.read_bytes() == data
        with pytest.raises(IntegrityError, match="sha256 mismatch"):
            c.download(ref.url, tmp_path / "other.bin", "0" * 64, ref.size)
    assert s.read("runs/r/act/1/0.bin") == data, "the orchestrator reads it through its cache"
    assert s.take_in("runs/r/act/1/0.bin", 1 << 20) == got, "a repeated take-in finds the same blob"
    assert s.take_in("runs/r/act/9/0.bin", 1 << 20) is None, "nothing uploaded"


def test_a_download_resumes_with_range_and_a_range_read_is_checked(seaweed, tmp_path):
    s = store_for(seaweed, tmp_path)
    data = os.urandom(400_000)
    b = s.write("runs/r/weights/0/e0.safetensors", data)
    url = s.download_url(b.key)
    dest = tmp_path / "w.bin"
    (tmp_path / "w.bin.part").write_bytes(data[:150_000])
    seen: list[int] = []
    with fast_client(ORCHESTRATOR) as c:
        c.download(url, dest, b.sha256, b.size, on_progress=lambda have, total: seen.append(have))
        assert dest.read_bytes() == data
        assert seen[0] > 150_000, "the first bytes counted come after the part already there (Range)"
        # A part already whole: the store answers 416 to `bytes=N-` and the part is the blob.
        dest.unlink()
        (tmp_path / "w.bin.part").write_bytes(data)
        assert c.download(url, dest, b.sha256, b.size).read_bytes() == data
        # A part that is wrong is noticed by its sha256 and fetched again whole.
        dest.unlink()
        (tmp_path / "w.bin.part").write_bytes(b"x" * 1000)
        assert c.download(url, dest, b.sha256, b.size).read_bytes() == data
        span = data[123_456 : 123_456 + 70_000]
        assert c.read_range(url, 123_456, 70_000, hashlib.sha256(span).hexdigest()) == span


def test_expired_and_tampered_urls_are_refused(seaweed, tmp_path):
    s = store_for(seaweed, tmp_path)
    b = s.write("runs/r/tokens/1.bin", b"tokens" * 100)
    url = s.download_url(b.key)
    assert "X-Amz-Expires=21600" in url, "6 h, the default ttl_s"
    with fast_client(ORCHESTRATOR) as c:
        for bad in (
            url.replace("tokens/1.bin", "tokens/2.bin"),  # another object
            url[:-4] + ("0000" if not url.endswith("0000") else "1111"),  # another signature
            url.replace("X-Amz-Expires=21600", "X-Amz-Expires=21601"),  # a longer life
        ):
            with pytest.raises(ApiError) as e:
                c.download(bad, tmp_path / "t.bin", b.sha256, b.size)
            assert e.value.status == 403 and "SignatureDoesNotMatch" in str(e.value), str(e.value)
        up = s.upload_url("runs/r/act/1/0.bin", 1000)
        with pytest.raises(ApiError) as e:
            c.upload(url, b"x")  # a download URL does not take a PUT
        assert e.value.status == 403
        # The Content-Type is signed: a PUT that sends another one (or none) is refused.
        r = requests.put(up, data=b"x", headers={"Content-Type": "text/plain"}, timeout=10)
        assert r.status_code == 403
        short = store_for(seaweed, tmp_path / "short", ttl_s=1)
        old_get, old_put = short.download_url(b.key), short.upload_url("runs/r/act/1/0.bin", 1000)
        time.sleep(2.1)
        with pytest.raises(ApiError) as e:
            c.download(old_get, tmp_path / "t.bin", b.sha256, b.size)
        assert e.value.status == 403 and "expired" in str(e.value), str(e.value)
        with pytest.raises(ApiError) as e:
            c.upload(old_put, b"x")
        assert e.value.status == 403 and "expired" in str(e.value)
    assert objects(seaweed, s) == ["blobs/runs/r/tokens/1.bin"], "no refused request stored anything"


def test_an_upload_past_its_limit_is_refused_and_deleted_at_take_in(seaweed, tmp_path):
    s = store_for(seaweed, tmp_path)
    with fast_client(ORCHESTRATOR) as c:
        c.upload(s.upload_url("runs/r/act/1/0.bin", 1000), b"x" * 1001)
    with pytest.raises(TooLarge):
        s.take_in("runs/r/act/1/0.bin", 1000)
    assert objects(seaweed, s) == [] and not s.exists("runs/r/act/1/0.bin")


def test_the_client_sends_a_store_no_orchestrator_header(tmp_path):
    """A URL on another origin gets no bearer token, protocol or sha256 header (a presigned PUT must carry
    no header its signature does not cover); the orchestrator's own URLs get them all."""
    orch, store = Server(), Server()
    for srv in (orch, store):
        srv.routes["/b"] = lambda h: h.reply(200)
    try:
        with fast_client(orch.url, token="s3cret") as c:
            c.upload(f"{store.url}/b?X-Amz-Signature=1", b"data")
            c.upload("/b", b"data")
        (_, _, to_store), (_, _, to_orch) = store.seen[-1], orch.seen[-1]
        assert to_store["Content-Type"] == "application/octet-stream"
        for name in ("Authorization", PROTOCOL_HEADER, SHA256_HEADER):
            assert name not in to_store, name
            assert name in to_orch, name
    finally:
        orch.stop()
        store.stop()


def test_the_cache_follows_the_store(seaweed, tmp_path, monkeypatch):
    """Another replica (here boto3 itself) changes or deletes an object: the orchestrator's copy follows
    once FRESH_S has passed (a conditional GET), and deleting a folder deletes its objects."""
    monkeypatch.setattr(blobcache, "FRESH_S", 0.0)
    s = store_for(seaweed, tmp_path)
    s.write("runs/r/a.bin", b"first")
    assert s.path("runs/r/a.bin").read_bytes() == b"first"
    seaweed.client().put_object(Bucket=s.bucket, Key=f"{s.prefix}blobs/runs/r/a.bin", Body=b"second")
    assert s.read("runs/r/a.bin") == b"second"
    seaweed.client().delete_object(Bucket=s.bucket, Key=f"{s.prefix}blobs/runs/r/a.bin")
    assert not s.path("runs/r/a.bin").exists() and not s.exists("runs/r/a.bin")
    for i in range(3):
        s.write(f"runs/r/w/{i}.bin", b"w")
    s.write("runs/other/x.bin", b"x")
    s.delete_tree("runs/r")
    assert objects(seaweed, s) == ["blobs/runs/other/x.bin"]
    s.write("runs/other/y.bin", b"y")
    s.delete_many(["runs/other/x.bin", "runs/other/y.bin", "runs/other/never.bin"])
    assert objects(seaweed, s) == [] and not s.exists("runs/other/y.bin")


def test_a_store_that_cannot_be_used_stops_the_start_with_one_line(seaweed, tmp_path):
    env = seaweed.env()
    cases = {
        "set AWS_ACCESS_KEY_ID": ("s3://iota-test", {k: v for k, v in env.items() if "SECRET" not in k}),
        "credentials were refused": ("s3://iota-test", {**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret"}),
        "no such bucket": ("s3://no-such-bucket", env),
        "is not an http": ("s3://iota-test", {**env, "IOTA_S3_ENDPOINT": "ftp://x"}),
    }
    for words, (spec, environ) in cases.items():
        with pytest.raises(BlobStoreError, match=words) as e:
            open_store(spec, tmp_path, b"", environ=environ)
        assert env["AWS_SECRET_ACCESS_KEY"] not in str(e.value) and "\n" not in str(e.value)
        assert not e.value.transient
    down = {**env, "IOTA_S3_ENDPOINT": "http://127.0.0.1:9"}
    with pytest.raises(BlobStoreError) as e:
        open_store("s3://iota-test", tmp_path, b"", environ=down)
    assert e.value.transient, "a store that does not answer may answer later"
    for bad in ("iota-test", "s3://", "s3://Upper", "s3://b/../x", "s3://bucket/a b"):
        with pytest.raises(BlobStoreError):
            parse_spec(bad)
    with pytest.raises(BlobStoreError) as e:
        parse_spec("s3://AKIAKEY:secret-in-url@bucket")
    assert "secret-in-url" not in str(e.value) and "environment" in str(e.value)
    assert parse_spec("s3://bucket/a/b/") == ("bucket", "a/b/") and parse_spec("s3://bucket") == (
        "bucket",
        "",
    )
