"""Pruning (prune.py) on a real orchestrator in this process, driven by simulated workers over HTTP: rows
go away, and every number a reader shows stays the same (status, credits, the dashboard, /metrics,
rebalance's speeds); a result for a pruned item gets 410.

    timeout 300 .venv/bin/python -m pytest -q tests/test_prune.py
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
import requests
from inprocess_orchestrator import InProcessOrchestrator, until
from iota_orchestrator import dashboard, db, prune, rebalance, runs, tallies
from iota_orchestrator.audits import PENDING
from iota_orchestrator.series import Series
from prometheus_client.parser import text_string_to_metric_families
from simworker import SimWorker
from sqlalchemy import func, insert, select

from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.validation import AuditVerdict
from iota_cli.swarm.corpus import write_corpus
from iota_cli.train.api import SwarmApi
from iota_cli.train.errors import ApiError

ADMIN = "admin-token-for-prune-tests"
LATER = 3600.0  # prune as if this much later: past every retention window


@pytest.fixture(scope="module")
def orch(tmp_path_factory):
    base = tmp_path_factory.mktemp("prune")
    with InProcessOrchestrator(base / "data", admin_token=ADMIN) as o:
        o.corpus = write_corpus(base / "text", files=1, words=4000)
        yield o


def make_run(orch) -> str:
    m = tiny_manifest(str(orch.corpus))
    # No merge round opens (its interval is far off): rounds would come and go between two looks.
    m = replace(m, train=replace(m.train, max_inflight_per_head=2), merge=replace(m.merge, interval=10**6))
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        return admin.create_run(m).run_id


def count(orch, table, run_id: str) -> int:
    with orch.state.tx() as conn:
        return conn.execute(
            select(func.count()).select_from(table).where(table.c.run_id == run_id)
        ).scalar_one()


def judge_all(orch) -> int:
    """The validator's part: every check that is ready passes (so the work it checked is vetted)."""
    n = 0
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        while (task := admin.next_audit()) is not None:
            admin.judge(task.audit_id, AuditVerdict(passed=True))
            n += 1
    return n


def collected(orch, run_id: str) -> bool:
    """Whether every finished chain's blobs were collected (reaper.collect_garbage): prunable then."""
    C = db.chains
    ended = (C.c.run_id == run_id, C.c.state != "active", C.c.gc.is_(False))
    with orch.state.tx() as conn:
        return conn.execute(select(C.c.sample_id).where(*ended)).first() is None


def settled(orch) -> bool:
    """Every check judged (the reaper readies those of ended chains first)."""
    judge_all(orch)
    with orch.state.tx() as conn:
        return conn.execute(select(db.audits.c.id).where(db.audits.c.state.in_(PENDING))).first() is None


def numbers(orch, run_id: str, workers: list[SimWorker]) -> dict:
    """Everything a person or a scraper reads about the run, less what moves with the clock."""
    st = requests.get(f"{orch.url}/v1/runs/{run_id}/status", timeout=10).json()
    board = dashboard_now(orch, run_id)
    for k in ("elapsed_s", "tokens_per_s"):
        board["run"].pop(k)
    for c in board["contributors"]:
        c.pop("last_seen_s")
        c.pop("why")
    credits = {
        w.name: requests.get(f"{orch.url}/v1/contributors/{w.contributor_id}/credits", timeout=10).json()
        for w in workers
    }
    metrics = requests.get(f"{orch.url}/metrics", timeout=10).text
    gauges = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(metrics)
        if f.name.startswith(("iota_run", "iota_merge", "iota_workers", "iota_validation", "iota_queue"))
        for s in f.samples
    }
    with orch.state.tx() as conn:
        speeds = rebalance.members(conn, runs.context(conn, run_id))
    return {
        "status": st,
        "board": {k: v for k, v in board.items() if k not in ("now", "series")},
        "loss": board["series"]["loss"],
        "credits": credits,
        "gauges": gauges,
        "speeds": speeds,
    }


def test_pruning_keeps_every_number_and_late_results_get_410(orch):
    run_id = make_run(orch)
    workers = [SimWorker(orch.url, f"w{i}").register() for i in range(3)]
    for stage, w in enumerate(workers):
        w.assign(run_id, stage=stage)
    head, _, tail = workers
    first = None
    for _ in range(60):  # chains through every stage, a validator vetting what it checked
        for w in workers:
            if (it := w.claim()) is not None:
                first = first or it
                w.do(it)
        judge_all(orch)
    assert first is not None and count(orch, db.chains, run_id) >= 12
    until(lambda: collected(orch, run_id), what="the finished chains' blobs collected")
    before = numbers(orch, run_id, workers)
    work, ledger = count(orch, db.work, run_id), count(orch, db.ledger, run_id)

    # Running: the chains go, but for each live worker's last items, which rebalance measures its speed
    # over; no ledger row goes (no merge round has counted any, and a failed check could claw them back).
    pruned = prune.prune(orch.state, time.time() + LATER, retention=0.0)
    assert pruned.chains > 0 and 0 < count(orch, db.work, run_id) < work
    assert pruned.ledger == 0 and count(orch, db.ledger, run_id) == ledger
    assert numbers(orch, run_id, workers) == before

    # A late result, give-back or upload for a pruned item: 410, as the worker's "forgotten" expects.
    with orch.state.tx() as conn:
        assert conn.execute(select(db.work).where(db.work.c.id == int(first["work_id"][1:]))).first() is None
    for call in (
        lambda: head.complete(first, None, 0),
        lambda: head.call("POST", f"/v1/work/{first['work_id']}/abandon", {"reason": "stopping"}),
    ):
        with pytest.raises(ApiError) as e:
            call()
        assert e.value.status == 410 and "pruned" in e.value.detail
    with pytest.raises(ApiError) as e:
        head.complete({**first, "work_id": "w999999999"}, None, 0)
    assert e.value.status == 404, "an id never handed out is still unknown"

    # Finished, every check judged: the ledger's rows are folded into totals too.
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        admin.abort_run(run_id)
    until(lambda: settled(orch) and collected(orch, run_id), what="checks judged, blobs collected")
    before = numbers(orch, run_id, workers)
    pruned = prune.prune(orch.state, time.time() + LATER, retention=0.0)
    # What stays: the newest ledger row and the chain with the newest work row (SQLite reuses top ids).
    assert pruned.ledger > 0 and count(orch, db.ledger, run_id) <= 1
    assert count(orch, db.chains, run_id) <= 1 and count(orch, db.work, run_id) <= 2 * 3 - 1
    after = numbers(orch, run_id, workers)
    assert after.pop("speeds") != before.pop("speeds"), "a finished run is not rebalanced: its items go"
    assert after == before
    with orch.state.tx() as conn:
        assert sum(n for n in tallies.work_done(conn, run_id).values()) > 0
    assert prune.prune(orch.state, time.time() + LATER, retention=0.0) == prune.Pruned(), "idempotent"
    assert tail.claim() is None  # the run is over; nothing the worker asks for is a 500


def test_old_merge_rounds_go_with_their_blobs_and_the_counts_stay(orch):
    run_id = make_run(orch)
    state, MR, MP, MC, B = orch.state, db.merge_rounds, db.merge_parts, db.merge_contribs, db.blobs
    n, stage, now = prune.KEEP_ROUNDS + 5, 1, time.time()
    with state.tx() as conn:  # rounds as publish.py leaves them: closed, each with its part and updates
        for e in range(n):
            conn.execute(
                insert(MR).values(
                    run_id=run_id, stage=stage, epoch=e, state="closed", opened=now + e, deadline=now + e,
                    closed=now + e, contributions=2,
                )
            )  # fmt: skip
            key = f"runs/{run_id}/merge/s{stage}/e{e}/p0.part"
            conn.execute(
                insert(MP).values(
                    run_id=run_id, stage=stage, epoch=e, part=0, start=0, stop=4, owners="[]", result_key=key
                )
            )
            b = state.blobs.write(key, b"part")
            conn.execute(insert(B).values(key=key, sha256=b.sha256, size=b.size, created=now, sealed=True))
            for cid in ["c-early", "c-late"] if e < 3 or e == n - 1 else ["c-late"]:
                conn.execute(
                    insert(MC).values(
                        run_id=run_id, stage=stage, epoch=e, contributor_id=cid, blob_key=f"u{e}{cid}",
                        weight=1.0, t=now + e, ledger_mark=e,
                    )
                )  # fmt: skip
    board = numbers_of_rounds(orch, run_id)
    pruned = prune.prune(state, now, retention=prune.DEFAULT_RETENTION_S)
    assert pruned.rounds == n - prune.KEEP_ROUNDS and pruned.blobs == n - prune.KEEP_ROUNDS
    assert numbers_of_rounds(orch, run_id) == board
    with state.tx() as conn:
        epochs = sorted(conn.execute(select(MR.c.epoch).where(MR.c.run_id == run_id)).scalars())
        assert epochs == list(range(n - prune.KEEP_ROUNDS, n))
        assert sorted(conn.execute(select(MP.c.epoch).where(MP.c.run_id == run_id)).scalars()) == epochs
        kept = conn.execute(select(MC.c.epoch, MC.c.contributor_id).where(MC.c.run_id == run_id)).all()
        # Each contributor's latest update stays (its ledger mark paces its next round): c-early's is
        # in the newest round, so its old ones go.
        assert {(e, c) for e, c in kept} == {(e, "c-late") for e in epochs} | {(n - 1, "c-early")}
    for e in range(n):
        gone = e < n - prune.KEEP_ROUNDS
        assert state.blobs.exists(f"runs/{run_id}/merge/s{stage}/e{e}/p0.part") is not gone


def dashboard_now(orch, run_id: str) -> dict:
    """The dashboard's document as GET /v1/dashboard builds it, built now (the route caches it)."""
    with orch.state.tx() as conn:
        ctx = runs.context(conn, run_id)
        series = Series(ctx.tokens_per_sample, float(runs.get_run(conn, run_id).created))
        return json.loads(json.dumps(dashboard.view(conn, ctx, series, {}, time.time())))


def numbers_of_rounds(orch, run_id: str) -> tuple:
    rounds = dashboard_now(orch, run_id)["rounds"]
    metrics = requests.get(f"{orch.url}/metrics", timeout=10).text
    gauge = [
        (s.labels["stage"], s.labels["state"], s.value)
        for f in text_string_to_metric_families(metrics)
        if f.name == "iota_merge_rounds"
        for s in f.samples
        if s.labels["run"] == run_id
    ]
    return rounds, sorted(gauge)
