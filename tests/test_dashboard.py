"""The dashboard's document, its page and /metrics, on a real orchestrator in this process, driven by
simulated workers over HTTP (the browser and a real swarm: test_dashboard_e2e.py)."""

from __future__ import annotations

import json
import math
import time

import pytest
import requests
from inprocess_orchestrator import InProcessOrchestrator
from iota_orchestrator import db
from iota_orchestrator.activity import Activity
from iota_orchestrator.api.dashboard import CACHE_S
from iota_orchestrator.series import MAX_POINTS, Series
from prometheus_client.parser import text_string_to_metric_families
from simworker import SimWorker
from sqlalchemy import insert

from iota_cli.core.manifest import tiny_manifest
from iota_cli.swarm.corpus import write_corpus

ADMIN = "admin-token-for-dashboard-tests"


@pytest.fixture(scope="module")
def orch(tmp_path_factory):
    base = tmp_path_factory.mktemp("dash")
    with InProcessOrchestrator(base / "data", admin_token=ADMIN) as o:
        o.corpus = write_corpus(base / "text")
        yield o


def make_run(orch) -> str:
    m = tiny_manifest(str(orch.corpus))
    r = requests.post(
        f"{orch.url}/v1/runs", json={"manifest": m.to_dict()}, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert r.status_code == 201, r.text
    return r.json()["run_id"]


def board(orch, run_id: str | None = None, fresh: bool = False) -> dict:
    """The dashboard's document; fresh: one built after this call, not one cached up to CACHE_S ago."""
    if fresh:
        time.sleep(CACHE_S)
    r = requests.get(f"{orch.url}/v1/dashboard", params={"run_id": run_id} if run_id else None, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def families(orch) -> dict:
    r = requests.get(f"{orch.url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(fams: dict, name: str, **labels: str) -> float:
    """Sum of a family's samples (counters: the _total samples) whose labels include these."""
    return sum(
        s.value
        for s in fams[name].samples
        if s.name in (name, name + "_total") and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_page_assets_and_refusals(orch):
    page = requests.get(orch.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert '<script src="/static/dashboard.js"' in page.text and "loss-chart" in page.text
    js = requests.get(orch.url + "/static/dashboard.js", timeout=10)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in js.text  # names are contributors' own: text only, never markup
    assert requests.get(orch.url + "/static/../db.sqlite", timeout=10).status_code == 404
    assert requests.get(orch.url + "/static/secrets.txt", timeout=10).status_code == 404
    assert requests.get(orch.url + "/v1/dashboard?run_id=run-nope", timeout=10).status_code == 404
    assert requests.get(orch.url + "/v1/dashboard?run_id=" + "x" * 65, timeout=10).status_code == 422


def test_dashboard_follows_the_work(orch):
    run_id = make_run(orch)
    head, body, tail = (SimWorker(orch.url, f"w{i}").register() for i in range(3))
    for stage, w in enumerate((head, body, tail)):
        w.assign(run_id, stage=stage)
    assert body.claim() is None  # nothing from stage 0 yet: a 204 with its reason
    item = head.claim()
    d = board(orch, run_id)
    state = {c["name"]: c for c in d["contributors"]}
    assert state["w0"]["state"] == "computing" and "1 item in hand" in state["w0"]["why"]
    assert state["w1"]["state"] == "waiting" and "nothing from stage 0 or 2 yet" in state["w1"]["why"]
    assert d["series"]["loss"] == [] and d["run"]["tokens"] == 0

    head.do(item)
    for _ in range(6):  # a few chains through every stage
        for w in (head, body, tail):
            if (it := w.claim()) is not None:
                w.do(it)
    d = board(orch)  # the newest running run by default (the first ask: built now)
    assert d["run"]["run_id"] == run_id and d["run"]["tokens"] > 0
    loss = d["series"]["loss"]
    assert loss and all(math.isfinite(y) for _, y in loss)
    assert loss[-1][0] == d["run"]["tokens"]  # the curve ends at the tokens trained
    assert sum(1 for _ in d["series"]["tokens_per_s"]) >= 1
    assert d["series"]["tokens_per_s"][-1][0] <= d["run"]["elapsed_s"] + 1
    assert [c["rank"] for c in d["leaderboard"]] == [1, 2, 3]
    totals = [c["total"] for c in d["leaderboard"]]
    assert totals == sorted(totals, reverse=True) and totals[0] > 0
    assert {s["stage"] for s in d["stages"]} == {0, 1, 2}
    assert run_id in {r["run_id"] for r in d["runs"]}
    assert board(orch)["now"] == d["now"]  # many pages polling cost one build

    # A held-out loss the validator measured (a merge check's verdict, as audits.decide stores it) lands
    # on the curve at the tokens trained by then.
    with orch.state.tx() as conn:
        conn.execute(
            insert(db.audits).values(
                run_id=run_id,
                contributor_id=body.contributor_id,
                kind="merge",
                stage=1,
                state="passed",
                created=time.time(),
                deadline=time.time() + 60,
                decided=time.time(),
                ledger_mark=0,
                basis=0.0,
                epoch=0,
                loss=4.25,
            )
        )
    tail.api.leave()
    requests.post(f"{orch.url}/v1/runs/{run_id}/abort", headers={"Authorization": f"Bearer {ADMIN}"})
    d = board(orch, run_id, fresh=True)
    (point,) = d["series"]["heldout"]
    assert point["loss"] == 4.25 and point["passed"] and 0 < point["tokens"] <= d["run"]["tokens"]
    assert d["checks"]["by_kind"]["merge"] == {"passed": 1}
    assert d["checks"]["recent"][0]["name"] == "w1" and d["checks"]["recent"][0]["kind"] == "merge"
    state = {c["name"]: c for c in d["contributors"]}
    assert state["w2"]["state"] == "gone" and state["w2"]["why"].startswith("left the run")
    assert d["run"]["state"] == "finished"
    text = json.dumps(d)
    for w in (head, body, tail):  # public facts only, as GET /v1/runs/{id}/status shows them
        assert w.token not in text
    assert ADMIN not in text and "127.0.0.1" not in text


def test_metrics_parse_with_route_templates(orch):
    run_id = make_run(orch)
    head, body, tail = (SimWorker(orch.url, f"m{i}").register() for i in range(3))
    for stage, w in enumerate((head, body, tail)):
        w.assign(run_id, stage=stage)
    before = families(orch)
    for _ in range(4):
        for w in (head, body, tail):
            if (it := w.claim()) is not None:
                w.do(it)
    fams = families(orch)
    routes = {s.labels["route"] for s in fams["iota_http_requests"].samples}
    assert "/v1/work/{work_id}/complete" in routes and "/v1/blobs/{key:path}" in routes
    assert not any("run-" in r or "/w-" in r for r in routes), routes  # templates, never raw paths
    complete = {"route": "/v1/work/{work_id}/complete", "method": "POST"}
    assert value(fams, "iota_http_requests", **complete) > value(before, "iota_http_requests", **complete)
    timed = [
        x.value
        for x in fams["iota_http_request_duration_seconds"].samples
        if x.name.endswith("_count") and x.labels["route"] == complete["route"]
    ]
    assert timed and timed[0] >= 4
    assert value(fams, "iota_blob_bytes", direction="in") > value(before, "iota_blob_bytes", direction="in")
    assert value(fams, "iota_blob_bytes", direction="out") > value(before, "iota_blob_bytes", direction="out")
    status = requests.get(f"{orch.url}/v1/runs/{run_id}/status", timeout=10).json()
    assert value(fams, "iota_run_tokens", run=run_id) == status["tokens_processed"] > 0
    assert value(fams, "iota_workers", run=run_id, state="active") == 3
    assert "iota_queue_depth" in fams and "iota_merge_rounds" in fams and "iota_validation_failures" in fams
    assert fams["iota_run_loss"].samples and math.isfinite(value(fams, "iota_run_loss", run=run_id))
    text = requests.get(f"{orch.url}/metrics", timeout=10).text
    assert head.token not in text and ADMIN not in text


# --- the parts, without a server -----------------------------------------------------------------------


def test_series_stays_small_and_keeps_every_sample():
    s = Series(tokens_per_sample=100, t0=1000.0)
    n = 5 * MAX_POINTS + 7
    for i in range(n):
        s.add(loss=5.0 - i / n, t=1000.0 + i * 0.5)
    assert s.samples == n and sum(s.loss_counts) == n and sum(s.time_counts) == n
    loss = s.loss_points()
    assert len(loss) <= MAX_POINTS and loss[-1][0] == n * 100
    assert all(a[0] < b[0] and a[1] > b[1] for a, b in zip(loss, loss[1:], strict=False))  # falls
    now = 1000.0 + n * 0.5
    rate = s.rate_points(now)
    assert len(rate) <= MAX_POINTS
    assert all(abs(r - 200.0) < 1.0 for _, r in rate[:-1])  # 2 samples/s of 100 tokens
    assert abs(s.recent_rate(now, 30.0) - 200.0) < 20.0
    assert s.rate_points(now + 10 * s.time_width)[-1][1] == 0.0  # a stalled swarm falls to 0
    assert s.tokens_at(1000.0 + 10.0) == pytest.approx(2100, abs=2 * 100 * s.time_width)


def test_activity_keeps_the_cause_and_its_start():
    a = Activity()
    a.claimed("d1", "stage 1 has no worker", 10.0)
    a.claimed("d1", "stage 1 has no worker", 15.0)
    a.claimed("d2", "no work yet", 12.0)
    assert a.waiting({"d1": "c-1", "d2": "c-2"}, 16.0) == {
        "c-1": ("stage 1 has no worker", 10.0),
        "c-2": ("no work yet", 12.0),
    }
    a.claimed("d1", None, 17.0)  # work came
    a.claimed("d2", "the pipeline is full (3 samples in flight)", 18.0)
    assert a.waiting({"d1": "c-1", "d2": "c-2"}, 19.0) == {
        "c-2": ("the pipeline is full (3 samples in flight)", 18.0)
    }
    assert a.waiting({"d2": "c-2"}, 18.0 + 10_000) == {}  # long silent: gone, not waiting
