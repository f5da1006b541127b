"""Turning stored keys into what workers follow: signed BlobRef / UploadRef URLs and full replies."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select

from iota_cli.core.protocol import Assignment, BlobRef, UploadRef, WorkItem
from iota_orchestrator import db, lease, merge
from iota_orchestrator.chains import work_id
from iota_orchestrator.runs import RunCtx
from iota_orchestrator.scheduler import Claimed
from iota_orchestrator.state import State


def blob_ref(state: State, key: str, sha256: str, size: int) -> BlobRef:
    return BlobRef(url=state.blobs.download_url(key), sha256=sha256, size=size)


def upload_ref(state: State, key: str, max_size: int) -> UploadRef:
    return UploadRef(url=state.blobs.upload_url(key, max_size), max_size=max_size)


def weights_ref(conn: Connection, state: State, key: str) -> BlobRef:
    b = conn.execute(select(db.blobs.c.sha256, db.blobs.c.size).where(db.blobs.c.key == key)).one()
    return blob_ref(state, key, b.sha256, b.size)


def assignment_reply(conn: Connection, state: State, ctx: RunCtx, a: Any) -> Assignment:
    st = merge.stage_row(conn, ctx.run_id, a.stage)
    lease_s = ctx.manifest.train.lease_s
    return Assignment(
        run_id=ctx.run_id,
        stage=a.stage,
        n_stages=ctx.n_stages,
        manifest=ctx.manifest.to_dict(),
        epoch=st.epoch,
        weights=weights_ref(conn, state, st.weights_key),
        lease_s=lease_s,
        heartbeat_s=lease.heartbeat_s(lease_s),
    )


def work_item(state: State, ctx: RunCtx, c: Claimed) -> WorkItem:
    row, chain = c.row, c.chain
    last = ctx.n_stages - 1
    needs_tokens = row.kind == "forward" and row.stage in (0, last)
    tokens = blob_ref(state, chain.tokens_key, chain.tokens_sha, chain.tokens_size) if needs_tokens else None
    inp = blob_ref(state, row.input_key, *c.input_sha) if row.input_key and c.input_sha else None
    upload = upload_ref(state, row.output_key, ctx.act_max_size) if row.output_key else None
    return WorkItem(
        work_id=work_id(row.id),
        kind=row.kind,
        stage=row.stage,
        sample_id=row.sample_id,
        tokens=tokens,
        input=inp,
        upload=upload,
        deadline_s=ctx.manifest.train.work_timeout_s,
        forward_id=work_id(row.forward_id) if row.forward_id else None,
    )
