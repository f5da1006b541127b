"""Aborting a run: an operator's way to finish it now, whatever is in flight and whoever is left.

A stopped run finishes once its pipeline drains (reaper.finish_check); that needs workers. Abort does
not: in one transaction every active chain is dropped with its queued and claimed items, open merge
rounds are closed unmerged (the weights merged so far stay), and the run becomes `finished`. Workers
learn it from their next heartbeat or claim (a long-polling claim is woken at once) and exit; a result
for a dropped item then gets 409. It reads no run data, so it works when the run's corpus or tokenizer
is gone, which is when an operator may need it most. It is set-wise: a few statements, however many
chains are in flight, while every request waits for the lock.
"""

from __future__ import annotations

from sqlalchemy import Connection, func, select, update

from iota_orchestrator import db
from iota_orchestrator.chains import stage_key, worker_key
from iota_orchestrator.runs import get_run

R, C, W, M = db.runs, db.chains, db.work, db.merge_rounds


def abort(conn: Connection, run_id: str, now: float) -> set[str]:
    """Finish run_id now (a finished run is left as it is); return the claims' wakeup keys."""
    run = get_run(conn, run_id)  # NotFound for an unknown run
    if run.state == "finished":
        return set()
    in_flight = (C.c.run_id == run_id) & (C.c.state == "active")
    dropped = conn.execute(select(func.count()).select_from(C).where(in_flight)).scalar_one()
    conn.execute(update(C).where(in_flight).values(state="dropped", finished=now))
    pending = W.c.state.in_(("queued", "claimed"))
    conn.execute(update(W).where(W.c.run_id == run_id, pending).values(state="dropped"))
    conn.execute(
        update(M).where(M.c.run_id == run_id, M.c.state != "closed").values(state="closed", closed=now)
    )
    conn.execute(
        update(R)
        .where(R.c.run_id == run_id)
        .values(
            state="finished",
            finished=now,
            stop_requested=True,
            samples_dropped=R.c.samples_dropped + dropped,
        )
    )
    stages = conn.execute(select(db.stages.c.stage).where(db.stages.c.run_id == run_id)).scalars()
    workers = conn.execute(
        select(db.assignments.c.contributor_id).where(db.assignments.c.run_id == run_id)
    ).scalars()
    return {stage_key(run_id, s) for s in stages} | {worker_key(cid) for cid in workers}
