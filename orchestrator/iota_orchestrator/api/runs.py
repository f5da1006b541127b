"""Runs: operators create and stop them (admin token); anyone may read them and their status."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import update

from iota_cli.core.protocol import Health, Problem, RunCreate, RunCreated, RunInfo, RunStatus
from iota_orchestrator import __version__, db, runs, status
from iota_orchestrator.api.deps import Admin, StateDep, now

router = APIRouter(prefix="/v1", responses={400: {"model": Problem}, 404: {"model": Problem}})


@router.get("/health", response_model=Health, tags=["meta"])
async def health() -> Health:
    return Health(version=__version__)


@router.post(
    "/runs",
    response_model=RunCreated,
    status_code=201,
    dependencies=[Admin],
    tags=["runs"],
    responses={401: {"model": Problem}, 403: {"model": Problem}, 422: {"model": Problem}},
)
async def create_run(body: RunCreate, state: StateDep) -> RunCreated:
    """Create a run: index (or, with a tokenizer.json, encode) its data, write epoch-0 weights."""
    m = runs.parse_manifest(body.manifest, state.config.max_params)
    prepared = await run_in_threadpool(runs.prepare, state.blobs, m, state.config.data_dir)

    def record() -> str:
        with state.tx() as conn:
            return runs.record(conn, prepared, now())

    return RunCreated(run_id=await run_in_threadpool(record))


@router.get("/runs", response_model=list[RunInfo], tags=["runs"])
async def list_runs(state: StateDep) -> list[dict]:
    with state.tx() as conn:
        return runs.list_runs(conn)


@router.get("/runs/{run_id}", response_model=RunInfo, tags=["runs"])
async def get_run(run_id: str, state: StateDep) -> dict:
    with state.tx() as conn:
        return runs.info(runs.get_run(conn, run_id))


@router.get("/runs/{run_id}/status", response_model=RunStatus, tags=["runs"])
async def run_status(run_id: str, state: StateDep) -> dict:
    with state.tx() as conn:
        return status.run_status(conn, runs.context(conn, run_id))


@router.post(
    "/runs/{run_id}/stop",
    response_model=RunInfo,
    dependencies=[Admin],
    tags=["runs"],
    responses={401: {"model": Problem}, 403: {"model": Problem}},
)
async def stop_run(run_id: str, state: StateDep) -> dict:
    """Issue no new samples; the run finishes once the pipeline drains."""
    with state.tx() as conn:
        runs.get_run(conn, run_id)
        conn.execute(update(db.runs).where(db.runs.c.run_id == run_id).values(stop_requested=True))
        row = runs.get_run(conn, run_id)
    state.poke.set()
    return runs.info(row)
