"""What pruning folded away: counts and sums of deleted rows, which every reader of those rows adds in.

prune.py deletes finished work rows, old ledger rows and old merge rounds; before it does, it adds them
here in the same transaction, so a run's status (items done per stage), a contributor's credits (by
kind, with the number of entries) and the dashboard's round counts read the same before and after.
One row per (run, what, kind, stage, contributor):

- what "work": done items of a kind on a stage (n);
- what "ledger": a contributor's ledger rows of a kind on a stage (n, credits, tokens);
- what "round": closed merge rounds of a stage (n; kind "closed").

    tallies.add(conn, [Tally("run-1", "work", "forward", 0, "", n=3)])
    tallies.work_done(conn, "run-1")    # {(0, "forward"): 3}
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import BigInteger, Column, Connection, Float, Index, String, Table, func, select, update

from iota_orchestrator import db

tallies = Table(
    "tallies",
    db.metadata,
    Column("run_id", String(64), primary_key=True),
    Column("what", String(8), primary_key=True),  # work | ledger | round
    Column("kind", String(8), primary_key=True),
    Column("stage", db.Int, primary_key=True),
    Column("contributor_id", String(64), primary_key=True),  # ledger: whose rows; else ""
    Column("n", BigInteger, nullable=False, default=0),
    Column("credits", Float, nullable=False, default=0.0),
    Column("tokens", BigInteger, nullable=False, default=0),
    Index("ix_tallies_contributor", "contributor_id", "what"),
)
T = tallies


@dataclass(frozen=True)
class Tally:
    run_id: str
    what: str
    kind: str
    stage: int
    contributor_id: str = ""
    n: int = 0
    credits: float = 0.0
    tokens: int = 0


def add(conn: Connection, items: Iterable[Tally]) -> None:
    """Add each to its row (made at 0 when missing); the caller holds the write lock, so no race."""
    merged: dict[tuple[str, str, str, int, str], Tally] = {}
    for t in items:
        key = (t.run_id, t.what, t.kind, t.stage, t.contributor_id)
        old = merged.get(key)
        if old is not None:
            t = Tally(*key, n=old.n + t.n, credits=old.credits + t.credits, tokens=old.tokens + t.tokens)
        merged[key] = t
    for (run_id, what, kind, stage, cid), t in merged.items():
        where = (
            T.c.run_id == run_id,
            T.c.what == what,
            T.c.kind == kind,
            T.c.stage == stage,
            T.c.contributor_id == cid,
        )
        grown = conn.execute(
            update(T)
            .where(*where)
            .values(n=T.c.n + t.n, credits=T.c.credits + t.credits, tokens=T.c.tokens + t.tokens)
        ).rowcount
        if not grown:
            conn.execute(
                T.insert().values(
                    run_id=run_id, what=what, kind=kind, stage=stage, contributor_id=cid,
                    n=t.n, credits=t.credits, tokens=t.tokens,
                )
            )  # fmt: skip


def work_done(conn: Connection, run_id: str) -> dict[tuple[int, str], int]:
    """(stage, kind) -> done items pruned from the run."""
    rows = conn.execute(select(T.c.stage, T.c.kind, T.c.n).where(T.c.run_id == run_id, T.c.what == "work"))
    return {(int(s), str(k)): int(n) for s, k, n in rows}


def ledger_by_kind(conn: Connection, contributor_id: str) -> dict[str, tuple[float, int]]:
    """kind -> (credits, entries) of the contributor's pruned ledger rows, over every run."""
    rows = conn.execute(
        select(T.c.kind, func.sum(T.c.credits), func.sum(T.c.n))
        .where(T.c.contributor_id == contributor_id, T.c.what == "ledger")
        .group_by(T.c.kind)
    )
    return {str(k): (float(c or 0.0), int(n or 0)) for k, c, n in rows}


def rounds_closed(conn: Connection, run_id: str) -> dict[int, int]:
    """stage -> closed merge rounds pruned from the run."""
    rows = conn.execute(select(T.c.stage, T.c.n).where(T.c.run_id == run_id, T.c.what == "round"))
    return {int(s): int(n) for s, n in rows}
