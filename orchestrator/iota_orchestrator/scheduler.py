"""Work: per-stage queues, claims with deadlines, and moving a sample's chain along as results arrive.

Backward work is handed out before forward work, and only to the worker that ran the matching forward.
Functions here run inside a State.tx() transaction and return wakeup keys for long-polling claims.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, func, insert, select, update

from iota_cli.core.tensors import RawTensor, encode
from iota_orchestrator import data, db, ledger
from iota_orchestrator.blobs import BlobStore
from iota_orchestrator.chains import (
    C,
    W,
    assignment,
    drop_chain,
    output_key,
    parse_work_id,
    requeue,
    stage_key,
    tokens_key,
    work_id,
    worker_key,
)
from iota_orchestrator.errors import BadRequest, Conflict, Forbidden, Invalid, NotFound
from iota_orchestrator.runs import RunCtx
from iota_orchestrator.weights import check_tensors


def tokens_blob(ctx: RunCtx, index: int) -> bytes:
    t = ctx.manifest.train
    arr = data.sample_tokens(list(ctx.files), ctx.layout, index, t.batch_size, t.seq_len, ctx.cache)
    return encode({"tokens": RawTensor("I32", tuple(arr.shape), arr.tobytes())})


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
_ROUTED = (
    select(W)
    .where(W.c.route == bindparam("cid"), W.c.state == "queued", W.c.run_id == bindparam("run"))
    .order_by(W.c.id)
    .limit(1)
)
_QUEUED = (
    select(W)
    .where(
        W.c.run_id == bindparam("run"),
        W.c.stage == bindparam("stage"),
        W.c.state == "queued",
        W.c.kind == "forward",
    )
    .order_by(W.c.id)
    .limit(1)
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
    conn: Connection,
    ctx: RunCtx,
    run: Any,
    contributor_id: str,
    stage: int,
    now: float,
    claim_id: str | None = None,
) -> Claimed | None:
    """The next item for this worker: its routed backward work, then its stage's forward queue.

    A claim repeated with the same claim_id (a retry after a lost answer) gets the same item again.
    """
    if claim_id:
        again = conn.execute(_AGAIN, {"cid": contributor_id, "claim": claim_id}).first()
        if again is not None:
            return _claimed(conn, ctx, again, None)
    if run.state != "running":
        return None
    row = conn.execute(_ROUTED, {"cid": contributor_id, "run": ctx.run_id}).first()
    if row is None:
        row = conn.execute(_QUEUED, {"run": ctx.run_id, "stage": stage}).first()
    new_tokens = None
    if row is None and stage == 0:
        row, new_tokens = _new_sample(conn, ctx, run, contributor_id, now)
    if row is None:
        return None
    out_key = None if (row.kind == "backward" and row.stage == 0) else output_key(ctx.run_id, row, row.id)
    deadline = now + ctx.manifest.train.work_timeout_s
    args = {
        "wid": row.id,
        "cid": contributor_id,
        "now": now,
        "deadline": deadline,
        "out": out_key,
        "claim": claim_id,
    }
    conn.execute(_TAKE, args)
    if row.kind == "forward" and row.stage == 0:
        conn.execute(
            update(C)
            .where(C.c.run_id == ctx.run_id, C.c.sample_id == row.sample_id)
            .values(head_worker=contributor_id)
        )
    return _claimed(conn, ctx, conn.execute(_WORK, {"wid": row.id}).first(), new_tokens)


def _claimed(conn: Connection, ctx: RunCtx, row: Any, new_tokens: bytes | None) -> Claimed:
    chain = conn.execute(_CHAIN, {"run": ctx.run_id, "sample": row.sample_id}).first()
    input_sha = None
    if row.input_key:
        b = conn.execute(_BLOB, {"key": row.input_key}).first()
        input_sha = (b.sha256, b.size) if b else None
    return Claimed(row, chain, input_sha, new_tokens)


def _new_sample(conn: Connection, ctx: RunCtx, run: Any, head: str, now: float) -> tuple[Any, bytes | None]:
    t = ctx.manifest.train
    if run.stop_requested or (t.max_samples and run.samples_issued >= t.max_samples):
        return None, None
    inflight = conn.execute(
        select(func.count())
        .select_from(C)
        .where(C.c.run_id == ctx.run_id, C.c.head_worker == head, C.c.state == "active")
    ).scalar_one()
    if inflight >= t.max_inflight_per_head:
        return None, None
    sample_id = int(run.samples_issued)
    index = data.data_index(sample_id, ctx.layout.n_samples, ctx.manifest.seed)
    blob = tokens_blob(ctx, index)
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
    row = conn.execute(_WORK, {"wid": parse_work_id(wid)}).first()
    if row is None:
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
    sha: str | None,
    size: int,
    loss: float | None,
    now: float,
) -> tuple[float, set[str]]:
    """Accept a result, credit it, and queue what follows in the sample's chain."""
    wid = work_id(row.id)
    if row.state == "done":
        return float(row.credits or 0.0), set()
    if row.state != "claimed":
        raise Conflict(
            f"work item {wid} was {'re-issued' if row.state == 'expired' else 'dropped'}; result discarded"
        )
    last = ctx.n_stages - 1
    is_tail = row.kind == "forward" and row.stage == last
    if row.output_key:
        _check_output(
            conn,
            ctx,
            blobs,
            row,
            sha,
            size,
            "activations" if row.kind == "forward" and not is_tail else "grad",
        )
    if is_tail and (loss is None or not math.isfinite(loss)):
        raise Invalid("the tail must report a finite loss")
    credits = ledger.work_credits(ctx.gflops[row.stage], ctx.tokens_per_sample, row.kind, is_tail)
    conn.execute(update(W).where(W.c.id == row.id).values(state="done", completed=now, credits=credits))
    ledger.record(
        conn, ctx.run_id, contributor_id, wid, row.kind, row.stage, ctx.tokens_per_sample, credits, now
    )
    keys: set[str] = set()
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
        conn.execute(insert(db.losses).values(run_id=ctx.run_id, sample_id=row.sample_id, loss=loss, t=now))
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
    return credits, keys


def _check_output(
    conn: Connection, ctx: RunCtx, blobs: BlobStore, row: Any, sha: str | None, size: int, name: str
) -> None:
    if sha is None:
        raise BadRequest("sha256 of the uploaded result is required")
    b = conn.execute(_BLOB, {"key": row.output_key}).first()
    if b is None:
        raise BadRequest("no result uploaded yet: PUT it to the item's upload URL first")
    if b.sha256 != sha or b.size != size:
        raise BadRequest(f"the uploaded result has sha256 {b.sha256} and {b.size} bytes, not what you sent")
    problem = check_tensors(blobs.path(row.output_key), ctx.expect(name))
    if problem:
        raise Invalid(f"result rejected: {problem}")
    conn.execute(update(db.blobs).where(db.blobs.c.key == row.output_key).values(sealed=True))


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


def abandon(conn: Connection, ctx: RunCtx, row: Any, now: float) -> set[str]:
    if row.state != "claimed":
        return set()
    if row.kind == "forward":
        return requeue(conn, ctx, row, now)
    return drop_chain(conn, ctx, row.sample_id, now)
