"""The replies that hand a worker its stage (Assignment) and its next item (WorkItem), URLs signed.

With the directory store a claim may take its small inputs inline (ClaimRequest.inline_max) and its
result may come back in the complete (UploadRef.inline_max): two round trips an item instead of four.
An object store never carries bytes through the orchestrator, so it offers neither.
"""

from __future__ import annotations

import base64
from typing import Any

from sqlalchemy import Connection

from iota_cli.core.protocol import INLINE_MAX, Assignment, BlobRef, WorkItem
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


def work_item(blobs: BlobStore, ctx: RunCtx, c: Claimed, inline_max: int = 0) -> WorkItem:
    """The claimed item for the worker; inputs up to inline_max bytes carry their bytes (not presigned)."""
    row, chain = c.row, c.chain
    last = ctx.n_stages - 1
    inline_max = 0 if blobs.presigned else inline_max
    needs_tokens = row.kind == "forward" and row.stage in (0, last)
    tokens = None
    if needs_tokens:
        tokens = _ref(blobs, chain.tokens_key, chain.tokens_sha, chain.tokens_size, inline_max)
    inp = _ref(blobs, row.input_key, *c.input_sha, inline_max) if row.input_key and c.input_sha else None
    upload = None
    if row.output_key:
        upload = blobs.upload_ref(row.output_key, ctx.act_max_size)
        if not blobs.presigned:
            upload = upload.model_copy(update={"inline_max": min(INLINE_MAX, ctx.act_max_size)})
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


def _ref(blobs: BlobStore, key: str, sha256: str, size: int, inline_max: int) -> BlobRef:
    ref = blobs.ref(key, sha256, size)
    if size > inline_max:
        return ref
    try:  # the worker verifies these bytes as it would a download; a damaged file is given back the same
        data = blobs.read(key)
    except FileNotFoundError:
        return ref  # its URL answers 404 as ever
    return ref.model_copy(update={"data": base64.b64encode(data).decode("ascii")})
