"""The end of a merge round: the orchestrator's own reduction when owners fail, and publishing epoch E+1.

The reaper calls `advance` every tick. It fixes the partitions of rounds whose contribute phase is over
(butterfly.py), computes a partition itself when both its owners are gone (their leases lapsed) or the
reducing phase has passed merge.timeout_s (with the same core.outer code on the uploads, its own
epoch-E weights and momentum, so the bytes are the owners'), does the same to settle a partition whose
two owners disagree or whose result the second owner cannot confirm in time (butterfly.settle: a wrong
owner fails a check), and once every partition has a confirmed result
assembles the stage's epoch E+1 weights (header + the parts' "weights" in order) and, for diloco, the
momentum blob, then in one transaction keyed on (stage, E) moves the stage to E+1. Everything it needs
is in rows and blobs, so after a restart a reducing round simply carries on, and a publish whose
transaction did not commit is done again (same bytes), never twice.

    python -c "from iota_orchestrator import publish; help(publish.advance)"
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
from sqlalchemy import delete, insert, select, update

from iota_cli.core import flat, outer, tensors
from iota_cli.core.tensors import RawTensor
from iota_orchestrator import butterfly, db, merge_checks, rounds, runs
from iota_orchestrator.runs import RunCtx
from iota_orchestrator.state import State

log = logging.getLogger("iota_orchestrator")
R, MP, A, ST, B = db.merge_rounds, db.merge_parts, db.assignments, db.stages, db.blobs
_stuck: set[tuple[str, int, int]] = set()  # rounds the fallback could not reduce (logged once each)


def advance(state: State, ctx: RunCtx, now: float) -> None:
    """One pass over a run's merge rounds: start reducing, fall back, publish."""
    with state.tx() as conn:
        due = rounds.due(conn, ctx, now)
    for stage, epoch in due:
        _fix(state, ctx, stage, epoch, now)
    with state.tx() as conn:
        reducing = conn.execute(select(R).where(R.c.run_id == ctx.run_id, R.c.state == "reducing")).all()
    for rnd in reducing:
        _settle(state, ctx, rnd, now)


def _fix(state: State, ctx: RunCtx, stage: int, epoch: int, now: float) -> None:
    with state.tx() as conn:
        contribs = rounds.contributions(conn, ctx.run_id, stage, epoch)
        momentum = butterfly.momentum_of(conn, ctx.run_id, stage, epoch)
        steps = [merge_checks.allowed_steps(conn, ctx, c.contributor_id, stage, epoch) for c in contribs]
    fixed = butterfly.hash_ranges(ctx, state.blobs, stage, contribs, momentum, steps)
    with state.tx() as conn:
        started = butterfly.start_reducing(conn, ctx, stage, epoch, fixed, now)
    if started:
        state.wake.notify([rounds.wake_key(ctx.run_id, stage, epoch)])
        if clipped := {c: round(s, 4) for c, s in fixed.scales.items() if s < 1.0}:
            log.warning("run %s stage %d epoch %d: updates clipped %s", ctx.run_id, stage, epoch, clipped)
        log.info(
            "run %s stage %d epoch %d: %d contributions, reducing", ctx.run_id, stage, epoch, len(contribs)
        )


def _settle(state: State, ctx: RunCtx, rnd: Any, now: float) -> None:
    dead: list[str] = []
    with state.tx() as conn:
        parts = rounds.parts(conn, ctx.run_id, rnd.stage, rnd.epoch)
        epoch = conn.execute(
            select(ST.c.epoch).where(ST.c.run_id == ctx.run_id, ST.c.stage == rnd.stage)
        ).scalar_one()
        live = set(
            conn.execute(
                select(A.c.contributor_id).where(
                    A.c.run_id == ctx.run_id, A.c.stage == rnd.stage, A.c.state == "active"
                )
            ).scalars()
        )
        if epoch != rnd.epoch:  # the stage moved on without it (damaged weights were replaced): drop it
            dead = _forget(conn, ctx, rnd, now)
    if epoch != rnd.epoch:
        _delete(state, dead)
        return
    late = now > rnd.reducing + ctx.manifest.merge.timeout_s
    orphans = [p for p in parts if p.result_sha is None and (late or not live & set(rounds.owners(p)))]
    # No single owner decides a partition: its result waits for the other owner's, and a dispute, or a
    # result the other owner can no longer confirm, is settled by reducing it here (butterfly.settle).
    waiting = [p for p in parts if butterfly.unconfirmed(p) and p.second_sha is None and not late]
    waiting = [p for p in waiting if live & (set(rounds.owners(p)) - {p.first_by})]
    checks = [p for p in parts if butterfly.unconfirmed(p) and p not in waiting]
    if orphans and not fallback(state, ctx, rnd, orphans, now):
        return
    if checks and not fallback(state, ctx, rnd, checks, now, settle=True) and not late:
        return  # (once late, a result that cannot be checked here is published as its owner sent it)
    if waiting:
        return
    if orphans or checks or all(p.result_sha is not None for p in parts):
        publish(state, ctx, rnd.stage, rnd.epoch, now)


def _slice(path: Any, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def fallback(state: State, ctx: RunCtx, rnd: Any, parts: list[Any], now: float, settle: bool = False) -> bool:
    """Compute these partitions here, as an owner would; False when it cannot (its epoch-E weights are
    damaged or an upload no longer matches its hashes: the owners' results are then awaited). With
    settle, the result replaces the owners' unconfirmed or disputed one and a wrong owner pays."""
    blobs, m = state.blobs, ctx.manifest.merge
    with state.tx() as conn:
        contribs = rounds.contributions(conn, ctx.run_id, rnd.stage, rnd.epoch)
        momentum = butterfly.momentum_of(conn, ctx.run_id, rnd.stage, rnd.epoch)
        st = conn.execute(select(ST).where(ST.c.run_id == ctx.run_id, ST.c.stage == rnd.stage)).one()
        base_row = conn.execute(select(B).where(B.c.key == st.weights_key)).first()
    try:
        data = blobs.read(st.weights_key)
        if base_row is None or base_row.quarantined or hashlib.sha256(data).hexdigest() != base_row.sha256:
            raise ValueError("the stage's epoch-E weights are damaged")
        base = flat.FlatLayout.of(ctx.cfg, rnd.stage).flatten(tensors.decode(data)[0])
        weights = rounds.round_weights(contribs)
        for p in parts:
            updates = []
            for c in contribs:
                offset, length, sha = butterfly.spans_of(c)[p.part]
                raw = _slice(blobs.path(c.blob_key), offset, length)
                if hashlib.sha256(raw).hexdigest() != sha:
                    raise ValueError(f"the update of {c.contributor_id} no longer matches its hashes")
                updates.append(flat.from_wire(raw, m.wire_dtype))
            mom = None
            if momentum is not None and p.momentum_sha is not None:
                width = flat.WIRE_SIZES[m.wire_dtype]
                at = butterfly.data_start(blobs, momentum) + p.start * width
                mom = flat.from_wire(
                    _slice(blobs.path(momentum), at, (p.stop - p.start) * width), m.wire_dtype
                )
            scales = [butterfly.scale_of(c) for c in contribs]
            new, new_m = outer.reduce_partition(
                m, base[p.start : p.stop], updates, weights, mom, rnd.epoch, scales
            )
            key = rounds.part_key(ctx.run_id, rnd.stage, rnd.epoch, p.part, butterfly.ORCHESTRATOR)
            b = blobs.write(key, flat.part_blob(new, new_m, m.wire_dtype))
            if settle:
                with state.tx() as conn:
                    dead, wake = butterfly.settle(conn, ctx, p, key, b.sha256, b.size, now)
                _delete(state, dead)
                state.wake.notify(list(wake))
                if p.result_sha != b.sha256:
                    log.warning(
                        "run %s stage %d epoch %d: partition %d reduced here; owners %s sent %s, %s",
                        ctx.run_id, rnd.stage, rnd.epoch, p.part, ", ".join(rounds.owners(p)),
                        (p.result_sha or "-")[:12], (p.second_sha or "-")[:12],
                    )  # fmt: skip
                continue
            with state.tx() as conn:
                taken = butterfly.record_result(conn, ctx, p, key, b.sha256, b.size, now)
            if not taken:
                blobs.delete(key)
            log.warning(
                "run %s stage %d epoch %d: partition %d reduced by the orchestrator (owners %s)",
                ctx.run_id, rnd.stage, rnd.epoch, p.part, ", ".join(rounds.owners(p)),
            )  # fmt: skip
    except (OSError, ValueError) as e:
        if (ctx.run_id, rnd.stage, rnd.epoch) in _stuck:  # said once; the owners' results are awaited
            return False
        _stuck.add((ctx.run_id, rnd.stage, rnd.epoch))
        log.error(
            "run %s stage %d epoch %d: cannot reduce a partition here (awaiting its owners): %s",
            ctx.run_id,
            rnd.stage,
            rnd.epoch,
            e,
        )
        return False
    return True


def publish(state: State, ctx: RunCtx, stage: int, epoch: int, now: float) -> bool:
    """Assemble epoch+1 from the parts and move the stage to it (once); False if it is not ready."""
    blobs, m = state.blobs, ctx.manifest.merge
    with state.tx() as conn:
        parts = rounds.parts(conn, ctx.run_id, stage, epoch)
    if not parts or any(p.result_sha is None for p in parts):
        return False
    ws, ms = [], []
    for p in parts:
        try:
            w, mom = flat.read_part(
                blobs.read(p.result_key), p.stop - p.start, m.wire_dtype, m.strategy == "diloco"
            )
        except (OSError, ValueError) as e:  # damaged on this disk: that partition is reduced again
            log.error(
                "run %s stage %d epoch %d: result of partition %d unreadable: %s",
                ctx.run_id,
                stage,
                epoch,
                p.part,
                e,
            )
            with state.tx() as conn:
                where = (
                    MP.c.run_id == ctx.run_id,
                    MP.c.stage == stage,
                    MP.c.epoch == epoch,
                    MP.c.part == p.part,
                )
                conn.execute(update(MP).where(*where).values(result_key=None, result_sha=None, first_by=None))
            return False
        ws.append(w)
        if mom is not None:
            ms.append(mom)
    vec = np.concatenate(ws)
    meta = {"stage": str(stage), "epoch": str(epoch + 1)}
    data = tensors.encode(flat.FlatLayout.of(ctx.cfg, stage).unflatten(vec), meta)
    start = tensors.parse_header(data, len(data)).data_start
    shas = [hashlib.sha256(data[start + 4 * p.start : start + 4 * p.stop]).hexdigest() for p in parts]
    mkey = rounds.momentum_key(ctx.run_id, stage, epoch + 1) if ms else None
    with state.tx() as conn:
        rnd = rounds.get_round(conn, ctx.run_id, stage, epoch)
        current = conn.execute(
            select(ST.c.epoch).where(ST.c.run_id == ctx.run_id, ST.c.stage == stage)
        ).scalar_one()
        if rnd is None or rnd.state != "reducing" or current != epoch:
            return False  # published already (a tick raced a restart) or superseded
    key = runs.weights_key(ctx.run_id, stage, epoch + 1)
    stored = [blobs.write(key, data)]
    if mkey is not None:
        mvec = np.concatenate(ms)
        stored.append(
            blobs.write(
                mkey,
                tensors.encode(
                    {"momentum": RawTensor(m.wire_dtype, (mvec.size,), flat.to_wire(mvec, m.wire_dtype))}
                ),
            )
        )
    with state.tx() as conn:
        rnd = rounds.get_round(conn, ctx.run_id, stage, epoch)
        if rnd is None or rnd.state != "reducing":  # aborted while the blobs were written
            return False
        old_momentum = butterfly.momentum_of(conn, ctx.run_id, stage, epoch - 1)
        for b in stored:
            conn.execute(insert(B).values(key=b.key, sha256=b.sha256, size=b.size, created=now, sealed=True))
        conn.execute(
            update(ST)
            .where(ST.c.run_id == ctx.run_id, ST.c.stage == stage)
            .values(epoch=epoch + 1, weights_key=key, updated=now)
        )
        rw = (R.c.run_id == ctx.run_id, R.c.stage == stage, R.c.epoch == epoch)
        conn.execute(update(R).where(*rw).values(state="closed", closed=now, momentum_key=mkey))
        for p, sha in zip(parts, shas, strict=True):
            pw = (MP.c.run_id == ctx.run_id, MP.c.stage == stage, MP.c.epoch == epoch, MP.c.part == p.part)
            conn.execute(update(MP).where(*pw).values(published_sha=sha))
        # Round E's own uploads, parts and momentum stay until E+1 publishes: an owner still reducing
        # when the round closed finishes, and its result is compared (butterfly.report_part).
        dead = _spent(conn, ctx, stage, epoch - 1)
        if old_momentum:
            dead.append(old_momentum)
        if epoch >= 1:  # keep the previous epoch for replicas still downloading it
            dead.append(runs.weights_key(ctx.run_id, stage, epoch - 1))
        conn.execute(delete(B).where(B.c.key.in_(dead)))
    _delete(state, dead)
    state.wake.notify([rounds.wake_key(ctx.run_id, stage, epoch)])
    log.info("run %s stage %d merged %d partitions into epoch %d", ctx.run_id, stage, len(parts), epoch + 1)
    return True


def _spent(conn: Any, ctx: RunCtx, stage: int, epoch: int) -> list[str]:
    """A round's uploads and part results: nobody reads them once it is closed."""
    contribs = rounds.contributions(conn, ctx.run_id, stage, epoch)
    parts = rounds.parts(conn, ctx.run_id, stage, epoch)
    return [c.blob_key for c in contribs] + [p.result_key for p in parts if p.result_key]


def _forget(conn: Any, ctx: RunCtx, rnd: Any, now: float) -> list[str]:
    dead = _spent(conn, ctx, rnd.stage, rnd.epoch)
    conn.execute(
        update(R)
        .where(R.c.run_id == ctx.run_id, R.c.stage == rnd.stage, R.c.epoch == rnd.epoch)
        .values(state="closed", closed=now)
    )
    conn.execute(delete(B).where(B.c.key.in_(dead)))
    return dead


def _delete(state: State, keys: list[str]) -> None:
    state.blobs.delete_many(keys)
