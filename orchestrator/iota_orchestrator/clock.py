"""Time for leases and deadlines: the database's clock on PostgreSQL, so every replica reads the same one.

On SQLite (one process) it is this machine's clock. On PostgreSQL each State.tx() reads the database's
time as it takes the write lock (postgres.lock), and `now()` inside that transaction returns it: every
timestamp a transaction writes or compares is the same instant of the one clock, and a later transaction
never reads an earlier time. Outside a transaction (a reaper tick deciding what is due) `now()` is this
machine's clock corrected by the offset last measured against the database's.

    t = clock.now()          # anywhere
    t = clock.now_of(conn)   # read the database's clock now (PostgreSQL), or this machine's (SQLite)
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from sqlalchemy import Connection

_tx = threading.local()  # .t: the database time of the transaction this thread is in
_offset = 0.0  # database clock - this machine's, as last measured


def now() -> float:
    t: float | None = getattr(_tx, "t", None)
    return t if t is not None else time.time() + _offset


def now_of(conn: Connection) -> float:
    """The database's time (PostgreSQL), or this machine's (SQLite)."""
    if conn.dialect.name != "postgresql":
        return time.time()
    from iota_orchestrator import postgres

    return observe(postgres.now(conn))


def observe(database_time: float) -> float:
    """Note the database's time just read (it corrects now() outside transactions); return it."""
    global _offset
    _offset = database_time - time.time()
    return database_time


@contextlib.contextmanager
def frozen_at(t: float) -> Iterator[None]:
    """now() is t in this thread for the block: one transaction's instant."""
    before = getattr(_tx, "t", None)
    _tx.t = observe(t)
    try:
        yield
    finally:
        _tx.t = before
