"""Rebalancing: move a worker onto the bottleneck stage when that raises the pipeline's pace enough.

A pipeline runs at the pace of its slowest stage. Placement (assignment.py) reinforces it only when a
worker joins; this moves an already placed replica of a stage that can spare one. The reaper calls
`maybe_move` every tick; the rule itself (`plan`) is a pure function over plain data:

- a worker's speed is GFLOP per second *while busy*: the credits of its last BUSY_ITEMS completed work
  items over the time it spent on them (an item's busy time runs from its claim, or the worker's previous
  completion if later, to its own completion). Credited work per wall second (measure.py) would not do:
  in a pipeline every stage finishes items at the bottleneck's pace, so only time not spent waiting for
  work tells a fast stage from a slow one;
- a stage's capacity is the summed speed of its live workers over its GFLOP per token (tokens/s);
- one worker of a donor stage (which keeps at least one) whose memory fits the slowest stage is moved
  there if that raises the minimum capacity over all stages by MARGIN (20%) or more, picking the move
  that raises it most. A move back would lower the minimum again, so the rule cannot ping-pong on
  steady measurements; the cool-down covers noisy ones;
- speeds are measured at most every PLAN_EVERY_S (10 s, or a quarter of the cool-down if shorter): one
  indexed query per live worker, which at thousands of workers is not a per-tick cost;
- nothing moves while any live worker has fewer than MIN_ITEMS measured items (a newcomer: its speed is
  unknown), while a move is pending, or within COOLDOWN_S of the run's last assignment change (a join
  or a move: the stages' speeds are measured afresh first). The cool-down is stored nowhere but in the
  assignments' `assigned` times, so it survives a restart.

COOLDOWN_S defaults to 120 s; IOTA_REBALANCE_COOLDOWN_S in the orchestrator's environment overrides it
(tests use a few seconds; even 0 still waits for every worker to be measured). Try it:
`pytest tests/test_rebalance.py` (the rule), `pytest -m slow tests/test_rebalance.py` (a swarm with one
throttled stage).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, select, update

from iota_orchestrator import db
from iota_orchestrator.runs import RunCtx

A, CT, W = db.assignments, db.contributors, db.work
MARGIN = 0.2  # a move must raise the slowest stage's capacity by this fraction
MIN_ITEMS = 3  # completed items before a worker's speed counts
BUSY_ITEMS = 16  # the recent items a worker's speed is measured over
DEFAULT_COOLDOWN_S = 120.0
PLAN_EVERY_S = 10.0  # at most this often (a quarter of the cool-down if shorter) are speeds measured
_planned: dict[str, float] = {}  # run id -> when its members were last measured (this process)


def cooldown_s() -> float:
    """Seconds after a run's last join or move before the next move (read each tick: tests set it)."""
    try:
        return float(os.environ.get("IOTA_REBALANCE_COOLDOWN_S", DEFAULT_COOLDOWN_S))
    except ValueError:
        return DEFAULT_COOLDOWN_S


@dataclass(frozen=True)
class Member:
    contributor_id: str
    speed: float | None  # GFLOP/s while busy; None: not measured yet (a newcomer)
    memory_bytes: int  # 0: unknown, everything fits


@dataclass(frozen=True)
class Move:
    contributor_id: str
    source: int
    target: int
    before: float  # the pipeline's minimum stage capacity now
    after: float  # and after the move, as predicted


def capacities(stages: list[list[Member]], gflops: list[float]) -> list[float]:
    return [sum(m.speed or 0.0 for m in ms) / max(g, 1e-12) for ms, g in zip(stages, gflops, strict=True)]


def plan(
    stages: list[list[Member]], gflops: list[float], memory_need: list[int], margin: float = MARGIN
) -> Move | None:
    """The one move that raises the minimum stage capacity most, if by `margin` or more; else None."""
    if any(m.speed is None for ms in stages for m in ms) or not all(stages):
        return None  # a newcomer's speed is unknown; an empty stage is assignment.rebalance's to fill
    cap = capacities(stages, gflops)
    before = min(cap)
    target = cap.index(before)
    best: Move | None = None
    for source, members in enumerate(stages):
        if source == target or len(members) < 2:  # the donor keeps at least one worker
            continue
        for m in members:
            if m.memory_bytes and memory_need[target] > m.memory_bytes:
                continue
            speed = m.speed or 0.0
            moved = list(cap)
            moved[source] -= speed / max(gflops[source], 1e-12)
            moved[target] += speed / max(gflops[target], 1e-12)
            after = min(moved)
            if after >= before * (1 + margin) and (best is None or after > best.after):
                best = Move(m.contributor_id, source, target, before, after)
    return best


def busy_speed(items: list[tuple[float, float, float]], min_items: int = MIN_ITEMS) -> float | None:
    """GFLOP/s over the busy time of (claimed, completed, credits) items; None with too few."""
    if len(items) < min_items:
        return None
    busy, done, prev = 0.0, 0.0, float("-inf")
    for claimed, completed, credits in sorted(items, key=lambda i: i[1]):
        busy += max(completed - max(claimed, prev), 0.0)
        done += credits
        prev = completed
    return done / max(busy, 1e-3)  # a burst of instant completions does not make an absurd speed


_DONE = (
    select(W.c.claimed, W.c.completed, W.c.credits)
    .where(W.c.worker == bindparam("cid"), W.c.state == "done", W.c.run_id == bindparam("run"))
    .order_by(W.c.id.desc())  # through ix_work_held (worker, state): a few index steps per worker
    .limit(BUSY_ITEMS)
)


def members(conn: Connection, ctx: RunCtx) -> list[list[Member]]:
    """Every stage's live workers with their measured speed and memory."""
    stages: list[list[Member]] = [[] for _ in range(ctx.n_stages)]
    rows = conn.execute(
        select(A.c.stage, A.c.contributor_id, CT.c.memory_bytes)
        .select_from(A.join(CT, A.c.contributor_id == CT.c.contributor_id))
        .where(A.c.run_id == ctx.run_id, A.c.state == "active")
    ).all()
    for stage, cid, mem in rows:
        if 0 <= stage < ctx.n_stages:
            items = [
                (float(c), float(d), float(g or 0.0))
                for c, d, g in conn.execute(_DONE, {"cid": cid, "run": ctx.run_id})
                if c is not None and d is not None
            ]
            stages[stage].append(Member(cid, busy_speed(items), int(mem)))
    return stages


def maybe_move(conn: Connection, ctx: RunCtx, now: float) -> Move | None:
    """Ask one worker to move to the bottleneck stage (its next heartbeat says `reassign`), if due."""
    live = (A.c.run_id == ctx.run_id, A.c.state == "active")
    if conn.execute(select(A.c.contributor_id).where(*live, A.c.reassign_to.is_not(None))).first():
        return None  # one move at a time: the last one has not happened yet
    last = conn.execute(select(A.c.assigned).where(*live).order_by(A.c.assigned.desc())).first()
    wait = cooldown_s()
    if last is None or now - float(last[0]) < wait:
        return None
    # members() reads each live worker's recent items (one indexed query each): not every tick.
    if now - _planned.get(ctx.run_id, float("-inf")) < min(PLAN_EVERY_S, wait / 4):
        return None
    _planned[ctx.run_id] = now
    move = plan(members(conn, ctx), list(ctx.gflops), list(ctx.memory_need))
    if move is not None:
        conn.execute(
            update(A)
            .where(A.c.run_id == ctx.run_id, A.c.contributor_id == move.contributor_id)
            .values(reassign_to=move.target)
        )
    return move
