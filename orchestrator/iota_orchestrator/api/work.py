"""The worker's loop over HTTP: assignment, heartbeat, claim, complete, abandon (merging: api/merge.py).

A refused result or contribution (422) is charged to its sender in a transaction of its own, after the
request's transaction has rolled back (faults.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import APIRouter, Response
from sqlalchemy import Connection

from iota_cli.core.protocol import (
    RUN_STATE_HEADER,
    WAIT_HEADER,
    Abandon,
    Assignment,
    AssignmentRequest,
    ClaimRequest,
    Heartbeat,
    HeartbeatReply,
    Ok,
    WorkComplete,
    WorkCompleteReply,
    WorkItem,
)
from iota_orchestrator import assignment, chains, db, faults, lease, ledger, runs, scheduler, standing, waits
from iota_orchestrator.api.deps import Contributor, StateDep, now, problems
from iota_orchestrator.api.urls import assignment_reply, work_item
from iota_orchestrator.errors import Conflict
from iota_orchestrator.faults import Rejected
from iota_orchestrator.state import State
from iota_orchestrator.uploads import inline_result, receive_result, store_inline

router = APIRouter(
    prefix="/v1",
    tags=["work"],
    responses=problems(400, 401, 403, 404, 409, 422),
)
log = logging.getLogger("iota_orchestrator")
RETRY_S = "1"
TOUCH_EVERY_S = 1.0


@router.post("/assignment", response_model=Assignment)
async def assign(body: AssignmentRequest, cid: Contributor, state: StateDep) -> Assignment:
    """The stage this worker trains: sticky across reconnects, balanced by throughput, fitting memory."""
    return await state.with_db(_assign, state, cid, body)


def _assign(state: State, cid: str, body: AssignmentRequest) -> Assignment:
    with state.tx() as conn:
        run_id = body.run_id or runs.newest_running(conn)
        run = runs.get_run(conn, run_id)
        ctx = runs.context(conn, run_id)  # a run still being prepared: 503, come back (runs.py)
        if run.state != "running":
            raise Conflict(f"run {run_id} has finished")
        C = db.contributors
        # The claimed throughput is kept for `status` to show; placement measures its own (measure.py).
        conn.execute(
            C.update()
            .where(C.c.contributor_id == cid)
            .values(backend=body.backend, memory_bytes=body.memory_bytes, throughput=body.throughput)
        )
        a, keys = assignment.assign(conn, ctx, cid, body.memory_bytes, now(), body.stage)
        reply = assignment_reply(conn, state.blobs, ctx, a)
    state.wake.notify(keys)
    return reply


@router.post("/heartbeat", response_model=HeartbeatReply)
async def heartbeat(body: Heartbeat, cid: Contributor, state: StateDep) -> HeartbeatReply:
    """Renew the lease; learn the stage's weights epoch, merge rounds, moves and dropped samples."""

    def beat(conn: Connection) -> HeartbeatReply:
        return lease.beat(conn, runs.context(conn, body.run_id), state.blobs, cid, body, now())

    return await state.in_tx(beat)


def _try_claim(state: State, cid: str, body: ClaimRequest) -> tuple[WorkItem | None, list[str], str]:
    run_id, claim_id = body.run_id, body.claim_id
    with state.tx() as conn:
        t = now()  # the transaction's instant (the database's clock on PostgreSQL)
        run = runs.get_run(conn, run_id)
        ctx = runs.context(conn, run_id)
        a = chains.assignment(conn, run_id, cid)
        if a is None:
            raise Conflict(f"you have no assignment in run {run_id}; POST /v1/assignment first")
        standing.refuse_banned(a)
        if a.state != "active" or t - a.last_seen > TOUCH_EVERY_S:  # spare a write on every poll
            lease.touch(conn, run_id, cid, t)
        c = scheduler.claim(conn, ctx, run, a, t, claim_id)
        keys = [chains.worker_key(cid), chains.stage_key(run_id, a.stage)]
    if c is None:
        return None, keys, run.state
    _ensure_tokens(state, ctx, c)
    return work_item(state.blobs, ctx, c, body.inline_max), keys, run.state


def _ensure_tokens(state: State, ctx: runs.RunCtx, c: scheduler.Claimed) -> None:
    """Token batches are made from the data on demand; (re)write one if this item needs it."""
    needs = c.row.kind == "forward" and c.row.stage in (0, ctx.n_stages - 1)
    if c.new_tokens is not None:
        state.blobs.write(c.chain.tokens_key, c.new_tokens)
    elif needs and not state.blobs.exists(c.chain.tokens_key):
        state.blobs.write(c.chain.tokens_key, chains.tokens_blob(ctx, c.chain.data_index))


def _why(state: State, cid: str, run_id: str) -> str | None:
    """The 204's hint; a hint never costs the claim its answer, so a failure here only drops it."""
    try:
        with state.read() as conn:  # a hint: no write lock on PostgreSQL
            a = chains.assignment(conn, run_id, cid)
            if a is None:  # it left while we waited
                return "this worker has no assignment"
            return waits.why_no_work(conn, runs.context(conn, run_id), runs.get_run(conn, run_id), a, now())
    except Exception:
        log.exception("could not say why %s gets no work", cid)
        return None


def _header(description: str) -> dict[str, object]:
    return {"description": description, "schema": {"type": "string"}}


NO_WORK = {
    "description": "no work now; retry after Retry-After seconds",
    "headers": {
        "Retry-After": _header("seconds to wait before claiming again"),
        RUN_STATE_HEADER: _header("running, or finished: the run is over, leave"),
        WAIT_HEADER: _header("why there is no work, for people (e.g. 'stage 1 has no worker'); optional"),
    },
}


@router.post("/work/claim", response_model=WorkItem, responses={204: NO_WORK})
async def claim(body: ClaimRequest, cid: Contributor, state: StateDep) -> WorkItem | Response:
    """The next work item: routed backward work first, then forward work; 204 when there is none."""
    deadline = time.monotonic() + body.wait_s
    item, keys, run_state = await state.with_db(_try_claim, state, cid, body)
    while (
        item is None
        and run_state == "running"
        and not state.wake.closing
        and (left := deadline - time.monotonic()) > 0
    ):
        # Register before looking again, so work that comes while we look still wakes us.
        watched, ev = keys, state.wake.register(keys)
        try:
            item, keys, run_state = await state.with_db(_try_claim, state, cid, body)
            if item is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), timeout=left)
        finally:
            state.wake.unregister(watched, ev)
    if item is None:
        headers = {"Retry-After": RETRY_S, RUN_STATE_HEADER: run_state}
        if run_state == "running" and (why := await state.with_db(_why, state, cid, body.run_id)):
            headers[WAIT_HEADER] = why
        return Response(status_code=204, headers=headers)
    return item


@router.post("/work/{work_id}/complete", response_model=WorkCompleteReply)
async def complete(work_id: str, body: WorkComplete, cid: Contributor, state: StateDep) -> WorkCompleteReply:
    """Report a finished item whose result is uploaded (or comes inline, `data`); credits it once, however
    often it is repeated."""
    data = inline_result(state, body)
    if data is None:
        await receive_result(state, work_id, cid)  # an upload to an object store is taken in first
    return await state.with_db(_complete, state, work_id, cid, body, data)


def _complete(
    state: State, work_id: str, cid: str, body: WorkComplete, data: bytes | None
) -> WorkCompleteReply:
    try:
        with state.tx() as conn:
            row = scheduler.load_item(conn, work_id, cid)
            standing.refuse_banned(chains.assignment(conn, row.run_id, cid))
            ctx = runs.context(conn, row.run_id)
            if data is not None and body.sha256 and row.state == "claimed" and row.output_key:
                store_inline(conn, state, row.output_key, data, body.sha256, ctx.act_max_size)
            credits, keys, check = scheduler.complete(conn, ctx, state.blobs, row, cid, body, now())
            total = ledger.total(conn, cid)
    except Rejected as e:
        _charge(state, e, cid)
        raise
    # The completer's own claim waiting ahead (a worker prefetches its next item) may now be under its limit.
    state.wake.notify([*keys, chains.worker_key(cid)])
    return WorkCompleteReply(credits=credits, total_credits=round(total, 6), audit=check)


def _charge(state: State, e: Rejected, cid: str) -> None:
    with state.tx() as conn:
        faults.lapse(conn, e.run_id, cid, e.detail, now(), kind="rejected")


@router.post("/work/{work_id}/abandon", response_model=Ok)
async def abandon(work_id: str, cid: Contributor, state: StateDep, body: Abandon | None = None) -> Ok:
    """Give an item back, saying why (no body: `stopping`); forward work is re-queued for another worker
    until it has failed MAX_ITEM_FAILURES times, backward work drops its sample."""
    why = body or Abandon()

    def give_back(conn: Connection) -> set[str]:
        row = scheduler.load_item(conn, work_id, cid)
        return scheduler.abandon(conn, runs.context(conn, row.run_id), state.blobs, row, why, now())

    state.wake.notify(await state.in_tx(give_back))
    return Ok()
