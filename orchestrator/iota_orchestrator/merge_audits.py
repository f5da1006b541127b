"""Merge updates scored on held-out tokens: Templar's loss-before/after test, run by the validator.

While a validator is there (it asked for work within ACTIVE_S), an update recorded for a round may be
sampled (standing.draw): its round then waits, until its deadline, for the validator's score: the
pipeline's loss on a batch the run has not issued yet, with the stage at base - update, against the loss
at base (core.validation.merge_loss_ok). A failed update leaves its round if it has not begun reducing,
and the work it carried is unpaid (standing.unpaid). Its sender's standing does not move either way: a
replica that trained on what a cheater sent it fails this test too, and the recomputation of work items
is what judges honesty. The checks share audits.py's table (kind "merge").

    python -c "from iota_orchestrator import merge_audits; print(merge_audits.heldout_key('r', 3))"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from iota_cli.core.protocol import BlobRef
from iota_cli.core.validation import AuditTask
from iota_orchestrator import chains, data, db, ledger, runs, standing
from iota_orchestrator.blobs import BlobStore
from iota_orchestrator.runs import RunCtx

AU, B = db.audits, db.blobs
PENDING = ("ready", "taken")


ACTIVE_S = 30.0  # a validator that asked for work this recently is there to score merge updates
_SEEN = "validator_seen"


def validator_seen(conn: Connection, now: float) -> None:
    """A validator asked for work (rounds wait for merge checks only while one is there)."""
    db.set_meta(conn, _SEEN, repr(now))


def validator_active(conn: Connection, now: float) -> bool:
    seen = db.get_meta(conn, _SEEN)
    return seen is not None and now - float(seen) < ACTIVE_S


def sample(
    conn: Connection, ctx: RunCtx, contributor_id: str, stage: int, epoch: int, deadline: float, now: float
) -> bool:
    """Maybe score this just-recorded update on held-out tokens before its round reduces (the round
    waits for the verdict until `deadline`); see _rate for how often. Only while a validator is there:
    a swarm without one merges on the bound alone."""
    if not validator_active(conn, now) or standing.SYSTEM_RNG.random() >= _rate(conn, ctx, contributor_id):
        return False
    run = conn.execute(select(db.runs.c.samples_issued).where(db.runs.c.run_id == ctx.run_id)).scalar_one()
    # Held out: a random corpus sample the run has not issued yet, unpredictable to the replicas.
    ahead = int(run) + standing.SYSTEM_RNG.randrange(1, max(2, ctx.layout.n_samples))
    index = data.data_index(ahead, ctx.layout.n_samples, ctx.manifest.seed)
    # A failed update leaves the work it carried (its counted weight) unpaid.
    MC = db.merge_contribs
    carried = conn.execute(
        select(MC.c.weight).where(
            MC.c.run_id == ctx.run_id,
            MC.c.stage == stage,
            MC.c.epoch == epoch,
            MC.c.contributor_id == contributor_id,
        )
    ).scalar_one_or_none()
    items = max(float(carried or 0.0) / max(ctx.tokens_per_sample, 1), 1.0)
    basis = items * ledger.work_credits(ctx.gflops[stage], ctx.tokens_per_sample, "backward", False)
    audit_id = conn.execute(
        insert(AU).values(
            run_id=ctx.run_id,
            contributor_id=contributor_id,
            kind="merge",
            stage=stage,
            sample_id=index,
            state="ready",
            created=now,
            deadline=deadline,
            ledger_mark=0,  # a good update says nothing of its sender's work items: it vets no credits
            basis=basis,
            epoch=epoch,
        )
    ).inserted_primary_key[0]  # type: ignore[index]
    return audit_id is not None


def _rate(conn: Connection, ctx: RunCtx, contributor_id: str) -> float:
    """Every update until its sender passed a merge check; then the sample rate (the suspect rate once
    it failed any check)."""
    states = set(
        conn.execute(
            select(AU.c.state)
            .where(
                AU.c.run_id == ctx.run_id,
                AU.c.contributor_id == contributor_id,
                AU.c.state.in_(("passed", "failed")),
            )
            .where(AU.c.kind == "merge")
        ).scalars()
    )
    t = ctx.manifest.trust
    if "passed" not in states:
        return 1.0
    a = conn.execute(
        select(db.assignments.c.fails).where(
            db.assignments.c.run_id == ctx.run_id, db.assignments.c.contributor_id == contributor_id
        )
    ).scalar_one_or_none()
    return t.suspect_rate if a else t.sample_rate


def pending(conn: Connection, run_id: str, stage: int, epoch: int) -> bool:
    """Whether a merge update of this round still waits for its held-out score."""
    q = select(AU.c.id).where(
        AU.c.run_id == run_id,
        AU.c.kind == "merge",
        AU.c.stage == stage,
        AU.c.epoch == epoch,
        AU.c.state.in_(PENDING),
    )
    return conn.execute(q.limit(1)).first() is not None


def heldout_key(run_id: str, audit_id: int) -> str:
    return f"runs/{run_id}/audit/{audit_id}.heldout.safetensors"


def task(
    conn: Connection,
    ctx: RunCtx,
    blobs: BlobStore,
    au: Any,
    ref: Callable[[str | None], BlobRef | None],
    now: float,
) -> AuditTask | None:
    """The validator's task for a merge check (None: a blob it needs is gone)."""
    from iota_orchestrator import rounds  # rounds records updates and samples them here

    if au.weights_key is None:
        # The held-out batch rests under weights_key: it is deleted with the snapshots once decided.
        key = heldout_key(ctx.run_id, au.id)
        stored = blobs.write(key, chains.tokens_blob(ctx, au.sample_id))
        conn.execute(
            insert(B).values(key=key, sha256=stored.sha256, size=stored.size, created=now, sealed=True)
        )
        conn.execute(update(AU).where(AU.c.id == au.id).values(weights_key=key))
    update_ref = ref(rounds.update_key(ctx.run_id, au.stage, au.epoch, au.contributor_id))
    held = ref(heldout_key(ctx.run_id, au.id))
    pipeline = []
    for s in range(ctx.n_stages):
        if s == au.stage:
            pipeline.append(ref(runs.weights_key(ctx.run_id, s, au.epoch)))
        else:
            key = conn.execute(
                select(db.stages.c.weights_key).where(
                    db.stages.c.run_id == ctx.run_id, db.stages.c.stage == s
                )
            ).scalar_one()
            pipeline.append(ref(key))
    if update_ref is None or held is None or any(p is None for p in pipeline):
        return None
    return AuditTask(
        audit_id=au.id,
        kind="merge",
        run_id=ctx.run_id,
        manifest=ctx.manifest,
        stage=au.stage,
        backend="",
        update=update_ref,
        pipeline=[p for p in pipeline if p is not None],
        heldout=held,
    )


def leave_out(conn: Connection, ctx: RunCtx, au: Any) -> None:
    """A failed merge update leaves its round, if the round has not begun reducing."""
    R, MC = db.merge_rounds, db.merge_contribs
    where = (R.c.run_id == ctx.run_id, R.c.stage == au.stage, R.c.epoch == au.epoch)
    rnd = conn.execute(select(R.c.state).where(*where)).first()
    if rnd is None or rnd.state != "open":
        return
    gone = conn.execute(
        delete(MC).where(
            MC.c.run_id == ctx.run_id,
            MC.c.stage == au.stage,
            MC.c.epoch == au.epoch,
            MC.c.contributor_id == au.contributor_id,
        )
    ).rowcount
    if gone:
        conn.execute(update(R).where(*where).values(contributions=R.c.contributions - gone))
