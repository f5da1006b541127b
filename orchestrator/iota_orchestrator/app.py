"""The FastAPI application: routes under /v1 behind the guard (guard.py), and how errors are answered.

`create_app(state)` serves an opened State (see serve.py); `create_app()` without one only describes the
API (openapi.py uses it to write docs/openapi.json). Bad input is always a 4xx (the protocol promises
it); trouble with the orchestrator's own storage (a full disk, a read-only file system, a database busy or
unwritable) is a 503 with Retry-After, which workers wait out, and the failed write leaves nothing
behind: the transaction rolls back and temp files are removed where they were made.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from iota_cli.core.protocol import PROTOCOL_VERSION, Problem
from iota_cli.core.tensors import TensorFormatError
from iota_orchestrator import __version__
from iota_orchestrator.api import audits, blobs, contributors, dashboard, merge, runs, work
from iota_orchestrator.errors import ApiError
from iota_orchestrator.guard import MAX_JSON_BYTES, Guard
from iota_orchestrator.state import State

log = logging.getLogger("iota_orchestrator")
STORAGE_RETRY_S = 5  # a full disk frees up on an operator's time scale, not a request's
BUSY_RETRY_S = 1
MAX_ERRORS_SHOWN = 20
LOG_EVERY_S = 30.0
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": Problem, "description": "storage full, read-only or busy: retry after Retry-After seconds"}
}


def create_app(state: State | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reaper = preparer = None
        if state is not None:
            import asyncio

            from iota_orchestrator.preparing import Preparer
            from iota_orchestrator.reaper import Reaper

            state.attach(asyncio.get_running_loop())
            reaper, preparer = Reaper(state), Preparer(state)  # preparer: runs whose corpus is encoded
            reaper.start()
            preparer.start()
        try:
            yield
        finally:
            if preparer is not None:
                preparer.stop()
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
    for module in (runs, contributors, work, merge, audits, blobs):
        app.include_router(module.router, responses=UNAVAILABLE)
    dashboard.install(app)  # `/`, /v1/dashboard, /metrics, and the request metrics (outside the guard)

    install_error_handlers(app)
    return app


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = dict(exc.headers)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_detail(exc)}, status_code=422)

    @app.exception_handler(TensorFormatError)
    async def _tensor_error(_: Request, exc: TensorFormatError) -> JSONResponse:
        return JSONResponse({"detail": f"malformed tensors: {exc}"}, status_code=422)

    @app.exception_handler(OSError)
    async def _storage(_: Request, exc: OSError) -> JSONResponse:
        detail = storage_detail(exc.errno, exc.strerror or type(exc).__name__)
        _log.warning(detail, f"storage error, answering 503: {exc}")
        return _unavailable(detail, STORAGE_RETRY_S)

    @app.exception_handler(OperationalError)
    async def _db_error(_: Request, exc: OperationalError) -> JSONResponse:
        detail, retry = database_detail(str(exc.orig))
        _log.warning(detail, f"database error, answering 503: {exc.orig}")
        return _unavailable(detail, retry)


def _unavailable(detail: str, retry_s: int) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": str(retry_s)})


def storage_detail(code: int | None, reason: str) -> str:
    """What a worker is told when the orchestrator's storage fails it (never the path or the traceback)."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "the orchestrator's storage is full; retry later"
    if code == errno.EROFS:
        return "the orchestrator's storage is read-only; retry later"
    return f"the orchestrator's storage is unavailable ({reason}); retry later"


def database_detail(message: str) -> tuple[str, int]:
    """sqlite3's OperationalError text -> what to tell the client, and how long it should wait."""
    text = message.lower()
    if "full" in text:
        return storage_detail(errno.ENOSPC, message), STORAGE_RETRY_S
    if "readonly" in text or "read-only" in text:
        return storage_detail(errno.EROFS, message), STORAGE_RETRY_S
    if "i/o" in text or "unable to open" in text:
        return storage_detail(errno.EIO, "database I/O error"), STORAGE_RETRY_S
    return "database busy, retry", BUSY_RETRY_S


def validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    """FastAPI's error list without the inputs it echoes (they may not even be encodable) and bounded."""
    return [
        {
            "type": str(e.get("type", "")),
            "loc": [_safe(p) for p in e.get("loc", ())],
            "msg": _safe(e.get("msg")),
        }
        for e in exc.errors()[:MAX_ERRORS_SHOWN]
    ]


def _safe(value: object) -> str | int | float:
    """A location part or message that every JSON encoder takes: short, valid UTF-8, finite."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    text = value if isinstance(value, str) else repr(value)
    return text[:200].encode("utf-8", "backslashreplace").decode("utf-8")


class _Throttle:
    """Log each kind of storage trouble once per LOG_EVERY_S: a full disk fails every request."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def warning(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self.last.get(kind, -LOG_EVERY_S) >= LOG_EVERY_S:
            self.last[kind] = now
            log.warning(message)


_log = _Throttle()
