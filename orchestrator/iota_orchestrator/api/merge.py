"""Merge rounds over HTTP: a replica reports its update, follows its plan and reports the parts it reduced.

    POST /v1/merge/complete  MergeComplete -> MergeCompleteReply   (the update uploaded to MergeRound.upload)
    GET  /v1/merge/plan?run_id=&stage=&epoch=&wait_s=  -> MergePlan (long-polls up to wait_s <= 30)
    POST /v1/merge/part      MergePartDone -> MergePartReply       (a part blob uploaded to MergePart.upload)

Uploads are read through outside the lock and off the event loop (they can be large); a refused one is a
422 and a `rejected` fault of its sender, charged in a transaction of its own (faults.py). An update that
fails its check (not finite, or past the optimizer's bound: merge_checks.py) is also a failed check of
its sender (standing.failed: its unvetted credits clawed back, a penalty, a ban below zero standing).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import Connection, select

from iota_cli.core import flat
from iota_cli.core.protocol import (
    MergeComplete,
    MergeCompleteReply,
    MergePartDone,
    MergePartReply,
    MergePlan,
)
from iota_orchestrator import butterfly, db, faults, integrity, merge_checks, rounds, runs, uploads
from iota_orchestrator.api.deps import Contributor, StateDep, now, problems
from iota_orchestrator.errors import Conflict
from iota_orchestrator.faults import Rejected
from iota_orchestrator.state import State

router = APIRouter(
    prefix="/v1/merge",
    tags=["merge"],
    responses=problems(400, 401, 403, 404, 409, 422),
)
MAX_WAIT_S = 30.0


def _charge(state: State, e: Rejected, cid: str) -> None:
    with state.tx() as conn:
        faults.lapse(conn, e.run_id, cid, e.detail, now(), kind="rejected")


def _weights_key(conn: Connection, body: MergeComplete) -> str:
    """The key of the stage's current weights blob ("" for a stage the run does not have)."""
    S = db.stages
    key = conn.execute(
        select(S.c.weights_key).where(S.c.run_id == body.run_id, S.c.stage == body.stage)
    ).scalar_one_or_none()
    return key or ""


def _charge_contribution(state: State, ctx: runs.RunCtx, e: Rejected, cid: str) -> None:
    with state.tx() as conn:
        keys = merge_checks.charge(conn, ctx, cid, e, now())
    if keys:  # a ban gave its claimed work back: wake whoever waits for it
        state.wake.notify(list(keys))


@router.post("/complete", response_model=MergeCompleteReply)
async def merge_complete(body: MergeComplete, cid: Contributor, state: StateDep) -> MergeCompleteReply:
    """Report the update uploaded for the stage's open round (409 if the epoch moved on or the round
    takes no more updates, 422 if it is not exactly {"update": wire dtype [N]}, all finite)."""
    ctx, base_key = await state.in_tx(
        lambda conn: (runs.context(conn, body.run_id), _weights_key(conn, body))
    )
    uploaded = rounds.update_key(body.run_id, body.stage, body.epoch, cid)
    await uploads.receive(state, uploaded, rounds.update_max_size(ctx, body.stage))
    path = await asyncio.to_thread(state.blobs.path, uploaded)  # an object store's: a cached copy
    size, dtype = rounds.flat_size(ctx, body.stage), ctx.manifest.merge.wire_dtype
    checked = await asyncio.to_thread(integrity.check_with, path, lambda h: flat.check_update(h, size, dtype))
    stats = await asyncio.to_thread(merge_checks.read_stats, path, size, dtype)
    base_max = await asyncio.to_thread(merge_checks.base_max_abs, state.blobs, base_key) if base_key else None
    read = rounds.Read(checked, stats, base_key, base_max)

    def contribute(conn: Connection) -> MergeCompleteReply:
        return rounds.contribute(conn, ctx, cid, body, read, now())

    try:
        reply = await state.in_tx(contribute)
    except Rejected as e:
        await state.with_db(_charge_contribution, state, ctx, e, cid)
        raise
    state.poke.set()  # the contribute phase may be over
    return reply


def _waits(plan: MergePlan) -> bool:
    """Whether a long-poll should wait on: nothing for the caller to reduce and the round not settled."""
    return plan.state in ("open", "reducing") and not any(p.upload for p in plan.parts)


@router.get("/plan", response_model=MergePlan)
async def merge_plan(
    cid: Contributor,
    state: StateDep,
    run_id: Annotated[str, Query(min_length=1, max_length=64)],
    stage: Annotated[int, Query(ge=0, le=1 << 16)],
    epoch: Annotated[int, Query(ge=0, le=1 << 31)],
    wait_s: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0.0,
) -> MergePlan:
    """The round of (stage, epoch) as the caller should see it: the partitions it owns with every range
    to read while reducing, where each partition landed once closed. With wait_s, answers when there is
    something to reduce or the round is closed or gone, or when wait_s is up."""
    ctx = await state.in_tx(lambda conn: runs.context(conn, run_id))

    def look(conn: Connection) -> MergePlan:
        return butterfly.plan(conn, ctx, state.blobs, cid, stage, epoch)

    deadline = time.monotonic() + wait_s
    plan = await state.in_tx(look)
    keys = [rounds.wake_key(run_id, stage, epoch)]
    while _waits(plan) and not state.wake.closing and (left := deadline - time.monotonic()) > 0:
        ev = state.wake.register(keys)  # before looking again, so a change meanwhile still wakes us
        try:
            plan = await state.in_tx(look)
            if _waits(plan):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), timeout=min(left, 1.0))
        finally:
            state.wake.unregister(keys, ev)
    return plan


@router.post("/part", response_model=MergePartReply)
async def merge_part(body: MergePartDone, cid: Contributor, state: StateDep) -> MergePartReply:
    """Report a partition's result uploaded to its MergePart.upload (403 if the caller does not own it,
    409 for no such round, 422 if it is not exactly what core.flat.part_blob writes, all finite)."""

    def find(conn: Connection) -> tuple[runs.RunCtx, int]:
        ctx = runs.context(conn, body.run_id)
        p = butterfly.find_part(conn, ctx.run_id, body.stage, body.epoch, body.part)
        if p is None:
            raise Conflict(
                f"no merge round has partition {body.part} of stage {body.stage} at epoch {body.epoch}"
            )
        return ctx, p.stop - p.start

    ctx, n = await state.in_tx(find)
    uploaded = rounds.part_key(body.run_id, body.stage, body.epoch, body.part, cid)
    await uploads.receive(state, uploaded, rounds.part_max_size(ctx, n))
    path = await asyncio.to_thread(state.blobs.path, uploaded)
    checked = await asyncio.to_thread(butterfly.check_part, ctx, path, n)

    def report(conn: Connection) -> tuple[MergePartReply, list[str]]:
        return butterfly.report_part(conn, ctx, cid, body, checked, now())

    try:
        reply, dead = await state.in_tx(report)
    except Rejected as e:
        await state.with_db(_charge, state, e, cid)
        raise
    for key in dead:
        state.blobs.delete(key)
    state.wake.notify([rounds.wake_key(body.run_id, body.stage, body.epoch)])
    state.poke.set()  # every partition may be in: publish
    return reply
