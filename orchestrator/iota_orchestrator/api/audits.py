"""Checks over HTTP: a sampled worker reports its weights snapshot; a validator takes checks and judges them.

    POST /v1/work/{work_id}/weights  WeightsReport -> Ok    (contributor; the snapshot PUT to
                                                             WorkCompleteReply.audit first)
    GET  /v1/audits/next?wait_s=10   -> AuditTask, or 204   (operator token; long-polls up to 30 s)
    POST /v1/audits/{audit_id}       AuditVerdict -> Ok     (operator token)

A validator is `iota validate` (iota_cli/validate), run beside the orchestrator with the operator token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from sqlalchemy import Connection

from iota_cli.core.protocol import Ok
from iota_cli.core.validation import AuditTask, AuditVerdict, WeightsReport
from iota_orchestrator import audits, integrity, merge_audits, runs, uploads
from iota_orchestrator.api.deps import Admin, Contributor, StateDep, now, problems
from iota_orchestrator.errors import Invalid
from iota_orchestrator.runs import RunCtx
from iota_orchestrator.state import State

router = APIRouter(prefix="/v1", tags=["validation"], responses=problems(400, 401, 403, 404, 409, 422))
MAX_WAIT_S = 30.0


@router.post("/work/{work_id}/weights", response_model=Ok)
async def report_weights(work_id: str, body: WeightsReport, cid: Contributor, state: StateDep) -> Ok:
    """The weights a sampled item ran on are uploaded (422 if they are not the stage's weights, all
    finite: the check fails)."""

    def find(conn: Connection) -> tuple[RunCtx, int, int]:
        au = audits.of_item(conn, work_id, cid)
        return runs.context(conn, au.run_id), au.id, au.stage

    ctx, audit_id, stage = await state.in_tx(find)
    uploaded = audits.weights_key(ctx.run_id, audit_id)
    await uploads.receive(state, uploaded, audits.weights_max_size(ctx, stage))
    path = await asyncio.to_thread(state.blobs.path, uploaded)  # an object store's: a cached copy
    checked = await asyncio.to_thread(integrity.check_file, path, audits.weights_want(ctx, stage))

    def report(conn: Connection) -> set[str]:
        return audits.report_weights(conn, ctx, audits.of_item(conn, work_id, cid), body, checked, now())

    state.wake.notify(await state.in_tx(report))
    if checked.problem:
        raise Invalid(f"weights snapshot refused (the check failed): {checked.problem}")
    return Ok()


@router.get(
    "/audits/next",
    response_model=AuditTask,
    dependencies=[Admin],
    responses={204: {"description": "no check is ready; ask again"}},
)
async def next_audit(
    state: StateDep, wait_s: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0.0
) -> AuditTask | Response:
    """The oldest check ready to judge (it is then the caller's until its verdict or the timeout)."""
    deadline = time.monotonic() + wait_s
    task = await state.with_db(_take, state)
    while task is None and not state.wake.closing and (left := deadline - time.monotonic()) > 0:
        ev = state.wake.register([audits.WAKE])
        try:
            task = await state.with_db(_take, state)
            if task is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), timeout=min(left, 1.0))
        finally:
            state.wake.unregister([audits.WAKE], ev)
    return Response(status_code=204) if task is None else task


def _take(state: State) -> AuditTask | None:
    with state.tx() as conn:
        merge_audits.validator_seen(conn, now())
        return audits.take(conn, lambda run_id: runs.context(conn, run_id), state.blobs, now())


@router.post("/audits/{audit_id}", response_model=Ok, dependencies=[Admin])
async def judge(audit_id: Annotated[int, Path(ge=1, le=1 << 62)], body: AuditVerdict, state: StateDep) -> Ok:
    """A validator's verdict on a check it took; repeating it changes nothing."""

    def decide(conn: Connection) -> set[str]:
        return audits.decide(conn, runs.context(conn, audits.run_of(conn, audit_id)), audit_id, body, now())

    state.wake.notify(await state.in_tx(decide))
    return Ok()
