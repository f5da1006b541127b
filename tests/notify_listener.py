"""A real sd_notify receiver for tests: what systemd would see on $NOTIFY_SOCKET.

with NotifyListener(tmp_path / "notify") as ln:          # or NotifyListener.abstract()
    env = {**os.environ, "NOTIFY_SOCKET": ln.env_value, "WATCHDOG_USEC": "1000000"}
    ... start `iota join` with env ...
    ln.wait_for("READY=1", timeout=60)
    pings = ln.times("WATCHDOG=1")
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path


class NotifyListener:
    """Binds an AF_UNIX datagram socket and records (monotonic time, field) for every field received."""

    def __init__(self, path: Path | None = None, abstract_name: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract_name is not None:
            self.sock.bind(b"\0" + abstract_name.encode())
            self.env_value = "@" + abstract_name
        else:
            assert path is not None
            self.sock.bind(str(path))
            self.env_value = str(path)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @classmethod
    def abstract(cls) -> NotifyListener:
        return cls(abstract_name=f"iota-test-{os.getpid()}-{time.monotonic_ns()}")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            with self._lock:
                self.messages.extend((now, f) for f in data.decode().split("\n") if f)

    def fields(self) -> list[str]:
        with self._lock:
            return [f for _, f in self.messages]

    def times(self, field: str) -> list[float]:
        with self._lock:
            return [t for t, f in self.messages if f == field]

    def wait_for(self, prefix: str, timeout: float = 5.0) -> str:
        """The first field starting with prefix; AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for f in self.fields():
                if f.startswith(prefix):
                    return f
            time.sleep(0.01)
        raise AssertionError(f"no {prefix!r} within {timeout}s; got {self.fields()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
