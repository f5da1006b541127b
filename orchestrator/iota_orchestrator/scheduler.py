"""Work: per-stage queues, claims with deadlines, leases, re-issue, and the chain of one sample.

A sample is a chain of items: forward on stage 0..S-1 (the tail also runs its backward), then backward on
S-2..0, each routed to the worker that ran that stage's forward. Backward work is handed out first.
Functions here run inside a State.tx() transaction and return wakeup keys for long-polling claims.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, func, insert, select, update

from iota_cli.tensors import RawTensor, encode
from iota_orchestrator import data, db, ledger
from iota_orchestrator.blobs import BlobStore
from iota_orchestrator.errors import BadRequest, Conflict, Forbidden, Invalid, NotFound
from iota_orchestrator.runs import RunCtx
from iota_orchestrator.weights import check_tensors

W, C, A = db.work, db.chains, db.assignments
WORK_ID = re.compile(r"^w([0-9]{1,18})$")


def work_id(row_id: int) -> str:
    return f"w{row_id}"


def parse_work_id(text: str) -> int:
    m = WORK_ID.match(text)
    if not m:
        raise NotFound(f"no work item {text[:40]!r}")
    return int(m.group(1))


def stage_key(run_id: str, stage: int) -> str:
    return f"s:{run_id}:{stage}"


def worker_key(contributor_id: str) -> str:
    return f"c:{contributor_id}"


def tokens_key(run_id: str, sample_id: int) -> str:
    return f"runs/{run_id}/tokens/{sample_id}.safetensors"


def output_key(run_id: str, row: Any, row_id: int) -> str:
    kind = "act" if row.kind == "forward" else "grad"
    return f"runs/{run_id}/{kind}/{row.sample_id}/s{row.stage}-{work_id(row_id)}.safetensors"


def tokens_blob(ctx: RunCtx, index: int) -> bytes:
    t = ctx.manifest.train
    arr = data.sample_tokens(list(ctx.files), ctx.layout, index, t.batch_size, t.seq_len)
    return encode({"tokens": RawTensor("I32", tuple(arr.shape), arr.tobytes())})


@dataclass(frozen=True)
class Claimed:
    row: Any  # the work row, as claimed
    chain: Any
    input_sha: tuple[str, int] | None  # (sha256, size) of the input blob
    new_tokens: bytes | None  # a fresh sample's token blob, to store before answering


def assignment(conn: Connection, run_id: str, contributor_id: str) -> Any:
    return conn.execute(select(A).where(A.c.run_id == run_id, A.c.contributor_id == contributor_id)).first()


def touch(conn: Connection, run_id: str, contributor_id: str, now: float) -> None:
    """A worker that talks to us is alive: renew its lease (and revive it if it had been dropped)."""
    conn.execute(
        update(A)
        .where(A.c.run_id == run_id, A.c.contributor_id == contributor_id)
        .values(last_seen=now, state="active")
    )


def grant_restart_grace(conn: Connection, now: float) -> None:
    """After a restart, give live workers a full lease and claimed items a full timeout from now."""
    conn.execute(update(A).where(A.c.state == "active", A.c.last_seen < now).values(last_seen=now))
    for run in conn.execute(select(db.runs.c.run_id, db.runs.c.manifest).where(db.runs.c.state == "running")):
        t = json.loads(run.manifest).get("train", {})
        timeout, merge_s = float(t.get("work_timeout_s", 60.0)), float(t.get("merge_timeout_s", 60.0))
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


# --- claiming ------------------------------------------------------------------------------------------


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
        again = conn.execute(
            select(W).where(W.c.worker == contributor_id, W.c.claim_id == claim_id, W.c.state == "claimed")
        ).first()
        if again is not None:
            return _claimed(conn, ctx, again, None)
    if run.state != "running":
        return None
    row = conn.execute(
        select(W)
        .where(W.c.route == contributor_id, W.c.state == "queued", W.c.run_id == ctx.run_id)
        .order_by(W.c.id)
        .limit(1)
    ).first()
    if row is None:
        row = conn.execute(
            select(W)
            .where(W.c.run_id == ctx.run_id, W.c.stage == stage, W.c.state == "queued", W.c.kind == "forward")
            .order_by(W.c.id)
            .limit(1)
        ).first()
    new_tokens = None
    if row is None and stage == 0:
        row, new_tokens = _new_sample(conn, ctx, run, contributor_id, now)
    if row is None:
        return None
    timeout = ctx.manifest.train.work_timeout_s
    out_key = None if (row.kind == "backward" and row.stage == 0) else output_key(ctx.run_id, row, row.id)
    conn.execute(
        update(W)
        .where(W.c.id == row.id)
        .values(
            state="claimed",
            worker=contributor_id,
            claimed=now,
            deadline=now + timeout,
            output_key=out_key,
            claim_id=claim_id,
        )
    )
    if row.kind == "forward" and row.stage == 0:
        conn.execute(
            update(C)
            .where(C.c.run_id == ctx.run_id, C.c.sample_id == row.sample_id)
            .values(head_worker=contributor_id)
        )
    return _claimed(conn, ctx, conn.execute(select(W).where(W.c.id == row.id)).first(), new_tokens)


def _claimed(conn: Connection, ctx: RunCtx, row: Any, new_tokens: bytes | None) -> Claimed:
    chain = conn.execute(select(C).where(C.c.run_id == ctx.run_id, C.c.sample_id == row.sample_id)).first()
    input_sha = None
    if row.input_key:
        b = conn.execute(
            select(db.blobs.c.sha256, db.blobs.c.size).where(db.blobs.c.key == row.input_key)
        ).first()
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
    ).inserted_primary_key[0]
    return conn.execute(select(W).where(W.c.id == rid)).first(), blob


def _put_blob_row(conn: Connection, key: str, sha: str, size: int, now: float) -> None:
    B = db.blobs
    if conn.execute(select(B.c.key).where(B.c.key == key)).first() is None:
        conn.execute(insert(B).values(key=key, sha256=sha, size=size, created=now, sealed=True))
    else:
        conn.execute(update(B).where(B.c.key == key).values(sha256=sha, size=size, created=now))


# --- completing ----------------------------------------------------------------------------------------


def load_item(conn: Connection, wid: str, contributor_id: str) -> Any:
    row = conn.execute(select(W).where(W.c.id == parse_work_id(wid))).first()
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
        conn.execute(
            insert(db.losses).values(run_id=ctx.run_id, sample_id=row.sample_id, loss=float(loss), t=now)
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
    return credits, keys


def _check_output(
    conn: Connection, ctx: RunCtx, blobs: BlobStore, row: Any, sha: str | None, size: int, name: str
) -> None:
    if sha is None:
        raise BadRequest("sha256 of the uploaded result is required")
    b = conn.execute(select(db.blobs).where(db.blobs.c.key == row.output_key)).first()
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
    if owner is None or owner.state != "active" or owner.stage != stage:
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


# --- giving work back ----------------------------------------------------------------------------------


def drop_chain(conn: Connection, ctx: RunCtx, sample_id: int, now: float) -> set[str]:
    """Give up on a sample: discard its pending items and tell its workers to free what they saved."""
    chain = conn.execute(select(C).where(C.c.run_id == ctx.run_id, C.c.sample_id == sample_id)).first()
    if chain is None or chain.state != "active":
        return set()
    conn.execute(
        update(C)
        .where(C.c.run_id == ctx.run_id, C.c.sample_id == sample_id)
        .values(state="dropped", finished=now)
    )
    here = and_(W.c.run_id == ctx.run_id, W.c.sample_id == sample_id)
    conn.execute(update(W).where(here, W.c.state.in_(("queued", "claimed"))).values(state="dropped"))
    conn.execute(
        update(W).where(here, W.c.worker.is_not(None), W.c.kind == "forward").values(notify_drop=True)
    )
    R = db.runs
    conn.execute(update(R).where(R.c.run_id == ctx.run_id).values(samples_dropped=R.c.samples_dropped + 1))
    return {worker_key(chain.head_worker)} if chain.head_worker else set()


def requeue(conn: Connection, ctx: RunCtx, row: Any, now: float) -> set[str]:
    """Re-issue a forward item: the old one is expired (a late result gets 409), a fresh copy is queued."""
    conn.execute(update(W).where(W.c.id == row.id).values(state="expired"))
    conn.execute(
        insert(W).values(
            run_id=ctx.run_id,
            sample_id=row.sample_id,
            stage=row.stage,
            kind="forward",
            state="queued",
            input_key=row.input_key,
            created=now,
            notify_drop=False,
        )
    )
    if row.stage == 0:
        conn.execute(
            update(C).where(C.c.run_id == ctx.run_id, C.c.sample_id == row.sample_id).values(head_worker=None)
        )
    return {stage_key(ctx.run_id, row.stage)}


def abandon(conn: Connection, ctx: RunCtx, row: Any, now: float) -> set[str]:
    if row.state != "claimed":
        return set()
    if row.kind == "forward":
        return requeue(conn, ctx, row, now)
    return drop_chain(conn, ctx, row.sample_id, now)


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
        keys |= requeue(conn, ctx, row, now)
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
    """Drop workers silent past their lease; re-issue (forward) or drop (backward) items past deadline."""
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
        keys |= (
            requeue(conn, ctx, row, now)
            if row.kind == "forward"
            else drop_chain(conn, ctx, row.sample_id, now)
        )
    return keys


def take_drops(conn: Connection, run_id: str, contributor_id: str) -> list[int]:
    """Sample ids whose chains were dropped since this worker last asked (it frees their saved state)."""
    rows = conn.execute(
        select(W.c.id, W.c.sample_id).where(
            W.c.worker == contributor_id, W.c.notify_drop.is_(True), W.c.run_id == run_id
        )
    ).all()
    if rows:
        conn.execute(update(W).where(W.c.id.in_([r.id for r in rows])).values(notify_drop=False))
    return sorted({r.sample_id for r in rows})


def queue_depths(conn: Connection, run_id: str) -> dict[tuple[int, str], int]:
    rows = conn.execute(
        select(W.c.stage, W.c.kind, func.count())
        .where(W.c.run_id == run_id, W.c.state == "queued")
        .group_by(W.c.stage, W.c.kind)
    ).all()
    return {(s, k): n for s, k, n in rows}


def active_chains(conn: Connection, run_id: str) -> int:
    return conn.execute(
        select(func.count()).select_from(C).where(C.c.run_id == run_id, C.c.state == "active")
    ).scalar_one()
