"""The orchestrator's clockwork: a thread that expires leases and deadlines, moves merge rounds along
(publish.advance: partitions, fallback reductions, publishing),
finishes drained runs (a stopped one drops what no live worker can drain), watches every stage's
weights on disk and deletes blobs nobody needs any more.

Every decision is taken from timestamps stored in the database, so a restart picks up where it stopped.
With several replicas on PostgreSQL only the one holding the leader lease ticks (leader.py); time is
the database's (clock.py).
"""

from __future__ import annotations

import logging
import os
import threading

from sqlalchemy import Connection, delete, select, tuple_, update

from iota_orchestrator import (
    assignment,
    audits,
    chains,
    clock,
    db,
    integrity,
    lease,
    merge,
    prune,
    publish,
    rounds,
    runs,
)
from iota_orchestrator.leader import Leader
from iota_orchestrator.rebalance import maybe_move
from iota_orchestrator.runs import RunCtx
from iota_orchestrator.state import State

log = logging.getLogger("iota_orchestrator")
GC_BATCH = 500
# Weights files that hashed right, by key: (size, mtime_ns) then. A file is hashed again when it changes.
_verified: dict[str, tuple[int, int]] = {}


def tick(state: State, now: float | None = None) -> None:
    now = clock.now() if now is None else now
    with state.tx() as conn:
        run_ids = [r[0] for r in conn.execute(select(db.runs.c.run_id).where(db.runs.c.state == "running"))]
    for run_id in run_ids:
        with state.tx() as conn:
            ctx = runs.context(conn, run_id)
            keys = lease.expire(conn, ctx, now)
            if runs.get_run(conn, run_id).stop_requested:
                keys |= chains.drop_stranded(conn, ctx, now)
            assignment.rebalance(conn, ctx)
            move = maybe_move(conn, ctx, now)  # a stage that can spare a worker reinforces the slowest
        if move is not None:
            log.info(
                "run %s: moving %s from stage %d to bottleneck stage %d (min capacity %.1f -> %.1f tokens/s)",
                *(run_id, move.contributor_id, move.source, move.target, move.before, move.after),
            )
        state.wake.notify(keys)
        publish.advance(state, ctx, now)
        watch_weights(state, ctx, now)
        with state.tx() as conn:
            finished = finish_check(conn, ctx, now)
        if finished:
            state.wake.notify(chains.stage_key(run_id, s) for s in range(ctx.n_stages))
    with state.tx() as conn:  # a finished run's checks are still judged (and their blobs then collected)
        keys = set()
        for run_id in audits.runs_pending(conn):
            keys |= audits.expire(conn, runs.context(conn, run_id), now)
    state.wake.notify(keys)
    collect_garbage(state)
    prune.tick(state, now)  # finished work rows, old ledger rows and merge rounds, every prune.EVERY_S


def watch_weights(state: State, ctx: RunCtx, now: float) -> None:
    """Hash each stage's current weights when their file changed (outside the lock); rebuild damage."""
    with state.tx() as conn:
        current = merge.current_weights(conn, ctx.run_id)
    for stage, epoch, key, sha, quarantined in current:
        if quarantined or sha is None:  # failed loudly already; the replicas' next merge replaces them
            continue
        try:
            st = os.stat(state.blobs.path(key))
            seen: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
        except OSError:
            seen = None
        if seen is not None and (_verified.get(key) == seen or integrity.intact(state.blobs, key, sha)):
            _verified[key] = seen
            continue
        with state.tx() as conn:
            if merge.stage_row(conn, ctx.run_id, stage).weights_key != key:
                continue  # a merge replaced them meanwhile
            what = merge.rebuild(conn, ctx, state.blobs, stage, now)
        log.error("run %s stage %d: weights of epoch %d damaged on disk; %s", ctx.run_id, stage, epoch, what)


def finish_check(conn: Connection, ctx: RunCtx, now: float) -> bool:
    """Finish a run once no sample will be issued and none is in flight (after a closing merge)."""
    run = runs.get_run(conn, ctx.run_id)
    t = ctx.manifest.train
    exhausted = run.stop_requested or (t.max_samples and run.samples_issued >= t.max_samples)
    if not exhausted or chains.active_chains(conn, ctx.run_id):
        return False
    if run.final_merge is None:
        conn.execute(update(db.runs).where(db.runs.c.run_id == ctx.run_id).values(final_merge=now))
        return False
    # Every replica's next heartbeat (within a lease), a round in flight at the drain, then the final one:
    # each round takes up to timeout_s to collect updates and timeout_s more before the fallback reduces
    # it. Past that the run ends with what was merged.
    limit = run.final_merge + t.lease_s + 6 * ctx.manifest.merge.timeout_s + 5
    if rounds.final_pending(conn, ctx, run.final_merge, now) and now < limit:
        return False
    conn.execute(update(db.runs).where(db.runs.c.run_id == ctx.run_id).values(state="finished", finished=now))
    log.info("run %s finished", ctx.run_id)
    return True


def collect_garbage(state: State) -> int:
    """Delete the token, activation and gradient blobs of finished chains (a batch at a time), except
    those a pending check still reads, and the weights snapshots of decided checks."""
    C, W = db.chains, db.work
    with state.tx() as conn:
        done = conn.execute(
            select(C.c.run_id, C.c.sample_id, C.c.tokens_key)
            .where(C.c.state.in_(("done", "dropped")), C.c.gc.is_(False), ~audits.pinned())
            .limit(GC_BATCH)
        ).all()
        keys = audits.forget_snapshots(conn, GC_BATCH)
        if done:
            # A few set-wise statements, not two a chain: the reaper holds the lock every request waits for.
            ids = [(r.run_id, r.sample_id) for r in done]
            outs = select(W.c.output_key).where(
                tuple_(W.c.run_id, W.c.sample_id).in_(ids), W.c.output_key.is_not(None)
            )
            chain_keys = [r.tokens_key for r in done] + list(conn.execute(outs).scalars())
            conn.execute(update(C).where(tuple_(C.c.run_id, C.c.sample_id).in_(ids)).values(gc=True))
            conn.execute(delete(db.blobs).where(db.blobs.c.key.in_(chain_keys)))
            keys += chain_keys
    state.blobs.delete_many(keys)  # an object store: one request for the batch
    return len(done)


class Reaper(threading.Thread):
    def __init__(self, state: State) -> None:
        super().__init__(name="iota-reaper", daemon=True)
        self.state = state
        self.stopping = threading.Event()

    def run(self) -> None:
        leader = Leader(self.state.config.database)
        try:
            while not self.stopping.is_set():
                try:
                    if leader.holds():
                        tick(self.state)
                except Exception:  # keep the clock going; the next tick retries from stored state
                    log.exception("reaper tick failed")
                self.state.poke.wait(self.state.config.tick_s)
                self.state.poke.clear()
        finally:
            leader.close()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.state.poke.set()
        self.join(timeout)
