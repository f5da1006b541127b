"""The swarm's state as Prometheus metric families, read from the database when /metrics is scraped.

Nothing is kept between scrapes: a handful of grouped counts over indexed columns per live run (the
running ones, or the newest when none runs), so a scrape costs about what one `status` call does and
stays correct across restarts. Labels are bounded: run, stage, and a few fixed states or kinds; never a
contributor (thousands of them would each be a series).

    families = gauges.collect(conn)   # inside a transaction (see api/dashboard.py)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import Connection, func, select

from iota_orchestrator import chains, db, tallies

A, AU, MR, L, R = db.assignments, db.audits, db.merge_rounds, db.losses, db.runs
LOSS_WINDOW = 5  # iota_run_loss is the mean of the newest few tail losses (one alone is noisy)


def live_runs(conn: Connection) -> list[Any]:
    """Runs worth a series: every running run, else the newest (its final figures stay visible)."""
    rows = conn.execute(select(R).where(R.c.state == "running").order_by(R.c.created)).all()
    if rows:
        return list(rows)
    return list(conn.execute(select(R).order_by(R.c.created.desc()).limit(1)).all())


def collect(conn: Connection) -> list[Metric]:
    f = _Families()
    f.contributors.add_metric(
        [], conn.execute(select(func.count()).select_from(db.contributors)).scalar_one()
    )
    for run in live_runs(conn):
        _run(conn, f, run)
    return f.all()


class _Families:
    def __init__(self) -> None:
        self.contributors = GaugeMetricFamily("iota_contributors", "Contributors registered")
        self.info = GaugeMetricFamily(
            "iota_run_info", "A live run (always 1)", labels=["run", "name", "state"]
        )
        self.tokens = CounterMetricFamily(
            "iota_run_tokens", "Tokens trained (through the tail)", labels=["run"]
        )
        self.samples = CounterMetricFamily(
            "iota_run_samples", "Samples by what became of them", labels=["run", "state"]
        )
        self.loss = GaugeMetricFamily(
            "iota_run_loss",
            f"Mean of the newest {LOSS_WINDOW} training losses the tails reported",
            labels=["run"],
        )
        self.credits = GaugeMetricFamily("iota_run_credits", "Credits earned in the run", labels=["run"])
        self.queue = GaugeMetricFamily(
            "iota_queue_depth", "Work items queued", labels=["run", "stage", "kind"]
        )
        self.workers = GaugeMetricFamily(
            "iota_workers", "Workers by stage and assignment state", labels=["run", "stage", "state"]
        )
        self.epoch = GaugeMetricFamily(
            "iota_stage_epoch", "Weights epoch of each stage", labels=["run", "stage"]
        )
        self.rounds = GaugeMetricFamily(
            "iota_merge_rounds", "Merge rounds by stage and state", labels=["run", "stage", "state"]
        )
        self.checks = GaugeMetricFamily(
            "iota_validation_checks", "Validation checks by kind and state", labels=["run", "kind", "state"]
        )
        self.failures = CounterMetricFamily(
            "iota_validation_failures", "Validation checks failed", labels=["run", "kind"]
        )

    def all(self) -> list[Metric]:
        return [m for m in vars(self).values() if isinstance(m, Metric)]


def _run(conn: Connection, f: _Families, run: Any) -> None:
    rid = run.run_id
    f.info.add_metric([rid, run.name, run.state], 1)
    f.tokens.add_metric([rid], int(run.tokens))
    for state in ("issued", "completed", "dropped"):
        f.samples.add_metric([rid, state], int(getattr(run, f"samples_{state}")))
    recent = list(
        conn.execute(
            select(L.c.loss).where(L.c.run_id == rid).order_by(L.c.id.desc()).limit(LOSS_WINDOW)
        ).scalars()
    )
    if recent:
        f.loss.add_metric([rid], sum(recent) / len(recent))
    for (stage, kind), n in sorted(chains.queue_depths(conn, rid).items()):
        f.queue.add_metric([rid, str(stage), kind], n)
    credits = 0.0
    for stage, state, n, c in conn.execute(
        select(A.c.stage, A.c.state, func.count(), func.sum(A.c.credits))
        .where(A.c.run_id == rid)
        .group_by(A.c.stage, A.c.state)
    ):
        f.workers.add_metric([rid, str(stage), state], n)
        credits += float(c or 0.0)
    f.credits.add_metric([rid], credits)
    for stage, epoch in conn.execute(
        select(db.stages.c.stage, db.stages.c.epoch).where(db.stages.c.run_id == rid)
    ):
        f.epoch.add_metric([rid, str(stage)], epoch)
    rounds = {(s, "closed"): n for s, n in tallies.rounds_closed(conn, rid).items()}  # pruned (prune.py)
    for stage, state, n in conn.execute(
        select(MR.c.stage, MR.c.state, func.count())
        .where(MR.c.run_id == rid)
        .group_by(MR.c.stage, MR.c.state)
    ):
        rounds[(stage, state)] = rounds.get((stage, state), 0) + int(n)
    _grouped(f.rounds, rid, ((s, state, n) for (s, state), n in sorted(rounds.items())))
    failed: dict[str, int] = {"work": 0, "merge": 0}
    for kind, state, n in conn.execute(
        select(AU.c.kind, AU.c.state, func.count()).where(AU.c.run_id == rid).group_by(AU.c.kind, AU.c.state)
    ):
        f.checks.add_metric([rid, kind, state], n)
        if state == "failed":
            failed[kind] = failed.get(kind, 0) + n
    for kind, n in failed.items():
        f.failures.add_metric([rid, kind], n)


def _grouped(family: GaugeMetricFamily, rid: str, rows: Iterable[Any]) -> None:
    for stage, state, n in rows:
        family.add_metric([rid, str(stage), state], n)
