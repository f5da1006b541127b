"""The FastAPI application: routes under /v1, the protocol-header and body-size guard, error mapping.

`create_app(state)` serves an opened State (see serve.py); `create_app()` without one only describes the
API (openapi.py uses it to write docs/openapi.json).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from iota_cli.core.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION
from iota_cli.core.tensors import TensorFormatError
from iota_orchestrator import __version__
from iota_orchestrator.api import blobs, contributors, runs, work
from iota_orchestrator.errors import ApiError
from iota_orchestrator.state import State

log = logging.getLogger("iota_orchestrator")
BLOB_PREFIX = "/v1/blobs/"
MAX_JSON_BYTES = 1 << 20


class Guard:
    """Pure ASGI middleware: reject an unknown protocol version and oversized JSON bodies before routing."""

    def __init__(self, app: Any, max_json_bytes: int = MAX_JSON_BYTES) -> None:
        self.app, self.limit = app, max_json_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        version = headers.get(PROTOCOL_HEADER.lower().encode())
        if version is not None and version.strip() != str(PROTOCOL_VERSION).encode():
            shown = version[:20].decode("latin-1")
            detail = f"unsupported protocol {shown!r}; this orchestrator speaks {PROTOCOL_VERSION}"
            return await _send_json(send, 400, detail)
        if scope["path"].startswith(BLOB_PREFIX):
            return await self.app(scope, receive, send)
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return await _send_json(send, 400, "malformed Content-Length")
        if declared > self.limit:
            return await _send_json(send, 413, f"request body over {self.limit} bytes")
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                return await _send_json(send, 413, f"request body over {self.limit} bytes")
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _send_json(send: Any, status: int, detail: str) -> None:
    raw = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": raw})


def create_app(state: State | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reaper = None
        if state is not None:
            import asyncio

            from iota_orchestrator.reaper import Reaper

            state.attach(asyncio.get_running_loop())
            reaper = Reaper(state)
            reaper.start()
        try:
            yield
        finally:
            if reaper is not None:
                reaper.stop()
            if state is not None:
                state.close()

    app = FastAPI(
        title="iota orchestrator",
        version=__version__,
        description=f"Coordinates iota workers training one model (protocol v{PROTOCOL_VERSION}; "
        "see docs/protocol.md).",
        lifespan=lifespan,
    )
    app.state.orch = state
    max_json = state.config.max_json_bytes if state is not None else MAX_JSON_BYTES
    app.add_middleware(Guard, max_json_bytes=max_json)
    for module in (runs, contributors, work, blobs):
        app.include_router(module.router)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = dict(exc.headers)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)

    @app.exception_handler(TensorFormatError)
    async def _tensor_error(_: Request, exc: TensorFormatError) -> JSONResponse:
        return JSONResponse({"detail": f"malformed tensors: {exc}"}, status_code=422)

    @app.exception_handler(OperationalError)
    async def _db_busy(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database error: %s", exc)
        return JSONResponse({"detail": "database busy, retry"}, status_code=503, headers={"Retry-After": "1"})

    return app
