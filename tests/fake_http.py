"""A scriptable HTTP/1.1 server on 127.0.0.1 for client tests: routes are functions of the request.

s = Server(); s.routes["/v1/health"] = ok({"status": "ok"}); ...; s.stop()
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from iota_cli.train.client import Client

Route = Callable[["Handler"], None]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def _dispatch(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(n) if n else b""
        path = self.path.split("?")[0]
        self.server.seen.append((self.command, path, dict(self.headers)))
        self.server.bodies.append(self.body)
        route = self.server.routes.get(path)
        if route is None:
            self.reply(404, {"detail": f"no route {path}"})
        else:
            route(self)

    do_GET = do_POST = do_PUT = _dispatch

    def reply(self, status: int, obj: object = None, headers: dict[str, str] | None = None) -> None:
        body = b"" if obj is None else json.dumps(obj).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if obj is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.routes: dict[str, Route] = {}
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.bodies: list[bytes] = []
        self.release = threading.Event()  # ends every stalled handler at teardown
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address) -> None:  # cut connections are the point here
        pass

    def count(self, path: str) -> int:
        return sum(1 for _, p, _ in self.seen if p == path)

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fast_client(base: str, **kw) -> Client:
    """Backoff in tens of milliseconds so the whole file runs in seconds."""
    kw.setdefault("backoff", (0.05, 0.2))
    kw.setdefault("retries", 1)
    kw.setdefault("retry_backoff", 0.01)
    kw.setdefault("timeout", (1.0, 2.0))
    return Client(base, **kw)


def sequence(*steps: Route) -> Route:
    """A route that plays steps in order, then repeats the last one."""
    calls = iter(steps)
    last: list[Route] = []

    def route(h: Handler) -> None:
        step = next(calls, None) or last[0]
        last[:] = [step]
        step(h)

    return route


def ok(obj: object) -> Route:
    return lambda h: h.reply(200, obj)


def status(code: int, headers: dict[str, str] | None = None) -> Route:
    return lambda h: h.reply(code, {"detail": f"status {code}"}, headers)
