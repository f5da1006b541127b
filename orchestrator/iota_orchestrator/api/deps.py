"""Request dependencies: the orchestrator state, and who is asking (contributor or admin).

Endpoints are coroutines that do a request's database work in one `await state.with_db(fn, ...)` or
`await state.in_tx(fn)`, which never lets the event loop wait for the transaction lock (state.py says
where the work runs and why). Not sync `def` endpoints: FastAPI would then also validate each reply
in its thread pool, two hops a request. Long-polling claims wait on the loop (an asyncio.Event),
costing no thread while they wait.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Connection, select

from iota_cli.core.protocol import Problem
from iota_orchestrator import auth, clock, db
from iota_orchestrator.errors import ApiError, Forbidden, Unauthorized
from iota_orchestrator.state import State

bearer_scheme = HTTPBearer(
    auto_error=False, description="contributor token, or the admin token for admin routes"
)
Creds = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def get_state(request: Request) -> State:
    state = request.app.state.orch
    if state is None:
        raise ApiError("orchestrator state is not open")
    return state


StateDep = Annotated[State, Depends(get_state)]


def _token(creds: HTTPAuthorizationCredentials | None) -> str:
    if creds is None or not creds.credentials or len(creds.credentials) > 512:
        raise Unauthorized("missing bearer token", CHALLENGE)
    return creds.credentials


async def contributor(state: StateDep, creds: Creds) -> str:
    """The contributor id behind the bearer token (401 when there is none or it is unknown)."""
    digest = auth.hash_token(_token(creds))
    cid = state.token_cache.get(digest)
    if cid is None:

        def lookup(conn: Connection) -> str | None:
            row = conn.execute(
                select(db.contributors.c.contributor_id).where(db.contributors.c.token_hash == digest)
            ).first()
            return row[0] if row else None

        cid = await state.in_tx(lookup)
        if cid is None:
            raise Unauthorized("unknown token; register with POST /v1/contributors", CHALLENGE)
        state.token_cache[digest] = cid
    return cid


async def admin(state: StateDep, creds: Creds) -> None:
    """Admin routes: 401 without a valid token, 403 for a contributor's token."""
    token = _token(creds)
    digest = auth.hash_token(token)

    def check(conn: Connection) -> str | None:
        if auth.is_admin(conn, token):
            return "admin"
        C = db.contributors
        known = conn.execute(select(C.c.contributor_id).where(C.c.token_hash == digest)).first()
        return "contributor" if known else None

    who = await state.in_tx(check)
    if who == "contributor":
        raise Forbidden("this route needs the admin token")
    if who is None:
        raise Unauthorized("invalid admin token", CHALLENGE)


Contributor = Annotated[str, Depends(contributor)]
Admin = Depends(admin)


def now() -> float:
    """The time leases and deadlines are judged by: the database's on PostgreSQL (clock.py)."""
    return clock.now()


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of errors answered with a Problem body."""
    return {code: {"model": Problem} for code in codes}
