"""Sampled checks of contributors' work: which items, the weights snapshot, the validator's queue, verdicts.

When a forward item is accepted, standing.draw decides whether it is checked; the reply then asks its
worker for the stage's weights as the item used them (WorkCompleteReply.audit). A check moves through
(merge updates scored on held-out tokens share the table and the queue: merge_audits.py):

    weights  -> (snapshot reported)  backward (head, body) | ready (tail)
    backward -> (the sample's backward is in, or its chain ended)  ready
    ready    -> (a validator takes it: GET /v1/audits/next)  taken -> (its verdict)  passed | failed

A snapshot not reported by the deadline fails the check (no weights, no credit). A check nobody judged by
trust.verdict_timeout_s is dropped, unjudged. The chain's blobs stay until the check is decided (the
reaper's garbage collection skips them). Verdicts move the contributor's standing (standing.py).

    python -c "from iota_orchestrator import audits; print(audits.weights_key('r', 7))"
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, and_, exists, func, insert, or_, select, update

from iota_cli.core.modelspec import stage_params, stage_spec
from iota_cli.core.protocol import BlobRef, UploadRef
from iota_cli.core.validation import AuditTask, AuditVerdict, WeightsReport
from iota_orchestrator import db, merge_audits, merge_checks, runs, standing
from iota_orchestrator.blobs import BlobStore
from iota_orchestrator.chains import parse_work_id
from iota_orchestrator.errors import BadRequest, Conflict, NotFound
from iota_orchestrator.integrity import Checked, Want
from iota_orchestrator.runs import HEADER_SLACK, RunCtx

AU, W, C, B = db.audits, db.work, db.chains, db.blobs
PENDING = ("weights", "backward", "ready", "taken")
WAKE = "audits"  # what a validator's long-poll waits on
MAX_PENDING = 2  # checks in flight per contributor: bounds the snapshots one worker uploads at a time


def weights_key(run_id: str, audit_id: int) -> str:
    return f"runs/{run_id}/audit/{audit_id}.weights.safetensors"


def weights_want(ctx: RunCtx, stage: int) -> Want:
    return {p.name: ("F32", p.shape) for p in stage_params(ctx.cfg, stage_spec(ctx.cfg, stage))}


def weights_max_size(ctx: RunCtx, stage: int) -> int:
    params = stage_params(ctx.cfg, stage_spec(ctx.cfg, stage))
    return sum(4 * math.prod(p.shape) for p in params) + HEADER_SLACK


def pinned() -> Any:
    """A condition on chains (db.chains as C): a pending check still needs the chain's blobs."""
    return exists().where(
        AU.c.run_id == C.c.run_id,
        AU.c.sample_id == C.c.sample_id,
        AU.c.kind == "work",
        AU.c.state.in_(PENDING),
    )


# --- sampling ----------------------------------------------------------------------------------------------


def sample(
    conn: Connection,
    ctx: RunCtx,
    blobs: BlobStore,
    row: Any,
    a: Any,
    ran_on: int | None,
    mark: int,
    basis: float,
    now: float,
) -> UploadRef | None:
    """Maybe check this just-accepted forward item; the upload its worker's snapshot goes to if so.

    ran_on is the epoch the worker says the item used (None from older clients)."""
    if not standing.draw(ctx, a):  # first: the usual answer, and it needs no query
        return None
    epoch = item_epoch(a.epoch, ran_on)
    pending = conn.execute(
        select(AU.c.id).where(
            AU.c.run_id == ctx.run_id,
            AU.c.contributor_id == a.contributor_id,
            AU.c.kind == "work",
            AU.c.state.in_(PENDING),
        )
    ).all()
    if len(pending) >= (1 if a.passes == 0 else MAX_PENDING):
        return None
    audit_id = conn.execute(
        insert(AU).values(
            run_id=ctx.run_id,
            contributor_id=a.contributor_id,
            stage=row.stage,
            sample_id=row.sample_id,
            forward_id=row.id,
            state="weights",
            created=now,
            deadline=now + ctx.manifest.train.work_timeout_s,
            ledger_mark=mark,
            basis=basis,
            epoch=epoch,
            steps=merge_checks.allowed_steps(conn, ctx, a.contributor_id, row.stage, epoch),
        )
    ).inserted_primary_key[0]  # type: ignore[index]
    return blobs.upload_ref(weights_key(ctx.run_id, audit_id), weights_max_size(ctx, row.stage))


def awaited_upload(conn: Connection, ctx: RunCtx, blobs: BlobStore, row: Any) -> UploadRef | None:
    """The upload a check of this forward item still waits on, for a complete sent again (its first
    reply was lost on the way): answered None, the worker would never send its snapshot, and the check
    would fail at its deadline, charging an honest worker for a cut connection."""
    audit_id = conn.execute(
        select(AU.c.id).where(AU.c.forward_id == row.id, AU.c.kind == "work", AU.c.state == "weights")
    ).scalar_one_or_none()
    if audit_id is None:
        return None
    return blobs.upload_ref(weights_key(ctx.run_id, audit_id), weights_max_size(ctx, row.stage))


def item_epoch(held: int, ran_on: int | None) -> int:
    """The epoch to check an item from: the one it ran on when that is the epoch the worker holds or the
    one just before (its result was sent behind the loop while a merge landed). An older claim is not
    believed: each epoch back widens the steps a snapshot may be from its base."""
    if ran_on is not None and held - 1 <= ran_on <= held:
        return ran_on
    return held


def of_item(conn: Connection, work_id: str, contributor_id: str) -> Any:
    """The check waiting for this contributor's snapshot of this item (404 if none)."""
    rid = parse_work_id(work_id)
    au = conn.execute(select(AU).where(AU.c.forward_id == rid, AU.c.contributor_id == contributor_id)).first()
    if au is None:
        raise NotFound(f"work item {work_id} was not sampled for a check")
    return au


def report_weights(
    conn: Connection, ctx: RunCtx, au: Any, report: WeightsReport, checked: Checked, now: float
) -> set[str]:
    """The worker uploaded its snapshot: accept it (422 via a failed check if it is not the stage's
    weights), and move the check on. Repeating a report is accepted again."""
    if au.state != "weights":
        return set()
    key = weights_key(ctx.run_id, au.id)
    b = conn.execute(select(B).where(B.c.key == key)).first()
    if b is None:
        raise BadRequest("upload the weights to the check's upload URL first")
    if b.sha256 != report.sha256 or b.size != report.size:
        raise BadRequest("the uploaded weights do not match the sha256 and size you sent")
    if checked.sha256 != b.sha256:
        raise Conflict("the uploaded weights changed while they were checked; report them again")
    if checked.problem:
        _set(conn, au.id, state="failed", decided=now, detail=f"snapshot refused: {checked.problem}")
        return standing.failed(
            conn, ctx, au.contributor_id, f"audit:{au.id}", au.basis, f"snapshot: {checked.problem}", now
        )
    conn.execute(update(B).where(B.c.key == key).values(sealed=True))
    tail = au.stage == ctx.n_stages - 1
    _set(conn, au.id, state="ready" if tail else "backward", weights_key=key)
    return {WAKE} if tail else set()


def backward_done(conn: Connection, row: Any) -> set[str]:
    """A backward item was accepted: a check of its forward can now be judged whole."""
    n = conn.execute(
        update(AU)
        .where(AU.c.forward_id == row.forward_id, AU.c.state == "backward")
        .values(state="ready", backward_id=row.id)
    ).rowcount
    return {WAKE} if n else set()


def expire(conn: Connection, ctx: RunCtx, now: float) -> set[str]:
    """The reaper's part: missing snapshots fail, ended chains go forward-only, stale checks drop."""
    keys: set[str] = set()
    late = conn.execute(
        select(AU).where(
            AU.c.run_id == ctx.run_id, AU.c.kind == "work", AU.c.state == "weights", AU.c.deadline < now
        )
    ).all()
    for au in late:
        _set(conn, au.id, state="failed", decided=now, detail="no weights snapshot by the deadline")
        keys |= standing.failed(
            conn, ctx, au.contributor_id, f"audit:{au.id}", au.basis, "no weights snapshot for a check", now
        )
    ended = and_(C.c.run_id == AU.c.run_id, C.c.sample_id == AU.c.sample_id, C.c.state != "active")
    n = conn.execute(
        update(AU)
        .where(AU.c.run_id == ctx.run_id, AU.c.state == "backward", exists().where(ended))
        .values(state="ready")
    ).rowcount
    timeout = ctx.manifest.trust.verdict_timeout_s
    stale = or_(
        and_(AU.c.kind == "work", AU.c.created < now - timeout),
        and_(AU.c.kind == "merge", AU.c.deadline < now),  # the round goes on without its verdict
    )
    conn.execute(
        update(AU)
        .where(AU.c.run_id == ctx.run_id, AU.c.state.in_(PENDING[1:]), stale)
        .values(state="void", decided=now, detail="not judged in time")
    )
    return keys | ({WAKE} if n else set())


def runs_pending(conn: Connection) -> list[str]:
    """Runs with checks not yet decided (finished runs too: their checks are still judged)."""
    return list(conn.execute(select(AU.c.run_id).where(AU.c.state.in_(PENDING)).distinct()).scalars())


def _set(conn: Connection, audit_id: int, **values: Any) -> None:
    conn.execute(update(AU).where(AU.c.id == audit_id).values(**values))


# --- the validator's side -------------------------------------------------------------------------------


def take(
    conn: Connection, context: Callable[[str], RunCtx], blobs: BlobStore, now: float
) -> AuditTask | None:
    """The oldest check ready to judge, marked taken; None when there is none. A validator that takes a
    check and dies leaves it taken: it is dropped at the verdict timeout, unjudged."""
    while True:
        au = conn.execute(select(AU).where(AU.c.state == "ready").order_by(AU.c.id).limit(1)).first()
        if au is None:
            return None
        task = _task(conn, context(au.run_id), blobs, au, now)
        if task is not None:
            _set(conn, au.id, state="taken")
            return task
        _set(conn, au.id, state="void", decided=now, detail="its blobs are gone")


def _task(conn: Connection, ctx: RunCtx, blobs: BlobStore, au: Any, now: float) -> AuditTask | None:
    def ref(key: str | None) -> BlobRef | None:
        b = conn.execute(select(B.c.sha256, B.c.size).where(B.c.key == key)).first() if key else None
        return None if b is None else blobs.ref(key, b.sha256, b.size)  # type: ignore[arg-type]

    if au.kind == "merge":
        return merge_audits.task(conn, ctx, blobs, au, ref, now)

    fwd = conn.execute(select(W).where(W.c.id == au.forward_id)).one()
    bwd = conn.execute(select(W).where(W.c.id == au.backward_id)).first() if au.backward_id else None
    chain = conn.execute(select(C).where(C.c.run_id == au.run_id, C.c.sample_id == au.sample_id)).one()
    weights = ref(au.weights_key)
    if weights is None:
        return None
    tail = au.stage == ctx.n_stages - 1
    loss = None
    if tail:
        L = db.losses
        loss = conn.execute(
            select(L.c.loss)
            .where(L.c.run_id == au.run_id, L.c.sample_id == au.sample_id)
            .order_by(L.c.id.desc())
            .limit(1)
        ).scalar_one_or_none()
    backend = conn.execute(
        select(db.contributors.c.backend).where(db.contributors.c.contributor_id == au.contributor_id)
    ).scalar_one()
    return AuditTask(
        audit_id=au.id,
        run_id=au.run_id,
        manifest=ctx.manifest,
        stage=au.stage,
        backend=backend,
        weights=weights,
        tokens=ref(chain.tokens_key) if au.stage in (0, ctx.n_stages - 1) else None,
        input=ref(fwd.input_key),
        output=ref(fwd.output_key),
        loss=loss,
        grad=ref(bwd.input_key) if bwd is not None else None,
        grad_output=ref(bwd.output_key) if bwd is not None else None,
        base=ref(runs.weights_key(au.run_id, au.stage, au.epoch)) if au.epoch is not None else None,
        max_steps=au.steps,
    )


def run_of(conn: Connection, audit_id: int) -> str:
    run_id = conn.execute(select(AU.c.run_id).where(AU.c.id == audit_id)).scalar_one_or_none()
    if run_id is None:
        raise NotFound(f"no check {audit_id}")
    return str(run_id)


def decide(conn: Connection, ctx: RunCtx, audit_id: int, verdict: AuditVerdict, now: float) -> set[str]:
    """Record a validator's verdict and move the contributor's standing (once per check)."""
    au = conn.execute(select(AU).where(AU.c.id == audit_id)).first()
    if au is None:
        raise NotFound(f"no check {audit_id}")
    if au.state in ("passed", "failed", "void"):
        return set()  # judged already (a repeated verdict), or dropped for lateness
    if au.state != "taken":
        raise Conflict(f"check {audit_id} is {au.state}, not taken by a validator")
    state = "passed" if verdict.passed else "failed"
    _set(conn, au.id, state=state, decided=now, loss=verdict.loss, detail=verdict.detail[:500])
    if verdict.passed:
        if au.kind == "work":  # a merge update's score does not judge its worker (merge_audits.py)
            standing.passed(conn, ctx, au.contributor_id, au.ledger_mark)
        return set()
    if au.kind == "merge":  # left out and unpaid, but not a failed check of its worker (merge_audits.py)
        merge_audits.leave_out(conn, ctx, au)
        ref = merge_checks.REF.format(stage=au.stage, epoch=au.epoch, cid=au.contributor_id)  # rounds skip it
        standing.unpaid(conn, ctx, au.contributor_id, ref, au.basis, f"held-out loss: {verdict.detail}", now)
        return set()
    return standing.failed(
        conn, ctx, au.contributor_id, f"audit:{au.id}", au.basis, f"check failed: {verdict.detail}", now
    )


def forget_snapshots(conn: Connection, limit: int) -> list[str]:
    """Unlink up to `limit` snapshots of decided checks; their keys, for the caller to delete."""
    rows = conn.execute(
        select(AU.c.id, AU.c.weights_key)
        .where(AU.c.state.in_(("passed", "failed", "void")), AU.c.weights_key.is_not(None))
        .limit(limit)
    ).all()
    if not rows:
        return []
    keys = [r.weights_key for r in rows]
    conn.execute(update(AU).where(AU.c.id.in_([r.id for r in rows])).values(weights_key=None))
    conn.execute(B.delete().where(B.c.key.in_(keys)))
    return keys


def judged(conn: Connection, run_id: str) -> bool:
    """Whether a validator has judged any check in the run (then only vetted tails' losses count)."""
    q = select(AU.c.id).where(AU.c.run_id == run_id, AU.c.state.in_(("passed", "failed"))).limit(1)
    return conn.execute(q).first() is not None


def counts(conn: Connection, run_id: str) -> dict[str, int]:
    """Checks of a run by state (for the run status)."""
    rows = conn.execute(
        select(AU.c.state, func.count()).where(AU.c.run_id == run_id).group_by(AU.c.state)
    ).all()
    return {s: int(n) for s, n in rows}
