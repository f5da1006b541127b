"""The replica's side of a merge round: real Workers against the real in-process orchestrator over HTTP.

Every stage is trained by a real Worker. The replicas under test wrap their backend in a Recorder, which
keeps the weights after every optimizer step and, at every load, the weights just before it and what was
loaded, so the overlap rule (loaded = merged + current - snapshot) is checked with numbers taken from the
backend itself. Fast stages are FakeStage with a step that moves every weight by a replica's own delta;
one test trains the tail with the real torch-cpu backend.

    pytest -q tests/test_replica_merge.py
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
from fake_stage import FakeStage
from inprocess_orchestrator import InProcessOrchestrator, until
from sqlalchemy import select

from iota_cli.core.backend import StageBackend
from iota_cli.core.flat import WIRE_SIZES, FlatLayout, WireDtype, owners, part_blob, partitions, update_blob
from iota_cli.core.manifest import RunManifest, tiny_manifest
from iota_cli.core.protocol import AssignmentRequest, MergeSlice, RegisterRequest
from iota_cli.core.tensors import RawTensor, TensorDict, decode
from iota_cli.headless.notify import Notifier
from iota_cli.headless.progress import Progress
from iota_cli.swarm.corpus import write_corpus
from iota_cli.train.api import SwarmApi
from iota_cli.train.checkpoint import CheckpointStore
from iota_cli.train.client import Client
from iota_cli.train.errors import IntegrityError
from iota_cli.train.join import restore
from iota_cli.train.worker import LoopOptions, Worker

ADMIN = "admin-for-replica-merge-tests"
LOOP = LoopOptions(checkpoint_interval_s=0.0, claim_wait_s=0.5, pause_poll_s=0.1)
TAIL = 2
PART_DONE = ("POST", "/v1/merge/part")


@pytest.fixture(scope="module")
def orch(tmp_path_factory) -> Iterator[InProcessOrchestrator]:
    base = tmp_path_factory.mktemp("replica-merge")
    with InProcessOrchestrator(base / "data", ADMIN) as o:
        o.corpus = write_corpus(base / "text", files=2, words=3000)
        yield o


def make_run(orch: InProcessOrchestrator, **merge) -> str:
    m = tiny_manifest(str(orch.corpus))
    # One tail item is one optimizer step; a 3 s lease means a heartbeat a second.
    m = replace(m, train=replace(m.train, lease_s=3.0, backward_per_step=1))
    m = replace(m, merge=replace(m.merge, **{"interval": 4, "timeout_s": 20.0, **merge}))
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        return admin.create_run(m).run_id


# --- backends that remember --------------------------------------------------------------------------


class DeltaStage(FakeStage):
    """A FakeStage whose optimizer step adds delta to every weight, so replicas drift apart by design."""

    def __init__(self, manifest: RunManifest, stage: int, delta: float) -> None:
        super().__init__(manifest.model, stage)
        self.delta = np.float32(delta)

    def step(self) -> float:
        self.params = {
            n: RawTensor("F32", t.shape, (np.frombuffer(t.data, np.float32) + self.delta).tobytes())
            for n, t in self.params.items()
        }
        return super().step()


@dataclass
class Landing:
    steps: int  # optimizer steps taken when it happened
    before: np.ndarray
    loaded: np.ndarray


class Recorder:
    """A StageBackend that passes every call through and remembers weights (flat, by step) and loads."""

    def __init__(self, inner: StageBackend, layout: FlatLayout) -> None:
        self.inner, self.layout, self.name = inner, layout, inner.name
        self.steps = 0
        self.after_step: dict[int, np.ndarray] = {}  # the weights once `steps` steps were taken
        self.initial: np.ndarray | None = None  # what restore loaded (the assignment's weights)
        self.landings: list[Landing] = []  # every load after that one
        self.lock = threading.Lock()

    def forward(self, work_id: str, inputs: TensorDict) -> TensorDict:
        return self.inner.forward(work_id, inputs)

    def backward(self, work_id: str, grads: TensorDict):
        return self.inner.backward(work_id, grads)

    def free(self, work_id: str) -> None:
        self.inner.free(work_id)

    def in_flight(self) -> list[str]:
        return self.inner.in_flight()

    def step(self) -> float:
        out = self.inner.step()
        with self.lock:
            self.steps += 1
            self.after_step[self.steps] = self.flat()
        return out

    def weights(self) -> TensorDict:
        return self.inner.weights()

    def optimizer_state(self) -> TensorDict:
        return self.inner.optimizer_state()

    def load(self, weights: TensorDict, optimizer_state: TensorDict | None = None) -> None:
        before = self.flat() if self.initial is not None else None
        self.inner.load(weights, optimizer_state)
        with self.lock:
            loaded = self.layout.flatten(weights)
            if before is None:
                self.initial = loaded
            else:
                self.landings.append(Landing(self.steps, before, loaded))
            self.after_step[self.steps] = self.flat()

    def flat(self) -> np.ndarray:
        return self.layout.flatten(self.inner.weights())


# --- workers -----------------------------------------------------------------------------------------


@dataclass
class Replica:
    worker: Worker
    backend: Recorder
    home: Path
    token: str
    thread: threading.Thread | None = None
    stopped: bool = field(default=False)

    def start(self) -> Replica:
        self.thread = threading.Thread(target=self.worker.run, name="worker-loop", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.worker.stop.set()
        assert self.thread is not None
        self.thread.join(20)
        assert not self.thread.is_alive(), "the worker did not stop"
        self.worker.store.close()

    @property
    def stats(self):
        return self.worker.merger.rounds


Factory = Callable[[RunManifest], StageBackend]


def replica(
    orch: InProcessOrchestrator, run_id: str, stage: int, home: Path, make: Factory, token: str | None = None
) -> Replica:
    """A registered (or, with token, the same) contributor's Worker, restored as `iota join` restores."""
    client = Client(orch.url, stop=threading.Event(), backoff=(0.05, 0.2), integrity_retries=1)
    api = SwarmApi(client)
    if token is None:
        token = api.register(RegisterRequest(name=home.name, backend="fake")).token
    client.token = token
    assignment = api.assignment(AssignmentRequest(run_id=run_id, stage=stage, backend="fake"))
    cfg = assignment.manifest
    backend = Recorder(make(cfg), FlatLayout.of(cfg.model, stage))
    store = CheckpointStore(home / "checkpoints")
    cid = api.me().contributor_id
    state = restore(backend, assignment, store, api, home / "cache", cid, "fake")
    progress = Progress(f"stage {stage}", interactive=False, stream=io.StringIO())
    w = Worker(api, backend, assignment, state, store, home / "cache", progress, Notifier(None), None, LOOP)
    return Replica(w, backend, home, token)


def fake(stage: int) -> Factory:
    return lambda m: FakeStage(m.model, stage)


def delta(d: float) -> Factory:
    return lambda m: DeltaStage(m, TAIL, d)


@contextlib.contextmanager
def pipeline(orch: InProcessOrchestrator, run_id: str, tmp: Path) -> Iterator[list[Replica]]:
    """Head and body Workers on FakeStages; the test adds the tail's replicas to the list it gets."""
    crew = [replica(orch, run_id, s, tmp / f"stage{s}", fake(s)).start() for s in (0, 1)]
    try:
        yield crew
    finally:
        orch.unavailable.clear()
        for r in reversed(crew):
            r.stop()


def published(api: SwarmApi, run_id: str, epoch: int, layout: FlatLayout) -> np.ndarray:
    """The stage's merged weights of epoch + 1, as the closed round's plan names them."""
    plan = api.merge_plan(run_id, TAIL, epoch)
    assert plan.state == "closed" and plan.weights is not None
    ref = plan.weights
    data = api.read_slice(MergeSlice(url=ref.url, offset=0, length=ref.size, sha256=ref.sha256))
    return layout.flatten(decode(data)[0])


def contributions(orch: InProcessOrchestrator, run_id: str, epoch: int) -> list[tuple[str, float]]:
    """(contributor id, the weight the orchestrator counted) of a round, in the order every party reduces."""
    from iota_orchestrator import db

    MC = db.merge_contribs
    q = select(MC.c.contributor_id, MC.c.weight).where(
        MC.c.run_id == run_id, MC.c.stage == TAIL, MC.c.epoch == epoch
    )
    with orch.state.tx() as conn:
        return sorted((r.contributor_id, float(r.weight)) for r in conn.execute(q))


def check_overlap(r: Replica, merged: np.ndarray, atol: float) -> int:
    """The replica's merge landing obeys loaded = merged + (current - snapshot); the steps it kept."""
    first = r.stats[0]
    assert first.outcome == "merged", first
    snapshot = r.backend.after_step[first.step]
    landing = r.backend.landings[0]
    np.testing.assert_allclose(landing.loaded, merged + (landing.before - snapshot), atol=atol, rtol=0)
    return landing.steps - first.step


def at_epoch(replicas: list[Replica], epoch: int) -> Callable[[], bool]:
    return lambda: all(r.worker.state.epoch >= epoch for r in replicas)


def first_round_bytes(size: int, replicas: int, index: int, dtype: WireDtype) -> tuple[int, int]:
    """(sent, received) by the index-th contributor (by id) of a first diloco round with no losses.

    Out: its update, and a part blob per partition it owns. In: the others' slices of those partitions,
    and the merged (F32) slices of the rest; its own results match the published ones, so none of
    those, and the first round has no momentum to read.
    """
    ranges = partitions(size, replicas)
    mine = {p for p in range(len(ranges)) if index in owners(p, replicas)}
    sent = len(update_blob(np.zeros(size, np.float32), dtype))
    received = 0
    for p, (a, b) in enumerate(ranges):
        if p in mine:
            sent += len(part_blob(np.zeros(b - a, np.float32), np.zeros(b - a, np.float32), dtype))
            received += (replicas - 1) * WIRE_SIZES[dtype] * (b - a)
        else:
            received += 4 * (b - a)
    return sent, received


# --- tests -------------------------------------------------------------------------------------------


def test_three_replicas_merge_and_keep_the_steps_they_took_since_contributing(orch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="iota.merge")
    run_id = make_run(orch)
    deltas = (1e-3, -2e-3, 5e-4)
    with pipeline(orch, run_id, tmp_path) as crew:
        # Part results wait (503) until every replica has trained on past its snapshot.
        orch.unavailable.add(PART_DONE)
        tails = [replica(orch, run_id, TAIL, tmp_path / f"tail{i}", delta(d)) for i, d in enumerate(deltas)]
        crew.extend(t.start() for t in tails)
        until(lambda: all(t.stats and t.stats[0].sent for t in tails), 60, "three contributions")
        until(
            lambda: all(t.backend.steps >= t.stats[0].step + 2 for t in tails), 60, "steps past the snapshots"
        )
        orch.unavailable.discard(PART_DONE)
        until(lambda: all(t.worker.state.epoch >= 1 for t in tails), 60, "every replica to land epoch 1")
        orch.unavailable.add(PART_DONE)  # no further round completes: epoch 1 stays published
        api, layout = tails[0].worker.api, tails[0].worker.merger.layout
        merged = published(api, run_id, 0, layout)
        for t in tails:
            assert check_overlap(t, merged, atol=1e-6) >= 2, "the steps after the snapshot are kept"
            assert np.array_equal(t.worker.merger.base, merged), "base is the merged weights"
            ck = t.worker.store.load_latest()
            assert ck is not None and ck.state.epoch >= 1
    base0 = tails[0].backend.initial
    assert base0 is not None
    # The merged weights are the outer Nesterov step of the work-weighted mean of the pseudo-gradients,
    # computed here from the snapshots the backends kept (F32 on the wire, so no rounding to model).
    ids = {t.worker.state.contributor_id: t for t in tails}
    rows = contributions(orch, run_id, 0)
    assert [cid for cid, _ in rows] == sorted(ids)
    u = [base0.astype(np.float64) - ids[cid].backend.after_step[ids[cid].stats[0].step] for cid, _ in rows]
    w = np.array([weight for _, weight in rows])
    assert (w > 0).all()
    mean = sum(wi * ui for wi, ui in zip(w, u, strict=True)) / w.sum()
    cfg = tails[0].worker.manifest.merge
    mu = cfg.momentum_start  # the first round: no warm-up yet, momentum from zeros
    expected = base0 - cfg.outer_lr * (mean + mu * mean)
    np.testing.assert_allclose(merged, expected, atol=1e-6, rtol=0)
    for i, cid in enumerate(sorted(ids)):
        s = ids[cid].stats[0]
        assert (s.sent, s.received) == first_round_bytes(layout.size, 3, i, "F32"), (cid, s)
        assert f"merge round 0: sent {s.sent}, received {s.received}" in caplog.text


def test_a_replica_restarted_without_its_snapshot_catches_up_and_the_other_overlaps(orch, tmp_path):
    run_id = make_run(orch)
    with pipeline(orch, run_id, tmp_path) as crew:
        orch.unavailable.add(PART_DONE)  # the round stays in reducing until both sides are set
        a = replica(orch, run_id, TAIL, tmp_path / "a", delta(1e-3))
        b = replica(orch, run_id, TAIL, tmp_path / "b", delta(-1e-3))
        crew.extend([a.start(), b.start()])
        until(lambda: a.stats and a.stats[0].sent and b.stats and b.stats[0].sent, 60, "both contributions")
        # b goes down mid-round (its snapshot and update lost with the process) and comes back at once,
        # resuming its checkpoint at epoch 0: nothing of the round is left in it.
        b.stop()
        b2 = replica(orch, run_id, TAIL, tmp_path / "b", delta(-1e-3), token=b.token)
        assert b2.worker.state.epoch == 0 and b2.worker.state.contributor_id == b.worker.state.contributor_id
        crew.append(b2.start())
        until(lambda: a.backend.steps >= a.stats[0].step + 2, 60, "a to train past its snapshot")
        orch.unavailable.discard(PART_DONE)  # a reduces both partitions (it owns both at R = 2)
        until(lambda: a.worker.state.epoch >= 1 and b2.worker.state.epoch >= 1, 60, "both to reach epoch 1")
        orch.unavailable.add(PART_DONE)
        layout = a.worker.merger.layout
        merged = published(a.worker.api, run_id, 0, layout)
        assert check_overlap(a, merged, atol=1e-6) >= 2
        # b2 never contributed in this life: it loads the published weights as they are.
        assert b2.stats == [] and len(b2.backend.landings) == 1
        np.testing.assert_array_equal(b2.backend.landings[0].loaded, merged)
        assert np.array_equal(b2.worker.merger.base, merged) and b2.worker.merger.epoch == 1
        # ...and from there it merges as any replica does.
        orch.unavailable.discard(PART_DONE)
        until(lambda: b2.worker.state.epoch >= 2, 60, "b2's first merge to land")
        assert b2.stats[0].outcome == "merged" and b2.stats[0].epoch == 1


def test_torch_replicas_merge_in_bf16_and_keep_their_local_progress(orch, tmp_path):
    from iota_torch import cpu_backend

    def torch_tail(m: RunManifest) -> StageBackend:
        return cpu_backend.create(m.model, TAIL, m.optim, seed=m.seed)

    run_id = make_run(orch, wire_dtype="BF16", interval=3)
    with pipeline(orch, run_id, tmp_path) as crew:
        orch.unavailable.add(PART_DONE)
        tails = [replica(orch, run_id, TAIL, tmp_path / f"torch{i}", torch_tail) for i in range(2)]
        crew.extend(t.start() for t in tails)
        until(lambda: all(t.stats and t.stats[0].sent for t in tails), 120, "two contributions")
        until(lambda: all(t.backend.steps >= t.stats[0].step + 1 for t in tails), 120, "a step past each")
        orch.unavailable.discard(PART_DONE)
        until(lambda: all(t.worker.state.epoch >= 1 for t in tails), 120, "both to land epoch 1")
        orch.unavailable.add(PART_DONE)
        layout = tails[0].worker.merger.layout
        merged = published(tails[0].worker.api, run_id, 0, layout)
        base0 = tails[0].backend.initial
        assert base0 is not None and not np.allclose(merged, base0), "the merge moved the weights"
        for t in tails:
            assert check_overlap(t, merged, atol=1e-6) >= 1
            assert t.stats[0].sent > 0 and t.stats[0].received > 0


def test_a_range_read_is_verified(orch, tmp_path):
    run_id = make_run(orch)
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        info = admin.run(run_id)
    api = SwarmApi(Client(orch.url, integrity_retries=2))
    me = api.register(RegisterRequest(name="reader", backend="fake"))
    api.client.token = me.token
    ref = api.assignment(AssignmentRequest(run_id=info.run_id, stage=TAIL, backend="fake")).weights
    whole = api.read_slice(MergeSlice(url=ref.url, offset=0, length=ref.size, sha256=ref.sha256))
    piece = whole[100:164]
    sha = hashlib.sha256(piece).hexdigest()
    assert api.read_slice(MergeSlice(url=ref.url, offset=100, length=64, sha256=sha)) == piece
    with pytest.raises(IntegrityError):
        api.read_slice(MergeSlice(url=ref.url, offset=101, length=64, sha256=sha))


def test_the_outer_momentum_a_replica_computed_is_not_downloaded_again(orch, tmp_path):
    run_id = make_run(orch, interval=3)
    with pipeline(orch, run_id, tmp_path) as crew:
        tails = [
            replica(orch, run_id, TAIL, tmp_path / f"m{i}", delta(d)) for i, d in enumerate((1e-3, 2e-3))
        ]
        crew.extend(t.start() for t in tails)
        until(lambda: all(len(t.stats) >= 2 and t.worker.state.epoch >= 2 for t in tails), 90, "two rounds")
        n = tails[0].worker.merger.layout.size
        for t in tails:
            first, second = t.stats[:2]
            assert (first.epoch, second.epoch) == (0, 1) and second.outcome == "merged"
            # At R = 2 each replica owns both partitions: it reads the other's F32 update and nothing
            # else, round after round; the epoch-1 momentum is what it computed itself in round 0.
            assert first.received == second.received == 4 * n, (first, second)


def test_a_source_slice_that_fails_its_sha256_is_left_to_the_other_owner(orch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="iota.merge")
    run_id = make_run(orch)
    merge_blobs = ("GET", f"/v1/blobs/runs/{run_id}/merge/s{TAIL}/e0/")
    with pipeline(orch, run_id, tmp_path) as crew:
        orch.unavailable.add(merge_blobs)  # the owners wait to read until the test has damaged one
        a = replica(orch, run_id, TAIL, tmp_path / "a", delta(1e-3))
        b = replica(orch, run_id, TAIL, tmp_path / "b", delta(-1e-3))
        crew.extend([a.start(), b.start()])
        until(lambda: a.worker.api.merge_plan(run_id, TAIL, 0).state == "reducing", 60, "the reducing phase")
        from iota_orchestrator import rounds

        # Flip a byte of b's update in partition 0, on the orchestrator's disk: a's read of it fails
        # its sha256, while b reduces partition 0 from its own copy in memory.
        cid = b.worker.state.contributor_id
        path = orch.state.blobs.path(rounds.update_key(run_id, TAIL, 0, cid))
        data = bytearray(path.read_bytes())
        data[-1 - 4 * (a.worker.merger.layout.size // 2)] ^= 0x40
        path.write_bytes(bytes(data))
        orch.unavailable.discard(merge_blobs)
        until(lambda: a.worker.state.epoch >= 1 and b.worker.state.epoch >= 1, 60, "both to land epoch 1")
        orch.unavailable.add(PART_DONE)
        merged = published(a.worker.api, run_id, 0, a.worker.merger.layout)
        assert "leaving partition 0" in caplog.text
        # b reduces both partitions; a's partition 1 may come after b has closed the round.
        assert b.stats[0].reduced == 2 and a.stats[0].reduced <= 1
        for r in (a, b):
            assert r.thread is not None and r.thread.is_alive()
            check_overlap(r, merged, atol=1e-6)


def test_bytes_per_replica_per_round_stay_constant_in_the_number_of_replicas(orch, tmp_path, capsys):
    rows = []
    for count in (2, 4, 8):
        run_id = make_run(orch, wire_dtype="BF16")
        with pipeline(orch, run_id, tmp_path / f"r{count}") as crew:
            tails = [
                replica(orch, run_id, TAIL, tmp_path / f"r{count}" / f"t{i}", delta(1e-3 * (i + 1)))
                for i in range(count)
            ]
            crew.extend(t.start() for t in tails)
            until(at_epoch(tails, 1), 120, f"a round of {count}")
        n = tails[0].worker.merger.layout.size
        ids = sorted(t.worker.state.contributor_id for t in tails)
        for t in tails:
            s = t.stats[0]
            assert s.outcome == "merged"
            want = first_round_bytes(n, count, ids.index(t.worker.state.contributor_id), "BF16")
            assert (s.sent, s.received) == want
        sent = max(t.stats[0].sent for t in tails)
        received = max(t.stats[0].received for t in tails)
        rows.append((count, n, sent, received))
    with capsys.disabled():
        print("\nreplicas  params  sent/replica  received/replica  total/param (BF16 wire)")
        for count, n, sent, received in rows:
            print(f"{count:8d}  {n:6d}  {sent:12d}  {received:16d}  {(sent + received) / n:11.2f}")
    totals = [sent + received for _, _, sent, received in rows]
    # What one replica moves per round is 3w + 4 bytes a parameter (w = wire bytes) whatever R is.
    assert max(totals) <= 1.1 * min(totals)


def test_a_range_read_copes_with_servers_that_ignore_range_are_busy_or_send_bad_bytes():
    from fake_http import Server, fast_client, sequence, status

    body = bytes(range(256)) * 4

    def whole(h) -> None:  # a server that ignores Range
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def ranged(data: bytes):
        def route(h) -> None:
            first, last = (int(x) for x in h.headers["Range"].removeprefix("bytes=").split("-"))
            piece = data[first : last + 1]
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
            h.send_header("Content-Length", str(len(piece)))
            h.end_headers()
            h.wfile.write(piece)

        return route

    want = body[300:400]
    sha = hashlib.sha256(want).hexdigest()
    server = Server()
    try:
        client = fast_client(server.url, integrity_retries=2)
        server.routes["/a"] = whole
        assert client.read_range("/a", 300, 100, sha) == want
        server.routes["/b"] = sequence(status(503, {"Retry-After": "0"}), ranged(body))
        assert client.read_range("/b", 300, 100, sha) == want and server.count("/b") == 2
        flipped = body[:350] + bytes([body[350] ^ 1]) + body[351:]
        server.routes["/c"] = sequence(ranged(flipped), ranged(body))
        assert client.read_range("/c", 300, 100, sha) == want and server.count("/c") == 2
        server.routes["/d"] = ranged(flipped)
        with pytest.raises(IntegrityError):
            client.read_range("/d", 300, 100, sha)
        assert server.count("/d") == 2, "integrity_retries tries, then it gives up"
        assert server.seen[-1][2]["Range"] == "bytes=300-399"
    finally:
        server.stop()


def test_a_resumed_replica_counts_its_update_from_the_published_weights_not_its_checkpoint(orch, tmp_path):
    run_id = make_run(orch, interval=6)
    with pipeline(orch, run_id, tmp_path) as crew:
        first = replica(orch, run_id, TAIL, tmp_path / "t", delta(1e-3)).start()
        until(lambda: first.backend.steps >= 2, 60, "some local steps")
        first.stop()
        assert first.stats == [] and first.worker.state.epoch == 0
        again = replica(orch, run_id, TAIL, tmp_path / "t", delta(1e-3), token=first.token)
        base0, resumed = first.backend.initial, again.backend.initial
        assert base0 is not None and resumed is not None and not np.allclose(resumed, base0)
        assert again.worker.state.step >= 2 and np.array_equal(again.worker.merger.base, base0)
        crew.append(again.start())
        until(at_epoch([again], 1), 60, "its merge, alone on the stage")
        orch.unavailable.add(PART_DONE)
        merged = published(again.worker.api, run_id, 0, again.worker.merger.layout)
    # Alone, the mean is its own update: base0 - snapshot, with every step since epoch 0 in it.
    s = again.stats[0]
    snapshot = again.backend.after_step[s.step - first.backend.steps]
    cfg = again.worker.manifest.merge
    u = base0.astype(np.float64) - snapshot
    np.testing.assert_allclose(merged, base0 - cfg.outer_lr * (1 + cfg.momentum_start) * u, atol=1e-6, rtol=0)
