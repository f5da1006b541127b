"""The HTTP client against real HTTP servers on 127.0.0.1: retries, waiting, timeouts, resumable downloads."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from fake_http import Handler, Server, fast_client, free_port, ok, sequence, status
from hypothesis import given, settings
from hypothesis import strategies as st

from iota_cli import __version__
from iota_cli.train.errors import ApiError, IntegrityError, Stopped, Unreachable
from iota_cli.train.partfile import parse_content_range


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


# -- JSON calls ------------------------------------------------------------------------------------------


def test_headers_carry_protocol_auth_and_user_agent(server):
    server.routes["/v1/contributors/me"] = ok({"contributor_id": "c1"})
    c = fast_client(server.url, token="s3cret")
    assert c.get("/v1/contributors/me") == {"contributor_id": "c1"}
    _, _, headers = server.seen[-1]
    assert headers["X-Iota-Protocol"] == "1"
    assert headers["Authorization"] == "Bearer s3cret"
    assert headers["User-Agent"] == f"iota-cli/{__version__}"
    assert "s3cret" not in repr(c)
    c.token = None
    c.get("/v1/contributors/me")
    assert "Authorization" not in server.seen[-1][2]


def test_token_is_not_sent_to_another_origin(server, tmp_path):
    other = Server()
    try:
        data = b"blob" * 100
        other.routes["/blob"] = lambda h: serve_bytes(h, data)
        c = fast_client(server.url, token="s3cret")
        c.download(f"{other.url}/blob", tmp_path / "b", hashlib.sha256(data).hexdigest())
        assert "Authorization" not in other.seen[-1][2]
    finally:
        other.stop()


def test_a_base_url_path_is_kept_for_api_paths_and_handed_out_urls(server, tmp_path):
    data = b"weights" * 50
    server.routes["/proxy/swarm/v1/health"] = ok({"status": "ok"})
    server.routes["/proxy/swarm/v1/blobs/k"] = lambda h: serve_bytes(h, data)
    c = fast_client(f"{server.url}/proxy/swarm/", token="s3cret")
    assert c.get("/v1/health") == {"status": "ok"}
    # What the orchestrator hands out is relative to its root, which is the base URL (docs/protocol.md).
    c.download("/v1/blobs/k?exp=1&sig=ab", tmp_path / "w", hashlib.sha256(data).hexdigest())
    assert [p for _, p, _ in server.seen] == ["/proxy/swarm/v1/health", "/proxy/swarm/v1/blobs/k"]
    assert all(h["Authorization"] == "Bearer s3cret" for _, _, h in server.seen)
    assert c.url("https://store.example/b?sig=1") == "https://store.example/b?sig=1"  # a full URL as is


def test_503_then_200_post_is_retried(server):
    server.routes["/v1/work/claim"] = sequence(status(503, {"Retry-After": "0"}), ok({"work_id": "w1"}))
    waits: list[tuple[str, float]] = []
    c = fast_client(server.url, on_wait=lambda m, s: waits.append((m, s)))
    assert c.post("/v1/work/claim", {"run_id": "r"}) == {"work_id": "w1"}
    assert server.count("/v1/work/claim") == 2
    assert len(waits) == 1 and "unavailable (HTTP 503)" in waits[0][0]
    assert [json.loads(b) for b in server.bodies] == [{"run_id": "r"}] * 2


def test_502_on_get_retried_quickly_by_urllib3(server):
    server.routes["/v1/runs"] = sequence(status(502), ok([]))
    waits: list[str] = []
    c = fast_client(server.url, on_wait=lambda m, s: waits.append(m))
    assert c.get("/v1/runs") == []
    assert server.count("/v1/runs") == 2
    assert waits == []  # the quick layer absorbed it; nobody was told we waited


def test_429_retry_after_is_honoured(server):
    server.routes["/v1/heartbeat"] = sequence(status(429, {"Retry-After": "1"}), ok({"epoch": 3}))
    waits: list[float] = []
    c = fast_client(server.url, on_wait=lambda m, s: waits.append(s))
    t0 = time.monotonic()
    assert c.post("/v1/heartbeat", {}) == {"epoch": 3}
    assert time.monotonic() - t0 >= 1.0
    assert waits and waits[0] >= 1.0


def test_204_returns_none_with_the_retry_after_hint(server):
    server.routes["/v1/work/claim"] = lambda h: h.reply(204, None, {"Retry-After": "2.5"})
    c = fast_client(server.url)
    reply = c.request("POST", "/v1/work/claim", json={"run_id": "r"})
    assert (reply.status, reply.data, reply.retry_after) == (204, None, 2.5)
    assert c.post("/v1/work/claim", {"run_id": "r"}) is None


@pytest.mark.parametrize("code", [400, 401, 403, 404, 409, 422])
def test_4xx_raises_with_detail_and_is_not_retried(server, code):
    server.routes["/v1/work/w1/complete"] = lambda h: h.reply(code, {"detail": "item re-issued"})
    c = fast_client(server.url)
    with pytest.raises(ApiError) as e:
        c.post("/v1/work/w1/complete", {"sha256": None, "size": 0})
    assert (e.value.status, e.value.detail) == (code, "item re-issued")
    assert server.count("/v1/work/w1/complete") == 1


def test_fastapi_validation_detail_is_readable(server):
    detail = [{"loc": ["body", "size"], "msg": "Field required", "type": "missing"}]
    server.routes["/v1/assignment"] = lambda h: h.reply(422, {"detail": detail})
    with pytest.raises(ApiError, match="Field required"):
        fast_client(server.url).post("/v1/assignment", {})


def test_persistent_500_gives_up_with_api_error(server):
    server.routes["/v1/runs"] = status(500)
    c = fast_client(server.url, retries=2, on_wait=lambda m, s: None)
    with pytest.raises(ApiError) as e:
        c.post("/v1/runs", {})
    assert e.value.status == 500
    assert server.count("/v1/runs") == 3  # one try plus `retries` more, then a clear error


def test_connection_refused_then_server_appears(tmp_path):
    port = free_port()
    waits: list[str] = []
    c = fast_client(f"http://127.0.0.1:{port}", backoff=(0.1, 0.3), on_wait=lambda m, s: waits.append(m))
    later: list[Server] = []

    def start() -> None:
        s = Server(port)
        s.routes["/v1/health"] = ok({"status": "ok"})
        later.append(s)

    timer = threading.Timer(1.0, start)
    timer.start()
    try:
        assert c.get("/v1/health") == {"status": "ok"}
        assert waits and all("orchestrator unreachable (connection refused), retrying in" in m for m in waits)
    finally:
        timer.join()
        for s in later:
            s.stop()


def test_max_wait_raises_unreachable():
    c = fast_client(f"http://127.0.0.1:{free_port()}", max_wait_s=0.5, on_wait=lambda m, s: None)
    t0 = time.monotonic()
    with pytest.raises(Unreachable, match="gave up after 0.5 s"):
        c.get("/v1/health")
    assert time.monotonic() - t0 < 3


def test_stop_event_interrupts_waiting_promptly():
    stop = threading.Event()
    c = fast_client(f"http://127.0.0.1:{free_port()}", backoff=(10, 30), stop=stop, on_wait=lambda m, s: None)
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(Stopped):
        c.post("/v1/heartbeat", {})
    assert time.monotonic() - t0 < 2  # not the 5-10 s backoff sleep


def test_after_stop_a_request_gets_one_try_not_a_wait(server):
    server.routes["/v1/contributors/me/leave"] = ok({})
    stop = threading.Event()
    stop.set()
    c = fast_client(server.url, stop=stop)
    assert c.post("/v1/contributors/me/leave") == {}  # shutdown can still tell the orchestrator
    c2 = fast_client(f"http://127.0.0.1:{free_port()}", stop=stop)
    with pytest.raises(Stopped):
        c2.post("/v1/contributors/me/leave")


def test_read_stall_hits_the_read_timeout_then_recovers(server):
    def stall(h: Handler) -> None:
        h.server.release.wait(2)
        h.reply(200, {"late": True})

    server.routes["/v1/heartbeat"] = sequence(stall, ok({"epoch": 1}))
    waits: list[str] = []
    c = fast_client(server.url, timeout=(1.0, 0.3), on_wait=lambda m, s: waits.append(m))
    t0 = time.monotonic()
    assert c.post("/v1/heartbeat", {}) == {"epoch": 1}
    assert 0.3 <= time.monotonic() - t0 < 1.9
    assert waits and "no answer in 0.3 s" in waits[0]


# -- uploads ---------------------------------------------------------------------------------------------


def test_upload_sends_sha256_and_is_retried(server):
    stored: dict[str, bytes] = {}

    def put(h: Handler) -> None:
        digest = hashlib.sha256(h.body).hexdigest()
        if h.headers["X-Iota-Sha256"] != digest:
            h.reply(400, {"detail": "sha256 mismatch"})
            return
        stored[digest] = h.body
        h.reply(201, {"sha256": digest})

    server.routes["/v1/blobs/act"] = sequence(status(503), put)
    data = os.urandom(5000)
    c = fast_client(server.url, on_wait=lambda m, s: None)
    digest = c.upload("/v1/blobs/act?exp=1&sig=x", data)
    assert digest == hashlib.sha256(data).hexdigest() and stored[digest] == data
    assert server.count("/v1/blobs/act") == 2


# -- downloads -------------------------------------------------------------------------------------------


def serve_bytes(h: Handler, data: bytes, *, ignore_range=False, cut_at=None, corrupt=False) -> None:
    """A blob endpoint: honours `Range: bytes=N-` unless told not to; can cut the body or flip a byte."""
    start = 0
    rng = h.headers.get("Range")
    if rng and not ignore_range:
        start = int(rng.removeprefix("bytes=").rstrip("-"))
        if start >= len(data):
            h.send_response(416)
            h.send_header("Content-Range", f"bytes */{len(data)}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
    body = bytearray(data[start:])
    if corrupt:
        body[len(body) // 2] ^= 0x01
    h.send_response(206 if start else 200)
    if start:
        h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    h.send_header("Content-Length", str(len(body)))
    h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
    h.end_headers()
    if cut_at is not None:
        h.wfile.write(body[:cut_at])
        h.wfile.flush()
        h.close_connection = True
        h.connection.shutdown(socket.SHUT_RDWR)
        return
    h.wfile.write(body)


@pytest.fixture
def blob():
    data = os.urandom(300_000)
    return data, hashlib.sha256(data).hexdigest()


def test_download_cut_mid_stream_resumes_with_range(server, tmp_path, blob):
    data, digest = blob
    server.routes["/blob"] = sequence(
        lambda h: serve_bytes(h, data, cut_at=100_000), lambda h: serve_bytes(h, data)
    )
    progress: list[int] = []
    c = fast_client(server.url, on_wait=lambda m, s: None)
    out = c.download(
        "/blob", tmp_path / "w.safetensors", digest, len(data), on_progress=lambda n, t: progress.append(n)
    )
    assert out.read_bytes() == data
    assert not (tmp_path / "w.safetensors.part").exists()
    ranges = [h.get("Range") for _, p, h in server.seen if p == "/blob"]
    # What arrived before the cut (up to the last whole chunk) is kept and only the rest is asked for.
    assert ranges[0] is None and len(ranges) == 2
    assert 0 < int(ranges[1].removeprefix("bytes=").rstrip("-")) <= 100_000
    assert server.seen[-1][2]["Accept-Encoding"] == "identity"
    assert progress[-1] == len(data)


def test_download_resumes_a_part_file_left_by_an_earlier_run(server, tmp_path, blob):
    data, digest = blob
    (tmp_path / "w.part").write_bytes(data[:123_456])
    server.routes["/blob"] = lambda h: serve_bytes(h, data)
    fast_client(server.url).download("/blob", tmp_path / "w", digest)
    assert (tmp_path / "w").read_bytes() == data
    assert server.seen[-1][2]["Range"] == "bytes=123456-"


def test_download_server_ignoring_range_starts_over(server, tmp_path, blob):
    data, digest = blob
    (tmp_path / "w.part").write_bytes(data[:50_000])
    server.routes["/blob"] = lambda h: serve_bytes(h, data, ignore_range=True)
    fast_client(server.url).download("/blob", tmp_path / "w", digest, len(data))
    assert (tmp_path / "w").read_bytes() == data
    assert server.count("/blob") == 1 and server.seen[-1][2]["Range"] == "bytes=50000-"


def test_download_416_with_complete_part_verifies_without_refetching(server, tmp_path, blob):
    data, digest = blob
    (tmp_path / "w.part").write_bytes(data)
    server.routes["/blob"] = lambda h: serve_bytes(h, data)
    fast_client(server.url).download("/blob", tmp_path / "w", digest, len(data))
    assert (tmp_path / "w").read_bytes() == data
    assert server.count("/blob") == 1


def test_download_416_with_stale_part_refetches(server, tmp_path, blob):
    data, digest = blob
    (tmp_path / "w.part").write_bytes(os.urandom(len(data)))  # right length, wrong bytes
    server.routes["/blob"] = lambda h: serve_bytes(h, data)
    fast_client(server.url).download("/blob", tmp_path / "w", digest, len(data))
    assert (tmp_path / "w").read_bytes() == data
    assert [h.get("Range") for _, _, h in server.seen] == [f"bytes={len(data)}-", None]


def test_download_corrupt_byte_is_refetched(server, tmp_path, blob):
    data, digest = blob
    server.routes["/blob"] = sequence(
        lambda h: serve_bytes(h, data, corrupt=True), lambda h: serve_bytes(h, data)
    )
    msgs: list[str] = []
    fast_client(server.url, on_wait=lambda m, s: msgs.append(m)).download("/blob", tmp_path / "w", digest)
    assert (tmp_path / "w").read_bytes() == data
    assert server.count("/blob") == 2 and "sha256 mismatch" in msgs[0]


def test_download_always_corrupt_raises_integrity_error(server, tmp_path, blob):
    data, digest = blob
    server.routes["/blob"] = lambda h: serve_bytes(h, data, corrupt=True)
    with pytest.raises(IntegrityError):
        fast_client(server.url, integrity_retries=2).download("/blob", tmp_path / "w", digest)
    assert server.count("/blob") == 2
    assert not (tmp_path / "w").exists() and not (tmp_path / "w.part").exists()


def test_download_cache_hit_makes_no_request(server, tmp_path, blob):
    data, digest = blob
    (tmp_path / "w").write_bytes(data)
    assert fast_client(server.url).download("/blob", tmp_path / "w", digest, len(data)) == tmp_path / "w"
    assert server.seen == []


def test_download_4xx_is_an_api_error(server, tmp_path):
    server.routes["/blob"] = lambda h: h.reply(403, {"detail": "signature expired"})
    with pytest.raises(ApiError, match="signature expired"):
        fast_client(server.url).download("/blob", tmp_path / "w", "0" * 64)


def test_download_waits_while_store_is_down_then_resumes(server, tmp_path, blob):
    data, digest = blob
    server.routes["/blob"] = sequence(
        lambda h: serve_bytes(h, data, cut_at=10_000),
        status(503, {"Retry-After": "0"}),
        lambda h: serve_bytes(h, data),
    )
    msgs: list[str] = []
    fast_client(server.url, on_wait=lambda m, s: msgs.append(m)).download("/blob", tmp_path / "w", digest)
    assert (tmp_path / "w").read_bytes() == data
    assert any("cut off at 0 bytes" in m for m in msgs) and any("HTTP 503" in m for m in msgs)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10**12), st.integers(0, 10**6), st.integers(1, 10**6))
def test_content_range_parses_what_servers_send(start, length, extra):
    end, total = start + length, start + length + extra
    assert parse_content_range(f"bytes {start}-{end}/{total}") == (start, end, total)
    assert parse_content_range(f"bytes */{total}") == (None, None, total)
    assert parse_content_range(f"bytes {end + 1}-{start}/{total}") is None
    assert parse_content_range(f"bytes {start}-{end}/{end}") is None
    assert parse_content_range("items 0-1/2") is None


def test_two_workers_sharing_a_cache_fetch_once(server, tmp_path, blob):
    data, digest = blob

    def slow(h: Handler) -> None:
        h.server.release.wait(0.3)
        serve_bytes(h, data)

    server.routes["/blob"] = slow
    results: list[bytes] = []

    def fetch() -> None:
        results.append(fast_client(server.url).download("/blob", tmp_path / "w", digest).read_bytes())

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [data, data]
    assert server.count("/blob") == 1  # the second waited on the lock, then found a verified file
