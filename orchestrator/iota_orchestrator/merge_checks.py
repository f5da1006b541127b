"""What a merge contribution must pass before it enters a round, and what opens a round: counted work.

Nothing a replica says about its own progress is believed (docs/trust.md). A round opens when a replica's
backward work that the ledger counted since its previous contribution (or since it synced to the epoch)
reaches merge.interval optimizer steps' worth; an update is taken only if it is finite and within
core.bounds.update_bound for the steps that counted work allows since the stage's previous round opened.
A contribution that fails is left out and costs its sender (standing.failed: clawback, penalty, perhaps
a ban), charged by the endpoint after the request's transaction rolls back (MergeCheckFailed).

    python -c "from iota_orchestrator import merge_checks; help(merge_checks.allowed_steps)"
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from sqlalchemy import Connection, func, or_, select

from iota_cli.core import bounds, flat, tensors
from iota_cli.core.bounds import UpdateStats
from iota_orchestrator import db, faults, ledger, standing
from iota_orchestrator.blobs import BlobStore
from iota_orchestrator.errors import Conflict
from iota_orchestrator.faults import Rejected
from iota_orchestrator.runs import RunCtx

log = logging.getLogger("iota_orchestrator")
MC, L, ST, R = db.merge_contribs, db.ledger, db.stages, db.merge_rounds
REF = "merge:{stage}:{epoch}:{cid}"  # the ledger work_id prefix of a failed merge check
UNREADABLE_MAX_W = 100.0  # max |w| assumed when the stage's weights cannot be read (far above any init)
_max_abs: dict[str, float] = {}  # weights blob key -> max |w| (sealed blobs never change)


class MergeCheckFailed(Rejected):
    """An update an honest replica could not have sent: a 422, and a failed check of its sender."""

    def __init__(self, detail: str, run_id: str, stage: int, epoch: int, sha256: str) -> None:
        super().__init__(detail, run_id)
        self.stage, self.epoch, self.sha256 = stage, epoch, sha256


# --- reading the blobs (outside the lock) -----------------------------------------------------------


def read_stats(path: Path, size: int, wire_dtype: flat.WireDtype) -> UpdateStats | None:
    """The stats of an uploaded update blob (None: unreadable, or not exactly {"update": dtype [size]})."""
    try:
        data = path.read_bytes()
        header = tensors.parse_header(data, len(data))
        if flat.check_update(header, size, wire_dtype) is not None:
            return None
        offset, length = flat.update_span(header, 0, size)
    except (OSError, ValueError, tensors.TensorFormatError):
        return None
    return UpdateStats.of(flat.from_wire(memoryview(data)[offset : offset + length], wire_dtype))


def base_max_abs(blobs: BlobStore, key: str) -> float | None:
    """max |w| of a stage's weights blob (the base the updates count from); None when unreadable."""
    if key not in _max_abs:
        try:
            data = blobs.read(key)
            start = tensors.parse_header(data, len(data)).data_start
        except (OSError, ValueError, tensors.TensorFormatError):
            return None
        vec = np.frombuffer(memoryview(data)[start:], dtype="<f4")
        if len(_max_abs) > 256:  # one per stage and epoch: old epochs are never asked again
            _max_abs.clear()
        _max_abs[key] = float(np.abs(vec).max()) if vec.size else 0.0
    return _max_abs[key]


# --- counted work -----------------------------------------------------------------------------------


def _tokens(conn: Connection, ctx: RunCtx, cid: str, stage: int, since_id: int, since_t: float) -> float:
    """Tokens of backward passes the ledger counted for cid on stage after ledger id since_id and time
    since_t. The tail's forward item holds its backward, so it counts there."""
    kinds = or_(L.c.kind == "backward", L.c.stage == ctx.n_stages - 1)
    q = select(func.coalesce(func.sum(L.c.tokens), 0)).where(
        L.c.run_id == ctx.run_id,
        L.c.contributor_id == cid,
        L.c.stage == stage,
        L.c.kind.in_(standing.EARNED),
        kinds,
        L.c.id > since_id,
        L.c.t > since_t,
    )
    return float(conn.execute(q).scalar_one())


def work_since(conn: Connection, ctx: RunCtx, cid: str, stage: int, epoch: int) -> float:
    """Backward tokens counted for cid on the stage since its previous contribution, when that was to
    the round that made `epoch`, else since the stage reached `epoch` (the replica then synced to it:
    what it did before loading those weights is not in its update). Paces the opening of a round."""
    prev = conn.execute(
        select(MC.c.epoch, MC.c.ledger_mark)
        .where(MC.c.run_id == ctx.run_id, MC.c.stage == stage, MC.c.contributor_id == cid)
        .order_by(MC.c.epoch.desc())
        .limit(1)
    ).first()
    mark = int(prev.ledger_mark or 0) if prev is not None else 0
    if prev is not None and prev.epoch == epoch - 1:
        return _tokens(conn, ctx, cid, stage, mark, -math.inf)
    reached = conn.execute(
        select(ST.c.updated).where(ST.c.run_id == ctx.run_id, ST.c.stage == stage)
    ).scalar_one()
    return _tokens(conn, ctx, cid, stage, mark, float(reached))


def round_due(conn: Connection, ctx: RunCtx, cid: str, stage: int, epoch: int) -> bool:
    """Whether cid's counted work since its previous contribution or sync opens a round at epoch."""
    t = ctx.manifest.train
    need = ctx.manifest.merge.interval * t.backward_per_step * ctx.tokens_per_sample
    return work_since(conn, ctx, cid, stage, epoch) >= need


def allowed_steps(conn: Connection, ctx: RunCtx, cid: str, stage: int, epoch: int) -> int:
    """The most optimizer steps an update of cid at epoch can hold, from counted work alone.

    An update at E spans the steps since the replica's snapshot for round E-1 (overlap keeps them) or
    since it loaded E; both came after round E-1 opened, and a replica steps only after reporting the
    passes of that step, so the passes counted since then bound its steps (core.bounds.steps_from_items).
    """
    items = since_last_round(conn, ctx, cid, stage, epoch) / max(ctx.tokens_per_sample, 1)
    return bounds.steps_from_items(items, ctx.manifest.train.backward_per_step)


def since_last_round(conn: Connection, ctx: RunCtx, cid: str, stage: int, epoch: int) -> float:
    """Backward tokens counted for cid on the stage since the stage's previous round (before epoch)
    opened: all the work an update at epoch can hold (allowed_steps), and what a final round merges."""
    opened = conn.execute(
        select(func.max(R.c.opened)).where(R.c.run_id == ctx.run_id, R.c.stage == stage, R.c.epoch < epoch)
    ).scalar_one()
    return _tokens(conn, ctx, cid, stage, 0, -math.inf if opened is None else float(opened))


# --- the check and its cost -------------------------------------------------------------------------


def vet(
    conn: Connection,
    ctx: RunCtx,
    cid: str,
    stage: int,
    epoch: int,
    sha256: str,
    stats: UpdateStats | None,
    base_max: float | None,
) -> None:
    """Raise MergeCheckFailed unless the update is finite and within the optimizer's bound."""
    if stats is None:  # could not be read here: not the sender's fault, try again
        raise Conflict("the update could not be read; report it again")
    if base_max is None:
        # The stage's weights are damaged here, and this round is what replaces them (reaper.py): bound
        # weight decay's share with a generous max |w| rather than refuse every update.
        log.warning(
            "run %s stage %d: weights unreadable, bounding updates with max |w| = %g",
            ctx.run_id,
            stage,
            UNREADABLE_MAX_W,
        )
        base_max = UNREADABLE_MAX_W
    n = allowed_steps(conn, ctx, cid, stage, epoch)
    bound = bounds.update_bound(ctx.manifest.optim, n, base_max, ctx.manifest.merge.wire_dtype)
    problem = bounds.violation(stats, bound)
    if problem is not None:
        raise MergeCheckFailed(
            f"update rejected: {problem} ({n} counted steps)", ctx.run_id, stage, epoch, sha256
        )
    log.info(
        "run %s stage %d epoch %d: %s's update at %.3f of its bound (%d counted steps, max %.3g, L2 %.3g)",
        ctx.run_id, stage, epoch, cid, stats.max_abs / bound, n, stats.max_abs, stats.l2,
    )  # fmt: skip


def charge(conn: Connection, ctx: RunCtx, cid: str, e: Rejected, now: float) -> set[str]:
    """Charge a refused contribution: a failed check (once per uploaded blob) for a MergeCheckFailed, and
    a `rejected` lapse either way. Returns the wake-up keys of a ban's given-back work."""
    faults.lapse(conn, e.run_id, cid, e.detail, now, kind="rejected")
    if not isinstance(e, MergeCheckFailed):
        return set()
    ref = f"{REF.format(stage=e.stage, epoch=e.epoch, cid=cid)}:{e.sha256[:16]}"
    if conn.execute(select(L.c.id).where(L.c.work_id == ref)).first() is not None:
        return set()  # the same blob reported again: it paid already
    basis = ledger.work_credits(ctx.gflops[e.stage], ctx.tokens_per_sample, "backward", False)
    return standing.failed(conn, ctx, cid, ref, basis, e.detail, now)


def failed_here(conn: Connection, run_id: str, stage: int, epoch: int) -> set[str]:
    """Contributors whose update for this round failed its check (the round does not wait for them)."""
    prefix = REF.format(stage=stage, epoch=epoch, cid="")
    rows = conn.execute(
        select(L.c.contributor_id).where(
            L.c.run_id == run_id, L.c.kind == "clawback", L.c.work_id.startswith(prefix)
        )
    ).scalars()
    return set(rows)
