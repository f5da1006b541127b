"""The orchestrator's shared state: settings, the database, the blob store, the write lock, wakeups.

One process owns the SQLite file, and every transaction runs under one lock (SQLite has a single writer
anyway), so the scheduler's read-modify-write steps never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine

from iota_orchestrator import auth, db
from iota_orchestrator.blobs import BlobStore


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    sync: str = "normal"  # "full": fsync every commit and blob (survives power loss, slower)
    tick_s: float = 1.0  # how often leases, deadlines and merge rounds are checked
    max_json_bytes: int = 1 << 20
    max_params: int = 1_000_000_000  # largest model a run may ask for (weights are made here)
    url_ttl_s: float = 6 * 3600


class Wakeups:
    """Lets a long-polling claim sleep until work may be there; notify() is safe from any thread."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiters: dict[str, set[asyncio.Event]] = defaultdict(set)

    def register(self, keys: Iterable[str]) -> asyncio.Event:
        ev = asyncio.Event()
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
        if keys and self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._fire, keys)

    def _fire(self, keys: list[str]) -> None:
        for k in keys:
            for ev in self.waiters.pop(k, ()):
                ev.set()


class State:
    def __init__(self, config: ServerConfig, engine: Engine, blobs: BlobStore) -> None:
        self.config = config
        self.engine = engine
        self.blobs = blobs
        self.lock = threading.RLock()
        self.wake = Wakeups()
        self.poke = threading.Event()  # wakes the reaper early (a merge round may close)
        self._conn: Connection | None = None
        self.token_cache: dict[str, str] = {}  # token sha256 -> contributor id (tokens never change)

    @contextlib.contextmanager
    def tx(self) -> Iterator[Connection]:
        """One transaction under the write lock; commits on success, rolls back on error."""
        with self.lock:
            if self._conn is None:
                self._conn = self.engine.connect()
            conn = self._conn
            try:
                with conn.begin():
                    yield conn
            except BaseException:
                if conn.in_transaction():
                    conn.rollback()
                raise

    def close(self) -> None:
        with self.lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self.engine.dispose()


@dataclass(frozen=True)
class Opened:
    state: State
    admin_token: str | None  # set when it was generated now (print it once)


def open_state(config: ServerConfig, admin_from_env: str | None = None, rotate_admin: bool = False) -> Opened:
    """Open (or create) the data dir: migrate the database, set up secrets, give live workers grace."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    engine = db.open_engine(config.data_dir / "orchestrator.sqlite3", config.sync)
    db.migrate(engine)
    with engine.begin() as conn:
        token = auth.ensure_admin(conn, admin_from_env, rotate_admin)
        secret = auth.ensure_secret(conn)
    blobs = BlobStore(config.data_dir / "blobs", secret, fsync=config.sync == "full", ttl_s=config.url_ttl_s)
    state = State(config, engine, blobs)
    from iota_orchestrator import lease

    with state.tx() as conn:
        lease.grant_restart_grace(conn, time.time())
    return Opened(state, token)
