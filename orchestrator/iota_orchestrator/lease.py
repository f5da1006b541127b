"""Heartbeats: renew a worker's lease, record its progress, and tell it what changed.

The reply carries the stage's current weights epoch (newer than the worker's: load them), a merge round
to contribute to, whether the orchestrator wants it to move stage, and samples whose chains were dropped.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, update

from iota_orchestrator import db, merge, scheduler
from iota_orchestrator.errors import Conflict
from iota_orchestrator.runs import RunCtx

A = db.assignments


def heartbeat_s(lease_s: float) -> float:
    return round(min(max(lease_s / 3.0, 0.05), 10.0), 3)


def beat(
    conn: Connection,
    ctx: RunCtx,
    contributor_id: str,
    stage: int,
    step: int,
    epoch: int,
    tokens_per_s: float,
    now: float,
) -> dict[str, Any]:
    a = scheduler.assignment(conn, ctx.run_id, contributor_id)
    if a is None:
        raise Conflict(f"you have no assignment in run {ctx.run_id}; POST /v1/assignment first")
    if a.stage != stage:
        raise Conflict(f"you are assigned to stage {a.stage}, not {stage}; POST /v1/assignment again")
    st = merge.stage_row(conn, ctx.run_id, stage)
    values: dict[str, Any] = {
        "last_seen": now,
        "state": "active",
        "steps": step,
        "epoch": epoch,
        "tokens_per_s": tokens_per_s,
    }
    if epoch == st.epoch and a.sync_epoch != st.epoch:
        # The worker now holds this epoch's weights: count its steps toward the next merge from here.
        values.update(sync_epoch=st.epoch, sync_step=step)
    conn.execute(
        update(A).where(A.c.run_id == ctx.run_id, A.c.contributor_id == contributor_id).values(**values)
    )
    a = scheduler.assignment(conn, ctx.run_id, contributor_id)
    run = conn.execute(db.runs.select().where(db.runs.c.run_id == ctx.run_id)).first()
    offer = merge.offer(conn, ctx, a, now) if run.state == "running" else None
    return {
        "lease_s": ctx.manifest.train.lease_s,
        "epoch": st.epoch,
        "weights_key": st.weights_key,
        "run_state": run.state,
        "merge": offer,
        "reassign": a.reassign_to is not None,
        "drop": scheduler.take_drops(conn, ctx.run_id, contributor_id),
    }
