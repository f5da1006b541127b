"""The worker's heartbeat thread: renews the lease every heartbeat_s and keeps the latest news.

The loop takes the news between items (`take`); `wake` sends a beat now (a merge round came due, or the
loop is ending). A missed beat is logged and the next one follows; nothing here touches the backend.

    python -c "from iota_cli.train.heartbeats import Heartbeats; help(Heartbeats)"
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from iota_cli.core.protocol import Heartbeat, HeartbeatReply
from iota_cli.train.api import SwarmApi
from iota_cli.train.errors import ClientError, Stopped

log = logging.getLogger("iota.worker")


class Heartbeats:
    """Beats from a thread of its own, each built by `make` at send time (so it carries the latest step)."""

    def __init__(self, api: SwarmApi, interval_s: float, make: Callable[[], Heartbeat]) -> None:
        self.api, self.interval_s, self.make = api, max(0.2, interval_s), make
        self._news: HeartbeatReply | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()  # ends the thread (the api's stop is the user's)
        self._wake = threading.Event()  # beat now
        self._thread = threading.Thread(target=self._run, name="iota-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def take(self) -> HeartbeatReply | None:
        """The news of the latest beat not yet taken."""
        with self._lock:
            news, self._news = self._news, None
        return news

    def close(self) -> None:
        self._done.set()
        self._wake.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while not (self.api.stop.is_set() or self._done.is_set()):
            try:
                news = self.api.heartbeat(self.make())
                with self._lock:
                    self._news = news
            except Stopped:
                return
            except ClientError as e:
                log.debug("heartbeat missed: %s", e)
            self._wake.wait(self.interval_s)
            self._wake.clear()
