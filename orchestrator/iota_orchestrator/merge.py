"""A stage's published weights: the epoch its replicas hold, where to download them, and repair.

Merging itself is split by phase: rounds.py (a round's lifecycle and the heartbeat's offer),
butterfly.py (partitions, owners, the plan and part results), publish.py (the orchestrator's fallback
reduction and publishing epoch E+1). Weights damaged on disk are rebuilt here from an earlier epoch or
the init (rebuild), else failed until a merge replaces them.

    python -c "from iota_orchestrator import merge; help(merge.rebuild)"
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, delete, insert, select, update

from iota_cli.core.protocol import BlobRef
from iota_orchestrator import db, integrity, rounds, runs, weights
from iota_orchestrator.blobs import BlobStore
from iota_orchestrator.runs import RunCtx

ST = db.stages
_STAGE = select(ST).where(ST.c.run_id == bindparam("run"), ST.c.stage == bindparam("stage"))
_BLOB = select(db.blobs.c.sha256, db.blobs.c.size).where(db.blobs.c.key == bindparam("key"))


def stage_row(conn: Connection, run_id: str, stage: int) -> Any:
    return conn.execute(_STAGE, {"run": run_id, "stage": stage}).first()


def stage_weights(conn: Connection, blobs: BlobStore, st: Any) -> BlobRef:
    """The signed download of the weights a stage's row points at (its current epoch)."""
    b = conn.execute(_BLOB, {"key": st.weights_key}).one()
    return blobs.ref(st.weights_key, b.sha256, b.size)


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
    if rounds.get_round(conn, ctx.run_id, stage, epoch) is None:
        rounds.open_round(conn, ctx, stage, epoch, now)
    return "no intact copy to rebuild them from: failed until the replicas' next merge replaces them"
