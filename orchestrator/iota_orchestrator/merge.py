"""Merge rounds: replicas of a stage average their weights every `train.merge_interval` local steps.

A round for (stage, epoch E) opens when a replica at E has stepped merge_interval times since it synced.
Every live replica at E is then offered the round in its heartbeat, uploads its weights and reports them.
The round closes when all have contributed or merge_timeout_s passes; the orchestrator averages the
contributions (weighted by backward passes) with numpy and publishes them as epoch E+1. A contribution
for an old epoch gets 409 and the worker just syncs; nobody is dropped for a phase race. A contribution
is read through before it is recorded (integrity.check_file): a bad one gets 422 and a fault. Weights
damaged on disk are rebuilt from an earlier epoch or the init (rebuild), else failed until a merge.
(Butterfly all-reduce, where workers average partitions among themselves, is future work.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from iota_cli.core.protocol import BlobRef, MergeComplete, MergeCompleteReply, MergeRound
from iota_orchestrator import db, integrity, runs, weights
from iota_orchestrator.blobs import BlobStore
from iota_orchestrator.errors import BadRequest, Conflict, Forbidden
from iota_orchestrator.faults import Rejected
from iota_orchestrator.integrity import Checked
from iota_orchestrator.runs import RunCtx

R, MC, A, ST = db.merge_rounds, db.merge_contribs, db.assignments, db.stages


_STAGE = select(ST).where(ST.c.run_id == bindparam("run"), ST.c.stage == bindparam("stage"))
_ROUND = select(R).where(
    R.c.run_id == bindparam("run"), R.c.stage == bindparam("stage"), R.c.epoch == bindparam("epoch")
)
_CONTRIBUTED = select(MC.c.contributor_id).where(
    MC.c.run_id == bindparam("run"),
    MC.c.stage == bindparam("stage"),
    MC.c.epoch == bindparam("epoch"),
    MC.c.contributor_id == bindparam("cid"),
)


def stage_row(conn: Connection, run_id: str, stage: int) -> Any:
    return conn.execute(_STAGE, {"run": run_id, "stage": stage}).first()


_BLOB = select(db.blobs.c.sha256, db.blobs.c.size).where(db.blobs.c.key == bindparam("key"))


def stage_weights(conn: Connection, blobs: BlobStore, st: Any) -> BlobRef:
    """The signed download of the weights a stage's row points at (its current epoch)."""
    b = conn.execute(_BLOB, {"key": st.weights_key}).one()
    return blobs.ref(st.weights_key, b.sha256, b.size)


def contrib_key(run_id: str, stage: int, epoch: int, contributor_id: str) -> str:
    return f"runs/{run_id}/merge/s{stage}/e{epoch}/{contributor_id}.safetensors"


def get_round(conn: Connection, run_id: str, stage: int, epoch: int) -> Any:
    return conn.execute(_ROUND, {"run": run_id, "stage": stage, "epoch": epoch}).first()


def has_contributed(conn: Connection, run_id: str, stage: int, epoch: int, contributor_id: str) -> bool:
    args = {"run": run_id, "stage": stage, "epoch": epoch, "cid": contributor_id}
    return conn.execute(_CONTRIBUTED, args).first() is not None


def open_round(conn: Connection, ctx: RunCtx, stage: int, epoch: int, now: float) -> Any:
    conn.execute(
        insert(R).values(
            run_id=ctx.run_id,
            stage=stage,
            epoch=epoch,
            state="open",
            opened=now,
            deadline=now + ctx.manifest.train.merge_timeout_s,
            contributions=0,
        )
    )
    return get_round(conn, ctx.run_id, stage, epoch)


def _contributed(conn: Connection, run_id: str, stage: int, epoch: int) -> set[str]:
    rows = conn.execute(
        select(MC.c.contributor_id).where(MC.c.run_id == run_id, MC.c.stage == stage, MC.c.epoch == epoch)
    ).all()
    return {r[0] for r in rows}


def offer(
    conn: Connection,
    ctx: RunCtx,
    blobs: BlobStore,
    st: Any,
    contributor_id: str,
    epoch: int,
    steps_since: int | None,
    now: float,
) -> MergeRound | None:
    """The merge round a heartbeating replica should contribute to, opening one when it is due.

    st is the stage's row; steps_since counts the replica's optimizer steps since it synced to st.epoch
    (None when it has not yet).
    """
    if epoch != st.epoch:
        return None
    rnd = get_round(conn, ctx.run_id, st.stage, st.epoch)
    if rnd is None:
        if steps_since is None or steps_since < ctx.manifest.train.merge_interval:
            return None
        rnd = open_round(conn, ctx, st.stage, st.epoch, now)
    if rnd.state != "open" or has_contributed(conn, ctx.run_id, st.stage, st.epoch, contributor_id):
        return None
    key = contrib_key(ctx.run_id, st.stage, st.epoch, contributor_id)
    return MergeRound(
        stage=st.stage,
        epoch=st.epoch,
        upload=blobs.upload_ref(key, weights.max_weights_size(ctx.cfg, st.stage)),
        deadline_s=round(max(rnd.deadline - now, 0.0), 3),
    )


def contribution_want(ctx: RunCtx, stage: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """What a contribution to a stage's round must hold: its parameters, F32."""
    if not 0 <= stage < ctx.n_stages:
        return {}
    return {n: ("F32", shape) for n, shape in weights.expected(ctx.cfg, stage).items()}


def contribute(
    conn: Connection,
    ctx: RunCtx,
    blobs: BlobStore,
    contributor_id: str,
    report: MergeComplete,
    checked: Checked,
    now: float,
) -> MergeCompleteReply:
    """Record a replica's uploaded weights for the open round (repeating it is accepted again).

    checked is the upload as integrity.check_file read it, outside the lock (weights can be large).
    """
    stage, epoch = report.stage, report.epoch
    a = conn.execute(select(A).where(A.c.run_id == ctx.run_id, A.c.contributor_id == contributor_id)).first()
    if a is None or a.stage != stage:
        raise Forbidden(f"you are not a replica of stage {stage} in this run")
    st = stage_row(conn, ctx.run_id, stage)
    if epoch != st.epoch:
        raise Conflict(
            f"stage {stage} is at epoch {st.epoch}, not {epoch}: load the current weights and carry on"
        )
    rnd = get_round(conn, ctx.run_id, stage, epoch)
    if rnd is None or rnd.state != "open":
        raise Conflict(f"no merge round is open for stage {stage} at epoch {epoch}")
    if has_contributed(conn, ctx.run_id, stage, epoch, contributor_id):
        return MergeCompleteReply(accepted=True, epoch=st.epoch)
    key = contrib_key(ctx.run_id, stage, epoch, contributor_id)
    b = conn.execute(select(db.blobs).where(db.blobs.c.key == key)).first()
    if b is None:
        raise BadRequest("upload your weights to the round's upload URL first")
    if b.sha256 != report.sha256 or b.size != report.size:
        raise BadRequest("the uploaded weights do not match the sha256 and size you sent")
    if checked.sha256 != b.sha256:  # replaced while it was being read: read the new one
        raise Conflict("the uploaded weights changed while they were checked; report them again")
    if checked.problem:
        raise Rejected(f"weights rejected: {checked.problem}", ctx.run_id)
    conn.execute(update(db.blobs).where(db.blobs.c.key == key).values(sealed=True))
    conn.execute(
        insert(MC).values(
            run_id=ctx.run_id,
            stage=stage,
            epoch=epoch,
            contributor_id=contributor_id,
            blob_key=key,
            weight=float(report.weight),
            t=now,
        )
    )
    conn.execute(
        update(R)
        .where(R.c.run_id == ctx.run_id, R.c.stage == stage, R.c.epoch == epoch)
        .values(contributions=R.c.contributions + 1)
    )
    return MergeCompleteReply(accepted=True, epoch=st.epoch)


def due(conn: Connection, ctx: RunCtx, now: float) -> list[tuple[int, int]]:
    """Rounds ready to close (all live replicas in, or past the deadline); marks them closing."""
    out = []
    for rnd in conn.execute(
        select(R).where(R.c.run_id == ctx.run_id, R.c.state.in_(("open", "closing")))
    ).all():
        if rnd.state == "open":
            live = conn.execute(
                select(A.c.contributor_id).where(
                    A.c.run_id == ctx.run_id,
                    A.c.stage == rnd.stage,
                    A.c.state == "active",
                    A.c.epoch == rnd.epoch,
                )
            ).all()
            waiting = {r[0] for r in live} - _contributed(conn, ctx.run_id, rnd.stage, rnd.epoch)
            if rnd.deadline > now and (waiting or rnd.contributions == 0):
                continue
            conn.execute(
                update(R)
                .where(R.c.run_id == ctx.run_id, R.c.stage == rnd.stage, R.c.epoch == rnd.epoch)
                .values(state="closing")
            )
        out.append((rnd.stage, rnd.epoch))
    return out


def contributions(conn: Connection, run_id: str, stage: int, epoch: int) -> list[tuple[str, float]]:
    rows = conn.execute(
        select(MC.c.blob_key, MC.c.weight).where(
            MC.c.run_id == run_id, MC.c.stage == stage, MC.c.epoch == epoch
        )
    ).all()
    return [(r.blob_key, float(r.weight)) for r in rows]


def publish(
    conn: Connection, ctx: RunCtx, stage: int, epoch: int, stored: tuple[str, str, int] | None, now: float
) -> list[str]:
    """Make the averaged weights epoch+1 (or, with none usable, forget the round); return keys to delete."""
    where = (R.c.run_id == ctx.run_id, R.c.stage == stage, R.c.epoch == epoch)
    dead = [k for k, _ in contributions(conn, ctx.run_id, stage, epoch)]
    st = stage_row(conn, ctx.run_id, stage)
    if stored is None or st.epoch != epoch:
        if stored is not None:
            dead.append(stored[0])
        conn.execute(delete(MC).where(MC.c.run_id == ctx.run_id, MC.c.stage == stage, MC.c.epoch == epoch))
        conn.execute(delete(R).where(*where))
    else:
        key, sha, size = stored
        conn.execute(insert(db.blobs).values(key=key, sha256=sha, size=size, created=now, sealed=True))
        conn.execute(
            update(ST)
            .where(ST.c.run_id == ctx.run_id, ST.c.stage == stage)
            .values(epoch=epoch + 1, weights_key=key, updated=now)
        )
        conn.execute(update(R).where(*where).values(state="closed", closed=now))
        if epoch >= 1:  # keep the previous epoch for workers still downloading it
            dead.append(runs.weights_key(ctx.run_id, stage, epoch - 1))
    conn.execute(delete(db.blobs).where(db.blobs.c.key.in_(dead)))
    return dead


def open_final(conn: Connection, ctx: RunCtx, now: float) -> int:
    """Open a last round on every stage with live replicas (the run has drained); return how many."""
    opened = 0
    for s in range(ctx.n_stages):
        st = stage_row(conn, ctx.run_id, s)
        live = conn.execute(
            select(func.count())
            .select_from(A)
            .where(A.c.run_id == ctx.run_id, A.c.stage == s, A.c.state == "active")
        ).scalar_one()
        if live and get_round(conn, ctx.run_id, s, st.epoch) is None:
            open_round(conn, ctx, s, st.epoch, now)
            opened += 1
    return opened


def unsettled(conn: Connection, run_id: str) -> int:
    return conn.execute(
        select(func.count()).select_from(R).where(R.c.run_id == run_id, R.c.state.in_(("open", "closing")))
    ).scalar_one()


# --- damaged weights ------------------------------------------------------------------------------------


def current_weights(conn: Connection, run_id: str) -> Sequence[Any]:
    """(stage, epoch, weights_key, sha256, quarantined) of every stage's current weights (sha256 None: no
    blob row)."""
    B = db.blobs
    return conn.execute(
        select(ST.c.stage, ST.c.epoch, ST.c.weights_key, B.c.sha256, B.c.quarantined)
        .select_from(ST.outerjoin(B, B.c.key == ST.c.weights_key))
        .where(ST.c.run_id == run_id)
        .order_by(ST.c.stage)
    ).all()


def rebuild(conn: Connection, ctx: RunCtx, blobs: BlobStore, stage: int, now: float) -> str:
    """A stage's current weights no longer hash right on disk: say what was done about it.

    Epoch 0 is made again from the model spec's init (the same bytes). A later epoch E is replaced by a
    copy of E-1, if that is still kept and intact, published as E+1 so every replica loads it (the merge
    that made E is lost, not the run). Else the weights are quarantined, the status shows them failed,
    and a merge round opens so the replicas' next average replaces them.
    """
    st = stage_row(conn, ctx.run_id, stage)
    key, epoch = st.weights_key, st.epoch
    recorded = conn.execute(_BLOB, {"key": key}).one().sha256
    if epoch == 0:
        data = weights.init_stage(ctx.cfg, stage, ctx.manifest.seed)
        if hashlib.sha256(data).hexdigest() == recorded:
            blobs.write(key, data)
            return "made epoch 0 again from the model spec's init"
    prev = runs.weights_key(ctx.run_id, stage, epoch - 1) if epoch else None
    prev_row = conn.execute(_BLOB, {"key": prev}).first() if prev else None
    if prev and prev_row is not None and integrity.intact(blobs, prev, prev_row.sha256):
        new = runs.weights_key(ctx.run_id, stage, epoch + 1)
        b = blobs.write(new, blobs.read(prev))
        conn.execute(insert(db.blobs).values(key=new, sha256=b.sha256, size=b.size, created=now, sealed=True))
        conn.execute(
            update(ST)
            .where(ST.c.run_id == ctx.run_id, ST.c.stage == stage)
            .values(epoch=epoch + 1, weights_key=new, updated=now)
        )
        integrity.quarantine(conn, blobs, key, f"stage {stage} epoch {epoch} weights damaged on disk")
        conn.execute(delete(db.blobs).where(db.blobs.c.key == prev))
        blobs.delete(prev)
        return f"published a copy of epoch {epoch - 1} as epoch {epoch + 1}"
    integrity.quarantine(conn, blobs, key, f"stage {stage} epoch {epoch} weights damaged on disk")
    if get_round(conn, ctx.run_id, stage, epoch) is None:
        open_round(conn, ctx, stage, epoch, now)
    return "no intact copy to rebuild them from: failed until the replicas' next merge replaces them"
