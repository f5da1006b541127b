"""Durable state: SQLAlchemy Core tables, versioned migrations, and the SQLite (WAL) engine.

Only portable Core constructs are used, so the same tables run on PostgreSQL (postgres.py); every integer
there is 64-bit (Int), as SQLite's are. A fresh database gets
the current schema and is stamped with the latest version; an older one is moved forward by MIGRATIONS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    false,
    insert,
    select,
)
from sqlalchemy.pool import StaticPool

SCHEMA_VERSION = 6
metadata = MetaData()
Int = BigInteger().with_variant(Integer(), "sqlite")  # INTEGER PRIMARY KEY is SQLite's rowid: keep it


def _id(name: str, **kw: Any) -> Column:
    return Column(name, String(64), **kw)


meta = Table("meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text))

runs = Table(
    "runs",
    metadata,
    _id("run_id", primary_key=True),
    Column("name", String(128), nullable=False),
    Column("manifest", Text, nullable=False),  # JSON of RunManifest.to_dict()
    Column("state", String(16), nullable=False),  # running | finished
    Column("created", Float, nullable=False),
    Column("stop_requested", Boolean, nullable=False, default=False),
    Column("final_merge", Float),  # when the closing merge rounds were opened
    Column("finished", Float),
    Column("n_samples_epoch", BigInteger, nullable=False),  # samples one pass over the data yields
    Column("samples_issued", BigInteger, nullable=False, default=0),
    Column("samples_completed", BigInteger, nullable=False, default=0),
    Column("samples_dropped", BigInteger, nullable=False, default=0),
    Column("tokens", BigInteger, nullable=False, default=0),
)

run_files = Table(
    "run_files",
    metadata,
    _id("run_id", primary_key=True),
    Column("idx", Int, primary_key=True),
    Column("path", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("start", BigInteger, nullable=False),  # offset of the file's first token in the run's stream
)

# A run with a tokenizer.json: its fingerprint, EOS, and the encoded stream cached on disk (v2).
run_tokenizers = Table(
    "run_tokenizers",
    metadata,
    _id("run_id", primary_key=True),
    Column("path", Text, nullable=False),  # the tokenizer.json, resolved on the orchestrator's machine
    Column("sha256", String(64), nullable=False),  # of the tokenizer.json the stream was encoded with
    Column("eos_id", Int, nullable=False),
    Column("n_ids", Int, nullable=False),  # the tokenizer's largest id + 1
    Column("cache", Text, nullable=False),  # the flat int32 token file
    Column("cache_sha256", String(64), nullable=False),
    Column("n_tokens", BigInteger, nullable=False),
)

stages = Table(
    "stages",
    metadata,
    _id("run_id", primary_key=True),
    Column("stage", Int, primary_key=True),
    Column("epoch", Int, nullable=False),
    Column("weights_key", Text, nullable=False),
    Column("updated", Float, nullable=False),
)

contributors = Table(
    "contributors",
    metadata,
    _id("contributor_id", primary_key=True),
    Column("name", String(64), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("backend", String(64), nullable=False),
    Column("memory_bytes", BigInteger, nullable=False),
    Column("throughput", Float, nullable=False),
    Column("created", Float, nullable=False),
    Column("credits", Float, nullable=False, default=0.0),
)

assignments = Table(
    "assignments",
    metadata,
    _id("run_id", primary_key=True),
    _id("contributor_id", primary_key=True),
    Column("stage", Int, nullable=False),
    Column("state", String(16), nullable=False),  # active | dropped | left
    Column("assigned", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("steps", BigInteger, nullable=False, default=0),
    Column("epoch", Int, nullable=False, default=0),  # weights epoch the worker reports holding
    Column("sync_epoch", Int, nullable=False, default=-1),  # epoch at which sync_step was taken
    Column("sync_step", BigInteger, nullable=False, default=0),
    Column("tokens_per_s", Float, nullable=False, default=0.0),
    Column("reassign_to", Int),
    Column("credits", Float, nullable=False, default=0.0),
    # Claims that lapsed past their deadline, less completions since (never below 0): while above 0 the
    # worker may hold only one claim at a time (v3).
    Column("lapses", Int, nullable=False, default=0, server_default="0"),
    Column("beat", Float),  # its last heartbeat (v4): the run's end waits for each replica's last step
    # Its standing (v5, standing.py): checks passed and failed, and the ledger id up to which its credits
    # were vetted by a pass (a failed check claws back what it earned after that).
    Column("passes", Int, nullable=False, default=0, server_default="0"),
    Column("fails", Int, nullable=False, default=0, server_default="0"),
    Column("vetted_mark", BigInteger, nullable=False, default=0, server_default="0"),
    Index("ix_assign_run_state", "run_id", "state", "last_seen"),
)

chains = Table(
    "chains",
    metadata,
    _id("run_id", primary_key=True),
    Column("sample_id", BigInteger, primary_key=True),
    Column("data_index", BigInteger, nullable=False),  # position in the corpus (shard * per_shard + k)
    Column("tokens_key", Text, nullable=False),
    Column("tokens_sha", String(64), nullable=False),
    Column("tokens_size", Int, nullable=False),
    _id("head_worker"),
    Column("state", String(16), nullable=False),  # active | done | dropped
    Column("created", Float, nullable=False),
    Column("finished", Float),
    Column("gc", Boolean, nullable=False, default=False),
    Index("ix_chain_head", "run_id", "head_worker", "state"),
    Index("ix_chain_gc", "state", "gc"),
)

work = Table(
    "work",
    metadata,
    Column("id", Int, primary_key=True, autoincrement=True),
    _id("run_id", nullable=False),
    Column("sample_id", BigInteger, nullable=False),
    Column("stage", Int, nullable=False),
    Column("kind", String(8), nullable=False),  # forward | backward
    Column("state", String(8), nullable=False),  # queued | claimed | done | expired | dropped
    _id("route"),  # backward: the only contributor that may claim it
    _id("worker"),  # who claimed it
    _id("claim_id"),  # the client's idempotency key: a retried claim gets the same item back
    Column("forward_id", Int),  # backward: the forward work row on this stage
    Column("input_key", Text),
    Column("output_key", Text),
    Column("created", Float, nullable=False),
    Column("claimed", Float),
    Column("deadline", Float),
    Column("completed", Float),
    Column("credits", Float),
    Column("notify_drop", Boolean, nullable=False, default=False),
    Column("reason", String(16)),  # why an item came back unfinished: a give-back reason, expired, left (v3)
    _id("avoid"),  # a re-issued item goes to others first: who gave it back or let it lapse (v3)
    Index("ix_work_queue", "run_id", "stage", "state", "kind"),
    Index("ix_work_route", "route", "state"),
    Index("ix_work_deadline", "state", "deadline"),
    Index("ix_work_sample", "run_id", "sample_id"),
    Index("ix_work_notify", "worker", "notify_drop"),
    Index("ix_work_claim_id", "worker", "claim_id"),
    Index("ix_work_held", "worker", "state"),  # claims a worker holds (v3)
)

ledger = Table(
    "ledger",
    metadata,
    Column("id", Int, primary_key=True, autoincrement=True),
    _id("run_id", nullable=False),
    _id("contributor_id", nullable=False),
    _id("work_id", nullable=False, unique=True),  # a work item is credited at most once
    Column("kind", String(8), nullable=False),
    Column("stage", Int, nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("credits", Float, nullable=False),
    Column("t", Float, nullable=False),
    Index("ix_ledger_contributor", "contributor_id", "kind"),
)

losses = Table(
    "losses",
    metadata,
    Column("id", Int, primary_key=True, autoincrement=True),
    _id("run_id", nullable=False),
    Column("sample_id", BigInteger, nullable=False),
    Column("loss", Float, nullable=False),
    Column("t", Float, nullable=False),
    _id("contributor_id"),  # the tail that reported it (v5): the run's loss counts vetted tails only
    Index("ix_losses_run", "run_id", "id"),
)

# A check the validator makes (v5, audits.py). kind "work": a sampled forward item, the weights snapshot
# its worker uploaded on request, and (head and body) the backward of the same sample once it is in.
# kind "merge": a replica's update for a round, scored on held-out tokens before the round reduces.
audits = Table(
    "audits",
    metadata,
    Column("id", Int, primary_key=True, autoincrement=True),
    _id("run_id", nullable=False),
    _id("contributor_id", nullable=False),
    Column("kind", String(8), nullable=False, default="work"),
    Column("stage", Int, nullable=False),
    Column("sample_id", BigInteger),  # work: the sample; merge: the held-out corpus sample
    Column("forward_id", Int),  # work: the forward item checked
    Column("backward_id", Int),
    Column("weights_key", Text),  # work: the snapshot blob, once reported; merge: the update blob
    Column("state", String(8), nullable=False),  # weights | backward | ready | taken | passed | failed | void
    Column("created", Float, nullable=False),
    Column("deadline", Float, nullable=False),  # for the snapshot, then for the validator's verdict
    Column("decided", Float),
    Column("ledger_mark", BigInteger, nullable=False),  # the checked item's ledger id (merge: the latest)
    Column("basis", Float, nullable=False),  # the checked item's credits (a failure costs a multiple)
    Column("epoch", Int),  # work: the epoch its worker held (the snapshot's base); merge: the round's
    Column("steps", Int),  # work: the most optimizer steps its weights can be from that base
    Column("loss", Float),  # work: the tail's loss as recomputed; merge: the held-out loss after
    Column("detail", Text),
    Index("ix_audits_state", "state", "id"),
    Index("ix_audits_sample", "run_id", "sample_id"),
    Index("ix_audits_forward", "forward_id"),
)

merge_rounds = Table(
    "merge_rounds",
    metadata,
    _id("run_id", primary_key=True),
    Column("stage", Int, primary_key=True),
    Column("epoch", Int, primary_key=True),  # contributions are at this epoch; the result is epoch + 1
    Column("state", String(8), nullable=False),  # open | reducing | closed (v4; v3 had closing)
    Column("opened", Float, nullable=False),
    Column("deadline", Float, nullable=False),  # the contribute phase closes with whoever is in by then
    Column("closed", Float),
    Column("contributions", Int, nullable=False, default=0),
    Column("reducing", Float),  # when the partitions were fixed; fallback past reducing + timeout_s (v4)
    Column("momentum_key", Text),  # closed (diloco): the outer momentum blob as of epoch + 1 (v4)
)

# A replica's update (pseudo-gradient) for a round: weight = the backward work the orchestrator counted
# for it on the stage since its previous contribution (ledger rows after ledger_mark of that one).
merge_contribs = Table(
    "merge_contribs",
    metadata,
    _id("run_id", primary_key=True),
    Column("stage", Int, primary_key=True),
    Column("epoch", Int, primary_key=True),
    _id("contributor_id", primary_key=True),
    Column("blob_key", Text, nullable=False),
    Column("weight", Float, nullable=False),
    Column("t", Float, nullable=False),
    Column("sha256", String(64)),  # of the update blob (v4)
    Column("step", BigInteger),  # the replica's optimizer step when it took the update (v4)
    Column("ledger_mark", BigInteger),  # the largest ledger id counted into weight (v4)
    Column("slices", Text),  # JSON: sha256 of the blob's byte range of each partition, once fixed (v4)
)

# The partitions of a reducing or closed round (v4): two owners each, the first valid result wins and the
# second is compared with it (agreed; issue 13 acts on a disagreement).
merge_parts = Table(
    "merge_parts",
    metadata,
    _id("run_id", primary_key=True),
    Column("stage", Int, primary_key=True),
    Column("epoch", Int, primary_key=True),
    Column("part", Int, primary_key=True),
    Column("start", BigInteger, nullable=False),
    Column("stop", BigInteger, nullable=False),
    Column("owners", Text, nullable=False),  # JSON list of contributor ids
    Column("momentum_sha", String(64)),  # of this range of the epoch-E momentum blob (None: zeros)
    Column("result_key", Text),  # the accepted part blob, sent by first_by ("orchestrator": fallback)
    Column("result_sha", String(64)),
    _id("first_by"),
    _id("second_by"),
    Column("second_sha", String(64)),
    Column("agreed", Boolean),  # None until a second result came
    Column("published_sha", String(64)),  # of this range of the published epoch E+1 weights
)

blobs = Table(
    "blobs",
    metadata,
    Column("key", String(512), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("created", Float, nullable=False),
    # Sealed once accepted (a completed result, a recorded merge contribution, or made here): a sealed
    # blob never changes; an unsealed upload may be replaced by a corrected one.
    Column("sealed", Boolean, nullable=False, default=False),
    # Its bytes on disk no longer hash to sha256: never served again (410), the file is gone (v3).
    Column("quarantined", Boolean, nullable=False, default=False, server_default=false()),
)

# What each contributor did wrong in a run, by kind (rejected, bad_output, expired), for operators and for
# the validation and credit work that follows (v3).
faults = Table(
    "faults",
    metadata,
    _id("run_id", primary_key=True),
    _id("contributor_id", primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("count", Int, nullable=False, default=0),
    Column("last", Float, nullable=False),
    Column("detail", Text),  # the latest one's
)

Migration = Callable[[Connection], None]


class SchemaError(RuntimeError):
    """The database was written by a newer orchestrator, or a migration failed."""


def open_engine(path: Path, sync: str = "normal") -> Engine:
    """A single-connection SQLite engine in WAL mode; callers serialise access (see state.py)."""
    if sync not in ("normal", "full"):
        raise ValueError("sync must be 'normal' or 'full'")
    engine = create_engine(
        f"sqlite:///{path}",
        poolclass=StaticPool,
        connect_args={"check_same_thread": False, "timeout": 30},
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a killed process (the WAL is in the OS cache); FULL also survives
        # power loss at the price of an fsync per commit.
        cur.execute(f"PRAGMA synchronous={sync.upper()}")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    return engine


def schema_version(conn: Connection) -> int:
    row = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).first()
    return int(row[0]) if row else 0


def migrate(engine: Engine, migrations: Sequence[tuple[int, str, Migration]] | None = None) -> int:
    """Bring the schema to the newest version (migrations.MIGRATIONS); return the version now in place."""
    if migrations is None:
        from iota_orchestrator.migrations import MIGRATIONS  # it imports these tables

        migrations = MIGRATIONS
    latest = max([SCHEMA_VERSION, *(v for v, _, _ in migrations)])
    with engine.begin() as conn:
        meta.create(conn, checkfirst=True)
        current = schema_version(conn)
        if current > latest:
            raise SchemaError(f"database schema v{current} is newer than this orchestrator (v{latest})")
        if current == 0:
            metadata.create_all(conn)
            set_meta(conn, "schema_version", str(latest))
            return latest
    for version, what, fn in sorted(migrations, key=lambda m: m[0]):
        if version <= current:
            continue
        with engine.begin() as conn:
            try:
                fn(conn)
            except Exception as e:
                raise SchemaError(f"migration v{version} ({what}) failed: {e}") from e
            set_meta(conn, "schema_version", str(version))
    return latest


def get_meta(conn: Connection, key: str) -> str | None:
    row = conn.execute(select(meta.c.value).where(meta.c.key == key)).first()
    return row[0] if row else None


def set_meta(conn: Connection, key: str, value: str) -> None:
    if get_meta(conn, key) is None:
        conn.execute(insert(meta).values(key=key, value=value))
    else:
        conn.execute(meta.update().where(meta.c.key == key).values(value=value))
