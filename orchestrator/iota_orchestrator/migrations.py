"""Schema migrations: each moves a database written by an older orchestrator one version forward.

Append only; never edit a released one. db.migrate runs the ones a database lacks, each in its own
transaction: `python -c "from iota_orchestrator.migrations import MIGRATIONS; print(MIGRATIONS)"`.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, Table, inspect, select, text, tuple_
from sqlalchemy.schema import CreateColumn, CreateIndex

from iota_orchestrator.db import (
    Migration,
    assignments,
    audits,
    blobs,
    faults,
    losses,
    merge_contribs,
    merge_parts,
    merge_rounds,
    run_tokenizers,
    work,
)

# Tables defined beside the code that owns them (db.py is full): importing them here registers them in
# db.metadata before db.migrate creates a fresh schema.
from iota_orchestrator.preparing import run_prep
from iota_orchestrator.tallies import tallies


def _add_columns(conn: Connection, table: Table, names: Sequence[str]) -> None:
    """ALTER TABLE ADD COLUMN for each named column of `table` it lacks (rendered by the dialect)."""
    have = {c["name"] for c in inspect(conn).get_columns(table.name)}
    for name in names:
        if name not in have:
            column = CreateColumn(table.c[name]).compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column}"))


def _v3(conn: Connection) -> None:
    _add_columns(conn, assignments, ["lapses"])
    _add_columns(conn, work, ["reason", "avoid"])
    _add_columns(conn, blobs, ["quarantined"])
    if "ix_work_held" not in {i["name"] for i in inspect(conn).get_indexes("work")}:
        held = next(i for i in work.indexes if i.name == "ix_work_held")
        conn.execute(CreateIndex(held))
    faults.create(conn, checkfirst=True)


def _v4(conn: Connection) -> None:
    _add_columns(conn, assignments, ["beat"])
    _add_columns(conn, merge_rounds, ["reducing", "momentum_key"])
    _add_columns(conn, merge_contribs, ["sha256", "step", "ledger_mark", "slices"])
    merge_parts.create(conn, checkfirst=True)
    R, C = merge_rounds, merge_contribs  # a v3 round in flight holds full weights: forget it
    live = select(R.c.run_id, R.c.stage, R.c.epoch).where(R.c.state != "closed")
    conn.execute(C.delete().where(tuple_(C.c.run_id, C.c.stage, C.c.epoch).in_(live)))
    conn.execute(R.delete().where(R.c.state != "closed"))


def _v6(conn: Connection) -> None:
    run_prep.create(conn, checkfirst=True)
    tallies.create(conn, checkfirst=True)


def _v5(conn: Connection) -> None:
    _add_columns(conn, assignments, ["passes", "fails", "vetted_mark"])
    _add_columns(conn, losses, ["contributor_id"])
    audits.create(conn, checkfirst=True)


MIGRATIONS: list[tuple[int, str, Migration]] = [
    (2, "run_tokenizers table", lambda conn: run_tokenizers.create(conn, checkfirst=True)),
    (3, "fault records, claim lapses, item give-back reasons, blob quarantine", _v3),
    (4, "butterfly merge: partitions, outer momentum, counted contribution weights", _v4),
    (5, "validation: audits, standing, the reporter of each loss", _v5),
    (6, "housekeeping: tallies of pruned rows, runs prepared in the background", _v6),
]
