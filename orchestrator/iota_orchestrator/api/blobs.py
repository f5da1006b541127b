"""Blob upload and download through the directory store's signed URLs (the contract a presigned S3 URL
keeps). With an object store (--blob-store s3://...) the orchestrator serves no blob bytes: 404 here."""

from __future__ import annotations

import json
import os
import re
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from iota_cli.core.protocol import SHA256_HEADER
from iota_orchestrator import uploads
from iota_orchestrator.api.deps import StateDep, problems
from iota_orchestrator.blobs import check_key
from iota_orchestrator.dirblobs import DirStore, UploadSink
from iota_orchestrator.errors import BadRequest, Gone, NotFound, TooLarge
from iota_orchestrator.state import State

router = APIRouter(
    prefix="/v1/blobs",
    tags=["blobs"],
    responses=problems(400, 401, 403, 404, 409, 410, 413),
)
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
SMALL = 1 << 20  # blobs up to this size are answered from one read, not streamed by FileResponse
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
    store = _directory(state)
    limit = store.verify("put", key, exp, sig, max)
    if sha256 is None or not SHA_RE.match(sha256):
        raise BadRequest(f"the {SHA256_HEADER} header (lowercase hex sha256 of the body) is required")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"blob of {declared} bytes exceeds its limit of {limit} bytes")
    sink = UploadSink(store, limit)
    try:
        async for chunk in request.stream():
            if chunk:
                sink.write(chunk)
        if sink.size <= SMALL and not store.fsync:
            status = await state.with_db(_store, state, store, sink, key, sha256)  # a rename: on the loop
        else:  # a large file's move or an fsync: a worker thread waits for it, not the loop
            status = await run_in_threadpool(_store, state, store, sink, key, sha256)
    finally:
        sink.discard()
    return _stored(status, key, sha256, sink.size)


def _store(state: State, store: DirStore, sink: UploadSink, key: str, sha256: str) -> int:
    """Move the upload into place unless the key holds this very blob (200) or a sealed other one (409)."""
    got = sink.hash.hexdigest()
    if got != sha256:
        raise BadRequest(
            f"sha256 mismatch: the body hashes to {got}, the header says {sha256}; nothing stored"
        )
    with state.tx() as conn:
        row = uploads.lookup(conn, key)
        if row is not None and (row.sha256, row.size) == (sha256, sink.size) and store.exists(key):
            return 200
        uploads.admit(row, key, sha256, sink.size)
        sink.finish(key, sha256)
        uploads.record(conn, row, key, sha256, sink.size)
    return 201


def _directory(state: State) -> DirStore:
    if not isinstance(state.blobs, DirStore):
        raise NotFound("this orchestrator keeps blobs in an object store: use the URLs it hands out")
    return state.blobs


def _stored(status: int, key: str, sha: str, size: int) -> Response:
    body = json.dumps({"key": key, "sha256": sha, "size": size})
    return Response(body, status_code=status, media_type="application/json", headers={SHA256_HEADER: sha})


@router.get(
    "/{key:path}",
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "partial content"},
        416: {"description": "range not satisfiable"},
    },
)
async def get_blob(key: str, request: Request, state: StateDep, exp: Exp = None, sig: Sig = None) -> Response:
    """The blob's bytes, with its sha256 as ETag; `Range: bytes=N-` resumes a download (206); 410 for a
    blob that was quarantined (its bytes on disk no longer matched its sha256)."""
    check_key(key)
    _directory(state).verify("get", key, exp, sig)
    whole = "range" not in request.headers and request.method == "GET"
    return await state.with_db(_serve, state, key, whole)


def _serve(state: State, key: str, whole: bool) -> Response:
    """Look the blob up and answer it (small ones from one read, in the same with_db)."""
    with state.tx() as conn:
        found = uploads.lookup(conn, key)
    path = state.blobs.path(key)
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if found is not None and found.quarantined:
        raise Gone(f"blob {key} failed its sha256 check on the orchestrator's disk and is quarantined")
    if found is None or st is None:
        raise NotFound(f"no blob {key}")
    sha = found.sha256
    headers = {"ETag": f'"{sha}"', SHA256_HEADER: sha, "Cache-Control": "private, max-age=3600"}
    if st.st_size <= SMALL and whole:
        # Activations and token batches are small: one read beats FileResponse's trips to a worker thread.
        with open(path, "rb") as f:
            body = f.read()
        headers["Accept-Ranges"] = "bytes"
        return Response(body, headers=headers, media_type="application/octet-stream")
    return FileResponse(path, stat_result=st, headers=headers, media_type="application/octet-stream")


router.add_api_route("/{key:path}", get_blob, methods=["HEAD"], include_in_schema=False)
