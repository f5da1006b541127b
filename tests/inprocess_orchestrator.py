"""The real orchestrator inside the test process: create_app on a real State, uvicorn in a thread.

Starting in-process takes milliseconds where a child process takes a second, and the test can reach
the State (its blob files, say) directly. `unavailable` answers 503 to the requests it names, as an
overloaded proxy or blob store would, so a client's waiting can be driven by a real server.

    with InProcessOrchestrator(tmp_path / "orch", admin_token="t") as orch:
        SwarmApi.connect(orch.url).runs()
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from iota_orchestrator.app import create_app
from iota_orchestrator.serve import bind, url_for
from iota_orchestrator.state import ServerConfig, State, open_state


class Unavailable:
    """ASGI middleware before the app: 503 (Retry-After 1) to every (method, path prefix) in `closed`; a
    prefix may hold `*` wildcards (fnmatch: "/v1/work/*/complete")."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.closed: set[tuple[str, str]] = set()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and any(
            scope["method"] == m and fnmatch.fnmatchcase(scope["path"], p + "*") for m, p in set(self.closed)
        ):
            headers = [(b"retry-after", b"1"), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)


class InProcessOrchestrator:
    def __init__(self, data_dir: Path, admin_token: str, tick_s: float = 0.1, **settings: Any) -> None:
        # settings: other ServerConfig fields (register_burst, register_rate, invite, ...)
        # IOTA_DATABASE, as `iota orchestrator serve` reads it: tests run on PostgreSQL with --database.
        settings.setdefault("database", os.environ.get("IOTA_DATABASE") or None)
        # IOTA_BLOB_STORE too (s3://..., with the store's keys in the environment): blobs on an object store.
        settings.setdefault("blob_store", os.environ.get("IOTA_BLOB_STORE") or None)
        self.config = ServerConfig(data_dir=Path(data_dir), tick_s=tick_s, **settings)
        self.admin_token = admin_token
        self.url = ""
        self.state: State | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.unavailable: set[tuple[str, str]] = set()

    def start(self) -> InProcessOrchestrator:
        self.state = open_state(self.config, self.admin_token).state
        gate = Unavailable(create_app(self.state))
        gate.closed = self.unavailable
        sock = bind("127.0.0.1", 0)  # the real server's socket options (TCP_NODELAY on accepted sockets)
        self.url = url_for("127.0.0.1", sock.getsockname()[1])
        config = uvicorn.Config(
            gate, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=2
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="orchestrator", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process orchestrator did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)

    def __enter__(self) -> InProcessOrchestrator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def until(predicate, timeout: float = 15.0, what: str = "condition"):
    """Poll predicate until it returns something truthy (and return that), or fail the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
