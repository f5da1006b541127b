"""Credits: every accepted pass earns compute-weighted credits, recorded once per work id.

A failed check (standing.py) adds a negative "clawback" row: what was earned since the last vetted item,
plus the penalty.

A forward pass earns `gflops_per_token(stage) * tokens`, a backward pass twice that, and the tail's
forward item (forward, loss and backward at once) three times. Running totals on the contributor and the
assignment make reads cheap; the ledger rows are the record they can be rebuilt from, with the tallies
of the rows pruning folded away (prune.py, tallies.py).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, func, insert, select, update

from iota_orchestrator import db, tallies

BACKWARD_FACTOR = 2.0


def work_credits(gflops_per_token: float, tokens: int, kind: str, is_tail: bool) -> float:
    factor = BACKWARD_FACTOR if kind == "backward" else 1.0 + BACKWARD_FACTOR if is_tail else 1.0
    return round(gflops_per_token * tokens * factor, 6)


C, A = db.contributors, db.assignments
_INSERT = insert(db.ledger)
_ADD_TO_CONTRIBUTOR = (
    update(C).where(C.c.contributor_id == bindparam("cid")).values(credits=C.c.credits + bindparam("add"))
)
_ADD_TO_ASSIGNMENT = (
    update(A)
    .where(A.c.run_id == bindparam("run"), A.c.contributor_id == bindparam("cid"))
    .values(credits=A.c.credits + bindparam("add"))
)


def record(
    conn: Connection,
    run_id: str,
    contributor_id: str,
    work_id: str,
    kind: str,
    stage: int,
    tokens: int,
    credits: float,
    now: float,
) -> int:
    """Write one ledger row and add it to the running totals; its ledger id."""
    row = {
        "run_id": run_id,
        "contributor_id": contributor_id,
        "work_id": work_id,
        "kind": kind,
        "stage": stage,
        "tokens": tokens,
        "credits": credits,
        "t": now,
    }
    ledger_id = int(conn.execute(_INSERT, row).inserted_primary_key[0])  # type: ignore[index]
    conn.execute(_ADD_TO_CONTRIBUTOR, {"cid": contributor_id, "add": credits})
    conn.execute(_ADD_TO_ASSIGNMENT, {"run": run_id, "cid": contributor_id, "add": credits})
    return ledger_id


_TOTAL = select(db.contributors.c.credits).where(db.contributors.c.contributor_id == bindparam("cid"))


def total(conn: Connection, contributor_id: str) -> float:
    row = conn.execute(_TOTAL, {"cid": contributor_id}).first()
    return float(row[0]) if row else 0.0


def totals(conn: Connection, contributor_id: str) -> dict[str, Any]:
    """Totals from the ledger itself, split by kind."""
    L = db.ledger
    rows = conn.execute(
        select(L.c.kind, func.sum(L.c.credits), func.count())
        .where(L.c.contributor_id == contributor_id)
        .group_by(L.c.kind)
    ).all()
    by = tallies.ledger_by_kind(conn, contributor_id)  # rows pruned (prune.py), then the rest
    for k, s, n in rows:
        c, m = by.get(k, (0.0, 0))
        by[k] = (c + float(s or 0.0), m + int(n))
    fwd, bwd, back = (by.get(k, (0.0, 0)) for k in ("forward", "backward", "clawback"))
    return {
        "contributor_id": contributor_id,
        "total": round(fwd[0] + bwd[0] + back[0], 6),
        "forward": round(fwd[0], 6),
        "backward": round(bwd[0], 6),
        "clawed_back": round(-back[0], 6),
        "entries": fwd[1] + bwd[1] + back[1],
    }
