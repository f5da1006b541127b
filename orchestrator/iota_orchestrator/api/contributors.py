"""Contributors: registration (a token shown once), who am I, leaving, credit totals.

Registering costs something: each client address gets a burst, then a few a second (ratelimit.py;
429 with Retry-After past it), and with `serve --invite-required` the operator's invite (invites.py;
403 without it). A registration sent with the admin token is the operator's own and skips both.
"""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Request
from sqlalchemy import Connection, insert, select

from iota_cli.core.protocol import ContributorInfo, Credits, Ok, Problem, RegisterReply, RegisterRequest
from iota_orchestrator import auth, db, invites, lease, ledger, ratelimit, runs, standing
from iota_orchestrator.api.deps import Contributor, StateDep, now, problems
from iota_orchestrator.api.urls import assignment_reply
from iota_orchestrator.errors import Forbidden, NotFound, TooManyRequests

router = APIRouter(
    prefix="/v1", tags=["contributors"], responses={401: {"model": Problem}, 404: {"model": Problem}}
)


@router.post("/contributors", response_model=RegisterReply, status_code=201, responses=problems(403, 429))
async def register(body: RegisterRequest, request: Request, state: StateDep) -> RegisterReply:
    """Register a device; the token is returned only here and stored hashed.

    Rate-limited per client address (429 with Retry-After); needs the operator's invite where the
    server requires one (403). The claimed `throughput` is kept for display; placement never uses it.
    """
    await _admit(body, request, state)
    cid = "c-" + secrets.token_hex(6)
    token = auth.new_token("iota")
    row = insert(db.contributors).values(
        contributor_id=cid,
        name=body.name or cid,
        token_hash=auth.hash_token(token),
        backend=body.backend,
        memory_bytes=body.memory_bytes,
        throughput=body.throughput,
        created=now(),
        credits=0.0,
    )
    await state.in_tx(lambda conn: conn.execute(row))
    return RegisterReply(contributor_id=cid, token=token)


async def _admit(body: RegisterRequest, request: Request, state: StateDep) -> None:
    """Raise unless this registration may go ahead: under the address's rate and with the invite.

    The bucket is drawn from first, so guessing invites is as slow as registering; the admin token is
    looked up only when it could change the answer (a refusal), sparing the database on every call.
    The header is read here, not through the bearer dependency, which would mark registering as
    needing a token in the OpenAPI document.
    """
    host = request.client.host if request.client else None
    wait = state.registrations.take(ratelimit.address_key(host), time.monotonic())
    invite = state.config.invite
    if wait is None and (invite is None or invites.valid(invite, body.invite)):
        return
    token = auth.bearer(request.headers.get("Authorization"))
    if token is not None and await state.in_tx(lambda conn: auth.is_admin(conn, token)):
        return
    if wait is not None:
        c = state.config
        raise TooManyRequests(
            f"too many registrations from this address; retry in {wait:.1f} s (the limit is "
            f"{c.register_burst} at once, then {c.register_rate:g} a second)",
            {"Retry-After": ratelimit.retry_after(wait)},
        )
    raise Forbidden("this orchestrator admits contributors by invite only: set IOTA_INVITE to its invite")


@router.get("/contributors/me", response_model=ContributorInfo)
async def me(cid: Contributor, state: StateDep) -> ContributorInfo:
    A = db.assignments

    def look(conn: Connection) -> ContributorInfo:
        c = conn.execute(select(db.contributors).where(db.contributors.c.contributor_id == cid)).one()
        a = conn.execute(
            select(A)
            .join(db.runs, A.c.run_id == db.runs.c.run_id)
            .where(A.c.contributor_id == cid, db.runs.c.state == "running")
            .order_by(A.c.assigned.desc())
            .limit(1)
        ).first()
        ctx = runs.context(conn, a.run_id) if a else None
        reply = assignment_reply(conn, state.blobs, ctx, a) if a and ctx else None
        return ContributorInfo(
            contributor_id=cid,
            name=c.name,
            assignment=reply,
            credits=round(c.credits, 6),
            standing=standing.of(ctx, a) if a and ctx else None,
            checks={"passed": int(a.passes), "failed": int(a.fails)} if a else {},
        )

    return await state.in_tx(look)


@router.post("/contributors/me/leave", response_model=Ok)
async def leave(cid: Contributor, state: StateDep) -> Ok:
    """The worker is shutting down: re-issue its forward work now, keep its (sticky) assignment."""
    A = db.assignments

    def release(conn: Connection) -> set[str]:
        keys: set[str] = set()
        for (run_id,) in conn.execute(
            select(A.c.run_id).where(A.c.contributor_id == cid, A.c.state == "active")
        ).all():
            keys |= lease.release(conn, runs.context(conn, run_id), cid, now(), "left")
        return keys

    state.wake.notify(await state.in_tx(release))
    return Ok()


@router.get("/contributors/{contributor_id}/credits", response_model=Credits)
async def credits(contributor_id: str, state: StateDep) -> dict:
    def totals(conn: Connection) -> dict:
        row = conn.execute(
            select(db.contributors.c.contributor_id).where(db.contributors.c.contributor_id == contributor_id)
        ).first()
        if row is None:
            raise NotFound(f"no contributor {contributor_id[:64]!r}")
        return ledger.totals(conn, contributor_id)

    return await state.in_tx(totals)
