"""The ASGI guard in front of every route: protocol version, body size, and JSON a route can be given.

Before routing it refuses an unknown `X-Iota-Protocol` (400), a JSON body over the limit (413), and a
body that Python's json module would parse but that is not JSON one may serve (400): NaN, Infinity and
numbers past the float range (neither RFC 8259 nor pydantic's output allow them, so an error message
that echoed one would fail to encode), lone UTF-16 surrogates (SQLite and every encoder refuse them), NUL
characters (PostgreSQL's text cannot hold them; refused on SQLite too, so both back ends answer alike), and
nesting deeper than the parser's recursion limit; a NUL in the path or the query too. Bodies that are not
JSON at all pass through for the route to answer 400/422 in its own words. Blob uploads are streamed bytes
and are not buffered here.

Try it: python -c "from iota_orchestrator.guard import json_problem; print(json_problem(b'[NaN]'))"
"""

from __future__ import annotations

import json
import math
from typing import Any

from iota_cli.core.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION

BLOB_PREFIX = "/v1/blobs/"
MAX_JSON_BYTES = 1 << 20


class _NotServable(ValueError):
    pass


def _no_constant(name: str) -> float:
    raise _NotServable(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotServable(f"the number {text[:24]} is out of range")
    return value


def json_problem(body: bytes) -> str | None:
    """Why body, parsed as JSON, may not reach a route; None when it may (or is not JSON at all)."""
    try:
        value = json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except _NotServable as e:
        return f"invalid JSON: {e}"
    except RecursionError:
        return "invalid JSON: nested too deeply"
    except ValueError:
        return None  # not JSON (or not UTF-8): the route's own parsing answers 400/422
    return _unstorable(value)


def _unstorable(value: Any) -> str | None:
    """The first string (or key) holding a lone surrogate or a NUL, described; walked without recursion."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, dict):
            todo.extend(v.keys())
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return "invalid JSON: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)"
            if "\x00" in v:
                return "invalid JSON: a string holds a NUL character (\\u0000)"
    return None


class Guard:
    """Pure ASGI middleware (see the module doc); cheap: one read of a small body, one strict parse."""

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
            return await send_json(send, 400, detail)
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            return await send_json(send, 400, "a NUL character (%00) in the path or the query")
        if scope["path"].startswith(BLOB_PREFIX):
            return await self.app(scope, receive, send)
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return await send_json(send, 400, "malformed Content-Length")
        if declared > self.limit:
            return await send_json(send, 413, f"request body over {self.limit} bytes")
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                return await send_json(send, 413, f"request body over {self.limit} bytes")
        if body and (problem := json_problem(body)):
            return await send_json(send, 400, problem)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def send_json(send: Any, status: int, detail: str) -> None:
    raw = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": raw})
