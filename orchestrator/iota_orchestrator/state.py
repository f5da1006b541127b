"""The orchestrator's shared state: settings, the database, the blob store, the write lock, wakeups.

One process owns the SQLite file, and every transaction runs under one lock (SQLite has a single writer
anyway), so the scheduler's read-modify-write steps never interleave. The event loop never waits for
that lock: request handlers reach the database only through `await state.with_db(fn, ...)` or
`await state.in_tx(fn)`, which run fn on the loop at once when the lock is free and otherwise await
its release by the thread that holds it (a reaper tick), so every other request, long-polling claims
included, carries on meanwhile.

Why not a worker thread for the database: sqlite3 releases the GIL on every statement, and a thread
must then win it back from the busy loop each time, so its transactions take several times as long
and the server loses throughput: bench/orchestrator_load.py --workers 100 measured 15-25% fewer
requests/s with one or four threads (anyio or an executor, any GIL switch interval, sync "normal" or
"full"). A transaction in the OS cache is about a millisecond of CPU on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, TypeVarTuple

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import OperationalError

from iota_orchestrator import auth, datadir, db, ratelimit
from iota_orchestrator.blobs import BlobStore, open_store
from iota_orchestrator.wakeups import Wakeups

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    sync: str = "normal"  # "full": fsync every commit and blob (survives power loss, slower)
    tick_s: float = 1.0  # how often leases, deadlines and merge rounds are checked
    max_json_bytes: int = 1 << 20
    max_params: int = 1_000_000_000  # largest model a run may ask for (weights are made here)
    url_ttl_s: float = 6 * 3600
    # Registrations per client address (ratelimit.py): a burst, then this many a second (<= 0: no limit).
    register_burst: int = 20
    register_rate: float = 2.0
    invite: str | None = field(default=None, repr=False)  # required to register when set (invites.py)
    # s3://bucket[/prefix]: blobs on an object store (s3blobs.py); None: files in data_dir (dirblobs.py).
    blob_store: str | None = None


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
        self.registrations = ratelimit.RateLimiter(config.register_burst, config.register_rate)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._loop_holds = False  # the loop holds the lock, taken by with_db
        self._freed = asyncio.Event()  # set (on the loop) whenever another thread lets go of the lock

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve from this event loop (call it on the loop): wakeups fire on it, tx() never blocks it."""
        self.wake.loop = self._loop = loop
        self._loop_thread = threading.get_ident()
        self._freed = asyncio.Event()

    async def with_db(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """fn(*args), which uses tx(), on the loop once the lock is free; never blocks the loop on it."""
        while not self.lock.acquire(blocking=False):
            self._freed.clear()
            if self.lock.acquire(blocking=False):  # let go between the two looks: no wakeup will come
                break
            await self._freed.wait()
        self._loop_holds = True
        try:
            return fn(*args)  # synchronous: no other coroutine runs while the loop holds the lock
        finally:
            self._loop_holds = False
            self.lock.release()

    async def in_tx(self, fn: Callable[[Connection], T]) -> T:
        """fn(conn) in one transaction (see with_db)."""
        return await self.with_db(self._in_tx, fn)

    def _in_tx(self, fn: Callable[[Connection], T]) -> T:
        with self.tx() as conn:
            return fn(conn)

    @contextlib.contextmanager
    def tx(self) -> Iterator[Connection]:
        """One transaction under the write lock; commits on success, rolls back on error."""
        on_loop = threading.get_ident() == self._loop_thread
        if on_loop and not self._loop_holds:
            raise RuntimeError(
                "the event loop would wait for the database lock; use `await state.in_tx(...)`"
            )
        try:
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
        finally:
            if not on_loop:
                self._let_loop_know()

    def _let_loop_know(self) -> None:
        """Wake coroutines waiting in with_db for the lock this thread just let go of."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
                loop.call_soon_threadsafe(self._freed.set)

    def close(self) -> None:
        with self.lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self.engine.dispose()


@dataclass(frozen=True)
class Opened:
    state: State
    admin_token_file: Path | None  # where the admin token made at this start was written (print the path)


def open_state(config: ServerConfig, admin_from_env: str | None = None, rotate_admin: bool = False) -> Opened:
    """Open (or create) the data dir: migrate the database, set up secrets, give live workers grace.

    Raises DataDirError (one line, no traceback) when the data dir or its database cannot be used.
    """
    datadir.prepare(config.data_dir)
    engine = db.open_engine(config.data_dir / datadir.DATABASE, config.sync)
    token_file = None
    try:
        db.migrate(engine)
        with engine.begin() as conn:
            changes = rotate_admin or db.get_meta(conn, auth.ADMIN_KEY) is None
            token = auth.ensure_admin(conn, admin_from_env, rotate_admin)
            secret = auth.ensure_secret(conn)
            if token is not None:  # in the transaction: a token nobody could read is never stored
                token_file = datadir.write_admin_token(config.data_dir, token)
            elif changes:  # set from IOTA_ADMIN_TOKEN: a file from before would hold a stale token
                datadir.forget_admin_token(config.data_dir)
        datadir.secure_files(config.data_dir)
        blobs = open_store(  # the directory store, or an object store (blobs.py)
            config.blob_store, config.data_dir, secret, fsync=config.sync == "full", ttl_s=config.url_ttl_s
        )
        state = State(config, engine, blobs)
        from iota_orchestrator import lease

        with state.tx() as conn:
            lease.grant_restart_grace(conn, time.time())
    except (OperationalError, db.SchemaError, OSError, datadir.DataDirError) as e:
        engine.dispose()
        raise _unusable(config.data_dir, e) from None
    return Opened(state, token_file)


def _unusable(data_dir: Path, e: Exception) -> datadir.DataDirError:
    if isinstance(e, datadir.DataDirError):
        return e
    if isinstance(e, OSError):
        return datadir.failure(data_dir, "open the database", e)
    reason = str(e.orig) if isinstance(e, OperationalError) else str(e)
    return datadir.DataDirError(f"data dir {data_dir}: cannot open the database: {reason}", "full" in reason)
