"""Contributors: open registration (a token shown once), who am I, leaving, credit totals."""

from __future__ import annotations

import secrets

from fastapi import APIRouter
from sqlalchemy import Connection, insert, select

from iota_cli.core.protocol import ContributorInfo, Credits, Ok, Problem, RegisterReply, RegisterRequest
from iota_orchestrator import auth, db, lease, ledger, runs
from iota_orchestrator.api.deps import Contributor, StateDep, now
from iota_orchestrator.api.urls import assignment_reply
from iota_orchestrator.errors import NotFound

router = APIRouter(
    prefix="/v1", tags=["contributors"], responses={401: {"model": Problem}, 404: {"model": Problem}}
)


@router.post("/contributors", response_model=RegisterReply, status_code=201)
async def register(body: RegisterRequest, state: StateDep) -> RegisterReply:
    """Register a device; the token is returned only here and stored hashed."""
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
        reply = assignment_reply(conn, state.blobs, runs.context(conn, a.run_id), a) if a else None
        return ContributorInfo(contributor_id=cid, name=c.name, assignment=reply, credits=round(c.credits, 6))

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
