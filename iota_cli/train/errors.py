"""What talking to the orchestrator raises on purpose; the worker and `iota join` map these to behaviour.

ApiError: the server said no (its `status` decides: 409 drops an item, 401/403 is a config exit code).
Unreachable: no answer in time; Stopped: the stop event cut a wait short (shutting down, not a failure).
IntegrityError: downloaded bytes kept failing their sha256, so they are never trained on.
"""

from __future__ import annotations


class ClientError(Exception):
    """Base of everything the client raises on purpose."""


class ApiError(ClientError):
    """The server refused the request (4xx, or a 5xx that persisted); `detail` is its message."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class Unreachable(ClientError):
    """The server did not answer within max_wait_s (or waiting was not allowed)."""


class Stopped(Unreachable):
    """Waiting for the server was cut short by the stop event (shutdown)."""


class IntegrityError(ClientError):
    """Downloaded bytes kept failing their sha256 check."""
