"""Merge rounds of a stage, their lifecycle: open (contribute) -> reducing -> closed.

A round for (stage, epoch E) opens when the backward work the ledger counted for a replica holding E
since its last contribution (or since it synced to E) makes `merge.interval` optimizer steps (a step count
the replica reports opens nothing: merge_checks.round_due). While it is open every live replica at E is
offered it in its heartbeat (phase "contribute"), uploads its update (the pseudo-gradient base_E - local,
a flat "update" blob in the wire dtype) and reports it; the orchestrator reads it through and records it
with the weight it counted itself: the backward work of that replica on the stage since its previous
contribution (ledger rows), once merge_checks.vet found it finite and within the optimizer's bound (an
update that fails is left out and costs its sender). The contribute phase ends when every live replica
at E that may merge is in, or at the deadline with at least one (an empty expired round is forgotten).
butterfly.py then fixes the partitions and the owners reduce them; publish.py makes epoch E+1. See
docs/protocol.md, "Merging", and docs/trust.md.

    python -c "from iota_orchestrator import rounds; print(rounds.update_key('r', 0, 3, 'c'))"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, func, insert, or_, select, update

from iota_cli.core.bounds import UpdateStats
from iota_cli.core.flat import WIRE_SIZES, FlatLayout
from iota_cli.core.protocol import MergeComplete, MergeCompleteReply, MergeRound
from iota_orchestrator import db, merge_audits, merge_checks, standing
from iota_orchestrator.blobs import BlobStore
from iota_orchestrator.errors import BadRequest, Conflict, Forbidden
from iota_orchestrator.faults import Rejected
from iota_orchestrator.integrity import Checked
from iota_orchestrator.runs import HEADER_SLACK, RunCtx

R, MC, MP, A, ST, L = db.merge_rounds, db.merge_contribs, db.merge_parts, db.assignments, db.stages, db.ledger

_ROUND = select(R).where(
    R.c.run_id == bindparam("run"), R.c.stage == bindparam("stage"), R.c.epoch == bindparam("epoch")
)
_EPOCH = select(ST.c.epoch).where(ST.c.run_id == bindparam("run"), ST.c.stage == bindparam("stage"))


# --- names ------------------------------------------------------------------------------------------


def wake_key(run_id: str, stage: int, epoch: int) -> str:
    """What a long-polling GET /v1/merge/plan waits on: the round changed state or got a result."""
    return f"merge:{run_id}:{stage}:{epoch}"


def _dir(run_id: str, stage: int, epoch: int) -> str:
    return f"runs/{run_id}/merge/s{stage}/e{epoch}"


def update_key(run_id: str, stage: int, epoch: int, contributor_id: str) -> str:
    return f"{_dir(run_id, stage, epoch)}/{contributor_id}.update.safetensors"


def part_key(run_id: str, stage: int, epoch: int, part: int, by: str) -> str:
    return f"{_dir(run_id, stage, epoch)}/part{part}.{by}.safetensors"


def momentum_key(run_id: str, stage: int, epoch: int) -> str:
    """The stage's outer momentum as of `epoch` (written when round epoch - 1 is published)."""
    return f"runs/{run_id}/merge/s{stage}/momentum-e{epoch}.safetensors"


# --- sizes ------------------------------------------------------------------------------------------


def flat_size(ctx: RunCtx, stage: int) -> int:
    """Elements in a stage's flat parameter vector (0 for a stage the run does not have)."""
    return FlatLayout.of(ctx.cfg, stage).size if 0 <= stage < ctx.n_stages else 0


def update_max_size(ctx: RunCtx, stage: int) -> int:
    return flat_size(ctx, stage) * WIRE_SIZES[ctx.manifest.merge.wire_dtype] + HEADER_SLACK


def part_max_size(ctx: RunCtx, n: int) -> int:
    return n * (4 + WIRE_SIZES[ctx.manifest.merge.wire_dtype]) + HEADER_SLACK


# --- rows -------------------------------------------------------------------------------------------


def get_round(conn: Connection, run_id: str, stage: int, epoch: int) -> Any:
    return conn.execute(_ROUND, {"run": run_id, "stage": stage, "epoch": epoch}).first()


def _where(t: Any, run_id: str, stage: int, epoch: int) -> tuple[Any, ...]:
    return (t.c.run_id == run_id, t.c.stage == stage, t.c.epoch == epoch)


def contributions(conn: Connection, run_id: str, stage: int, epoch: int) -> list[Any]:
    """A round's contributions in the fixed order every party reduces them in: by contributor id."""
    q = select(MC).where(*_where(MC, run_id, stage, epoch)).order_by(MC.c.contributor_id)
    return list(conn.execute(q).all())


def parts(conn: Connection, run_id: str, stage: int, epoch: int) -> list[Any]:
    return list(conn.execute(select(MP).where(*_where(MP, run_id, stage, epoch)).order_by(MP.c.part)).all())


def owners(part: Any) -> list[str]:
    return list(json.loads(part.owners))


def round_weights(contribs: list[Any]) -> list[float]:
    """The weights of a round's mean: the counted work, or all equal when none was counted."""
    w = [float(c.weight) for c in contribs]
    return w if sum(w) > 0 else [1.0] * len(w)


def open_round(conn: Connection, ctx: RunCtx, stage: int, epoch: int, now: float) -> Any:
    deadline = now + ctx.manifest.merge.timeout_s
    conn.execute(
        insert(R).values(
            run_id=ctx.run_id, stage=stage, epoch=epoch, state="open", opened=now, deadline=deadline
        )
    )
    return get_round(conn, ctx.run_id, stage, epoch)


# --- the heartbeat's offer --------------------------------------------------------------------------


def offer(
    conn: Connection,
    ctx: RunCtx,
    blobs: BlobStore,
    st: Any,
    contributor_id: str,
    epoch: int,
    a: Any,
    now: float,
) -> MergeRound | None:
    """What a heartbeating replica should do for its stage's round at its epoch, opening one when due.

    st is the stage's row, a the replica's assignment. Only a replica that may merge (standing.may_merge)
    is offered a round, and only counted work opens one (merge_checks.round_due).
    """
    if epoch != st.epoch or not standing.may_merge(ctx, a):
        return None
    rnd = get_round(conn, ctx.run_id, st.stage, epoch)
    if rnd is None:
        if not merge_checks.round_due(conn, ctx, contributor_id, st.stage, epoch):
            return None
        rnd = open_round(conn, ctx, st.stage, epoch, now)
    if rnd.state == "open":
        if _has_contributed(conn, ctx.run_id, st.stage, epoch, contributor_id):
            return None
        key = update_key(ctx.run_id, st.stage, epoch, contributor_id)
        return MergeRound(
            stage=st.stage,
            epoch=epoch,
            phase="contribute",
            upload=blobs.upload_ref(key, update_max_size(ctx, st.stage)),
            deadline_s=round(max(rnd.deadline - now, 0.0), 3),
        )
    if rnd.state == "reducing" and to_reduce(conn, ctx.run_id, st.stage, epoch, contributor_id):
        left = rnd.reducing + ctx.manifest.merge.timeout_s - now
        return MergeRound(stage=st.stage, epoch=epoch, phase="reduce", deadline_s=round(max(left, 0.0), 3))
    return None


def to_reduce(conn: Connection, run_id: str, stage: int, epoch: int, contributor_id: str) -> list[Any]:
    """The partitions this contributor owns and has not reported a result for yet."""
    return [
        p
        for p in parts(conn, run_id, stage, epoch)
        if contributor_id in owners(p) and contributor_id not in (p.first_by, p.second_by)
    ]


def _has_contributed(conn: Connection, run_id: str, stage: int, epoch: int, contributor_id: str) -> bool:
    q = select(MC.c.contributor_id).where(
        *_where(MC, run_id, stage, epoch), MC.c.contributor_id == contributor_id
    )
    return conn.execute(q).first() is not None


# --- contributions ----------------------------------------------------------------------------------


def counted_work(conn: Connection, ctx: RunCtx, contributor_id: str, stage: int) -> tuple[float, int]:
    """(tokens of backward passes this contributor did on the stage since its previous contribution, the
    ledger id that count runs to). The tail's forward item holds its backward, so it counts there."""
    prev = conn.execute(
        select(func.max(MC.c.ledger_mark)).where(
            MC.c.run_id == ctx.run_id, MC.c.stage == stage, MC.c.contributor_id == contributor_id
        )
    ).scalar_one()
    mark = conn.execute(select(func.max(L.c.id))).scalar_one() or 0
    kinds = or_(L.c.kind == "backward", L.c.stage == ctx.n_stages - 1)
    tokens = conn.execute(
        select(func.coalesce(func.sum(L.c.tokens), 0)).where(
            L.c.run_id == ctx.run_id,
            L.c.contributor_id == contributor_id,
            L.c.stage == stage,
            kinds,
            L.c.id > (prev or 0),
            L.c.id <= mark,
        )
    ).scalar_one()
    return float(tokens), int(mark)


@dataclass(frozen=True)
class Read:
    """An uploaded update as the endpoint read it outside the lock (updates can be large)."""

    checked: Checked  # integrity.check_with: well-formed and finite
    stats: UpdateStats | None  # what merge_checks.vet bounds (None: could not be read)
    base_key: str  # the stage weights blob the endpoint took max |w| of
    base_max: float | None


def contribute(
    conn: Connection, ctx: RunCtx, contributor_id: str, report: MergeComplete, read: Read, now: float
) -> MergeCompleteReply:
    """Record a replica's update for the open round (repeating it is accepted again); one that fails its
    check raises merge_checks.MergeCheckFailed (the endpoint charges it) and is not recorded."""
    stage, epoch, checked = report.stage, report.epoch, read.checked
    a = conn.execute(select(A).where(A.c.run_id == ctx.run_id, A.c.contributor_id == contributor_id)).first()
    standing.refuse_banned(a)
    if a is None or a.stage != stage:
        raise Forbidden(f"you are not a replica of stage {stage} in this run")
    if not standing.may_merge(ctx, a):
        raise Forbidden("this run admits only contributors that passed a check to merges (docs/trust.md)")
    current = conn.execute(_EPOCH, {"run": ctx.run_id, "stage": stage}).scalar_one()
    if epoch != current:
        raise Conflict(
            f"stage {stage} is at epoch {current}, not {epoch}: load the current weights and carry on"
        )
    rnd = get_round(conn, ctx.run_id, stage, epoch)
    if _has_contributed(conn, ctx.run_id, stage, epoch, contributor_id):
        return MergeCompleteReply(accepted=True, epoch=current)
    if rnd is None or rnd.state != "open":
        raise Conflict(f"no merge round is taking updates for stage {stage} at epoch {epoch}")
    key = update_key(ctx.run_id, stage, epoch, contributor_id)
    b = conn.execute(select(db.blobs).where(db.blobs.c.key == key)).first()
    if b is None:
        raise BadRequest("upload your update to the round's upload URL first")
    if b.sha256 != report.sha256 or b.size != report.size:
        raise BadRequest("the uploaded update does not match the sha256 and size you sent")
    if checked.sha256 != b.sha256:  # replaced while it was being read: read the new one
        raise Conflict("the uploaded update changed while it was checked; report it again")
    if checked.problem and (read.stats is None or read.stats.finite):  # malformed: refused, no more
        raise Rejected(f"update rejected: {checked.problem}", ctx.run_id)
    if checked.problem:  # well-formed but not finite: no honest replica sends that
        raise merge_checks.MergeCheckFailed(
            f"update rejected: {checked.problem}", ctx.run_id, stage, epoch, b.sha256
        )
    st_key = conn.execute(
        select(ST.c.weights_key).where(ST.c.run_id == ctx.run_id, ST.c.stage == stage)
    ).scalar_one()
    if st_key != read.base_key:  # the stage's weights were replaced while the update was read
        raise Conflict("the stage's weights changed while your update was checked; report it again")
    merge_checks.vet(conn, ctx, contributor_id, stage, epoch, b.sha256, read.stats, read.base_max)
    weight, mark = counted_work(conn, ctx, contributor_id, stage)
    step = report.step or a.steps
    conn.execute(update(db.blobs).where(db.blobs.c.key == key).values(sealed=True))
    conn.execute(
        insert(MC).values(
            run_id=ctx.run_id,
            stage=stage,
            epoch=epoch,
            contributor_id=contributor_id,
            blob_key=key,
            weight=weight,
            t=now,
            sha256=b.sha256,
            step=step,
            ledger_mark=mark,
        )
    )
    conn.execute(
        update(R).where(*_where(R, ctx.run_id, stage, epoch)).values(contributions=R.c.contributions + 1)
    )
    if read.stats is not None and read.stats.max_abs > 0:  # an empty update cannot harm: not scored
        merge_audits.sample(conn, ctx, contributor_id, stage, epoch, rnd.deadline, now)  # held-out loss
    # The next round is paced from this step, at the epoch this round will publish (see lease.beat).
    conn.execute(
        update(A)
        .where(A.c.run_id == ctx.run_id, A.c.contributor_id == contributor_id)
        .values(sync_epoch=epoch + 1, sync_step=step)
    )
    return MergeCompleteReply(accepted=True, epoch=current)


# --- the end of the contribute phase ----------------------------------------------------------------


def due(conn: Connection, ctx: RunCtx, now: float) -> list[tuple[int, int]]:
    """Open rounds whose contribute phase is over: every live replica at E is in, or the deadline passed
    with at least one contribution. An expired round with none is forgotten (it may open again).

    A live replica still reporting E-1 counts as one at E: it is loading E (every replica gets it as the
    round before closes) and has not said so yet; one further behind is a straggler that waits for E+1.
    """
    out = []
    for rnd in conn.execute(select(R).where(R.c.run_id == ctx.run_id, R.c.state == "open")).all():
        rows = conn.execute(
            select(A).where(
                A.c.run_id == ctx.run_id,
                A.c.stage == rnd.stage,
                A.c.state == "active",
                A.c.epoch >= rnd.epoch - 1,
            )
        ).all()
        # Nobody waits for a replica that may not merge, or whose update for this round failed its check.
        failed = merge_checks.failed_here(conn, ctx.run_id, rnd.stage, rnd.epoch)
        live = {a.contributor_id for a in rows if standing.may_merge(ctx, a)} - failed
        got = {c.contributor_id for c in contributions(conn, ctx.run_id, rnd.stage, rnd.epoch)}
        scoring = merge_audits.pending(conn, ctx.run_id, rnd.stage, rnd.epoch)  # held-out loss checks
        if rnd.deadline > now and (live - got or not got or scoring):
            continue
        if got:
            out.append((rnd.stage, rnd.epoch))
        else:
            conn.execute(R.delete().where(*_where(R, ctx.run_id, rnd.stage, rnd.epoch)))
            if rnd.opened >= drained_at(conn, ctx.run_id):  # nobody gave a last update: nothing to wait for
                conn.execute(
                    update(A)
                    .where(A.c.run_id == ctx.run_id, A.c.stage == rnd.stage)
                    .values(sync_step=A.c.steps)
                )
    return out


def drained_at(conn: Connection, run_id: str) -> float:
    """When the run drained (its last merge began); infinity while it has not."""
    t = conn.execute(select(db.runs.c.final_merge).where(db.runs.c.run_id == run_id)).scalar_one_or_none()
    return float("inf") if t is None else float(t)


def final_pending(conn: Connection, ctx: RunCtx, since: float, now: float) -> int:
    """Stages whose replicas' last steps are not merged yet (the run drained at `since`), opening a final
    round where one is due; 0 when the run may finish.

    A stage waits until each live replica has heartbeated since the drain (that beat reports its last
    step; claims renew a lease but carry no step). Then it opens a round if a replica took steps after the
    update it last gave (steps > sync_step) and the ledger counted work of its since the previous round
    opened (a reported step alone opens nothing); a round already in flight at the drain took its
    updates before those steps, so it does not settle the stage."""
    pending = 0
    for s in range(ctx.n_stages):
        live = conn.execute(
            select(A.c.contributor_id, A.c.steps, A.c.sync_step, A.c.beat).where(
                A.c.run_id == ctx.run_id, A.c.stage == s, A.c.state == "active"
            )
        ).all()
        if not live:
            continue
        epoch = conn.execute(_EPOCH, {"run": ctx.run_id, "stage": s}).scalar_one()
        heard = all(r.beat is not None and r.beat >= since for r in live)
        if get_round(conn, ctx.run_id, s, epoch) is not None or not heard:
            pending += 1
        elif any(
            r.steps > r.sync_step and merge_checks.since_last_round(conn, ctx, r.contributor_id, s, epoch) > 0
            for r in live
        ):
            open_round(conn, ctx, s, epoch, now)
            pending += 1
    return pending
