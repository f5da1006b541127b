"""A loopback TCP proxy that behaves like a home internet link: delay, a bandwidth cap and cut connections.

`tc netem` needs a kernel module and root that CI and laptops lack, so a swarm test or bench puts one of
these in front of the orchestrator and gives each worker the proxy's address instead. Stdlib only: an
asyncio loop in a background thread.

    with LinkProxy(("127.0.0.1", 8700), Link(rtt_ms=100, loss=0.01, mbit=50)) as proxy:
        print(proxy.port, proxy.bytes_up, proxy.bytes_down, proxy.cuts)

or, for people, `python -m iota_cli.swarm.link --target 127.0.0.1:8700 --rtt-ms 100 --loss 0.01 --mbit 50`
(prints the port it listens on, runs until Ctrl-C).

What the settings mean:
- rtt_ms: every chunk, in each direction, is forwarded rtt_ms/2 after it arrived (a request and its
  reply see one rtt_ms). The delay is a timestamp, not a sleep before the next read, so it costs
  latency and never throughput. The TCP handshake itself is not delayed (the kernel accepts it).
- mbit: the link's capacity in each direction, shared by all its connections (one home line, not one
  line per connection); 0 is unlimited. The proxy reads no faster than the line drains, so a sender
  is held back by TCP backpressure as on a real line, not by an ever-growing buffer in the proxy.
- loss: the share of TCP connections that are cut. Each accepted connection is doomed or not, at
  accept time, by a seeded RNG: with loss=0.01 one connection in a hundred (not 1% of packets or of
  requests: a client that keeps its connections alive sees fewer cuts per request). A doomed connection
  is reset (RST both ways, SO_LINGER 0) after a random number of bytes, uniform in [0, cut_bytes), have
  passed in either direction, or a random time, uniform in [0, cut_s), after it opened, whichever comes
  first; one that ends on its own before then is reset at its end (its last bytes may never arrive).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any

CHUNK = 64 * 1024  # at 50 Mbit a chunk is 10 ms on the line: fine-grained enough for pacing
QUEUE_CHUNKS = 1024  # a bound on what one direction holds in flight when the line is unlimited


@dataclass(frozen=True)
class Link:
    rtt_ms: float = 0.0
    loss: float = 0.0  # the probability that a connection is cut (see the module docstring)
    mbit: float = 0.0  # per direction, shared by every connection; 0 = unlimited
    seed: int = 0
    cut_bytes: int = 64 * 1024  # a doomed connection is cut within this many bytes...
    cut_s: float = 5.0  # ...or within this many seconds of opening, whichever is first

    def __post_init__(self) -> None:
        if self.rtt_ms < 0 or self.mbit < 0 or not 0 <= self.loss <= 1:
            raise ValueError(f"need rtt_ms >= 0, mbit >= 0 and 0 <= loss <= 1: {self}")
        if self.cut_bytes < 1 or self.cut_s <= 0:
            raise ValueError(f"need cut_bytes >= 1 and cut_s > 0: {self}")


class Pacer:
    """One direction of the line: bytes leave one after another at the line's rate, whoever sends them."""

    def __init__(self, mbit: float) -> None:
        self.s_per_byte = 8 / (mbit * 1e6) if mbit > 0 else 0.0
        self.free_at = 0.0  # when the line has sent everything handed to it so far

    def reserve(self, n: int, now: float) -> float:
        """Hand n bytes to the line at now; when their last byte is on the wire."""
        if not self.s_per_byte:
            return now
        # No credit for idle time: a burst after a pause still goes at the line's rate.
        self.free_at = max(now, self.free_at) + n * self.s_per_byte
        return self.free_at


class _Conn:
    """Both halves of one proxied connection, and whether (and when) it is to be cut."""

    def __init__(self, proxy: LinkProxy, cut_at: int | None) -> None:
        self.proxy, self.cut_at = proxy, cut_at
        self.passed = 0  # bytes forwarded, both directions
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.over = False

    def admit(self, data: bytes) -> bytes:
        """The part of data that may pass before the cut point (all of it when not doomed)."""
        if self.cut_at is not None:
            data = data[: max(0, self.cut_at - self.passed)]
        self.passed += len(data)
        return data

    @property
    def cut_due(self) -> bool:
        return self.cut_at is not None and self.passed >= self.cut_at

    def end(self, reset: bool) -> None:
        """Close both sockets; with reset, as an RST (SO_LINGER 0 discards what is unsent)."""
        if self.over:
            return
        self.over = True
        for w in self.writers:
            if reset:
                sock = w.get_extra_info("socket")
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()
            else:
                w.close()
        current = asyncio.current_task()
        for t in self.tasks:
            if t is not current:
                t.cancel()

    def cut(self) -> None:
        if not self.over:
            self.proxy.cuts += 1
        self.end(reset=True)


class LinkProxy:
    """Listens on 127.0.0.1 (an OS-chosen port unless port is given) and forwards to target over `link`."""

    def __init__(self, target: tuple[str, int], link: Link, port: int = 0) -> None:
        self.target, self.link, self.port = target, link, port
        self.bytes_up = 0  # client -> target, forwarded
        self.bytes_down = 0  # target -> client, forwarded
        self.connections = 0  # accepted
        self.cuts = 0  # reset by the proxy on purpose (not resets that came from either end)
        self._rng = random.Random(link.seed)
        self._up, self._down = Pacer(link.mbit), Pacer(link.mbit)
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> int:
        """Start listening (in a background thread); the port."""
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"link-proxy->{self.target}", daemon=True
        )
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._listen(), loop).result(10)
        except BaseException:
            self._stop_loop()
            raise
        return self.port

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop listening, drop every connection, stop the thread; the port is free when this returns."""
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._stop_loop()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.end(reset=False)
        if self._handlers:  # let each handler finish, so the loop stops with no task pending
            await asyncio.wait(list(self._handlers), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    def _stop_loop(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> LinkProxy:
        if self._loop is None:
            self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        if (me := asyncio.current_task()) is not None:
            self._handlers.add(me)
        link, rng = self.link, self._rng
        # Decided here, in accept order, so a seed replays the same pattern of cuts for the same traffic.
        doomed = link.loss > 0 and rng.random() < link.loss
        cut_at = rng.randrange(link.cut_bytes) if doomed else None
        cut_after_s = rng.uniform(0, link.cut_s)
        conn = _Conn(self, cut_at)
        conn.writers.append(client_w)
        self._conns.add(conn)
        timer = None
        try:
            try:
                target_r, target_w = await asyncio.open_connection(*self.target)
            except OSError:
                conn.end(reset=True)  # as a refused connection looks through a real line: a reset
                return
            conn.writers.append(target_w)
            if doomed:
                timer = asyncio.get_running_loop().call_later(cut_after_s, conn.cut)
            conn.tasks = [
                asyncio.ensure_future(self._pipe(client_r, target_w, self._up, conn, "bytes_up")),
                asyncio.ensure_future(self._pipe(target_r, client_w, self._down, conn, "bytes_down")),
            ]
            # One direction may end cleanly (a half-close) while the other goes on; a failed one (a
            # reset from either end) ends both, as it would end the connection on a real line.
            await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = any(not t.cancelled() and t.done() and t.exception() for t in conn.tasks)
            if doomed and not failed:
                conn.cut()  # both directions ended before the cut point: cut at its end
            else:
                conn.end(reset=failed)
        finally:
            if timer is not None:
                timer.cancel()
            conn.end(reset=True)  # only if still open: cancelled by close(), or an error above
            self._conns.discard(conn)
            self._handlers.discard(asyncio.current_task())  # type: ignore[arg-type]

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, line: Pacer, conn: _Conn, counter: str
    ) -> None:
        """One direction: a reader that stamps each chunk with its delivery time, a writer that keeps it."""
        loop = asyncio.get_running_loop()
        one_way = self.link.rtt_ms / 2000
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(QUEUE_CHUNKS)  # None: a reset

        async def read() -> None:
            while True:
                try:
                    data = await src.read(CHUNK)
                except OSError:  # a reset from the sender: it reaches the receiver one way later
                    await queue.put((loop.time() + one_way, None))
                    return
                now = loop.time()
                if not data:
                    await queue.put((now + one_way, b""))  # the FIN travels the line like data
                    return
                sent = line.reserve(len(data), now)
                await queue.put((sent + one_way, data))
                if sent > now:  # read no faster than the line sends: backpressure to the sender
                    await asyncio.sleep(sent - now)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                at, data = await queue.get()
                if (wait := at - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    raise ConnectionResetError(f"reset by the peer ({counter})")
                if not data:
                    if dst.can_write_eof():
                        dst.write_eof()
                    return
                data = conn.admit(data)
                # Counted first: the write may hand the bytes to a reader in another thread at once.
                setattr(self, counter, getattr(self, counter) + len(data))
                dst.write(data)
                if conn.cut_due:
                    conn.cut()
                    return
                await dst.drain()
        finally:
            reader.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await reader


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m iota_cli.swarm.link", description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True, help="HOST:PORT to forward to, e.g. 127.0.0.1:8700")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (default: one the OS picks)")
    ap.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time added, in ms")
    ap.add_argument("--loss", type=float, default=0.0, help="share of connections cut (0..1)")
    ap.add_argument("--mbit", type=float, default=0.0, help="bandwidth each way, Mbit/s (0: unlimited)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    link = Link(rtt_ms=args.rtt_ms, loss=args.loss, mbit=args.mbit, seed=args.seed)
    proxy = LinkProxy((host or "127.0.0.1", int(port)), link, port=args.port)
    print(proxy.start(), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.close()
        print(
            f"connections {proxy.connections}, cut {proxy.cuts}, "
            f"up {proxy.bytes_up} B, down {proxy.bytes_down} B",
            flush=True,
        )


if __name__ == "__main__":
    main()
