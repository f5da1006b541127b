"""Why a claim got no work, in a few words for the contributor: the X-Iota-Wait header of a 204.

scheduler.claim returns no item for a handful of reasons; this names the one that holds now, most useful
first (a stage nobody trains explains a full pipeline better than the count of items in flight). It is
computed after a long-poll ends empty, in its own transaction, so it is a hint: work may arrive meanwhile.
The phrases are ASCII (an HTTP header) and stable while the cause lasts, so a worker's log shows a
change of cause, not every poll. Try it against a running swarm:

    curl -si -X POST -H "Authorization: Bearer $IOTA_TOKEN" -d '{"run_id": "RUN"}' URL/v1/work/claim
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, func, select

from iota_orchestrator import chains, db, faults, rounds, scheduler
from iota_orchestrator.runs import RunCtx

A, W = db.assignments, db.work


def why_no_work(conn: Connection, ctx: RunCtx, run: Any, a: Any, now: float) -> str:
    """The reason scheduler.claim gives the worker of assignment `a` nothing now."""
    if run.state != "running":
        return "the run has finished"
    t = ctx.manifest.train
    cid, stage = a.contributor_id, a.stage
    limit = faults.claim_limit(conn, t, a, now)
    if limit == 0:
        return "held back for a while: claims of this worker lapsed past their deadline"
    if scheduler.held(conn, ctx, cid) >= limit:
        return f"this worker holds {limit} item{'s' * (limit > 1)}, its limit"
    exhausted = run.stop_requested or (t.max_samples and run.samples_issued >= t.max_samples)
    in_flight = chains.active_chains(conn, ctx.run_id)
    if exhausted and not in_flight:
        return _closing(conn, ctx, stage)
    if missing := _unstaffed(conn, ctx):
        return _no_worker(missing)
    if exhausted:
        no_more = "the run is stopping" if run.stop_requested else "the run has no more samples"
        return f"{no_more}; finishing the work in flight"
    if stage == 0:
        return _head(conn, ctx, cid, now)
    if _avoided(conn, ctx, cid, stage):
        return "an item this worker gave back waits for another replica"
    if stage == ctx.n_stages - 1:
        return f"no activations from stage {stage - 1} yet"
    return f"nothing from stage {stage - 1} or {stage + 1} yet"


def _head(conn: Connection, ctx: RunCtx, cid: str, now: float) -> str:
    inflight = scheduler.head_inflight(conn, ctx, cid, now)
    if inflight >= ctx.manifest.train.max_inflight_per_head:
        return f"the pipeline is full ({inflight} samples in flight)"
    if chains.has_orphans(conn, ctx.run_id):
        return "a sample given back waits for another head"
    return "no work yet"


def _unstaffed(conn: Connection, ctx: RunCtx) -> list[int]:
    live = conn.execute(
        select(A.c.stage).where(A.c.run_id == ctx.run_id, A.c.state == "active").distinct()
    ).scalars()
    return sorted(set(range(ctx.n_stages)) - set(live))


def _no_worker(stages: list[int]) -> str:
    """[1] -> 'stage 1 has no worker'; [1, 2] -> 'stages 1 and 2 have no worker'."""
    if len(stages) == 1:
        return f"stage {stages[0]} has no worker"
    names = ", ".join(str(s) for s in stages[:-1]) + f" and {stages[-1]}"
    return f"stages {names} have no worker"


def _avoided(conn: Connection, ctx: RunCtx, cid: str, stage: int) -> bool:
    q = select(W.c.id).where(
        W.c.run_id == ctx.run_id, W.c.stage == stage, W.c.state == "queued", W.c.avoid == cid
    )
    return conn.execute(q.limit(1)).first() is not None


def _closing(conn: Connection, ctx: RunCtx, stage: int) -> str:
    """The run drained: it finishes once the closing merge rounds are in (reaper.finish_check)."""
    epoch = conn.execute(
        select(db.stages.c.epoch).where(db.stages.c.run_id == ctx.run_id, db.stages.c.stage == stage)
    ).scalar_one()
    r = rounds.get_round(conn, ctx.run_id, stage, epoch)
    if r is None:
        return "the run has no more samples; finishing"
    if r.state != "open":
        return f"the run has no more samples; merging stage {stage} (epoch {epoch})"
    contributed = len(rounds.contributions(conn, ctx.run_id, stage, epoch))
    live = conn.execute(
        select(func.count()).where(A.c.run_id == ctx.run_id, A.c.stage == stage, A.c.state == "active")
    ).scalar_one()
    return f"waiting for the merge round of stage {stage} ({contributed} of {live} replicas in)"
