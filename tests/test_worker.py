"""Worker, the training loop, against a real orchestrator in this process and fake stages.

Each test creates its own run on one in-process orchestrator. Stages the test does not train with a
Worker are held by simulated workers (tests/simworker.py) that keep their leases, so no stage is ever
empty and the orchestrator never moves a replica mid-test.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from fake_stage import FakeStage
from inprocess_orchestrator import InProcessOrchestrator, until
from simworker import SimWorker

from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.protocol import AssignmentRequest, RegisterRequest
from iota_cli.core.tensors import RawTensor
from iota_cli.headless.notify import Notifier
from iota_cli.headless.progress import Progress
from iota_cli.swarm.corpus import write_corpus
from iota_cli.train.api import SwarmApi
from iota_cli.train.checkpoint import CheckpointStore
from iota_cli.train.client import Client
from iota_cli.train.join import restore
from iota_cli.train.worker import LoopOptions, Worker

ADMIN = "admin-for-worker-tests"
LOOP = LoopOptions(checkpoint_interval_s=0.0, claim_wait_s=0.5, pause_poll_s=0.1)


@pytest.fixture(scope="module")
def orch(tmp_path_factory) -> Iterator[InProcessOrchestrator]:
    base = tmp_path_factory.mktemp("worker")
    with InProcessOrchestrator(base / "data", ADMIN) as o:
        o.corpus = write_corpus(base / "text", files=2, words=3000)
        yield o


def make_run(orch: InProcessOrchestrator, merge: dict | None = None, **train) -> str:
    m = tiny_manifest(str(orch.corpus))
    # A 3 s lease means a heartbeat a second: merge offers and the run's end reach workers quickly.
    m = replace(m, train=replace(m.train, **{"lease_s": 3.0, **train}))
    m = replace(m, merge=replace(m.merge, **{"interval": 1000, **(merge or {})}))
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        return admin.create_run(m).run_id


@dataclass
class Running:
    worker: Worker
    stage: FakeStage
    api: SwarmApi
    thread: threading.Thread | None = None

    def start(self) -> Running:
        self.thread = threading.Thread(target=self.worker.run, name="worker-loop", daemon=True)
        self.thread.start()
        return self

    def join(self, timeout: float) -> bool:
        """Wait for run() to return; whether it did."""
        assert self.thread is not None
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def stop(self) -> None:
        self.worker.stop.set()
        assert self.join(15), "the worker did not stop"
        self.worker.store.close()


def make_worker(orch: InProcessOrchestrator, run_id: str, stage: int, home: Path) -> Running:
    """A registered, assigned Worker on a FakeStage, restored the way `iota join` restores one."""
    client = Client(orch.url, stop=threading.Event(), backoff=(0.05, 0.2), integrity_retries=1)
    api = SwarmApi(client)
    me = api.register(RegisterRequest(name=home.name, backend="fake"))
    client.token = me.token
    assignment = api.assignment(AssignmentRequest(run_id=run_id, stage=stage, backend="fake"))
    fake = FakeStage(assignment.manifest.model, stage)
    store = CheckpointStore(home / "checkpoints")
    state = restore(fake, assignment, store, api, home / "cache", me.contributor_id, "fake")
    progress = Progress(f"stage {stage}", interactive=False, stream=io.StringIO())
    worker = Worker(api, fake, assignment, state, store, home / "cache", progress, Notifier(None), None, LOOP)
    return Running(worker, fake, api)


def sim(orch: InProcessOrchestrator, run_id: str, stage: int, name: str) -> SimWorker:
    w = SimWorker(orch.url, name).register()
    w.assign(run_id, stage=stage)
    return w


@contextlib.contextmanager
def alive(*sims: SimWorker) -> Iterator[None]:
    """Keep simulated workers' leases while the block runs."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(0.3):
            for w in sims:
                with contextlib.suppress(Exception):
                    w.heartbeat()

    th = threading.Thread(target=beat, daemon=True)
    th.start()
    try:
        yield
    finally:
        done.set()
        th.join(5)


def stage_status(orch: InProcessOrchestrator, run_id: str):
    with SwarmApi.connect(orch.url) as api:
        return api.run_status(run_id)


def test_a_pipeline_trains_steps_checkpoints_merges_and_stops_at_the_runs_end(orch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="iota.progress")
    run_id = make_run(orch, max_samples=4, backward_per_step=2)
    crew = [make_worker(orch, run_id, s, tmp_path / f"w{s}").start() for s in range(3)]
    for r in crew:
        assert r.join(60), "the run's end stops the loop without a stop event"
    st = stage_status(orch, run_id)
    assert st.state == "finished" and st.samples_completed == 4
    for r in crew:
        w, fake = r.worker, r.stage
        assert w.finished and not w.stop.is_set()
        assert len(fake.forwards) == len(fake.backwards) == 4, "every sample went forward and back"
        assert w.state.backward_passes == 4
        assert fake.steps == w.state.step == 2, "an optimizer step every backward_per_step=2 passes"
        total = r.api.credits(w.state.contributor_id).total
        assert w.state.credits_seen == pytest.approx(total) and total > 0
        # The end says so, with what this session did (a fresh contributor: its credits are all of them).
        assert w.progress.facts.state == "run finished"
        summary = f"run finished: 2 steps, {w.state.tokens:,} tokens, {total:.2f} credits"
        assert summary in caplog.messages
        assert fake.in_flight() == []
        # Checkpointed at every step (interval 0) and on the way out; the newest two are kept.
        assert {p.name for p in w.store.paths()} == {"ckpt-1.safetensors", "ckpt-2.safetensors"}
        ck = w.store.load_latest()
        assert ck is not None and ck.state.step == 2 and ck.weights == fake.weights()
        w.store.close()
    # The closing merge round of every stage got its one replica's weights, so each is at epoch 1.
    assert [s.epoch for s in st.stages] == [1, 1, 1]


def test_a_merge_round_with_another_replica_is_loaded(orch, tmp_path):
    run_id = make_run(orch, backward_per_step=1, merge={"interval": 1, "timeout_s": 10.0})
    head, body, replica = sim(orch, run_id, 0, "h"), sim(orch, run_id, 1, "b"), sim(orch, run_id, 2, "t2")
    with alive(head, body):
        for _ in range(2):
            head.do(head.claim())
            body.do(body.claim())
        replica.do(replica.claim())  # work of its own on the stage: its update counts in the mean
        r = make_worker(orch, run_id, 2, tmp_path / "tail").start()
        try:
            epoch0 = r.stage.weights()
            # One tail item is one step, so the worker's heartbeat opens a merge round; the other
            # replica sends an update of -0.002 everywhere (its weights moved by +0.002: within what
            # its counted AdamW steps can move, core.bounds; more is refused). With two replicas
            # each owns both partitions, so the worker reduces the round by itself.
            offer = until(lambda: replica.heartbeat()["merge"], what="the merge round")
            size = r.worker.merger.layout.size
            assert replica.contribute(offer, np.full(size, -2e-3, np.float32))["accepted"]
            until(lambda: r.worker.state.epoch == 1, what="the worker to load epoch 1")
            loaded = r.stage.loads[-1]
            # The fake's weights never change, so current == snapshot: it loads the merged weights as
            # published, moved toward the other replica's +0.002.
            assert loaded == replica.weights(), "what the worker loaded is what the orchestrator serves"
            for n, t in epoch0.items():
                assert (as_array(loaded[n]) > as_array(t)).all()
            ck = r.worker.store.load_latest()
            assert ck is not None and ck.state.epoch == 1 and ck.state.since_merge == 0
            assert r.worker.merger.rounds[0].outcome == "merged"
        finally:
            r.stop()


def as_array(t: RawTensor) -> np.ndarray:
    return np.frombuffer(t.data, np.float32).reshape(t.shape)


def uploaded(orch: InProcessOrchestrator, item: dict) -> Path:
    """The file on the orchestrator's disk that holds what was uploaded for an item."""
    return orch.state.blobs.path(unquote(urlsplit(item["upload"]["url"]).path.removeprefix("/v1/blobs/")))


@pytest.mark.parametrize("bad", ["rejected by the stage", "sha256 mismatch"])
def test_a_bad_input_is_given_back_and_the_loop_goes_on(orch, tmp_path, caplog, bad):
    caplog.set_level(logging.INFO, logger="iota.worker")
    run_id = make_run(orch, max_samples=1)
    head, tail = sim(orch, run_id, 0, "h"), sim(orch, run_id, 2, "t")
    with alive(head, tail):
        item = head.claim()
        head.do(item)
        r = make_worker(orch, run_id, 1, tmp_path / "body")
        if bad == "rejected by the stage":
            r.stage.reject = 1
        else:  # flip a byte of the activations the head uploaded, on the orchestrator's disk
            good = uploaded(orch, item).read_bytes()
            uploaded(orch, item).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        r.start()
        try:
            until(lambda: "giving it back" in caplog.text or r.stage.rejected, what="the bad input")
            assert r.thread.is_alive()
            if bad == "sha256 mismatch":
                assert r.stage.forwards == [], "corrupt bytes never reach the stage"
                # The orchestrator's own copy fails its sha256 too: it is quarantined (never served
                # again) and the sample dropped, since activations cannot be made again.
                until(lambda: r.api.run_status(run_id).samples_dropped == 1, what="the sample's drop")
                assert not uploaded(orch, item).exists() and r.thread.is_alive()
                return
            until(lambda: r.worker.state.credits_seen > 0, what="the item to be done after all")
            assert len(r.stage.forwards) == 1
            # Given back, not left to time out: the orchestrator re-issued it within the 30 s deadline.
            if bad == "rejected by the stage":
                assert r.stage.rejected[0] != r.stage.forwards[0], "the retry is a fresh work item"
        finally:
            r.stop()


def test_a_409_on_complete_drops_the_item(orch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="iota.worker")
    run_id = make_run(orch, max_samples=1, work_timeout_s=0.5)
    other, body, tail = sim(orch, run_id, 0, "h2"), sim(orch, run_id, 1, "b"), sim(orch, run_id, 2, "t")
    with alive(other, body, tail):
        r = make_worker(orch, run_id, 0, tmp_path / "slow")
        r.stage.hold = threading.Event()
        r.start()
        try:
            assert r.stage.entered.wait(10)
            # The item's deadline passes while the stage computes: another replica gets it.
            again = until(other.claim, what="the item to be re-issued")
            assert again["kind"] == "forward" and again["stage"] == 0
            # Completed at once: within its 0.5 s deadline, before the worker's prefetcher can claim it.
            assert other.do(again)["credits"] > 0
            r.stage.hold.set()
            key = until(lambda: r.stage.forwards and r.stage.forwards[0])
            until(lambda: key in r.stage.freed, what="the late item to be dropped")
            assert "(409)" in caplog.text
            assert r.worker.state.credits_seen == 0 and r.stage.in_flight() == []
            assert r.thread.is_alive(), "a 409 is not fatal"
        finally:
            r.stop()


def test_stop_gives_back_the_item_in_flight_and_checkpoints(orch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="iota.worker")
    run_id = make_run(orch, max_samples=1)
    body, tail = sim(orch, run_id, 1, "b"), sim(orch, run_id, 2, "t")
    with alive(body, tail):
        r = make_worker(orch, run_id, 0, tmp_path / "head")
        r.stage.hold = threading.Event()
        r.start()
        assert r.stage.entered.wait(10)
        # The result cannot be sent now (503: uploaded, or inline in its complete), and the goodbye
        # does not get through either, so only the worker's own give-back can put the item back.
        orch.unavailable.update(
            {("PUT", "/v1/blobs/"), ("POST", "/v1/work/*/complete"), ("POST", "/v1/contributors/me/leave")}
        )
        try:
            r.worker.stop.set()
            r.stage.hold.set()
            t0 = time.monotonic()
            assert r.join(10) and time.monotonic() - t0 < 5, "a stop does not wait out a busy server"
        finally:
            orch.unavailable.clear()
        assert r.stage.forwards[0] in r.stage.freed and r.stage.in_flight() == []
        assert "could not give back" not in caplog.text
        assert "could not tell the orchestrator we are leaving" in caplog.text
        again = sim(orch, run_id, 0, "h2").claim()
        assert again is not None and again["kind"] == "forward", "re-issued at once, not after 30 s"
        ck = r.worker.store.load_latest()
        assert ck is not None and replace(ck.state, saved_at=0.0) == r.worker.state
        r.worker.store.close()


def test_stop_while_waiting_for_work_leaves_at_once(orch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="iota.progress")
    run_id = make_run(orch, max_samples=0)
    head, body = sim(orch, run_id, 0, "h"), sim(orch, run_id, 1, "b")
    with alive(head, body):
        r = make_worker(orch, run_id, 2, tmp_path / "tail").start()
        until(lambda: r.worker.progress.facts.state.startswith("waiting for work"), what="the loop to start")
        r.worker.stop.set()
        assert r.join(5), "a stop ends the wait for work within one long-poll"
        assert r.worker.progress.facts.state == "stopped by you"
        assert caplog.messages[-1] == "stopped by you: 0 steps, 0 tokens, 0.00 credits"
        # Left, not silent: the orchestrator counts the worker out now, not when its lease runs out.
        workers = {w.name: w.alive for s in stage_status(orch, run_id).stages for w in s.workers}
        assert workers["tail"] is False and workers["h"] is True
        ck = r.worker.store.load_latest()
        assert ck is not None and ck.state.step == 0 and ck.state.run_id == run_id
        r.worker.store.close()
