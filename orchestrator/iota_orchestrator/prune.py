"""Pruning: rows nobody reads any more are deleted, their counts folded into tallies (tallies.py).

The reaper calls `tick` every tick; it prunes at most every EVERY_S, in transactions of up to BATCH rows
or CHAIN_BATCH chains (the write lock is let go between them; about 10 ms each, 100k work and ledger
rows in 12 s on 2 busy cores) and for at most BUDGET_S a pass. What goes, and what stays:

- chains finished (done or dropped) over RETENTION_S ago whose blobs were collected (reaper.collect_garbage)
  and that no pending check reads, with their work rows: done items are tallied per stage and kind (the
  run's status adds them in). In a running run a live worker's last rebalance.BUSY_ITEMS done items stay
  (rebalance.py measures its speed over them); so does the newest work row (SQLite would hand its id
  out again).
- ledger rows of forward and backward work over max(RETENTION_S, measure.WINDOW_S) old that nothing
  reads again: vetted (at or below the contributor's vetted_mark: a failed check claws back only what
  came after), counted into the contributor's latest merge contribution on the stage (rounds weigh what
  came after), and older than the stage's third newest round (merge_checks.since_last_round reads what
  came after). In a finished run without pending checks all of them go. Credits and entries by kind are
  tallied per contributor (ledger.totals adds them in); clawback rows and the newest row always stay.
- closed merge rounds older than the last KEEP_ROUNDS of their stage (the dashboard shows the newest),
  with their parts and their contributions but each contributor's latest on the stage (its ledger mark
  paces the next round); their blobs still stored are deleted through the store's delete_many.

A result, give-back or upload for a pruned item gets 410 (scheduler.load_item); a merge report for a
pruned round gets its round "gone". RETENTION_S defaults to 300 s; IOTA_PRUNE_RETENTION_S overrides it.

    pytest tests/test_prune.py
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, func, select, tuple_

from iota_orchestrator import audits, db, measure, rebalance, standing
from iota_orchestrator.dashboard import RECENT_ROUNDS
from iota_orchestrator.state import State
from iota_orchestrator.tallies import Tally, add

DEFAULT_RETENTION_S = 300.0
EVERY_S = 30.0
BATCH = 250  # rows a transaction (ledger rows, merge rounds): about 10 ms of the write lock
CHAIN_BATCH = 25  # chains a transaction, with their work rows (2 x stages - 1 each; eight indexes)
BUDGET_S = 2.0  # a pass stops after this long; the next one goes on
KEEP_ROUNDS = RECENT_ROUNDS
SETTLED_ROUNDS = 3  # ledger rows before the third newest round of a stage are never counted again
R, C, W, L, A = db.runs, db.chains, db.work, db.ledger, db.assignments
MR, MC, MP, B = db.merge_rounds, db.merge_contribs, db.merge_parts, db.blobs
_last: dict[int, float] = {}  # id(state) -> when it last pruned


def retention_s() -> float:
    try:
        return max(0.0, float(os.environ.get("IOTA_PRUNE_RETENTION_S", DEFAULT_RETENTION_S)))
    except ValueError:
        return DEFAULT_RETENTION_S


@dataclass
class Pruned:
    chains: int = 0
    work: int = 0
    ledger: int = 0
    rounds: int = 0
    blobs: int = 0


def tick(state: State, now: float) -> Pruned | None:
    """Prune if EVERY_S have passed since this state last did."""
    if now - _last.get(id(state), -math.inf) < EVERY_S:
        return None
    _last[id(state)] = now
    return prune(state, now)


def prune(state: State, now: float, retention: float | None = None) -> Pruned:
    """One pass over every run (see the module's docstring); what it deleted."""
    keep_s = retention_s() if retention is None else retention
    out, until = Pruned(), time.monotonic() + BUDGET_S
    with state.tx() as conn:
        run_ids = list(conn.execute(select(R.c.run_id).order_by(R.c.created)).scalars())
    for run_id in run_ids:
        _chains(state, run_id, now - keep_s, out, until)
        _ledger(state, run_id, now - max(keep_s, measure.WINDOW_S), out, until)
        _rounds(state, run_id, out)
    return out


def _batches(until: float) -> Iterable[int]:
    """Batch numbers while the pass's time lasts."""
    i = 0
    while time.monotonic() < until:
        yield i
        i += 1


# --- chains and their work rows ----------------------------------------------------------------------


def _busy_floor(conn: Connection, run_id: str) -> dict[str, int]:
    """Each live worker's lowest work id rebalance.py still reads (its BUSY_ITEMS-th newest done item);
    0 (keep all) for one with fewer. None in a run that is not running: nothing rebalances it."""
    floor: dict[str, int] = {}
    if conn.execute(select(R.c.state).where(R.c.run_id == run_id)).scalar() != "running":
        return floor
    for cid in conn.execute(select(A.c.contributor_id).where(A.c.run_id == run_id, A.c.state == "active")):
        q = (
            select(W.c.id)
            .where(W.c.worker == cid[0], W.c.state == "done", W.c.run_id == run_id)
            .order_by(W.c.id.desc())
            .offset(rebalance.BUSY_ITEMS - 1)
            .limit(1)
        )
        floor[cid[0]] = int(conn.execute(q).scalar() or 0)
    return floor


def _chains(state: State, run_id: str, cut: float, out: Pruned, until: float) -> None:
    cursor = -1
    with state.tx() as conn:
        floor = _busy_floor(conn, run_id)
    for _ in _batches(until):
        with state.tx() as conn:
            ended = conn.execute(
                select(C.c.sample_id)
                .where(
                    C.c.run_id == run_id,
                    C.c.sample_id > cursor,
                    C.c.state.in_(("done", "dropped")),
                    C.c.gc.is_(True),
                    C.c.finished < cut,
                    ~audits.pinned(),
                )
                .order_by(C.c.sample_id)
                .limit(CHAIN_BATCH)
            ).scalars()
            samples = list(ended)
            if not samples:
                return
            cursor = samples[-1]
            newest = conn.execute(select(func.max(W.c.id))).scalar() or 0
            rows = conn.execute(
                select(W.c.id, W.c.sample_id, W.c.stage, W.c.kind, W.c.state, W.c.worker).where(
                    W.c.run_id == run_id, W.c.sample_id.in_(samples)
                )
            ).all()
            kept = {r.sample_id for r in rows if r.id == newest or _read(r, floor)}
            gone = [r for r in rows if r.sample_id not in kept]
            done = Counter((r.stage, r.kind) for r in gone if r.state == "done")
            add(conn, (Tally(run_id, "work", k, s, n=n) for (s, k), n in done.items()))
            conn.execute(delete(W).where(W.c.id.in_([r.id for r in gone])))
            dead = [s for s in samples if s not in kept]
            conn.execute(delete(C).where(C.c.run_id == run_id, C.c.sample_id.in_(dead)))
            out.chains += len(dead)
            out.work += len(gone)
        if len(samples) < CHAIN_BATCH:
            return


def _read(row: Any, floor: dict[str, int]) -> bool:
    """Whether rebalance.py still reads this work row (a live worker's recent done item)."""
    return row.state == "done" and row.worker in floor and row.id >= floor[row.worker]


# --- the ledger -------------------------------------------------------------------------------------


def _settled(conn: Connection, run_id: str, stage: int) -> float:
    """Ledger rows of the stage before this time are not counted by any round again (-inf: all are)."""
    opened = _nth_newest_round(conn, run_id, stage, SETTLED_ROUNDS, MR.c.opened)
    return -math.inf if opened is None else float(opened)


def _nth_newest_round(conn: Connection, run_id: str, stage: int, n: int, column: Any) -> Any:
    """column of the stage's n-th newest merge round (1: the newest), None with fewer rounds."""
    return conn.execute(
        select(column)
        .where(MR.c.run_id == run_id, MR.c.stage == stage)
        .order_by(MR.c.epoch.desc())
        .offset(n - 1)
        .limit(1)
    ).scalar()


def _ledger(state: State, run_id: str, cut: float, out: Pruned, until: float) -> None:
    with state.tx() as conn:
        run = conn.execute(select(R.c.state, R.c.manifest).where(R.c.run_id == run_id)).one()
        pending = conn.execute(
            select(db.audits.c.id).where(db.audits.c.run_id == run_id, db.audits.c.state.in_(audits.PENDING))
        ).first()
        stages = list(conn.execute(select(db.stages.c.stage).where(db.stages.c.run_id == run_id)).scalars())
        # A finished run without pending checks reads none of its ledger rows again.
        settled = run.state == "finished" and pending is None
        bounds = {s: cut if settled else min(cut, _settled(conn, run_id, s)) for s in stages}
    for stage, before in bounds.items():
        if before == -math.inf:
            continue
        where: tuple[Any, ...] = (L.c.run_id == run_id, L.c.stage == stage, L.c.kind.in_(standing.EARNED))
        where += (L.c.t < before,)
        if not settled:
            latest = (
                select(func.max(MC.c.ledger_mark))
                .where(
                    MC.c.run_id == L.c.run_id,
                    MC.c.stage == L.c.stage,
                    MC.c.contributor_id == L.c.contributor_id,
                )
                .scalar_subquery()
            )
            vetted = (
                select(A.c.vetted_mark)
                .where(A.c.run_id == L.c.run_id, A.c.contributor_id == L.c.contributor_id)
                .scalar_subquery()
            )
            where += (L.c.id <= func.coalesce(latest, 0), L.c.id <= func.coalesce(vetted, 0))
        for _ in _batches(until):
            with state.tx() as conn:
                newest = conn.execute(select(func.max(L.c.id))).scalar() or 0
                rows = conn.execute(
                    select(L.c.id, L.c.contributor_id, L.c.kind, L.c.credits, L.c.tokens)
                    .where(*where, L.c.id < newest)
                    .order_by(L.c.id)
                    .limit(BATCH)
                ).all()
                tally: dict[tuple[str, str], list[float]] = {}
                for r in rows:
                    t = tally.setdefault((r.contributor_id, r.kind), [0, 0.0, 0])
                    t[0], t[1], t[2] = t[0] + 1, t[1] + float(r.credits), t[2] + int(r.tokens)
                add(
                    conn,
                    (
                        Tally(run_id, "ledger", k, stage, cid, n=int(n), credits=c, tokens=int(tok))
                        for (cid, k), (n, c, tok) in tally.items()
                    ),
                )
                conn.execute(delete(L).where(L.c.id.in_([r.id for r in rows])))
                out.ledger += len(rows)
            if len(rows) < BATCH:
                break


# --- merge rounds -----------------------------------------------------------------------------------


def _rounds(state: State, run_id: str, out: Pruned) -> None:
    with state.tx() as conn:
        keys = _old_rounds(conn, run_id, out)
    state.blobs.delete_many(keys)
    out.blobs += len(keys)


def _old_rounds(conn: Connection, run_id: str, out: Pruned) -> list[str]:
    """Delete up to BATCH closed rounds past each stage's newest KEEP_ROUNDS; the blob keys to delete."""
    AU = db.audits
    pending = (
        select(AU.c.id)
        .where(
            AU.c.run_id == MR.c.run_id,
            AU.c.stage == MR.c.stage,
            AU.c.epoch == MR.c.epoch,
            AU.c.kind == "merge",
            AU.c.state.in_(audits.PENDING),
        )
        .exists()
    )
    momentum = select(B.c.key).where(B.c.key == MR.c.momentum_key).exists()  # butterfly.momentum_of reads it
    old: list[tuple[int, int, str | None]] = []
    for (stage,) in conn.execute(select(db.stages.c.stage).where(db.stages.c.run_id == run_id)):
        newest = _nth_newest_round(conn, run_id, stage, KEEP_ROUNDS, MR.c.epoch)
        if newest is None:
            continue
        old += [
            (stage, int(e), k)
            for e, k in conn.execute(
                select(MR.c.epoch, MR.c.momentum_key)
                .where(
                    MR.c.run_id == run_id, MR.c.stage == stage, MR.c.epoch < newest, MR.c.state == "closed"
                )
                .where(~pending, ~momentum)
                .order_by(MR.c.epoch)
                .limit(BATCH - len(old))
            )
        ]
        if len(old) >= BATCH:
            break
    if not old:
        return []
    ids = [(run_id, s, e) for s, e, _ in old]
    mc_key, mp_key, mr_key = (tuple_(t.c.run_id, t.c.stage, t.c.epoch) for t in (MC, MP, MR))
    latest = (
        select(MC.c.stage, MC.c.contributor_id, func.max(MC.c.epoch).label("epoch"))
        .where(MC.c.run_id == run_id)
        .group_by(MC.c.stage, MC.c.contributor_id)
        .subquery()
    )
    spare = mc_key.in_(ids) & ~tuple_(MC.c.stage, MC.c.contributor_id, MC.c.epoch).in_(
        select(latest.c.stage, latest.c.contributor_id, latest.c.epoch)
    )
    keys = list(conn.execute(select(MC.c.blob_key).where(spare)).scalars())
    keys += list(
        conn.execute(select(MP.c.result_key).where(mp_key.in_(ids), MP.c.result_key.is_not(None))).scalars()
    )
    keys += [k for _, _, k in old if k]
    stored = list(conn.execute(select(B.c.key).where(B.c.key.in_(keys))).scalars()) if keys else []
    conn.execute(delete(MC).where(spare))
    conn.execute(delete(MP).where(mp_key.in_(ids)))
    conn.execute(delete(MR).where(mr_key.in_(ids)))
    conn.execute(delete(B).where(B.c.key.in_(stored)))
    add(conn, (Tally(run_id, "round", "closed", s, n=n) for s, n in Counter(s for s, _, _ in old).items()))
    out.rounds += len(old)
    return stored
