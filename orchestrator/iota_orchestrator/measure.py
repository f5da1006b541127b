"""Throughput as the orchestrator measures it: credited work per second, from a worker's own ledger rows.

Placement (assignment.py) balances stages by this, never by the `throughput` a worker claims when it
registers or asks for an assignment: a claim costs nothing, so a few fake "strong" workers claiming
1e18 would otherwise decide where every honest newcomer lands. Credits are GFLOP of accepted work
(ledger.py), so the rate is GFLOP/s, comparable across stages and runs.

A worker's rate is the credits of its last RECENT_ITEMS accepted items over the time from the oldest
of them to now (that oldest item's own credits are left out: it marks when the span starts). Items
older than WINDOW_S do not count, and a worker with fewer than MIN_ITEMS counted items is unmeasured:
a newcomer, counted as the median of the measured workers it would join (NEWCOMER when there are none),
whatever it claims. The rows come through ix_ledger_contributor (contributor, kind, then rowid), so
the cost is a few index steps per live worker, however long the ledger grows.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

from sqlalchemy import Connection, bindparam, select

from iota_orchestrator import db

RECENT_ITEMS = 32
MIN_ITEMS = 3
WINDOW_S = 600.0
MIN_SPAN_S = 1.0  # items finished in a burst do not make an absurd rate
NEWCOMER = 1.0  # every worker unmeasured: all count the same, so stages balance by count and compute
KINDS = ("forward", "backward")

L = db.ledger
_RECENT = (
    select(L.c.id, L.c.credits, L.c.t)
    .where(L.c.contributor_id == bindparam("cid"), L.c.kind == bindparam("kind"), L.c.t >= bindparam("since"))
    .order_by(L.c.id.desc())
    .limit(RECENT_ITEMS)
)


def rate(conn: Connection, contributor_id: str, now: float) -> float | None:
    """GFLOP/s of the worker's recently credited work, or None while it is unmeasured."""
    rows: list[tuple[int, float, float]] = []
    for kind in KINDS:
        params = {"cid": contributor_id, "kind": kind, "since": now - WINDOW_S}
        rows += [(int(i), float(c), float(t)) for i, c, t in conn.execute(_RECENT, params)]
    rows = sorted(rows, reverse=True)[:RECENT_ITEMS]
    if len(rows) < MIN_ITEMS:
        return None
    _, first_credits, since = rows[-1]  # newest first: the last row is the oldest counted
    done = sum(c for _, c, _ in rows) - first_credits
    return max(done, 0.0) / max(now - since, MIN_SPAN_S)


def rates(conn: Connection, contributor_ids: Iterable[str], now: float) -> dict[str, float]:
    """Each worker's measured rate, a newcomer's being the median of the measured ones."""
    measured = {cid: rate(conn, cid, now) for cid in set(contributor_ids)}
    known = [r for r in measured.values() if r is not None and r > 0]
    newcomer = statistics.median(known) if known else NEWCOMER
    return {cid: newcomer if r is None or r <= 0 else r for cid, r in measured.items()}
