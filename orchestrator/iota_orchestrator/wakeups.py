"""Wakeups: a long-polling claim sleeps on the event loop until work may be there for it.

Whoever makes work (a completed item, a requeue, a reaper tick) calls `notify(keys)`, from any thread;
a claim registers for its keys, looks for work once more (so nothing made meanwhile is missed) and
awaits the event. The waiter sets are only ever touched on the loop (notify hands the firing over
with call_soon_threadsafe), so they need no lock.

With several replicas (PostgreSQL) the claim may wait on another process: `publish`, set by listen.py,
also sends the keys to every replica (NOTIFY), whose listener calls `fire` (no re-publishing) there.

    wake = Wakeups(); wake.loop = asyncio.get_running_loop()
    ev = wake.register(keys); ...look for work...; await ev.wait(); wake.unregister(keys, ev)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable


class Wakeups:
    """Events for claims waiting on keys: register/unregister on the loop, notify from any thread."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self.closing = False  # the server is shutting down: long-polls answer now instead of waiting
        self.publish: Callable[[list[str]], None] | None = None  # to the other replicas (listen.py)

    def close(self) -> None:
        """Wake every waiter now, for good (on the loop, as shutdown begins): a long-poll still waiting
        when the graceful-shutdown timeout ends would be cancelled mid-request and log a traceback."""
        self.closing = True
        for events in list(self.waiters.values()):
            for ev in events:
                ev.set()
        self.waiters.clear()

    def register(self, keys: Iterable[str]) -> asyncio.Event:
        ev = asyncio.Event()
        if self.closing:
            ev.set()
            return ev
        for k in keys:
            self.waiters[k].add(ev)
        return ev

    def unregister(self, keys: Iterable[str], ev: asyncio.Event) -> None:
        for k in keys:
            s = self.waiters.get(k)
            if s is not None:
                s.discard(ev)
                if not s:
                    del self.waiters[k]

    def notify(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys and self.publish is not None:
            self.publish(keys)
        self.fire(keys)

    def fire(self, keys: list[str]) -> None:
        """Wake this process's waiters on keys (from any thread); `["*"]` wakes every waiter."""
        if keys and self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
                self.loop.call_soon_threadsafe(self._fire, keys)

    def _fire(self, keys: list[str]) -> None:
        if keys == ["*"]:  # notifications may have been missed (the listener reconnected): look again
            keys = list(self.waiters)
        for k in keys:
            for ev in self.waiters.pop(k, ()):
                ev.set()


class Poke(threading.Event):
    """State.poke: wakes the reaper early (a merge round may close). With several replicas only the leader
    runs the reaper, so `publish` (listen.py) tells every replica; `set_here` is the listener's own."""

    def __init__(self) -> None:
        super().__init__()
        self.publish: Callable[[], None] | None = None

    def set(self) -> None:
        super().set()
        if self.publish is not None:
            self.publish()

    def set_here(self) -> None:
        super().set()
