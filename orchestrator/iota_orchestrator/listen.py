"""Long-poll wakeups across replicas: NOTIFY on PostgreSQL, one listening connection in each replica.

A complete on replica A makes work that a claim long-polling on replica B waits for. A's Wakeups.notify
fires A's own waiters and queues the keys here; a publisher thread sends them with `pg_notify` on a
connection of its own (batching what queued meanwhile). notify is only ever called after the transaction
that made the work committed, so B never looks before the work is there. B's listener thread, LISTENing
on its own connection, fires the keys on B's loop. A replica skips what it sent itself (it fired those
already). The reaper's early wake (State.poke) travels the same way as the key POKE. A listener that
lost its connection reconnects and wakes every waiter once, so whatever it missed meanwhile is looked
for again; a waiter never depends on one message alone beyond its own long-poll timeout.

    bus = Bus(database_url, state.wake, state.poke); bus.start(); ...; bus.close()
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid

import psycopg

from iota_orchestrator import postgres
from iota_orchestrator.wakeups import Poke, Wakeups

log = logging.getLogger("iota_orchestrator")
POKE = "!poke"
MAX_PAYLOAD = 7000  # NOTIFY payloads must stay under 8000 bytes
RETRY_S = 1.0


class Bus:
    def __init__(self, database: str, wake: Wakeups, poke: Poke) -> None:
        self.dsn = postgres.libpq_url(database)
        self.wake, self.poke = wake, poke
        self.origin = uuid.uuid4().hex[:12]  # this replica, so it skips its own notifications
        self.outbox: queue.SimpleQueue[list[str] | None] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.listening = threading.Event()  # set while the listener is connected (tests wait for it)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.wake.publish = self.outbox.put
        self.poke.publish = lambda: self.outbox.put([POKE])
        for name, target in (("iota-listen", self._listen), ("iota-notify", self._publish)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def close(self, timeout: float = 5.0) -> None:
        self.wake.publish = self.poke.publish = None
        self.stopping.set()
        self.outbox.put(None)
        for t in self._threads:
            t.join(timeout)

    def payloads(self, keys: set[str]) -> list[str]:
        """origin, then keys, one a line, cut into notifications under MAX_PAYLOAD bytes."""
        out, lines, size = [], [self.origin], len(self.origin)
        for k in sorted(keys):
            if size + len(k) + 1 > MAX_PAYLOAD and len(lines) > 1:
                out.append("\n".join(lines))
                lines, size = [self.origin], len(self.origin)
            lines.append(k)
            size += len(k) + 1
        return [*out, "\n".join(lines)] if len(lines) > 1 else out

    def _publish(self) -> None:
        conn: psycopg.Connection | None = None
        while True:
            first = self.outbox.get()
            if first is None:
                break
            keys, stop = set(first), False
            while not stop:  # what queued meanwhile goes in the same notifications
                try:
                    more = self.outbox.get_nowait()
                except queue.Empty:
                    break
                stop = more is None
                keys.update(more or ())
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, application_name="iota-notify")
                for payload in self.payloads(keys):
                    conn.execute("SELECT pg_notify(%s, %s)", (postgres.CHANNEL, payload))
            except psycopg.Error as e:  # the other replicas' long-polls still end on their own timeout
                log.warning("cannot send wakeups to the other replicas: %s", e)
                if conn is not None:
                    conn.close()
                conn = None
            if stop:
                break
        if conn is not None:
            conn.close()

    def _listen(self) -> None:
        first = True
        while not self.stopping.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, application_name="iota-listen") as conn:
                    conn.execute(f"LISTEN {postgres.CHANNEL}")
                    self.listening.set()
                    if not first:  # what was sent while we were away: every waiter looks again
                        self.wake.fire(["*"])
                        self.poke.set_here()
                    first = False
                    while not self.stopping.is_set():
                        for n in conn.notifies(timeout=0.5):
                            self._deliver(n.payload)
            except psycopg.Error as e:
                self.listening.clear()
                if not self.stopping.is_set():
                    log.warning("lost the wakeup listener's connection (%s); reconnecting", e)
                    time.sleep(RETRY_S)
        self.listening.clear()

    def _deliver(self, payload: str) -> None:
        origin, _, rest = payload.partition("\n")
        if origin == self.origin or not rest:
            return
        keys = rest.split("\n")
        if POKE in keys:
            self.poke.set_here()
            keys.remove(POKE)
        self.wake.fire(keys)
