"""Aborting a run (`POST /v1/runs/{id}/abort`, `iota orchestrator run abort`): it finishes now.

A running run with live Worker loops (on fake stages) finishes at once and every loop ends on its
own; a stopped run whose workers are gone, which could never drain, finishes too. Work in flight is
dropped (its results get 409), and aborting again changes nothing.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import requests
from inprocess_orchestrator import InProcessOrchestrator
from test_worker import make_worker, sim, until
from typer.testing import CliRunner

from iota_cli.app import app
from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.protocol import RUN_STATE_HEADER, RunStatus
from iota_cli.swarm.corpus import write_corpus
from iota_cli.train.api import SwarmApi
from iota_cli.train.errors import ApiError

ADMIN = "admin-for-abort-tests"


@pytest.fixture(scope="module")
def orch(tmp_path_factory):
    base = tmp_path_factory.mktemp("abort")
    with InProcessOrchestrator(base / "data", ADMIN) as o:
        o.corpus = write_corpus(base / "text", files=1, words=3000)
        yield o


def make_run(orch: InProcessOrchestrator, **train) -> str:
    m = tiny_manifest(str(orch.corpus))
    m = replace(m, train=replace(m.train, **{"lease_s": 3.0, **train}), merge=replace(m.merge, interval=1000))
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        return admin.create_run(m).run_id


def status(orch: InProcessOrchestrator, run_id: str) -> RunStatus:
    with SwarmApi.connect(orch.url) as api:
        return api.run_status(run_id)


def drained(st: RunStatus) -> bool:
    return all(s.queue_forward == s.queue_backward == 0 for s in st.stages)


def test_abort_finishes_a_running_run_with_live_workers_at_once(orch, tmp_path):
    run_id = make_run(orch, work_timeout_s=600.0)
    crew = [make_worker(orch, run_id, s, tmp_path / f"w{s}").start() for s in range(3)]
    holder = sim(orch, run_id, 0, "holder")  # claims an item and is still working on it at the abort
    try:
        until(lambda: status(orch, run_id).samples_completed >= 2, timeout=60, what="training")
        held = until(holder.claim, what="an item to hold")
        started = time.monotonic()
        with SwarmApi.connect(orch.url, ADMIN) as admin:
            assert admin.abort_run(run_id).state == "finished"
        for r in crew:
            assert r.join(10), "every worker's loop ends on its own once the run has finished"
        assert time.monotonic() - started < 10
        for r in crew:
            assert r.worker.finished and not r.worker.stop.is_set()
    finally:
        for r in crew:
            r.stop()
    st = status(orch, run_id)
    assert st.state == "finished" and drained(st)
    assert st.samples_completed + st.samples_dropped == st.samples_issued and st.samples_dropped >= 1
    with pytest.raises(ApiError) as e:
        holder.complete(held, None, 0)
    assert e.value.status == 409, "a result for dropped work is refused"
    assert holder.heartbeat()["run_state"] == "finished"


def test_abort_finishes_a_stopped_run_that_has_no_workers_left(orch):
    run_id = make_run(orch, work_timeout_s=600.0)
    gone = sim(orch, run_id, 0, "gone")
    assert gone.claim() is not None  # a sample in flight, then its worker vanishes
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        admin.stop_run(run_id)
        time.sleep(0.5)  # a few reaper ticks: nothing drains it
        assert status(orch, run_id).state == "running"
        r = CliRunner().invoke(
            app, ["orchestrator", "run", "abort", run_id, "--url", orch.url], env={"IOTA_ADMIN_TOKEN": ADMIN}
        )
        assert r.exit_code == 0 and "finished" in r.stdout, r.output
        st = status(orch, run_id)
        assert st.state == "finished" and st.samples_dropped == 1 and drained(st)
        assert admin.abort_run(run_id).state == "finished", "aborting again changes nothing"
        assert status(orch, run_id) == st
    claim = gone.request("POST", "/v1/work/claim", json={"run_id": run_id, "wait_s": 0})
    assert claim.status_code == 204 and claim.headers[RUN_STATE_HEADER] == "finished"


def test_abort_needs_the_admin_token_and_a_run(orch):
    run_id = make_run(orch)
    worker = sim(orch, run_id, 0, "nosy")
    url = f"{orch.url}/v1/runs/{run_id}/abort"
    assert requests.post(url, timeout=10).status_code == 401
    assert (
        requests.post(url, headers={"Authorization": f"Bearer {worker.token}"}, timeout=10).status_code == 403
    )
    missing = requests.post(
        f"{orch.url}/v1/runs/no-such-run/abort", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
    )
    assert missing.status_code == 404
    assert status(orch, run_id).state == "running"
