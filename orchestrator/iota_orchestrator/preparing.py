"""Runs prepared in the background: a run with a tokenizer.json has its corpus encoded off the request.

`POST /v1/runs` checks such a run's tokenizer and data (check: 422s at once), records it `preparing`
(begin) and returns. A Preparer thread (one per serving process, one run at a time across them) encodes
the corpus and writes the epoch-0 weights (runs.build), reporting how far it is in table run_prep, which
the run's status shows as `encoding`; then the run becomes `running` (runs.record) and work is issued.
A failure makes it `failed`, with the reason; an abort while it is prepared makes it `finished` and the
encoder stops at its next report. Until then every request about the run's work waits (runs.context).

Which process encodes is recorded (owner, beat: its last report): another replica takes a run over once
the beat is STALE_S old; on SQLite there is one process, so a restarted orchestrator takes it at once.
An encode cut short (a restart, a kill) starts again from the beginning.

    preparer = Preparer(state); preparer.start()   # app.py, beside the reaper; poke() after a create
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Connection, Float, String, Table, Text, insert, select, update

from iota_cli.core.manifest import RunManifest
from iota_orchestrator import clock, data, db, runs, tokenizer
from iota_orchestrator.errors import ApiError, Invalid
from iota_orchestrator.state import State

log = logging.getLogger("iota_orchestrator")
STALE_S = 30.0  # a report this old: its encoder is gone (PostgreSQL; reports come every PROGRESS_S)
PROGRESS_S = 0.5  # at most this often is the encode's progress written
POLL_S = 2.0  # how often an idle Preparer looks for a run to prepare (a create pokes it at once)

# A run prepared in the background (v6): its progress, and which process prepares it.
run_prep = Table(
    "run_prep",
    db.metadata,
    Column("run_id", String(64), primary_key=True),
    Column("phase", String(8), nullable=False),  # queued | encoding | weights | ready | failed
    Column("files_total", db.Int, nullable=False),
    Column("files_done", db.Int, nullable=False, default=0),
    Column("bytes_total", db.Int, nullable=False),
    Column("bytes_done", db.Int, nullable=False, default=0),
    Column("owner", String(64)),  # the process preparing it (host:pid:random)
    Column("beat", Float),  # the owner's last report
    Column("started", Float),
    Column("finished", Float),
    Column("error", Text),
)
P, R = run_prep, db.runs
_wake = threading.Event()


class _Stopped(Exception):
    """The server is shutting down: leave the run for the next start."""


class _Lost(Exception):
    """The run is no longer ours to prepare: aborted, or taken over by another replica."""


def check(m: RunManifest) -> tuple[int, int]:
    """What a create checks at once (422s): the tokenizer, the vocabulary, some data. (files, bytes)."""
    t = tokenizer.load(m.model.tokenizer)
    problem = tokenizer.vocab_problem(t, m.model.vocab_size)
    if problem:
        raise Invalid("invalid manifest: " + problem)
    paths = data.list_files(m.data.source)
    if not paths:
        raise Invalid(f"data.source {m.data.source!r} yields no sample (no text files, or too little text)")
    return len(paths), sum(p.stat().st_size for p in paths)


def begin(conn: Connection, m: RunManifest, files: int, size: int, now: float) -> str:
    """Record a run to be prepared in the background; its id."""
    run_id = "run-" + secrets.token_hex(4)
    conn.execute(insert(R).values(**runs.new_run(m, run_id, "preparing", now), n_samples_epoch=0))
    conn.execute(insert(P).values(run_id=run_id, phase="queued", files_total=files, bytes_total=size))
    return run_id


def poke() -> None:
    """A run was created: look now, not at the next poll."""
    _wake.set()


def encoding(conn: Connection, run_id: str) -> dict[str, Any] | None:
    """The run's background preparation as RunStatus.encoding (None: it had none)."""
    row = conn.execute(select(P).where(P.c.run_id == run_id)).first()
    if row is None:
        return None
    keys = ("phase", "files_done", "files_total", "bytes_done", "bytes_total", "started", "finished", "error")
    return {k: getattr(row, k) for k in keys}


# --- the encoder's side ----------------------------------------------------------------------------


def claim(conn: Connection, owner: str, now: float, stale_s: float) -> tuple[str, RunManifest] | None:
    """The oldest run waiting to be prepared, now ours; None while none waits or another process is
    preparing one (one at a time)."""
    rows = conn.execute(
        select(P.c.run_id, P.c.owner, P.c.beat, R.c.manifest)
        .select_from(P.join(R, P.c.run_id == R.c.run_id))
        .where(R.c.state == "preparing")
        .order_by(R.c.created)
    ).all()
    if not rows or any(r.owner not in (None, owner) and (r.beat or 0.0) >= now - stale_s for r in rows):
        return None
    first = rows[0]
    conn.execute(
        update(P)
        .where(P.c.run_id == first.run_id)
        .values(owner=owner, beat=now, started=now, phase="encoding", bytes_done=0, files_done=0)
    )
    return first.run_id, RunManifest.from_dict(json.loads(first.manifest))


def _mine(conn: Connection, run_id: str, owner: str) -> bool:
    row = conn.execute(
        select(P.c.owner, R.c.state)
        .select_from(P.join(R, P.c.run_id == R.c.run_id))
        .where(P.c.run_id == run_id)
    ).first()
    return row is not None and row.owner == owner and row.state == "preparing"


def report(
    conn: Connection, run_id: str, owner: str, phase: str, seen: tokenizer.Progress, now: float
) -> bool:
    """Record how far the preparation is; False when the run is no longer ours to prepare."""
    if not _mine(conn, run_id, owner):
        return False
    done = {"bytes_done": seen.bytes_done, "files_done": seen.files_done} if phase == "encoding" else {}
    conn.execute(update(P).where(P.c.run_id == run_id).values(phase=phase, beat=now, **done))
    return True


def finish(conn: Connection, p: runs.Prepared, owner: str, now: float) -> bool:
    """The run is prepared: record its stream and weights, and it runs. False when it is not ours."""
    run_id = p.ctx.run_id
    if not _mine(conn, run_id, owner):
        return False
    runs.record(conn, p, now)
    files, size = len(p.ctx.files), conn.execute(select(P.c.bytes_done).where(P.c.run_id == run_id)).scalar()
    conn.execute(
        update(P)
        .where(P.c.run_id == run_id)
        .values(
            phase="ready", finished=now, owner=None, files_done=files, files_total=files, bytes_total=size
        )
    )
    return True


def fail(conn: Connection, run_id: str, owner: str, error: str, now: float) -> bool:
    if not _mine(conn, run_id, owner):
        return False
    conn.execute(update(R).where(R.c.run_id == run_id).values(state="failed", finished=now))
    conn.execute(
        update(P).where(P.c.run_id == run_id).values(phase="failed", error=error[:500], finished=now)
    )
    return True


def release(conn: Connection, run_id: str, owner: str) -> None:
    """Leave the run to whoever starts next (this process is stopping)."""
    conn.execute(update(P).where(P.c.run_id == run_id, P.c.owner == owner).values(owner=None, phase="queued"))


class Preparer(threading.Thread):
    def __init__(self, state: State) -> None:
        super().__init__(name="iota-preparer", daemon=True)
        self.state = state
        self.owner = f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(4)}"
        self.stale_s = STALE_S if state.shared else 0.0  # SQLite: any other owner was a dead process
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                busy = self.step()
            except Exception:  # the database failing, say: the run waits for the next try
                if self.stopping.is_set():
                    return
                log.exception("preparing a run failed; trying again shortly")
                busy = False
            if not busy:
                _wake.wait(POLL_S)
                _wake.clear()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        _wake.set()
        self.join(timeout)

    def step(self) -> bool:
        """Prepare one run if one waits; whether one did."""
        with self.state.tx() as conn:
            job = claim(conn, self.owner, clock.now(), self.stale_s)
        if job is None:
            return False
        run_id, m = job
        log.info("run %s: encoding its corpus in the background", run_id)
        started = time.monotonic()
        self.prepare(run_id, m)
        log.info("run %s: prepared in %.1f s", run_id, time.monotonic() - started)
        return True

    def prepare(self, run_id: str, m: RunManifest) -> None:
        state, data_dir = self.state, self.state.config.data_dir
        _sweep(runs.run_dir(data_dir, run_id))
        last = [float("-inf")]

        def progress(phase: str, seen: tokenizer.Progress) -> None:
            if self.stopping.is_set():
                raise _Stopped
            if phase == "encoding" and time.monotonic() - last[0] < PROGRESS_S:
                return
            last[0] = time.monotonic()
            with state.tx() as conn:
                if not report(conn, run_id, self.owner, phase, seen, clock.now()):
                    raise _Lost

        try:
            p = runs.build(state.blobs, m, data_dir, run_id, progress)
        except Exception as e:
            if isinstance(e, _Stopped) or self.stopping.is_set():  # whatever failed as the server stopped
                with contextlib.suppress(Exception), state.tx() as conn:
                    release(conn, run_id, self.owner)
                return
            self.failed_with(run_id, e)
            return
        with state.tx() as conn:
            done = finish(conn, p, self.owner, clock.now())
        if not done:
            self.tidy(run_id)

    def failed_with(self, run_id: str, e: Exception) -> None:
        """What the encode raised: the run was taken from us, or it cannot be prepared (and why)."""
        if isinstance(e, _Lost):
            self.tidy(run_id)
        elif isinstance(e, ApiError):
            self.failed(run_id, e.detail)
        elif isinstance(e, OSError):
            self.failed(run_id, f"{e.filename or 'storage'}: {e.strerror or e}")
        else:
            log.error("run %s: preparing it failed", run_id, exc_info=e)
            self.failed(run_id, f"the orchestrator failed preparing it ({type(e).__name__})")

    def failed(self, run_id: str, why: str) -> None:
        log.error("run %s: could not be prepared: %s", run_id, why)
        with self.state.tx() as conn:
            mine = fail(conn, run_id, self.owner, why, clock.now())
        if mine:
            runs.discard_files(self.state.blobs, self.state.config.data_dir, run_id)

    def tidy(self, run_id: str) -> None:
        """Not ours any more: delete what we wrote if the run was aborted (another owner keeps its own)."""
        with self.state.tx() as conn:
            aborted = conn.execute(select(R.c.state).where(R.c.run_id == run_id)).scalar() != "preparing"
        if aborted:
            runs.discard_files(self.state.blobs, self.state.config.data_dir, run_id)


def _sweep(folder: Path) -> None:
    """Remove the temp files an encode cut short left behind (atomic_writer's `.name.*.tmp`)."""
    for tmp in folder.glob(f".{tokenizer.CACHE_NAME}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
