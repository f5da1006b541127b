"""What the dashboard shows of a run, as one JSON document: GET /v1/dashboard (api/dashboard.py).

The run's status (status.run_status, the same public facts `GET /v1/runs/{id}/status` gives: names,
backends, credits, checks; never a token or an address) plus what a person wants to watch: the loss
curve over tokens with the held-out losses the validator measured, tokens/s over time (series.py), each
contributor's state (computing, waiting and why, gone), recent merge rounds and check verdicts, and the
credits leaderboard. A poll every few seconds costs a few indexed queries and the loss rows added since.

    python -c "from iota_orchestrator import dashboard; print(dashboard.contributor_state)"
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, func, select

from iota_orchestrator import chains, db, runs, status, tallies
from iota_orchestrator.runs import RunCtx
from iota_orchestrator.series import Series

A, AU, MR, W, R = db.assignments, db.audits, db.merge_rounds, db.work, db.runs
RECENT_ROUNDS = 12
RECENT_CHECKS = 10
MAX_HELDOUT = 500
LEADERS = 20
RATE_WINDOW_S = 30.0
GONE = {"left": "left the run", "dropped": "lease expired (no heartbeat)"}


def default_run(conn: Connection) -> str | None:
    """The run a bare `/` shows: the newest running one, else the newest of all (None: no run yet)."""
    for where in ((R.c.state == "running",), (R.c.state.not_in(runs.UNREADY),)):
        row = conn.execute(select(R.c.run_id).where(*where).order_by(R.c.created.desc()).limit(1)).first()
        if row is not None:
            return str(row[0])
    return None


def run_list(conn: Connection) -> list[dict[str, Any]]:
    rows = conn.execute(select(R.c.run_id, R.c.name, R.c.state).order_by(R.c.created.desc()).limit(20))
    return [{"run_id": r.run_id, "name": r.name, "state": r.state} for r in rows]


def view(
    conn: Connection, ctx: RunCtx, series: Series, waiting: dict[str, tuple[str, float]], now: float
) -> dict[str, Any]:
    """The dashboard's document for one run; `waiting` maps contributor id -> (reason, since)."""
    st = status.run_status(conn, ctx)
    run = runs.get_run(conn, ctx.run_id)
    series.read(conn, ctx.run_id)
    until = float(run.finished) if run.finished is not None else now
    elapsed = max(0.0, until - float(run.created))
    return {
        "run": {
            **{k: st[k] for k in ("run_id", "name", "state", "created", "n_stages", "max_samples")},
            **{k: st[k] for k in ("samples_issued", "samples_completed", "samples_dropped")},
            **{k: st[k] for k in ("first_loss", "last_loss", "loss_vetted", "losses_reported")},
            "tokens": st["tokens_processed"],
            "elapsed_s": round(elapsed, 1),
            "tokens_per_s": round(series.recent_rate(until, RATE_WINDOW_S), 1),
            "chains_in_flight": int(chains.active_chains(conn, ctx.run_id)),
            "tokens_per_sample": ctx.tokens_per_sample,
        },
        "series": {
            "loss": series.loss_points(),
            "heldout": heldout(conn, ctx.run_id, series),
            "tokens_per_s": series.rate_points(until),
        },
        "stages": [{k: v for k, v in s.items() if k != "workers"} for s in st["stages"]],
        "contributors": contributors(conn, ctx.run_id, st["stages"], waiting, now),
        "rounds": merge_rounds(conn, ctx.run_id, float(run.created)),
        "checks": checks(conn, ctx.run_id, st, float(run.created)),
        "leaderboard": [{"rank": i + 1, **c} for i, c in enumerate(st["credits"][:LEADERS])],
        "now": now,
    }


def contributor_state(
    w: dict[str, Any], a: Any, held: int, why: tuple[str, float] | None, now: float
) -> tuple[str, str]:
    """(state, why) of one worker: banned, gone (and why), computing, or waiting (and for what)."""
    if w["banned"]:
        return "banned", f"{w['checks']['failed']} checks failed"
    if a is not None and a.state != "active":
        return "gone", f"{GONE.get(a.state, a.state)} {_ago(now - float(a.last_seen))}"
    if held:
        return "computing", f"{held} item{'s' * (held > 1)} in hand"
    if why is not None:
        return "waiting", f"{why[0]} (for {_ago(now - why[1], suffix='')})"
    return "waiting", "between items"


def _ago(seconds: float, suffix: str = " ago") -> str:
    s = max(0, int(seconds))
    text = f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s // 3600} h"
    return text + suffix


def contributors(
    conn: Connection,
    run_id: str,
    stages: list[dict[str, Any]],
    waiting: dict[str, tuple[str, float]],
    now: float,
) -> list[dict[str, Any]]:
    held: dict[str, int] = dict(
        conn.execute(
            select(W.c.worker, func.count())
            .where(W.c.run_id == run_id, W.c.state == "claimed")
            .group_by(W.c.worker)
        ).all()
    )
    rows = {a.contributor_id: a for a in conn.execute(select(A).where(A.c.run_id == run_id))}
    out = []
    for s in stages:
        for w in s["workers"]:
            a = rows.get(w["contributor_id"])
            state, why = contributor_state(
                w, a, int(held.get(w["contributor_id"], 0)), waiting.get(w["contributor_id"]), now
            )
            keep = (
                "contributor_id",
                "name",
                "backend",
                "steps",
                "epoch",
                "tokens_per_s",
                "credits",
                "standing",
            )
            out.append(
                {
                    "stage": s["stage"],
                    **{k: w[k] for k in keep},
                    "checks": w["checks"],
                    "state": state,
                    "why": why,
                    "last_seen_s": round(now - float(a.last_seen), 1) if a is not None else None,
                }
            )
    return out


def heldout(conn: Connection, run_id: str, series: Series) -> list[dict[str, Any]]:
    """Held-out losses the validator measured (merge checks: the pipeline's loss on a batch the run has
    not issued, with the stage's update applied), placed at the tokens trained when each was judged."""
    rows = conn.execute(
        select(AU.c.id, AU.c.stage, AU.c.epoch, AU.c.state, AU.c.loss, AU.c.decided)
        .where(AU.c.run_id == run_id, AU.c.kind == "merge", AU.c.loss.is_not(None), AU.c.decided.is_not(None))
        .order_by(AU.c.id.desc())
        .limit(MAX_HELDOUT)
    ).all()
    return [
        {
            "tokens": series.tokens_at(float(r.decided)),
            "loss": round(float(r.loss), 5),
            "stage": r.stage,
            "epoch": r.epoch,
            "passed": r.state == "passed",
        }
        for r in reversed(rows)
    ]


def merge_rounds(conn: Connection, run_id: str, t0: float) -> dict[str, Any]:
    pruned = sum(tallies.rounds_closed(conn, run_id).values())  # closed rounds prune.py folded away
    counts: dict[str, int] = {"closed": pruned} if pruned else {}
    for state, n in conn.execute(
        select(MR.c.state, func.count()).where(MR.c.run_id == run_id).group_by(MR.c.state)
    ):
        counts[state] = counts.get(state, 0) + int(n)
    recent = conn.execute(
        select(MR).where(MR.c.run_id == run_id).order_by(MR.c.opened.desc()).limit(RECENT_ROUNDS)
    ).all()
    return {
        "counts": counts,
        "recent": [
            {
                "stage": r.stage,
                "epoch": r.epoch,
                "state": r.state,
                "contributions": int(r.contributions),
                "opened_s": round(float(r.opened) - t0, 1),
                "took_s": round(float(r.closed) - float(r.opened), 1) if r.closed is not None else None,
            }
            for r in recent
        ],
    }


def checks(conn: Connection, run_id: str, st: dict[str, Any], t0: float) -> dict[str, Any]:
    """Validation: checks by kind and state, and the latest verdicts (who, what, the verdict; not the
    validator's detail text, which the public status never showed)."""
    by_kind: dict[str, dict[str, int]] = {}
    for kind, state, n in conn.execute(
        select(AU.c.kind, AU.c.state, func.count())
        .where(AU.c.run_id == run_id)
        .group_by(AU.c.kind, AU.c.state)
    ):
        by_kind.setdefault(kind, {})[state] = int(n)
    names = {w["contributor_id"]: w["name"] for s in st["stages"] for w in s["workers"]}
    recent = conn.execute(
        select(AU.c.id, AU.c.kind, AU.c.stage, AU.c.contributor_id, AU.c.state, AU.c.loss, AU.c.decided)
        .where(AU.c.run_id == run_id, AU.c.state.in_(("passed", "failed")))
        .order_by(AU.c.id.desc())
        .limit(RECENT_CHECKS)
    ).all()
    return {
        "counts": st["checks"],
        "by_kind": by_kind,
        "recent": [
            {
                "id": r.id,
                "kind": r.kind,
                "stage": r.stage,
                "contributor_id": r.contributor_id,
                "name": names.get(r.contributor_id, r.contributor_id),
                "passed": r.state == "passed",
                "loss": round(float(r.loss), 5) if r.loss is not None else None,
                "decided_s": round(float(r.decided) - t0, 1) if r.decided is not None else None,
            }
            for r in recent
        ],
    }
