"""PostgreSQL: the engine, the write lock every transaction takes first, and the database's clock.

`iota orchestrator serve --database postgresql://user@host:5432/iota` (or IOTA_DATABASE) keeps the state
here instead of the data dir's SQLite file; the URL is mapped to SQLAlchemy's psycopg 3 driver.

Why one lock and not finer ones. Several API replicas share the database, and the scheduler's steps are
read-modify-writes over several tables (a claim reads the worker's held count, the head's samples in
flight and the run's issued count, then inserts a chain and a work row; a complete credits the ledger
and queues the next stage). SQLite runs them one at a time (one writer, and State's in-process lock).
Here every transaction State.tx() opens first takes `pg_advisory_xact_lock(WRITE_LOCK)`, so the same
holds across processes: the lock is held from the transaction's first statement to its commit or
rollback. Under READ COMMITTED (PostgreSQL's default, which we rely on: REPEATABLE READ would take its
snapshot before the lock wait) every later statement of a transaction sees all that the transactions
before it committed, because PostgreSQL makes a commit visible before it releases the transaction's
locks. So the transactions of all replicas run in one serial order, each seeing the one before it
complete: every invariant that holds with one SQLite writer holds here. In particular two replicas can
never both win a claim (the second sees the item claimed, or its claim id already answered), and a
retried submit with the same client-chosen id finds the first one's row. `FOR UPDATE SKIP LOCKED` on
the claimed row alone would not keep the counts above (the pipeline depth, the per-worker limit, the
sample numbering) and would add a second way to be right; the one lock is cheap next to a transaction's
statements (bench/orchestrator_load.py --database URL --replicas N measures both). A replica killed
mid-transaction loses its connection, and PostgreSQL rolls the transaction back and frees the lock.

The same round trip reads clock_timestamp(), the database's time after the lock wait: leases and
deadlines are decided by that one clock (clock.py), never by a replica's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import URL, make_url

WRITE_LOCK = (
    0x696F_7461_0001  # advisory lock keys: per database, so two orchestrators on one server never meet
)
LEADER_LOCK = 0x696F_7461_0002  # the replica that runs the reaper (leader.py)
SETUP_LOCK = 0x696F_7461_0003  # migrations and first-start secrets, once across replicas starting at once
CHANNEL = "iota_wake"  # LISTEN/NOTIFY channel of long-poll wakeups (listen.py)
# OFFSET 0 keeps the subquery a scan of its own, so the time is read only after the lock is granted.
_LOCK_NOW = text(
    "SELECT extract(epoch FROM clock_timestamp())::float8 FROM (SELECT pg_advisory_xact_lock(:k) OFFSET 0) l"
)
_NOW = text("SELECT extract(epoch FROM clock_timestamp())::float8")
# State.read(): status pages and hints read one snapshot and take no lock (a write in one fails).
READ_SNAPSHOT = text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
# A replica stopped (SIGSTOP, a hung disk) while holding the lock would stall every other one: the server
# ends such a transaction. No transaction of ours waits this long between statements.
IDLE_IN_TX_MS = 60_000
LOCK_TIMEOUT_MS = 60_000


def is_url(database: str | None) -> bool:
    return bool(database) and str(database).split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def engine_url(database: str) -> URL:
    """postgresql://, postgres:// or postgresql+psycopg:// -> SQLAlchemy's psycopg 3 URL."""
    url = make_url(database)
    if url.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return url.set(drivername="postgresql+psycopg")
    raise ValueError(f"not a PostgreSQL URL (postgresql://user@host:port/db): {shown(database)}")


def libpq_url(database: str) -> str:
    """The URL for a plain psycopg connection (LISTEN, the leader lease), password included."""
    return engine_url(database).set(drivername="postgresql").render_as_string(hide_password=False)


def shown(database: str) -> str:
    """The URL with its password masked, for messages and logs."""
    try:
        return make_url(database).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable database URL>"


def session_options(sync: str) -> str:
    """libpq `options` for every connection of ours. --sync normal is SQLite's NORMAL here too: a commit
    survives a crashed orchestrator process (it is in the server's WAL buffers), not the server's power
    loss; full waits for the WAL flush (and holds the write lock through it)."""
    commit = "on" if sync == "full" else "off"
    return (
        f"-c synchronous_commit={commit} -c lock_timeout={LOCK_TIMEOUT_MS} "
        f"-c idle_in_transaction_session_timeout={IDLE_IN_TX_MS}"
    )


def open_engine(database: str, sync: str = "normal") -> Engine:
    if sync not in ("normal", "full"):
        raise ValueError("sync must be 'normal' or 'full'")
    return create_engine(
        engine_url(database),
        pool_pre_ping=True,  # a connection the server closed (restart, idle timeout) is replaced, not used
        connect_args={"application_name": "iota-orchestrator", "options": session_options(sync)},
    )


def lock(conn: Connection) -> float:
    """Take the write lock for this transaction (its first statement); the database's time after it."""
    return float(conn.execute(_LOCK_NOW, {"k": WRITE_LOCK}).scalar_one())


def now(conn: Connection) -> float:
    return float(conn.execute(_NOW).scalar_one())


@contextlib.contextmanager
def setup_lock(engine: Engine) -> Iterator[None]:
    """Hold SETUP_LOCK for the block (PostgreSQL; nothing on SQLite): one starting process migrates."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": SETUP_LOCK})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": SETUP_LOCK})
            conn.commit()
