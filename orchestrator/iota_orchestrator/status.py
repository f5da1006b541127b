"""What a run looks like right now: workers per stage (the faults counted against them, their standing),
queues, epochs (and whether the weights are intact), tokens, vetted losses, credits, checks by state."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, func, select

from iota_cli.core.manifest import RunManifest
from iota_orchestrator import audits, chains, db, faults, merge, preparing, runs, standing, tallies
from iota_orchestrator.runs import RunCtx

LOSS_WINDOW = 5  # first_loss / last_loss average this many tail losses
RECENT = 50


def losses(conn: Connection, run_id: str) -> dict[str, Any]:
    """Loss history of vetted tails (a check passed, none failed): a tail's own word is not the run's
    loss until a recomputation agreed with it. A run no validator has judged anything in yet reports
    every tail's loss, saying so (loss_vetted false). first/last are means over up to LOSS_WINDOW
    losses (a third of them when few)."""
    L, A = db.losses, db.assignments
    vetted = audits.judged(conn, run_id)
    where: tuple[Any, ...] = (L.c.run_id == run_id,)
    if vetted:
        trusted = select(A.c.contributor_id).where(A.c.run_id == run_id, A.c.passes > 0, A.c.fails == 0)
        where += (L.c.contributor_id.in_(trusted),)
    n = conn.execute(select(func.count()).select_from(L).where(*where)).scalar_one()
    k = max(1, min(LOSS_WINDOW, n // 3))
    first = [r[0] for r in conn.execute(select(L.c.loss).where(*where).order_by(L.c.id).limit(k))]
    recent = [
        r[0] for r in conn.execute(select(L.c.loss).where(*where).order_by(L.c.id.desc()).limit(RECENT))
    ][::-1]
    last = recent[-k:]
    return {
        "losses_reported": int(n),
        "first_loss": sum(first) / len(first) if first else None,
        "last_loss": sum(last) / len(last) if last else None,
        "recent_losses": recent,
        "loss_vetted": vetted,
    }


def of(conn: Connection, run_id: str) -> dict[str, Any]:
    """GET /v1/runs/{id}/status: run_status, with the background encoding of a run that had one."""
    run = runs.get_run(conn, run_id)
    encoding = preparing.encoding(conn, run_id)
    if run.state in runs.UNREADY or (encoding is not None and encoding["phase"] != "ready"):
        return unready(run, encoding)
    return {**run_status(conn, runs.context(conn, run_id)), "encoding": encoding}


def unready(run: Any, encoding: dict[str, Any] | None) -> dict[str, Any]:
    """The status of a run whose corpus is not encoded (yet): nothing issued, no stage served."""
    m = RunManifest.from_dict(json.loads(run.manifest))
    return {
        **{k: getattr(run, k) for k in ("run_id", "name", "state", "created")},
        "n_stages": m.model.n_stages,
        "max_samples": m.train.max_samples,
        **dict.fromkeys(("samples_issued", "samples_completed", "samples_dropped", "tokens_processed"), 0),
        **{"losses_reported": 0, "first_loss": None, "last_loss": None, "recent_losses": []},
        **{"stages": [], "credits": [], "checks": {}, "encoding": encoding},
    }


def run_status(conn: Connection, ctx: RunCtx) -> dict[str, Any]:
    run = runs.get_run(conn, ctx.run_id)
    A, CT, W = db.assignments, db.contributors, db.work
    workers = conn.execute(
        select(A, CT.c.name, CT.c.backend, CT.c.throughput)
        .select_from(A.join(CT, A.c.contributor_id == CT.c.contributor_id))
        .where(A.c.run_id == ctx.run_id)
        .order_by(A.c.assigned)
    ).all()
    depths = chains.queue_depths(conn, ctx.run_id)
    done = tallies.work_done(conn, ctx.run_id)  # what pruning took away, and what is still there
    for s, k, n in conn.execute(
        select(W.c.stage, W.c.kind, func.count())
        .where(W.c.run_id == ctx.run_id, W.c.state == "done")
        .group_by(W.c.stage, W.c.kind)
    ):
        done[(s, k)] = done.get((s, k), 0) + int(n)
    weights = {w.stage: w for w in merge.current_weights(conn, ctx.run_id)}
    charged = faults.by_contributor(conn, ctx.run_id)
    stages = []
    for s in range(ctx.n_stages):
        mine = [w for w in workers if w.stage == s]
        stages.append(
            {
                "stage": s,
                "kind": "head" if s == 0 else "tail" if s == ctx.n_stages - 1 else "body",
                "workers": [
                    {
                        "contributor_id": w.contributor_id,
                        "name": w.name,
                        "backend": w.backend,
                        "alive": w.state == "active",
                        "steps": int(w.steps),
                        "epoch": int(w.epoch),
                        "tokens_per_s": float(w.tokens_per_s),
                        "throughput": float(w.throughput),
                        "credits": round(float(w.credits), 6),
                        "faults": charged.get(w.contributor_id, {}),
                        "standing": standing.of(ctx, w),
                        "checks": {"passed": int(w.passes), "failed": int(w.fails)},
                        "banned": w.state == standing.BANNED,
                    }
                    for w in mine
                ],
                "queue_forward": depths.get((s, "forward"), 0),
                "queue_backward": depths.get((s, "backward"), 0),
                "epoch": int(weights[s].epoch) if s in weights else 0,
                "weights_ok": not (s in weights and bool(weights[s].quarantined)),
                "optimizer_steps": sum(int(w.steps) for w in mine),
                "forward_done": done.get((s, "forward"), 0),
                "backward_done": done.get((s, "backward"), 0),
            }
        )
    credits = sorted(
        (
            {"contributor_id": w.contributor_id, "name": w.name, "total": round(float(w.credits), 6)}
            for w in workers
        ),
        key=lambda c: -c["total"],
    )
    return {
        "run_id": ctx.run_id,
        "name": run.name,
        "state": run.state,
        "created": run.created,
        "n_stages": ctx.n_stages,
        "max_samples": ctx.manifest.train.max_samples,
        "samples_issued": int(run.samples_issued),
        "samples_completed": int(run.samples_completed),
        "samples_dropped": int(run.samples_dropped),
        "tokens_processed": int(run.tokens),
        **losses(conn, ctx.run_id),
        "stages": stages,
        "credits": credits,
        "checks": audits.counts(conn, ctx.run_id),
    }
