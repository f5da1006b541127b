"""Runs: operators create, stop and abort them (admin token); anyone may read them and their status."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Connection, update

from iota_cli.core.protocol import Health, Problem, RunCreate, RunCreated, RunInfo, RunStatus
from iota_orchestrator import __version__, abort, db, preparing, runs, status
from iota_orchestrator.api.deps import Admin, StateDep, now
from iota_orchestrator.errors import Invalid, storage_trouble

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
    """Create a run: index its data and write epoch-0 weights. A run with a tokenizer.json is checked and
    recorded `preparing`; its corpus is encoded in the background (its status shows how far)."""
    with manifest_faults():
        m = runs.parse_manifest(body.manifest, state.config.max_params)
        if m.model.tokenizer != "bytes":
            files, size = await run_in_threadpool(preparing.check, m)
            run_id = await state.in_tx(lambda conn: preparing.begin(conn, m, files, size, now()))
            preparing.poke()
            return RunCreated(run_id=run_id, state="preparing")
        # Outside the lock: indexing or encoding the corpus and making the weights can take a while.
        prepared = await run_in_threadpool(runs.prepare, state.blobs, m, state.config.data_dir)
    try:
        run_id = await state.in_tx(lambda conn: runs.record(conn, prepared, now()))
    except BaseException:  # the database refused it (full, say): the run's files go too
        runs.discard(state.blobs, state.config.data_dir, prepared)
        raise
    return RunCreated(run_id=run_id)


@contextlib.contextmanager
def manifest_faults() -> Iterator[None]:
    """Failures the manifest caused, as 422: checking and preparing a run read nothing else from outside.

    A value past parse_manifest's checks that numpy cannot compute with, or a path that cannot be read
    (too long, a loop, not a directory), is the manifest's fault; our own disk failing stays a 503.
    """
    try:
        yield
    except (ValueError, OverflowError) as e:
        raise Invalid(f"this manifest cannot be served: {str(e)[:300]}") from None
    except OSError as e:
        if storage_trouble(e):
            raise
        raise Invalid(f"this manifest cannot be served: {e.strerror or e}") from None


@router.get("/runs", response_model=list[RunInfo], tags=["runs"])
async def list_runs(state: StateDep) -> list[dict]:
    return await state.in_read(runs.list_runs)


@router.get("/runs/{run_id}", response_model=RunInfo, tags=["runs"])
async def get_run(run_id: str, state: StateDep) -> dict:
    return await state.in_read(lambda conn: runs.info(runs.get_run(conn, run_id)))


@router.get("/runs/{run_id}/status", response_model=RunStatus, tags=["runs"])
async def run_status(run_id: str, state: StateDep) -> dict:
    return await state.in_read(lambda conn: status.of(conn, run_id))


@router.post(
    "/runs/{run_id}/stop",
    response_model=RunInfo,
    dependencies=[Admin],
    tags=["runs"],
    responses={401: {"model": Problem}, 403: {"model": Problem}},
)
async def stop_run(run_id: str, state: StateDep) -> dict:
    """Issue no new samples; the run finishes once the pipeline drains."""

    def stop(conn: Connection) -> dict:
        runs.get_run(conn, run_id)
        conn.execute(update(db.runs).where(db.runs.c.run_id == run_id).values(stop_requested=True))
        return runs.info(runs.get_run(conn, run_id))

    info = await state.in_tx(stop)
    state.poke.set()
    return info


@router.post(
    "/runs/{run_id}/abort",
    response_model=RunInfo,
    dependencies=[Admin],
    tags=["runs"],
    responses={401: {"model": Problem}, 403: {"model": Problem}},
)
async def abort_run(run_id: str, state: StateDep) -> dict:
    """Finish the run now: work in flight is dropped, workers see `run_state: finished` and exit."""

    def finish(conn: Connection) -> tuple[set[str], dict]:
        keys = abort.abort(conn, run_id, now())
        return keys, runs.info(runs.get_run(conn, run_id))

    keys, info = await state.in_tx(finish)
    state.wake.notify(keys)
    return info
