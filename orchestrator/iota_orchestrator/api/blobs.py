"""Blob upload and download through signed URLs (the same contract a presigned S3 URL keeps)."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import insert, select

from iota_cli.protocol import SHA256_HEADER, Problem
from iota_orchestrator import db
from iota_orchestrator.api.deps import StateDep
from iota_orchestrator.blobs import UploadSink, check_key
from iota_orchestrator.errors import BadRequest, Conflict, NotFound, TooLarge
from iota_orchestrator.state import State

router = APIRouter(
    prefix="/v1/blobs",
    tags=["blobs"],
    responses={
        400: {"model": Problem},
        401: {"model": Problem},
        403: {"model": Problem},
        404: {"model": Problem},
        409: {"model": Problem},
        413: {"model": Problem},
    },
)
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
Exp = Annotated[str | None, Query(max_length=20)]
Sig = Annotated[str | None, Query(max_length=128)]


@router.put(
    "/{key:path}",
    status_code=201,
    responses={200: {"description": "the identical blob was already stored"}, 201: {"description": "stored"}},
)
async def put_blob(
    key: str,
    request: Request,
    state: StateDep,
    exp: Exp = None,
    sig: Sig = None,
    max: Annotated[str | None, Query(max_length=20)] = None,  # noqa: A002 (the URL parameter's name)
    sha256: Annotated[str | None, Header(alias=SHA256_HEADER)] = None,
) -> Response:
    """Store the body under key if its sha256 matches the header and it fits the URL's size limit."""
    check_key(key)
    limit = state.blobs.verify("put", key, exp, sig, max)
    if sha256 is None or not SHA_RE.match(sha256):
        raise BadRequest(f"the {SHA256_HEADER} header (lowercase hex sha256 of the body) is required")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"blob of {declared} bytes exceeds its limit of {limit} bytes")
    sink = UploadSink(state.blobs, limit)
    try:
        async for chunk in request.stream():
            if chunk:
                sink.write(chunk)
        existing = await run_in_threadpool(_lookup, state, key)
        if existing is not None:
            sink.discard()
            if existing == (sink.hash.hexdigest(), sink.size) and sha256 == existing[0]:
                return _stored(200, key, *existing)
            if sink.hash.hexdigest() != sha256:
                raise BadRequest("sha256 mismatch: the body does not hash to the header; nothing stored")
            raise Conflict(f"blob {key} already exists with different content")
        stored = await run_in_threadpool(sink.finish, key, sha256)
    except BaseException:
        sink.discard()
        raise
    await run_in_threadpool(_record, state, key, stored.sha256, stored.size)
    return _stored(201, key, stored.sha256, stored.size)


def _stored(status: int, key: str, sha: str, size: int) -> Response:
    body = json.dumps({"key": key, "sha256": sha, "size": size})
    return Response(body, status_code=status, media_type="application/json", headers={SHA256_HEADER: sha})


def _lookup(state: State, key: str) -> tuple[str, int] | None:
    with state.tx() as conn:
        row = conn.execute(select(db.blobs.c.sha256, db.blobs.c.size).where(db.blobs.c.key == key)).first()
    return (row.sha256, row.size) if row else None


def _record(state: State, key: str, sha: str, size: int) -> None:
    with state.tx() as conn:
        if conn.execute(select(db.blobs.c.key).where(db.blobs.c.key == key)).first() is None:
            conn.execute(insert(db.blobs).values(key=key, sha256=sha, size=size, created=time.time()))


@router.get(
    "/{key:path}",
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "partial content"},
        416: {"description": "range not satisfiable"},
    },
)
async def get_blob(key: str, state: StateDep, exp: Exp = None, sig: Sig = None) -> Response:
    """The blob's bytes, with its sha256 as ETag; `Range: bytes=N-` resumes a download (206)."""
    check_key(key)
    state.blobs.verify("get", key, exp, sig)
    found = await run_in_threadpool(_lookup, state, key)
    path = state.blobs.path(key)
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if found is None or st is None:
        raise NotFound(f"no blob {key}")
    sha, _ = found
    headers = {"ETag": f'"{sha}"', SHA256_HEADER: sha, "Cache-Control": "private, max-age=3600"}
    return FileResponse(path, stat_result=st, headers=headers, media_type="application/octet-stream")


router.add_api_route("/{key:path}", get_blob, methods=["HEAD"], include_in_schema=False)
