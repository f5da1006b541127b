"""A sample's chain of work items: ids, keys, and what happens when a chain or an item is given up.

A sample is a chain of items: forward on stage 0..S-1 (the tail also runs its backward), then backward on
S-2..0, each routed to the worker that ran that stage's forward. scheduler.py moves chains forward;
lease.py gives work back when a worker goes quiet. Functions return wakeup keys for long-polling claims.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, insert, select, update

from iota_orchestrator import db
from iota_orchestrator.errors import NotFound
from iota_orchestrator.runs import RunCtx

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


# Hot statements are built once with bind parameters: building a select costs more than running it.
_ASSIGNMENT = select(A).where(A.c.run_id == bindparam("run"), A.c.contributor_id == bindparam("cid"))


def assignment(conn: Connection, run_id: str, contributor_id: str) -> Any:
    return conn.execute(_ASSIGNMENT, {"run": run_id, "cid": contributor_id}).first()


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
