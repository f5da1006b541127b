"""The home-link proxy (iota_cli/swarm/link.py) against tiny echo and sink servers on loopback.

    .venv/bin/python -m pytest tests/test_link.py -q

Timing bounds are loose enough for 2 busy cores but tight enough to catch a delay applied twice, a
delay that serializes throughput, or a cap that is off by a factor.
"""

from __future__ import annotations

import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from iota_cli.swarm.link import Link, LinkProxy


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class Sink(socketserver.BaseRequestHandler):
    """Reads until the client half-closes, then says how many bytes came."""

    def handle(self) -> None:
        n = 0
        while data := self.request.recv(65536):
            n += len(data)
        self.request.sendall(str(n).encode())


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = allow_reuse_address = True


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    yield from serve(Echo)


@pytest.fixture
def sink() -> Iterator[tuple[str, int]]:
    yield from serve(Sink)


def serve(handler: type[socketserver.BaseRequestHandler]) -> Iterator[tuple[str, int]]:
    server = Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    host, port = server.server_address[:2]
    yield str(host), int(port)
    server.shutdown()
    server.server_close()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n and (data := s.recv(n - len(got))):
        got += data
    return got


def test_a_request_through_the_link_takes_one_rtt(echo):
    with LinkProxy(echo, Link(rtt_ms=80)) as proxy, connect(proxy.port) as s:
        rtts = []
        for _ in range(5):
            t = time.monotonic()
            s.sendall(b"ping")
            assert recv_exactly(s, 4) == b"ping"
            rtts.append((time.monotonic() - t) * 1000)
    assert 78 <= statistics.median(rtts) <= 110, rtts


def test_the_delay_costs_latency_not_throughput(echo):
    """64 KiB chunks streamed through a 100 ms rtt: the whole takes about one rtt, not one per chunk."""
    payload = b"x" * (16 * 65536)
    with LinkProxy(echo, Link(rtt_ms=100)) as proxy, connect(proxy.port) as s:
        t = time.monotonic()
        threading.Thread(target=s.sendall, args=(payload,), daemon=True).start()
        assert len(recv_exactly(s, len(payload))) == len(payload)
        took = time.monotonic() - t
    assert 0.095 <= took <= 0.5, took


def send_to_sink(port: int, n: int) -> int:
    with connect(port) as s:
        s.sendall(b"x" * n)
        s.shutdown(socket.SHUT_WR)
        return int(recv_exactly(s, 32))


def test_bandwidth_is_capped(sink):
    n = 500_000  # at 8 Mbit (1 MB/s): 0.5 s
    with LinkProxy(sink, Link(mbit=8)) as proxy:
        t = time.monotonic()
        assert send_to_sink(proxy.port, n) == n
        rate = n / (time.monotonic() - t)
        assert proxy.bytes_up == n and 0 < proxy.bytes_down <= 32
    assert 0.75e6 <= rate <= 1.25e6, rate


def test_connections_share_one_line(sink):
    """Two transfers at once each get about half the line: one home link, not one per connection."""
    n, results = 250_000, []
    with LinkProxy(sink, Link(mbit=8)) as proxy:
        t = time.monotonic()
        threads = [threading.Thread(target=lambda: results.append(send_to_sink(proxy.port, n))) for _ in "ab"]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        took = time.monotonic() - t
    assert results == [n, n]
    assert 0.5 / 1.25 <= took <= 0.5 * 1.25, took


def exchange(port: int, payload: bytes) -> bytes | None:
    """Send payload to the echo server and read it back; None when the connection was reset."""
    try:
        with connect(port) as s:
            threading.Thread(target=s.sendall, args=(payload,), daemon=True).start()
            return recv_exactly(s, len(payload))
    except (ConnectionResetError, BrokenPipeError):
        return None


def test_with_loss_1_every_connection_is_cut(echo):
    payload = b"y" * 200_000  # more than cut_bytes: every cut lands mid-transfer
    with LinkProxy(echo, Link(loss=1.0, seed=3)) as proxy:
        got = [exchange(proxy.port, payload) for _ in range(20)]
        assert proxy.connections == proxy.cuts == 20
    assert all(g is None or len(g) < len(payload) for g in got)
    assert any(g is None for g in got)  # a cut is a reset, not a clean end


def test_with_loss_0_no_connection_is_cut(echo):
    payload = b"z" * 200_000
    with LinkProxy(echo, Link(loss=0.0)) as proxy:
        assert all(exchange(proxy.port, payload) == payload for _ in range(20))
        assert proxy.connections == 20 and proxy.cuts == 0
        assert proxy.bytes_up == proxy.bytes_down == 20 * len(payload)


def test_a_share_of_connections_is_cut_and_a_seed_repeats_it(echo):
    def pattern(seed: int) -> list[bool]:
        with LinkProxy(echo, Link(loss=0.3, seed=seed)) as proxy:
            return [exchange(proxy.port, b"w" * 100_000) != b"w" * 100_000 for _ in range(40)]

    first = pattern(7)
    assert 4 <= sum(first) <= 22, first
    assert pattern(7) == first


def test_a_reset_from_the_server_reaches_the_client():
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, LinkProxy(listener.getsockname()[:2], Link(rtt_ms=20)) as proxy, connect(proxy.port) as s:
        peer, _ = listener.accept()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()
        with pytest.raises(ConnectionResetError):
            s.recv(10)


def test_close_releases_the_port(echo):
    proxy = LinkProxy(echo, Link(rtt_ms=10))
    port = proxy.start()
    with connect(port) as s:
        s.sendall(b"hi")
        assert recv_exactly(s, 2) == b"hi"
        proxy.close()
        assert s.recv(10) == b""  # open connections are closed with it
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    # A server can listen there again (SO_REUSEADDR, as every server sets: the proxy's side of the closed
    # connection may sit in TIME_WAIT on that port).
    socket.create_server(("127.0.0.1", port)).close()


def test_the_command_prints_its_port(echo):
    cmd = [sys.executable, "-m", "iota_cli.swarm.link", "--target", f"{echo[0]}:{echo[1]}", "--rtt-ms", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with connect(port) as s:
            s.sendall(b"hello")
            assert recv_exactly(s, 5) == b"hello"
    finally:
        proc.terminate()
        proc.wait(10)
