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

On PostgreSQL (ServerConfig.database, postgres.py) the same lock still orders this process's
transactions, and each also takes the database's write lock, which orders them with every other
replica's. There a transaction mostly waits (on the network, on another replica's lock), so with_db
runs fn on one database thread of its own and the loop carries on meanwhile; wakeups reach the other
replicas through NOTIFY (listen.py), and time is the database's (clock.py). What only reads (status
pages, the 204's hint) may use `read()` / `await state.in_read(fn)`: a snapshot without the write lock.

    opened = open_state(config)            # one process: prepare() then connect()
    prepare(config); state = connect(config)   # several replicas: prepare once, then one each
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import OperationalError

from iota_orchestrator import auth, clock, datadir, db, postgres, ratelimit
from iota_orchestrator.blobs import BlobStore, open_store
from iota_orchestrator.wakeups import Poke, Wakeups

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    # postgresql://user@host:port/db (postgres.py); None: SQLite in data_dir. Not in repr: a password.
    database: str | None = field(default=None, repr=False)
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
        self.poke = Poke()  # wakes the reaper early (a merge round may close)
        self.shared = engine.dialect.name == "postgresql"  # other replicas may share the database
        self._db_thread = ThreadPoolExecutor(1, "iota-db") if self.shared else None
        self._read_thread = ThreadPoolExecutor(1, "iota-read") if self.shared else None
        self._read_lock = threading.Lock()
        self._read_conn: Connection | None = None
        self._bus: Any = None  # listen.Bus, while attached on PostgreSQL
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
        if self.shared and self._bus is None and self.config.database:
            from iota_orchestrator.listen import Bus

            self._bus = Bus(self.config.database, self.wake, self.poke)
            self._bus.start()

    async def with_db(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """fn(*args), which uses tx(), on the loop once the lock is free; never blocks the loop on it."""
        if self._db_thread is not None:
            return await asyncio.get_running_loop().run_in_executor(
                self._db_thread, functools.partial(fn, *args)
            )
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

    async def in_read(self, fn: Callable[[Connection], T]) -> T:
        """fn(conn), which only reads, in read(): a status page never holds up the swarm's writes."""
        if self._read_thread is None:
            return await self.in_tx(fn)
        return await asyncio.get_running_loop().run_in_executor(self._read_thread, self._in_read, fn)

    def _in_read(self, fn: Callable[[Connection], T]) -> T:
        with self.read() as conn:
            return fn(conn)

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction. On PostgreSQL: a snapshot on a connection of its own, without the write
        lock (one consistent view, as of its first statement; a write in it fails); on SQLite: tx()."""
        if not self.shared:
            with self.tx() as conn:
                yield conn
            return
        with self._read_lock:
            if self._read_conn is None:
                self._read_conn = self.engine.connect()
            conn = self._read_conn
            try:
                with conn.begin():
                    conn.execute(postgres.READ_SNAPSHOT)
                    yield conn
            except BaseException:
                if conn.invalidated:
                    self._read_conn = None
                    conn.close()
                raise

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
                        if self.shared:
                            with clock.frozen_at(postgres.lock(conn)):
                                yield conn
                        else:
                            yield conn
                except BaseException:
                    if conn.invalidated:  # the connection broke: the next transaction opens another
                        self._conn = None
                        conn.close()
                    elif conn.in_transaction():
                        conn.rollback()
                    raise
        finally:
            if not on_loop and not self.shared:  # on PostgreSQL with_db never waits for the lock
                self._let_loop_know()

    def _let_loop_know(self) -> None:
        """Wake coroutines waiting in with_db for the lock this thread just let go of."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
                loop.call_soon_threadsafe(self._freed.set)

    def close(self) -> None:
        if self._bus is not None:
            self._bus.close()
            self._bus = None
        for pool in (self._db_thread, self._read_thread):
            if pool is not None:
                pool.shutdown(wait=True)
        with self._read_lock:
            if self._read_conn is not None:
                self._read_conn.close()
                self._read_conn = None
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
    """prepare() then connect(): what one serving process does at start."""
    token_file = prepare(config, admin_from_env, rotate_admin)
    return Opened(connect(config), token_file)


def open_engine(config: ServerConfig) -> Engine:
    if config.database:
        return postgres.open_engine(config.database, config.sync)
    return db.open_engine(config.data_dir / datadir.DATABASE, config.sync)


def prepare(
    config: ServerConfig, admin_from_env: str | None = None, rotate_admin: bool = False
) -> Path | None:
    """Once a start, before anything serves: the data dir, migrations, the admin token and the URL secret,
    a full lease for live workers. Returns where an admin token made here was written.

    Raises DataDirError (one line, no traceback) when the data dir or its database cannot be used.
    """
    from iota_orchestrator import lease

    datadir.prepare(config.data_dir)
    token_file = None
    engine = open_engine(config)
    try:
        with postgres.setup_lock(engine):  # replicas started on several hosts at once migrate once
            db.migrate(engine)
            with engine.begin() as conn:
                now = postgres.lock(conn) if config.database else time.time()
                changes = rotate_admin or db.get_meta(conn, auth.ADMIN_KEY) is None
                token = auth.ensure_admin(conn, admin_from_env, rotate_admin)
                auth.ensure_secret(conn)
                if token is not None:  # in the transaction: a token nobody could read is never stored
                    token_file = datadir.write_admin_token(config.data_dir, token)
                elif changes:  # set from IOTA_ADMIN_TOKEN: a file from before would hold a stale token
                    datadir.forget_admin_token(config.data_dir)
                lease.grant_restart_grace(conn, now)
        datadir.secure_files(config.data_dir)
    except (OperationalError, db.SchemaError, OSError, datadir.DataDirError) as e:
        raise _unusable(config, e) from None
    finally:
        engine.dispose()
    return token_file


def connect(config: ServerConfig) -> State:
    """The State one serving process uses, on a database prepare() readied."""
    engine = open_engine(config)
    try:
        with engine.begin() as conn:
            secret = auth.ensure_secret(conn)
        blobs = open_store(  # the directory store, or an object store (blobs.py)
            config.blob_store, config.data_dir, secret, fsync=config.sync == "full", ttl_s=config.url_ttl_s
        )
    except (OperationalError, OSError, datadir.DataDirError) as e:
        engine.dispose()
        raise _unusable(config, e) from None
    return State(config, engine, blobs)


def _unusable(config: ServerConfig, e: Exception) -> datadir.DataDirError:
    if isinstance(e, datadir.DataDirError):
        return e
    if isinstance(e, OSError):
        return datadir.failure(config.data_dir, "open the database", e)
    reason = str(e.orig) if isinstance(e, OperationalError) else str(e)
    if config.database:
        where = f"database {postgres.shown(config.database)}"
        return datadir.DataDirError(f"{where}: cannot use it: {reason.strip()}", transient=True)
    return datadir.DataDirError(
        f"data dir {config.data_dir}: cannot open the database: {reason}", "full" in reason
    )
