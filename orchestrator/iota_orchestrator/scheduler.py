"""Work: per-stage queues, claims with deadlines, and moving a sample's chain along as results arrive.

Backward work is handed out before forward work, and only to the worker that ran the matching forward.
Queues are fair: a worker holds at most `train.max_claims_per_worker` claims (1 while its claims lapse,
see faults.py), an item given back goes to others first, and a head takes a sample, new or given back,
only while fewer than `train.max_inflight_per_head` of its own are in flight (not counting chains stalled
behind another worker's long-held claim), so claiming and giving back in a loop cannot swell the pipeline.
Every result is read and checked before it is accepted (integrity.py). Functions here run inside a
State.tx() transaction and return wakeup keys for long-polling claims.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, func, insert, or_, select, update

from iota_cli.core.protocol import Abandon, UploadRef, WorkComplete
from iota_orchestrator import audits, chains, data, db, faults, integrity, ledger
from iota_orchestrator.blobs import BlobStore
from iota_orchestrator.chains import (
    C,
    W,
    assignment,
    drop_chain,
    output_key,
    parse_work_id,
    stage_key,
    tokens_key,
    work_id,
    worker_key,
)
from iota_orchestrator.errors import Conflict, Forbidden, Gone, NotFound
from iota_orchestrator.faults import Rejected
from iota_orchestrator.runs import RunCtx


@dataclass(frozen=True)
class Claimed:
    row: Any  # the work row, as claimed
    chain: Any
    input_sha: tuple[str, int] | None  # (sha256, size) of the input blob
    new_tokens: bytes | None  # a fresh sample's token blob, to store before answering


# --- claiming ------------------------------------------------------------------------------------------


_AGAIN = select(W).where(
    W.c.worker == bindparam("cid"), W.c.claim_id == bindparam("claim"), W.c.state == "claimed"
)
_HELD = select(func.count()).where(
    W.c.worker == bindparam("cid"), W.c.state == "claimed", W.c.run_id == bindparam("run")
)
_ROUTED = (
    select(W)
    .where(W.c.route == bindparam("cid"), W.c.state == "queued", W.c.run_id == bindparam("run"))
    .order_by(W.c.id)
    .limit(1)
)
_WAITING = (
    W.c.run_id == bindparam("run"),
    W.c.stage == bindparam("stage"),
    W.c.state == "queued",
    W.c.kind == "forward",
)
_QUEUED = (
    select(W)
    .where(*_WAITING, or_(W.c.avoid.is_(None), W.c.avoid != bindparam("cid")))
    .order_by(W.c.id)
    .limit(1)
)
_AVOIDED = select(W).where(*_WAITING, W.c.avoid == bindparam("cid")).order_by(W.c.id).limit(1)
_OTHERS = (
    select(chains.A.c.contributor_id)
    .where(
        chains.A.c.run_id == bindparam("run"),
        chains.A.c.stage == bindparam("stage"),
        chains.A.c.state == "active",
        chains.A.c.contributor_id != bindparam("cid"),
    )
    .limit(1)
)
# A chain stuck behind an item another worker has held past STALLED_SHARE of the work timeout stops
# counting toward its head's pipeline depth, so one slow or hoarding worker costs the swarm a slot for
# that long, not for the whole timeout. Bounded: each such chain is pinned by a claim, and claims are few.
STALLED_SHARE = 0.25
_STALLED = (
    select(W.c.id)
    .where(
        W.c.run_id == C.c.run_id,
        W.c.sample_id == C.c.sample_id,
        W.c.state == "claimed",
        W.c.worker != bindparam("cid"),
        W.c.claimed < bindparam("stalled"),
    )
    .exists()
)
_INFLIGHT = select(func.count()).where(
    C.c.run_id == bindparam("run"), C.c.head_worker == bindparam("cid"), C.c.state == "active", ~_STALLED
)
_TAKE = (
    update(W)
    .where(W.c.id == bindparam("wid"))
    .values(
        state="claimed",
        worker=bindparam("cid"),
        claimed=bindparam("now"),
        deadline=bindparam("deadline"),
        output_key=bindparam("out"),
        claim_id=bindparam("claim"),
    )
)
_WORK = select(W).where(W.c.id == bindparam("wid"))
_CHAIN = select(C).where(C.c.run_id == bindparam("run"), C.c.sample_id == bindparam("sample"))
_BLOB = select(db.blobs).where(db.blobs.c.key == bindparam("key"))


def claim(
    conn: Connection, ctx: RunCtx, run: Any, a: Any, now: float, claim_id: str | None = None
) -> Claimed | None:
    """The next item for the worker of assignment `a`: its routed backward work, then its stage's queue.

    A claim repeated with the same claim_id (a retry after a lost answer) gets the same item again.
    """
    cid, stage = a.contributor_id, a.stage
    if claim_id:
        again = conn.execute(_AGAIN, {"cid": cid, "claim": claim_id}).first()
        if again is not None:
            return _claimed(conn, ctx, again, None)
    if run.state != "running":
        return None
    t = ctx.manifest.train
    if held(conn, ctx, cid) >= faults.claim_limit(conn, t, a, now):
        return None
    row = conn.execute(_ROUTED, {"cid": cid, "run": ctx.run_id}).first()
    room = stage != 0 or head_inflight(conn, ctx, cid, now) < t.max_inflight_per_head
    if row is None and room:
        row = _queued(conn, ctx, cid, stage, now)
    new_tokens = None
    if row is None and room and stage == 0:
        row, new_tokens = _new_sample(conn, ctx, run, cid, now)
    if row is None:
        return None
    out_key = output_key(ctx.run_id, row, row.id)  # the head's backward sends its proof of work
    deadline = now + t.work_timeout_s
    args = {"wid": row.id, "cid": cid, "now": now, "deadline": deadline, "out": out_key, "claim": claim_id}
    conn.execute(_TAKE, args)
    if row.kind == "forward" and row.stage == 0:
        conn.execute(
            update(C).where(C.c.run_id == ctx.run_id, C.c.sample_id == row.sample_id).values(head_worker=cid)
        )
    return _claimed(conn, ctx, conn.execute(_WORK, {"wid": row.id}).first(), new_tokens)


def held(conn: Connection, ctx: RunCtx, cid: str) -> int:
    """Items this worker holds claimed now."""
    return int(conn.execute(_HELD, {"cid": cid, "run": ctx.run_id}).scalar_one())


def head_inflight(conn: Connection, ctx: RunCtx, cid: str, now: float) -> int:
    """This head's samples in flight that count toward `train.max_inflight_per_head`."""
    stalled = now - STALLED_SHARE * ctx.manifest.train.work_timeout_s
    return int(conn.execute(_INFLIGHT, {"run": ctx.run_id, "cid": cid, "stalled": stalled}).scalar_one())


def _queued(conn: Connection, ctx: RunCtx, cid: str, stage: int, now: float) -> Any:
    """The oldest queued forward item of the stage; one this worker gave back or let lapse only when no
    other live worker could take it, or it has waited a whole work timeout."""
    args = {"run": ctx.run_id, "stage": stage, "cid": cid}
    row = conn.execute(_QUEUED, args).first()
    if row is not None:
        return row
    row = conn.execute(_AVOIDED, args).first()
    if row is None:
        return None
    if row.created < now - ctx.manifest.train.work_timeout_s or conn.execute(_OTHERS, args).first() is None:
        return row
    return None


def _claimed(conn: Connection, ctx: RunCtx, row: Any, new_tokens: bytes | None) -> Claimed:
    chain = conn.execute(_CHAIN, {"run": ctx.run_id, "sample": row.sample_id}).first()
    input_sha = None
    if row.input_key:
        b = conn.execute(_BLOB, {"key": row.input_key}).first()
        input_sha = (b.sha256, b.size) if b else None
    return Claimed(row, chain, input_sha, new_tokens)


def _new_sample(conn: Connection, ctx: RunCtx, run: Any, head: str, now: float) -> tuple[Any, bytes | None]:
    """A fresh sample for this head, unless one given back still waits for a head (take that first)."""
    t = ctx.manifest.train
    if run.stop_requested or (t.max_samples and run.samples_issued >= t.max_samples):
        return None, None
    if chains.has_orphans(conn, ctx.run_id):
        return None, None
    sample_id = int(run.samples_issued)
    index = data.data_index(sample_id, ctx.layout.n_samples, ctx.manifest.seed)
    blob = chains.tokens_blob(ctx, index)
    key = tokens_key(ctx.run_id, sample_id)
    sha = hashlib.sha256(blob).hexdigest()
    conn.execute(update(db.runs).where(db.runs.c.run_id == ctx.run_id).values(samples_issued=sample_id + 1))
    conn.execute(
        insert(C).values(
            run_id=ctx.run_id,
            sample_id=sample_id,
            data_index=index,
            tokens_key=key,
            tokens_sha=sha,
            tokens_size=len(blob),
            head_worker=head,
            state="active",
            created=now,
            gc=False,
        )
    )
    _put_blob_row(conn, key, sha, len(blob), now)
    rid = conn.execute(
        insert(W).values(
            run_id=ctx.run_id,
            sample_id=sample_id,
            stage=0,
            kind="forward",
            state="queued",
            created=now,
            notify_drop=False,
        )
    ).inserted_primary_key
    assert rid is not None
    return conn.execute(_WORK, {"wid": rid[0]}).first(), blob


def _put_blob_row(conn: Connection, key: str, sha: str, size: int, now: float) -> None:
    B = db.blobs
    if conn.execute(select(B.c.key).where(B.c.key == key)).first() is None:
        conn.execute(insert(B).values(key=key, sha256=sha, size=size, created=now, sealed=True))
    else:
        conn.execute(update(B).where(B.c.key == key).values(sha256=sha, size=size, created=now))


# --- completing ----------------------------------------------------------------------------------------


def load_item(conn: Connection, wid: str, contributor_id: str) -> Any:
    rid = parse_work_id(wid)
    row = conn.execute(_WORK, {"wid": rid}).first()
    if row is None:
        if rid < (conn.execute(select(func.max(W.c.id))).scalar() or 0):  # ids are never handed out twice
            raise Gone(f"work item {wid} finished long ago and was pruned; result discarded")
        raise NotFound(f"no work item {wid!r}")
    if row.worker != contributor_id:
        raise Forbidden(f"work item {wid} is not yours")
    return row


def complete(
    conn: Connection,
    ctx: RunCtx,
    blobs: BlobStore,
    row: Any,
    contributor_id: str,
    report: WorkComplete,
    now: float,
) -> tuple[float, set[str], UploadRef | None]:
    """Accept a result, credit it, and queue what follows in the sample's chain; a forward item may be
    sampled for a check (audits.sample), and then the upload for its weights snapshot comes back too."""
    wid = work_id(row.id)
    if row.state == "done":  # sent again: the same answer, a check's upload included
        check = audits.awaited_upload(conn, ctx, blobs, row) if row.kind == "forward" else None
        return float(row.credits or 0.0), set(), check
    if row.state != "claimed":
        raise Conflict(
            f"work item {wid} was {'re-issued' if row.state == 'expired' else 'dropped'}; result discarded"
        )
    sha, size, loss = report.sha256, report.size, report.loss
    last = ctx.n_stages - 1
    is_tail = row.kind == "forward" and row.stage == last
    if row.output_key:
        name = "activations" if row.kind == "forward" and not is_tail else "grad"
        want = ctx.expect_proof() if row.kind == "backward" and row.stage == 0 else ctx.expect(name)
        integrity.accept_result(conn, ctx, blobs, row.output_key, sha, size, want)
    if is_tail and (loss is None or not math.isfinite(loss)):
        raise Rejected("the tail must report a finite loss", ctx.run_id)
    credits = ledger.work_credits(ctx.gflops[row.stage], ctx.tokens_per_sample, row.kind, is_tail)
    conn.execute(update(W).where(W.c.id == row.id).values(state="done", completed=now, credits=credits))
    mark = ledger.record(
        conn, ctx.run_id, contributor_id, wid, row.kind, row.stage, ctx.tokens_per_sample, credits, now
    )
    faults.delivered(conn, ctx.run_id, contributor_id)
    keys: set[str] = set()
    check = None
    if row.kind == "forward":
        a = assignment(conn, ctx.run_id, contributor_id)
        check = audits.sample(conn, ctx, blobs, row, a, report.epoch, mark, credits, now)
    else:
        keys |= audits.backward_done(conn, row)
    R = db.runs
    if row.kind == "forward" and not is_tail:
        conn.execute(
            insert(W).values(
                run_id=ctx.run_id,
                sample_id=row.sample_id,
                stage=row.stage + 1,
                kind="forward",
                state="queued",
                input_key=row.output_key,
                created=now,
                notify_drop=False,
            )
        )
        keys.add(stage_key(ctx.run_id, row.stage + 1))
    elif is_tail:
        conn.execute(
            insert(db.losses).values(
                run_id=ctx.run_id, sample_id=row.sample_id, loss=loss, t=now, contributor_id=contributor_id
            )
        )
        conn.execute(
            update(R).where(R.c.run_id == ctx.run_id).values(tokens=R.c.tokens + ctx.tokens_per_sample)
        )
        keys |= _route_backward(conn, ctx, row.sample_id, row.stage - 1, row.output_key, now)
    elif row.stage > 0:
        keys |= _route_backward(conn, ctx, row.sample_id, row.stage - 1, row.output_key, now)
    else:
        conn.execute(
            update(C)
            .where(C.c.run_id == ctx.run_id, C.c.sample_id == row.sample_id, C.c.state == "active")
            .values(state="done", finished=now)
        )
        conn.execute(
            update(R).where(R.c.run_id == ctx.run_id).values(samples_completed=R.c.samples_completed + 1)
        )
        keys.add(worker_key(contributor_id))
    return credits, keys, check


def _route_backward(
    conn: Connection, ctx: RunCtx, sample_id: int, stage: int, grad_key: str, now: float
) -> set[str]:
    """Queue backward work for `stage`, for the worker that ran its forward; drop the chain if it is gone."""
    fwd = conn.execute(
        select(W.c.id, W.c.worker)
        .where(
            W.c.run_id == ctx.run_id,
            W.c.sample_id == sample_id,
            W.c.stage == stage,
            W.c.kind == "forward",
            W.c.state == "done",
        )
        .order_by(W.c.id.desc())
        .limit(1)
    ).first()
    owner = assignment(conn, ctx.run_id, fwd.worker) if fwd else None
    if fwd is None or owner is None or owner.state != "active" or owner.stage != stage:
        return drop_chain(conn, ctx, sample_id, now)
    conn.execute(
        insert(W).values(
            run_id=ctx.run_id,
            sample_id=sample_id,
            stage=stage,
            kind="backward",
            state="queued",
            route=fwd.worker,
            forward_id=fwd.id,
            input_key=grad_key,
            created=now,
            notify_drop=False,
        )
    )
    return {worker_key(fwd.worker)}


def abandon(conn: Connection, ctx: RunCtx, blobs: BlobStore, row: Any, why: Abandon, now: float) -> set[str]:
    """A worker gives an item back, saying why (see chains.give_back for what happens to it).

    `bad_input` is charged to whoever produced the input; `unverified` makes the orchestrator re-hash its
    own copies of the inputs, and a damaged one is quarantined rather than handed out again.
    """
    if row.state != "claimed":
        return set()
    if why.reason == "bad_input" and (sender := chains.producer(conn, ctx.run_id, row)) is not None:
        detail = f"{work_id(row.id)} refused its input: {why.detail}"
        faults.charge(conn, ctx.run_id, sender, "bad_output", detail, now)
    if why.reason == "unverified":
        dropped = integrity.recheck_inputs(conn, ctx, blobs, row, now)
        if dropped is not None:
            conn.execute(update(W).where(W.c.id == row.id).values(reason=why.reason))
            return dropped
    return chains.give_back(conn, ctx, row, why.reason, now)
