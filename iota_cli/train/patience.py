"""How the client waits out a server that is down or busy, one operation at a time.

Capped exponential backoff with jitter; the server's Retry-After as a floor; an overall deadline
(`Client.max_wait_s`); a report of every wait through `Client.on_wait` (the progress line, the journal);
and the stop event, which ends any wait at once. client.py makes one Patience per request or download.
See the delays: python -c "from iota_cli.train.patience import *; b = Backoff(); print(b.next(), b.next())"
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iota_cli.train.errors import Stopped, Unreachable

if TYPE_CHECKING:
    from iota_cli.train.client import Client

log = logging.getLogger("iota.client")


@dataclass
class Backoff:
    """Capped exponential backoff with jitter: base, 2*base, 4*base ... up to cap, each scaled by 0.5-1."""

    base: float = 1.0
    cap: float = 30.0
    attempt: int = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return delay * random.uniform(0.5, 1.0)


class Patience:
    """One operation's waiting: backoff, the max_wait_s deadline, on_wait reports and the stop event."""

    def __init__(self, client: Client, wait: bool) -> None:
        self.client, self.allowed = client, wait
        self.backoff = Backoff(*client.backoff)
        self.first_failure: float | None = None
        self.server_errors = 0

    def wait(self, why: str, hint: float | None = None) -> None:
        c = self.client
        if c.stop.is_set():
            raise Stopped(f"{why} (stopping)")
        if not self.allowed:
            raise Unreachable(why)
        now = time.monotonic()
        self.first_failure = self.first_failure or now
        delay = self.backoff.next()
        if hint is not None:  # Retry-After is a floor, plus a little jitter so replicas spread out
            delay = hint + random.uniform(0, 0.1 * hint + 0.05)
        if c.max_wait_s is not None:
            left = self.first_failure + c.max_wait_s - now
            if left <= 0:
                raise Unreachable(f"{why}; gave up after {c.max_wait_s:g} s")
            delay = min(delay, left)
        message = f"{why}, retrying in {_secs(delay)}"
        if c.on_wait is not None:
            c.on_wait(message, delay)
        else:
            log.warning(message)
        if c.stop.wait(delay):
            raise Stopped(f"{why} (stopping)")

    def progress(self) -> None:
        """Something worked: the next failure starts the backoff (and the deadline) afresh."""
        self.backoff.attempt, self.first_failure, self.server_errors = 0, None, 0


def _secs(s: float) -> str:
    return f"{s:.0f} s" if s >= 1.5 else f"{s:.1f} s"
