"""The replies that hand a worker its stage (Assignment) and its next item (WorkItem), URLs signed."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from iota_cli.core.protocol import Assignment, WorkItem
from iota_orchestrator import lease, merge
from iota_orchestrator.blobs import BlobStore
from iota_orchestrator.chains import work_id
from iota_orchestrator.runs import RunCtx
from iota_orchestrator.scheduler import Claimed


def assignment_reply(conn: Connection, blobs: BlobStore, ctx: RunCtx, a: Any) -> Assignment:
    st = merge.stage_row(conn, ctx.run_id, a.stage)
    lease_s = ctx.manifest.train.lease_s
    return Assignment(
        run_id=ctx.run_id,
        stage=a.stage,
        n_stages=ctx.n_stages,
        manifest=ctx.manifest,
        epoch=st.epoch,
        weights=merge.stage_weights(conn, blobs, st),
        lease_s=lease_s,
        heartbeat_s=lease.heartbeat_s(lease_s),
    )


def work_item(blobs: BlobStore, ctx: RunCtx, c: Claimed) -> WorkItem:
    row, chain = c.row, c.chain
    last = ctx.n_stages - 1
    needs_tokens = row.kind == "forward" and row.stage in (0, last)
    tokens = blobs.ref(chain.tokens_key, chain.tokens_sha, chain.tokens_size) if needs_tokens else None
    inp = blobs.ref(row.input_key, *c.input_sha) if row.input_key and c.input_sha else None
    upload = blobs.upload_ref(row.output_key, ctx.act_max_size) if row.output_key else None
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
