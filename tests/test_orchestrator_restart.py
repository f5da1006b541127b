"""Crash safety: SIGKILL the orchestrator mid-run, restart it on the same data dir and port, and check
that runs, contributors, assignments, queues and the ledger are as they were, and the run carries on.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import replace

import pytest
import requests
from simworker import SimWorker

from iota_cli.core.manifest import tiny_manifest
from iota_cli.swarm.corpus import write_corpus
from iota_cli.swarm.orchestrator import OrchestratorProcess, wait_until
from iota_cli.train.errors import ClientError

ADMIN = "admin-token-for-restart"


def snapshot(url, run_id, workers):
    st = requests.get(f"{url}/v1/runs/{run_id}/status", timeout=30).json()
    credits = {
        w.name: requests.get(f"{url}/v1/contributors/{w.contributor_id}/credits").json() for w in workers
    }
    return st, credits


def hammer(worker, stop, acked, pending):
    """Work as fast as possible, remembering every completion the server acknowledged."""
    while not stop.is_set():
        item, claim_id = None, uuid.uuid4().hex
        try:
            item = worker.claim(claim_id=claim_id)
            if item is None:
                time.sleep(0.01)
                continue
            acked[worker.name].append(worker.do(item)["credits"])
        except (requests.RequestException, ClientError):
            pending[worker.name] = (item, claim_id)  # the server died under us: retry once it is back
            return


def retry(worker, item, claim_id):
    """What a retrying client does after the server comes back: repeat the claim, finish the item."""
    if item is None:
        item = worker.claim(claim_id=claim_id)  # same claim_id: the same item if the claim had landed
    return worker.do(item)["credits"] if item else None


@pytest.mark.slow
def test_sigkill_mid_run_loses_nothing_acknowledged(tmp_path):
    corpus = write_corpus(tmp_path / "text")
    data = tmp_path / "data"
    orch = OrchestratorProcess(data, admin_token=ADMIN, tick_s=0.2).start()
    try:
        m = tiny_manifest(str(corpus), max_samples=40)
        m = replace(
            m,
            train=replace(m.train, lease_s=10.0, work_timeout_s=30.0),
            merge=replace(m.merge, timeout_s=1.0),
        )
        r = requests.post(
            orch.url + "/v1/runs",
            json={"manifest": m.to_dict()},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        run_id = r.json()["run_id"]
        workers = []
        for stage, name in [(0, "h1"), (0, "h2"), (1, "b"), (2, "t")]:
            w = SimWorker(orch.url, name).register()
            w.assign(run_id, stage=stage)
            workers.append(w)
        stop, acked, pending = threading.Event(), {w.name: [] for w in workers}, {}
        threads = [threading.Thread(target=hammer, args=(w, stop, acked, pending)) for w in workers]
        for th in threads:
            th.start()
        assert wait_until(lambda: sum(map(len, acked.values())) >= 25, timeout=60)
        orch.kill()  # SIGKILL while the workers are mid-request
        stop.set()
        for th in threads:
            th.join(30)
        port = orch.port
        # A different IOTA_ADMIN_TOKEN at a later start changes nothing: the stored hash stays.
        orch = OrchestratorProcess(data, port=port, admin_token="ignored", tick_s=0.2).start()
        assert orch.url.endswith(f":{port}")
        st, credits = snapshot(orch.url, run_id, workers)
        for w in workers:
            got, sent = credits[w.name], acked[w.name]
            assert sum(sent) <= got["total"] + 1e-6, f"{w.name}: an acknowledged completion was lost"
            assert len(sent) <= got["entries"] <= len(sent) + 1, "at most the request in flight is extra"
        assert st["state"] == "running" and st["samples_issued"] > 0
        alive = [w["alive"] for s in st["stages"] for w in s["workers"]]
        assert alive == [True] * 4, "a restart gives live workers a grace period"
        time.sleep(0.6)  # a few reaper ticks: nothing changes on its own
        assert snapshot(orch.url, run_id, workers)[1] == credits
        for w in workers:  # the same tokens still work, the same stages are assigned
            assert w.call("GET", "/v1/contributors/me")["assignment"]["stage"] == w.stage
        # Items in flight at the crash are finished as a retrying client would, and the run goes on.
        for w in workers:
            if w.name in pending and (credits := retry(w, *pending[w.name])) is not None:
                acked[w.name].append(credits)
        stop = threading.Event()
        threads = [threading.Thread(target=hammer, args=(w, stop, acked, {})) for w in workers]
        for th in threads:
            th.start()

        def finished():
            return requests.get(f"{orch.url}/v1/runs/{run_id}/status").json()["state"] == "finished"

        assert wait_until(finished, timeout=90, interval=0.3)
        stop.set()
        for th in threads:
            th.join(30)
        st, credits = snapshot(orch.url, run_id, workers)
        assert st["samples_issued"] == 40
        assert st["samples_completed"] + st["samples_dropped"] == 40
        assert st["samples_completed"] == 40, "no sample is lost to the crash"
        admin = requests.post(
            f"{orch.url}/v1/runs/{run_id}/stop", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30
        )
        assert admin.status_code == 200, "the admin token from the first start still works"
        assert orch.stop() == 0
    finally:
        orch.kill()
