"""Who did what wrong: per-contributor fault counts in a run, and the claim limit they earn.

Kinds: `rejected` (a result or merge contribution the server refused), `bad_output` (a later stage
reported this contributor's output as bad input), `expired` (a claim lapsed past its deadline). A lapse
also raises the assignment's `lapses` balance, which each completion lowers again; while it is above 0
the contributor may hold one claim at a time instead of `train.max_claims_per_worker`, and from 2 up none
for a back-off after its latest lapse (see claim_limit).

A refusal is an error the request answers with, so its fault must be recorded in a transaction of its
own (the request's transaction rolls back): raise Rejected, and the endpoint charges it (see api/work.py).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, func, insert, select, update

from iota_cli.core.manifest import TrainConfig
from iota_orchestrator import db
from iota_orchestrator.errors import Invalid

F, A = db.faults, db.assignments
LAPSES = ("expired", "rejected")  # faults that cost claims: a lapsed claim, a refused result
DETAIL_CHARS = 300


class Rejected(Invalid):
    """A contributor's upload or report was refused (422); `charge` it to them once the request ends."""

    def __init__(self, detail: str, run_id: str) -> None:
        super().__init__(detail)
        self.run_id = run_id


def charge(conn: Connection, run_id: str, contributor_id: str, kind: str, detail: str, now: float) -> None:
    """Count one fault of this kind against a contributor in a run."""
    key = (F.c.run_id == run_id, F.c.contributor_id == contributor_id, F.c.kind == kind)
    values = {"last": now, "detail": detail[:DETAIL_CHARS]}
    if conn.execute(update(F).where(*key).values(count=F.c.count + 1, **values)).rowcount == 0:
        conn.execute(
            insert(F).values(run_id=run_id, contributor_id=contributor_id, kind=kind, count=1, **values)
        )


def lapse(
    conn: Connection, run_id: str, contributor_id: str, detail: str, now: float, kind: str = "expired"
) -> None:
    """A claim of this contributor passed its deadline (or its result was refused: kind "rejected"): a
    fault, and fewer claims until it delivers (see claim_limit)."""
    charge(conn, run_id, contributor_id, kind, detail, now)
    conn.execute(
        update(A)
        .where(A.c.run_id == run_id, A.c.contributor_id == contributor_id)
        .values(lapses=A.c.lapses + 1)
    )


_DELIVERED = (
    update(A)
    .where(A.c.run_id == bindparam("run"), A.c.contributor_id == bindparam("cid"), A.c.lapses > 0)
    .values(lapses=A.c.lapses - 1)
)


def delivered(conn: Connection, run_id: str, contributor_id: str) -> None:
    """A completed item earns back one lapse."""
    conn.execute(_DELIVERED, {"run": run_id, "cid": contributor_id})


_LAST_LAPSE = select(func.max(F.c.last)).where(
    F.c.run_id == bindparam("run"), F.c.contributor_id == bindparam("cid"), F.c.kind.in_(LAPSES)
)


def claim_limit(conn: Connection, train: TrainConfig, assignment: Any, now: float) -> int:
    """How many claims this worker may hold at once: fewer while its claims lapse more than it delivers.

    A newcomer holds one claim until it has delivered something (a hoarder's first grab is then one item).
    One lapse too many: one claim at a time. Two or more (one, before any delivery): none at all for a
    while after the latest, doubling with each (a hoarder would otherwise hold an item per deadline
    forever); the wait ends by itself, so an honest machine that slept gets work again.
    """
    proven = assignment.credits > 0
    if assignment.lapses <= 0:
        return train.max_claims_per_worker if proven else 1
    if assignment.lapses >= (2 if proven else 1):
        args = {"run": assignment.run_id, "cid": assignment.contributor_id}
        last = conn.execute(_LAST_LAPSE, args).scalar()
        bench = train.work_timeout_s * 2 ** min(assignment.lapses - 1, 6)
        if last is not None and now - last < bench:
            return 0
    return 1


def by_contributor(conn: Connection, run_id: str) -> dict[str, dict[str, int]]:
    """{contributor_id: {kind: count}} for a run."""
    out: dict[str, dict[str, int]] = {}
    for cid, kind, count in conn.execute(
        select(F.c.contributor_id, F.c.kind, F.c.count).where(F.c.run_id == run_id)
    ):
        out.setdefault(cid, {})[kind] = int(count)
    return out
