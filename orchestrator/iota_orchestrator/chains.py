"""A sample's chain of work items: ids, keys, and what happens when a chain or an item is given up.

A sample is a chain of items: forward on stage 0..S-1 (the tail also runs its backward), then backward on
S-2..0, each routed to the worker that ran that stage's forward. scheduler.py moves chains forward;
lease.py gives work back when a worker goes quiet. Functions return wakeup keys for long-polling claims.

Every unfinished try of an item (given back for any reason, lapsed, or its worker left) is a work row in
state `expired` with its reason; after MAX_ITEM_FAILURES of them the chain is dropped, so no fault, and no
contributor that claims and gives back in a loop, keeps an item going forever.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, insert, select, update

from iota_cli.core.tensors import RawTensor, encode
from iota_orchestrator import data, db
from iota_orchestrator.errors import NotFound
from iota_orchestrator.runs import RunCtx

W, C, A = db.work, db.chains, db.assignments
WORK_ID = re.compile(r"^w([0-9]{1,18})$")
# Tries of one item (a stage's forward or backward of one sample) before its chain is dropped.
MAX_ITEM_FAILURES = 3


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


def tokens_blob(ctx: RunCtx, index: int) -> bytes:
    """The token batch of corpus sample `index`, as safetensors (the same bytes every time)."""
    t = ctx.manifest.train
    arr = data.sample_tokens(list(ctx.files), ctx.layout, index, t.batch_size, t.seq_len, ctx.cache)
    return encode({"tokens": RawTensor("I32", tuple(arr.shape), arr.tobytes())})


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


_TRIES = select(func.count()).where(
    W.c.run_id == bindparam("run"),
    W.c.sample_id == bindparam("sample"),
    W.c.stage == bindparam("stage"),
    W.c.kind == bindparam("kind"),
)


def tries(conn: Connection, run_id: str, row: Any) -> int:
    """How many times this item (its stage and kind of its sample) has been issued, this row included."""
    args = {"run": run_id, "sample": row.sample_id, "stage": row.stage, "kind": row.kind}
    return conn.execute(_TRIES, args).scalar_one()


def give_back(conn: Connection, ctx: RunCtx, row: Any, reason: str, now: float) -> set[str]:
    """An item comes back unfinished: re-issue it (forward, with tries left) or drop its chain.

    Backward work drops its chain at once, since only the worker that ran the forward could do it.
    """
    conn.execute(update(W).where(W.c.id == row.id).values(state="expired", reason=reason))
    if row.kind != "forward" or tries(conn, ctx.run_id, row) >= MAX_ITEM_FAILURES:
        return drop_chain(conn, ctx, row.sample_id, now)
    return requeue(conn, ctx, row, now)


def requeue(conn: Connection, ctx: RunCtx, row: Any, now: float) -> set[str]:
    """Queue a fresh copy of an expired forward item (a late result for the old one gets 409).

    The copy goes to others first: the worker that had it is avoided while another can take it.
    """
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
            avoid=row.worker,
        )
    )
    if row.stage == 0:
        conn.execute(
            update(C).where(C.c.run_id == ctx.run_id, C.c.sample_id == row.sample_id).values(head_worker=None)
        )
    return {stage_key(ctx.run_id, row.stage)}


_PRODUCER = select(W.c.worker).where(
    W.c.run_id == bindparam("run"),
    W.c.sample_id == bindparam("sample"),
    W.c.output_key == bindparam("key"),
    W.c.state == "done",
)


def producer(conn: Connection, run_id: str, row: Any) -> str | None:
    """The contributor whose accepted result is this item's input (None for server-made tokens)."""
    if not row.input_key:
        return None
    return conn.execute(_PRODUCER, {"run": run_id, "sample": row.sample_id, "key": row.input_key}).scalar()


_ORPHANS = select(C.c.sample_id).where(
    C.c.run_id == bindparam("run"), C.c.head_worker.is_(None), C.c.state == "active"
)


def has_orphans(conn: Connection, run_id: str) -> bool:
    """Whether a chain waits for a head: its head item was given back and not yet claimed again."""
    return conn.execute(_ORPHANS.limit(1), {"run": run_id}).first() is not None


def drop_stranded(conn: Connection, ctx: RunCtx, now: float) -> set[str]:
    """Drop chains waiting at a stage with no live worker (a stopped run: nobody is coming to drain them)."""
    live = select(A.c.stage).where(A.c.run_id == ctx.run_id, A.c.state == "active")
    stranded = conn.execute(
        select(W.c.sample_id)
        .where(W.c.run_id == ctx.run_id, W.c.state == "queued", W.c.stage.not_in(live))
        .distinct()
    ).scalars()
    keys: set[str] = set()
    for sample_id in list(stranded):
        keys |= drop_chain(conn, ctx, sample_id, now)
    return keys


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
