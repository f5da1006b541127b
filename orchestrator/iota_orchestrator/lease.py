"""Leases: heartbeats renew them, silence past lease_s drops a worker, and a restart grants grace.

The reply carries the stage's current weights epoch (newer than the worker's: load them), what to do
for the stage's merge round (contribute an update, or reduce partitions it owns: rounds.offer), whether
the orchestrator wants it to move stage, and samples whose chains were dropped.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from iota_cli.core.manifest import RunManifest
from iota_cli.core.protocol import Heartbeat, HeartbeatReply, RunState
from iota_orchestrator import db, faults, merge, rounds, standing
from iota_orchestrator.blobs import BlobStore
from iota_orchestrator.chains import A, W, assignment, drop_chain, give_back, work_id
from iota_orchestrator.errors import Conflict
from iota_orchestrator.runs import RunCtx


def heartbeat_s(lease_s: float) -> float:
    return round(min(max(lease_s / 3.0, 0.05), 10.0), 3)


_TOUCH = (
    update(A)
    .where(
        A.c.run_id == bindparam("run"), A.c.contributor_id == bindparam("cid"), A.c.state != standing.BANNED
    )
    .values(last_seen=bindparam("now"), state="active")
)
_RUN_STATE = select(db.runs.c.state).where(db.runs.c.run_id == bindparam("run"))
_DROPS = select(W.c.id, W.c.sample_id).where(
    W.c.worker == bindparam("cid"), W.c.notify_drop.is_(True), W.c.run_id == bindparam("run")
)


def touch(conn: Connection, run_id: str, contributor_id: str, now: float) -> None:
    """A worker that talks to us is alive: renew its lease (and revive it if it had been dropped)."""
    conn.execute(_TOUCH, {"run": run_id, "cid": contributor_id, "now": now})


def run_state(conn: Connection, run_id: str) -> RunState:
    return conn.execute(_RUN_STATE, {"run": run_id}).scalar_one()


def beat(
    conn: Connection, ctx: RunCtx, blobs: BlobStore, contributor_id: str, hb: Heartbeat, now: float
) -> HeartbeatReply:
    """Renew the lease and record the worker's progress; the reply is what it should do next."""
    a = assignment(conn, ctx.run_id, contributor_id)
    if a is None:
        raise Conflict(f"you have no assignment in run {ctx.run_id}; POST /v1/assignment first")
    standing.refuse_banned(a)
    if a.stage != hb.stage:
        raise Conflict(f"you are assigned to stage {a.stage}, not {hb.stage}; POST /v1/assignment again")
    st = merge.stage_row(conn, ctx.run_id, hb.stage)
    values: dict[str, Any] = {"steps": hb.step, "epoch": hb.epoch, "tokens_per_s": hb.tokens_per_s}
    sync_epoch, sync_step = a.sync_epoch, a.sync_step
    if hb.epoch == st.epoch and sync_epoch < st.epoch:
        # The worker now holds this epoch's weights. Its reported steps only tell the run's end whether a
        # final round is due (rounds.final_pending); rounds open from counted work (rounds.offer).
        sync_epoch, sync_step = st.epoch, hb.step
        values.update(sync_epoch=sync_epoch, sync_step=sync_step)
    values["beat"] = now
    conn.execute(
        update(A).where(A.c.run_id == ctx.run_id, A.c.contributor_id == contributor_id).values(**values)
    )
    touch(conn, ctx.run_id, contributor_id, now)
    state = run_state(conn, ctx.run_id)
    offer = None
    if state == "running":
        offer = rounds.offer(conn, ctx, blobs, st, contributor_id, hb.epoch, a, now)
    return HeartbeatReply(
        lease_s=ctx.manifest.train.lease_s,
        epoch=st.epoch,
        weights=merge.stage_weights(conn, blobs, st),
        run_state=state,
        merge=offer,
        reassign=a.reassign_to is not None,
        drop=take_drops(conn, ctx.run_id, contributor_id),
    )


def grant_restart_grace(conn: Connection, now: float) -> None:
    """After a restart, give live workers a full lease and claimed items a full timeout from now."""
    conn.execute(update(A).where(A.c.state == "active", A.c.last_seen < now).values(last_seen=now))
    for run in conn.execute(select(db.runs.c.run_id, db.runs.c.manifest).where(db.runs.c.state == "running")):
        m = RunManifest.from_dict(json.loads(run.manifest))
        timeout, merge_s = m.train.work_timeout_s, m.merge.timeout_s
        conn.execute(
            update(W)
            .where(W.c.run_id == run.run_id, W.c.state == "claimed", W.c.deadline < now + timeout)
            .values(deadline=now + timeout)
        )
        R = db.merge_rounds
        conn.execute(
            update(R)
            .where(R.c.run_id == run.run_id, R.c.state == "open", R.c.deadline < now + merge_s)
            .values(deadline=now + merge_s)
        )
        # Owners re-poll their plan after a restart: give them a whole reducing phase before the fallback.
        conn.execute(
            update(R)
            .where(R.c.run_id == run.run_id, R.c.state == "reducing", R.c.reducing < now)
            .values(reducing=now)
        )


def release(conn: Connection, ctx: RunCtx, contributor_id: str, now: float, new_state: str) -> set[str]:
    """A worker leaves or is dropped: re-issue its forward work, discard backward work routed to it."""
    keys: set[str] = set()
    for row in conn.execute(
        select(W).where(
            W.c.run_id == ctx.run_id,
            W.c.worker == contributor_id,
            W.c.state == "claimed",
            W.c.kind == "forward",
        )
    ).all():
        keys |= give_back(conn, ctx, row, "left", now)
    for row in conn.execute(
        select(W.c.sample_id).where(
            W.c.run_id == ctx.run_id, W.c.route == contributor_id, W.c.state.in_(("queued", "claimed"))
        )
    ).all():
        keys |= drop_chain(conn, ctx, row.sample_id, now)
    conn.execute(
        update(A)
        .where(A.c.run_id == ctx.run_id, A.c.contributor_id == contributor_id)
        .values(state=new_state)
    )
    return keys


def expire(conn: Connection, ctx: RunCtx, now: float) -> set[str]:
    """Drop workers silent past their lease; give back items past their deadline (a lapse of their
    worker's: see faults.py), to be re-issued (forward) or dropped (backward)."""
    keys: set[str] = set()
    lease = ctx.manifest.train.lease_s
    silent = conn.execute(
        select(A.c.contributor_id).where(
            A.c.run_id == ctx.run_id, A.c.state == "active", A.c.last_seen < now - lease
        )
    ).all()
    for (cid,) in silent:
        keys |= release(conn, ctx, cid, now, "dropped")
    late = conn.execute(
        select(W).where(W.c.state == "claimed", W.c.deadline < now, W.c.run_id == ctx.run_id)
    ).all()
    for row in late:
        faults.lapse(conn, ctx.run_id, row.worker, f"{work_id(row.id)} passed its deadline", now)
        keys |= give_back(conn, ctx, row, "expired", now)
    return keys


def take_drops(conn: Connection, run_id: str, contributor_id: str) -> list[int]:
    """Sample ids whose chains were dropped since this worker last asked (it frees their saved state)."""
    rows = conn.execute(_DROPS, {"cid": contributor_id, "run": run_id}).all()
    if rows:
        conn.execute(update(W).where(W.c.id.in_([r.id for r in rows])).values(notify_drop=False))
    return sorted({r.sample_id for r in rows})
