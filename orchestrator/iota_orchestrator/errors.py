"""Errors the core raises and the API turns into `{"detail": ...}` with a 4xx status, and which
OSErrors mean the orchestrator's own storage is in trouble (answered 503, see app.py)."""

from __future__ import annotations

import errno

# The server's storage cannot take this now (full, read-only, failing, out of handles): retry later.
STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM}
)


def storage_trouble(e: OSError) -> bool:
    """Whether e is the orchestrator's storage failing, not a bad path someone sent."""
    return e.errno in STORAGE_ERRNOS


class ApiError(Exception):
    status = 400

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class TooLarge(ApiError):
    status = 413


class Invalid(ApiError):
    status = 422


class Gone(ApiError):
    status = 410


class Unavailable(ApiError):
    status = 503  # not ready yet (a run being prepared): raise with a Retry-After header


class TooManyRequests(ApiError):
    status = 429  # raise with a Retry-After header: the client waits that long and asks again
