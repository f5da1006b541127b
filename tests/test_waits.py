"""Every wait names its cause, and the end of a run says so (issue 14).

A real orchestrator process serves the module. The claim-level test walks one run through the reasons a
claim gets no work (X-Iota-Wait on the 204) with simulated workers; the end-to-end test runs a real
`iota join` head alone (its log names the stages nobody trains), then lets simulated workers take the
other stages until the run finishes (its log ends with the closing line).

    pytest tests/test_waits.py -m 'not slow'
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
from inprocess_orchestrator import until
from simworker import SimWorker

from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.protocol import RUN_STATE_HEADER, WAIT_HEADER, RegisterRequest
from iota_cli.swarm.corpus import write_corpus
from iota_cli.swarm.orchestrator import OrchestratorProcess
from iota_cli.train.api import SwarmApi
from iota_cli.train.checkpoint import LoopState
from iota_cli.train.states import Session, ending, waiting

ADMIN = "admin-for-wait-tests"


@pytest.fixture(scope="module")
def orch(tmp_path_factory) -> Iterator[OrchestratorProcess]:
    base = tmp_path_factory.mktemp("waits")
    with OrchestratorProcess(base / "orch", admin_token=ADMIN, tick_s=0.2) as o:
        o.corpus = write_corpus(base / "text", files=2, words=3000)  # type: ignore[attr-defined]
        yield o


def make_run(orch: OrchestratorProcess, **train: object) -> str:
    m = tiny_manifest(str(orch.corpus))  # type: ignore[attr-defined]
    # A 3 s lease: a heartbeat a second, so the run's end and merge offers reach workers quickly.
    m = replace(m, train=replace(m.train, **{"lease_s": 3.0, **train}))
    m = replace(m, merge=replace(m.merge, timeout_s=5.0))
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        return admin.create_run(m).run_id


def token(orch: OrchestratorProcess, name: str) -> tuple[str, str]:
    """A contributor registered with the admin token (no registration rate limit): (token, id)."""
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        reply = admin.register(RegisterRequest(name=name, backend="sim"))
    return reply.token, reply.contributor_id


def sim(orch: OrchestratorProcess, run_id: str, stage: int, name: str) -> SimWorker:
    w = SimWorker(orch.url, name)
    w.api.client.token, w.contributor_id = token(orch, name)
    w.assign(run_id, stage=stage)
    return w


def why(w: SimWorker) -> str | None:
    """One claim that must get no work: its X-Iota-Wait."""
    r = w.request("POST", "/v1/work/claim", json={"run_id": w.run_id})
    assert r.status_code == 204, r.text
    return r.headers.get(WAIT_HEADER)


def test_a_claim_without_work_says_why(orch):
    run_id = make_run(orch, max_samples=0, lease_s=10.0)  # the sims only renew their leases by claiming
    head = sim(orch, run_id, 0, "head")
    first = head.claim()
    assert first is not None
    assert why(head) == "this worker holds 1 item, its limit"  # a newcomer holds one until it delivers
    head.do(first)
    for _ in range(2):
        head.do(head.claim())
    assert why(head) == "stages 1 and 2 have no worker"
    tail = sim(orch, run_id, 2, "tail")
    assert why(head) == why(tail) == "stage 1 has no worker"
    body = sim(orch, run_id, 1, "body")
    assert why(head) == "the pipeline is full (3 samples in flight)"
    assert why(tail) == "no activations from stage 1 yet"
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        admin.stop_run(run_id)
    assert why(head) == "the run is stopping; finishing the work in flight"
    crew = [head, body, tail]
    drain(crew)
    for w in crew:  # the replicas report their last steps after the drain; then the closing rounds open
        w.step = max(w.step, 1)

    def closing() -> str | None:
        for w in crew:
            w.heartbeat()
        said = why(head)
        return said if said and said.startswith("waiting for the merge round") else None

    assert (
        until(closing, 20, "a closing merge round")
        == "waiting for the merge round of stage 0 (0 of 1 replicas in)"
    )
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        admin.abort_run(run_id)
    r = head.request("POST", "/v1/work/claim", json={"run_id": run_id})
    assert r.status_code == 204 and r.headers[RUN_STATE_HEADER] == "finished"
    assert WAIT_HEADER not in r.headers, "a finished run says so in X-Iota-Run-State"


def drain(crew: list[SimWorker]) -> None:
    """Do every item in flight until no stage has work left."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        items = [(w, w.claim()) for w in crew]
        if not any(item for _, item in items):
            return
        for w, item in items:
            if item:
                w.do(item)
    raise AssertionError("the work in flight did not drain")


def test_what_a_worker_says_while_waiting_and_at_the_end():
    state = LoopState(run_id="r", contributor_id="c", stage=0, step=5, tokens=1000, credits_seen=2.0)
    s = Session.start(state)
    s.credited(1.25)
    s.credited(0.5)
    end = replace(state, step=45, tokens=82920, credits_seen=3.75)
    assert (
        s.summary("run finished", end)
        == "run finished: 40 steps, 81,920 tokens, 1.75 credits (3.75 credits in all)"
    )
    assert (
        Session.start(end).summary("stopped by you", end)
        == "stopped by you: 0 steps, 0 tokens, 0.00 credits (3.75 credits in all)"
    )
    fresh = LoopState(run_id="r", contributor_id="c", stage=0)
    first = Session.start(fresh)
    first.credited(0.5)
    assert (
        first.summary("run finished", replace(fresh, step=1, tokens=1, credits_seen=0.5))
        == "run finished: 1 step, 1 token, 0.50 credits"
    )
    assert waiting(None) == "waiting for work"
    assert waiting("stage 1 has no worker") == "waiting for work: stage 1 has no worker"
    assert waiting("waiting for the merge round of stage 0 (2 of 3 replicas in)").startswith(
        "waiting for the"
    )
    assert ending(True, False, None, False) == "run finished"
    assert ending(False, True, None, False) == "moving to another stage"
    assert ending(False, False, 40, True) == "reached --max-steps 40"
    assert ending(False, False, None, True) == "stopped by you"


@contextlib.contextmanager
def serving(crew: list[SimWorker]) -> Iterator[None]:
    """Simulated workers that heartbeat and do their stage's work until the block ends. They report no
    steps, so their stages open no closing merge round: the run ends once the real worker's is in."""
    done = threading.Event()

    def work(w: SimWorker) -> None:
        while not done.is_set():
            with contextlib.suppress(Exception):  # the run may finish under it
                w.heartbeat()
                if item := w.claim(wait_s=0.5):
                    w.do(item)
                w.step = 0

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in crew]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        done.set()
        for t in threads:
            t.join(10)


@pytest.mark.slow
def test_join_alone_names_the_missing_stages_then_the_run_ends_with_a_summary(orch, tmp_path):
    run_id = make_run(orch, max_samples=4)
    tok, _ = token(orch, "joiner")
    env = {**os.environ, "IOTA_HOME": str(tmp_path / "home"), "IOTA_TOKEN": tok, "OMP_NUM_THREADS": "1"}
    env["PYTHONUNBUFFERED"] = "1"
    log = tmp_path / "worker.log"  # stdout and stderr, as `iota swarm` keeps a worker's log
    cmd = [sys.executable, "-m", "iota_cli", "join", "--orchestrator", orch.url, "--run", run_id]
    cmd += ["--backend", "torch-cpu", "--stage", "0", "--force"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait = "waiting for work: stages 1 and 2 have no worker"
        until(lambda: wait in log.read_text() or proc.poll() is not None, 120, "the head to wait")
        assert proc.poll() is None, log.read_text()
        with serving([sim(orch, run_id, 1, "body"), sim(orch, run_id, 2, "tail")]):
            assert proc.wait(120) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    text = log.read_text()
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # 4 samples, 2 backward passes a step: 2 steps; the last line is the summary, after the final state.
    assert lines[-2].endswith("run finished"), lines[-3:]
    assert re.search(r"run finished: 2 steps, [\d,]+ tokens, \d+\.\d\d credits$", lines[-1]), lines[-3:]
