"""Stage assignment: fit a worker's memory, balance measured throughput across stages, stay sticky.

A stage's capacity is the summed throughput of its live workers divided by its compute per token; the
slowest stage bounds the swarm, so a newcomer joins the stage with the least capacity that fits it.
Throughput here is what the orchestrator measured from each worker's credited work (measure.py); the
figure a worker claims is stored for display and decides nothing.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, insert, select, update

from iota_orchestrator import chains, db, lease, measure, standing
from iota_orchestrator.errors import Conflict, Invalid
from iota_orchestrator.runs import RunCtx

A, CT = db.assignments, db.contributors
MIN_THROUGHPUT = 1e-6  # a worker measured at (almost) nothing still counts as a worker


def capacities(conn: Connection, ctx: RunCtx, now: float | None = None) -> tuple[list[float], list[int]]:
    """Capacity (measured throughput per GFLOP/token) and live worker count of every stage."""
    cap, count = [0.0] * ctx.n_stages, [0] * ctx.n_stages
    rows = conn.execute(
        select(A.c.stage, A.c.contributor_id).where(A.c.run_id == ctx.run_id, A.c.state == "active")
    ).all()
    rate = measure.rates(conn, (cid for _, cid in rows), time.time() if now is None else now)
    for stage, cid in rows:
        if 0 <= stage < ctx.n_stages:
            cap[stage] += max(rate[cid], MIN_THROUGHPUT) / max(ctx.gflops[stage], 1e-12)
            count[stage] += 1
    return cap, count


def fitting(ctx: RunCtx, memory_bytes: int) -> list[int]:
    return [s for s in range(ctx.n_stages) if memory_bytes == 0 or ctx.memory_need[s] <= memory_bytes]


def choose_stage(conn: Connection, ctx: RunCtx, memory_bytes: int, now: float | None = None) -> int:
    fits = fitting(ctx, memory_bytes)
    if not fits:
        need = min(ctx.memory_need)
        raise Conflict(
            f"no stage of this run fits in {memory_bytes:,} bytes; the smallest needs about {need:,}"
        )
    cap, count = capacities(conn, ctx, now)
    return min(fits, key=lambda s: (cap[s], count[s], s))


def assign(
    conn: Connection, ctx: RunCtx, contributor_id: str, memory_bytes: int, now: float, want: int | None = None
) -> tuple[Any, set[str]]:
    """The worker's assignment in this run: the sticky one, a pending move, the stage it asks for
    (an operator pinning a device), or a fresh choice."""
    if want is not None and not 0 <= want < ctx.n_stages:
        raise Invalid(f"stage {want} is out of range 0..{ctx.n_stages - 1}")
    if want is not None and want not in fitting(ctx, memory_bytes):
        raise Conflict(
            f"stage {want} needs about {ctx.memory_need[want]:,} bytes, more than {memory_bytes:,}"
        )
    keys: set[str] = set()
    a = chains.assignment(conn, ctx.run_id, contributor_id)
    standing.refuse_banned(a)
    where = (A.c.run_id == ctx.run_id, A.c.contributor_id == contributor_id)
    if a is not None and a.reassign_to is None and want in (None, a.stage):
        conn.execute(update(A).where(*where).values(state="active", last_seen=now))
    elif a is not None:
        keys = lease.release(conn, ctx, contributor_id, now, "left")
        conn.execute(
            update(A)
            .where(*where)
            .values(
                stage=want if want is not None else a.reassign_to,
                reassign_to=None,
                state="active",
                last_seen=now,
                assigned=now,
                sync_epoch=-1,
                sync_step=0,
                steps=0,
                epoch=0,
            )
        )
    else:
        stage = want if want is not None else choose_stage(conn, ctx, memory_bytes, now)
        conn.execute(
            insert(A).values(
                run_id=ctx.run_id,
                contributor_id=contributor_id,
                stage=stage,
                state="active",
                assigned=now,
                last_seen=now,
                steps=0,
                epoch=0,
                sync_epoch=-1,
                sync_step=0,
                tokens_per_s=0.0,
                credits=0.0,
            )
        )
    return chains.assignment(conn, ctx.run_id, contributor_id), keys


def rebalance(conn: Connection, ctx: RunCtx) -> None:
    """When a stage has no live worker, ask one replica of the most crowded stage to move there."""
    pending = conn.execute(
        select(A.c.contributor_id).where(
            A.c.run_id == ctx.run_id, A.c.reassign_to.is_not(None), A.c.state == "active"
        )
    ).first()
    if pending is not None:
        return
    count = [0] * ctx.n_stages  # counted first: measuring every worker's rate each tick would be waste
    for (stage,) in conn.execute(
        select(A.c.stage).where(A.c.run_id == ctx.run_id, A.c.state == "active")
    ).all():
        if 0 <= stage < ctx.n_stages:
            count[stage] += 1
    empty = [s for s in range(ctx.n_stages) if count[s] == 0]
    if not empty:
        return
    cap, count = capacities(conn, ctx)
    donor = max(range(ctx.n_stages), key=lambda s: (count[s], cap[s]))
    if count[donor] < 2:
        return
    rows = conn.execute(
        select(A.c.contributor_id, CT.c.memory_bytes)
        .select_from(A.join(CT, A.c.contributor_id == CT.c.contributor_id))
        .where(A.c.run_id == ctx.run_id, A.c.state == "active", A.c.stage == donor)
        .order_by(A.c.assigned.desc())
    ).all()
    for target in empty:
        for cid, mem in rows:
            if target in fitting(ctx, int(mem)):
                conn.execute(
                    update(A)
                    .where(A.c.run_id == ctx.run_id, A.c.contributor_id == cid)
                    .values(reassign_to=target)
                )
                return
