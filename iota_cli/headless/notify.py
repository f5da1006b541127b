"""sd_notify without dependencies: tell systemd we are ready, alive, what we are doing, and stopping.

The worker loop creates one `Notifier.from_env()` and calls `watchdog()` every iteration: pings are
rate-limited to half of $WATCHDOG_USEC, and because they come from the loop itself (never a helper
thread), a hung loop stops pinging and systemd restarts it. Everything is a no-op when $NOTIFY_SOCKET
is unset, so the same code runs in a terminal.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def socket_address(value: str) -> str | bytes | None:
    """$NOTIFY_SOCKET as an AF_UNIX address: '@name' is abstract ('\\0name'); None if unusable."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:... and relative paths: not ours to handle


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC, as sd_watchdog_enabled advises); None: disabled."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner and owner != str(pid):  # set for our parent and inherited: not meant for us
        return None
    return usec / 2 / 1e6


class Notifier:
    """Sends sd_notify datagrams; every method returns whether a datagram went out."""

    def __init__(
        self,
        address: str | bytes | None,
        watchdog_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.watchdog_s = watchdog_s if address is not None else None
        self._clock = clock
        self._last_ping: float | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, unset: bool = False) -> Notifier:
        """Read NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID; unset=True hides them from child processes."""
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.debug("ignoring unsupported NOTIFY_SOCKET=%s", raw)
        notifier = cls(address, watchdog_interval(env, os.getpid()))
        if unset and env is os.environ:
            for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(var, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of newline-separated KEY=VALUE fields. Failures are logged, never raised."""
        if self.address is None or not fields:
            return False
        data = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall(data)
        except OSError as e:
            log.debug("sd_notify failed: %s", e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        self._last_ping = self._clock()  # READY=1 also starts systemd's watchdog clock
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        """Call every loop iteration: pings when half the watchdog interval has passed since the last."""
        if self.watchdog_s is None:
            return False
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self.watchdog_s:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop (a weights download, a large checkpoint)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))
