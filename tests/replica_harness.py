"""Replicas under test for the merge tests: backends that remember, Workers built as `iota join` builds
them, and what a merge round should have done, computed independently (tests/test_replica_merge.py).

A Recorder wraps a replica's backend and keeps the weights after every optimizer step and, at every load,
the weights just before it and what was loaded, so the overlap rule (loaded = merged + current - snapshot)
is checked with numbers taken from the backend itself. DeltaStage is a FakeStage whose step moves every
weight by the replica's own delta, so replicas drift apart by design.
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fake_stage import FakeStage
from inprocess_orchestrator import InProcessOrchestrator
from sqlalchemy import select

from iota_cli.core.backend import StageBackend
from iota_cli.core.flat import WIRE_SIZES, FlatLayout, WireDtype, owners, part_blob, partitions, update_blob
from iota_cli.core.manifest import RunManifest
from iota_cli.core.protocol import AssignmentRequest, MergeSlice, RegisterRequest
from iota_cli.core.tensors import RawTensor, TensorDict, decode
from iota_cli.headless.notify import Notifier
from iota_cli.headless.progress import Progress
from iota_cli.train.api import SwarmApi
from iota_cli.train.checkpoint import CheckpointStore
from iota_cli.train.client import Client
from iota_cli.train.join import restore
from iota_cli.train.worker import LoopOptions, Worker

LOOP = LoopOptions(checkpoint_interval_s=0.0, claim_wait_s=0.5, pause_poll_s=0.1)
TAIL = 2
PART_DONE = ("POST", "/v1/merge/part")  # in orch.unavailable: part results wait (503)
CONTRIBUTE = ("POST", "/v1/merge/complete")  # in orch.unavailable: no further round can reduce


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
                self.after_step[self.steps] = loaded
            else:  # after_step keeps what the weights were at this step: a snapshot may be from then
                self.landings.append(Landing(self.steps, before, loaded))

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


def started_on_its_own_thread(
    orch: InProcessOrchestrator, run_id: str, stage: int, home: Path, make: Factory
) -> Replica:
    """A replica built and run on one thread, as `iota join` runs it (MLX streams belong to a thread)."""
    box: queue.Queue[Replica | BaseException] = queue.Queue()

    def main() -> None:
        try:
            r = replica(orch, run_id, stage, home, make)
        except BaseException as e:
            box.put(e)
            raise
        box.put(r)
        r.worker.run()

    thread = threading.Thread(target=main, name="worker-loop", daemon=True)
    thread.start()
    got = box.get(timeout=60)
    if isinstance(got, BaseException):
        raise got
    got.thread = thread
    return got


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


def contributions(orch: InProcessOrchestrator, run_id: str, epoch: int) -> list[tuple[str, float, float]]:
    """(contributor id, the weight the orchestrator counted, its norm clip) of a round, in the order every
    party reduces (the clip: butterfly.scale_of, 1 unless three or more replicas and one is outsized)."""
    from iota_orchestrator import butterfly, db

    MC = db.merge_contribs
    q = select(MC).where(MC.c.run_id == run_id, MC.c.stage == TAIL, MC.c.epoch == epoch)
    with orch.state.tx() as conn:
        rows = conn.execute(q).all()
    return sorted((r.contributor_id, float(r.weight), butterfly.scale_of(r)) for r in rows)


def check_overlap(r: Replica, merged: np.ndarray, atol: float) -> int:
    """The replica's merge landing obeys loaded = merged + (current - snapshot); the steps it kept."""
    first = r.stats[0]
    assert first.outcome == "merged", first
    snapshot = r.backend.after_step[first.step]
    landing = r.backend.landings[0]
    off = landing.loaded - (merged + (landing.before - snapshot))
    assert np.abs(off).max() <= atol, (
        f"{r.home.name}: off by {off.min():.3g}..{off.max():.3g}; snapshot at step {first.step}, landed at "
        f"{landing.steps}, {len(r.backend.landings)} loads, rounds {r.stats}"
    )
    return landing.steps - first.step


def at_epoch(replicas: list[Replica], epoch: int) -> Callable[[], bool]:
    return lambda: all(r.worker.state.epoch >= epoch for r in replicas)


def first_round_bytes(
    size: int, replicas: int, index: int, dtype: WireDtype, momentum: bool = True
) -> tuple[int, int]:
    """(sent, received) by the index-th contributor (by id) of a first round with no losses.

    Out: its update, and a part blob per partition it owns (with the outer momentum for diloco). In: the
    others' slices of those partitions, and the merged (F32) slices of the rest; its own results match
    the published ones, so none of those, and the first round has no momentum to read.
    """
    ranges = partitions(size, replicas)
    mine = {p for p in range(len(ranges)) if index in owners(p, replicas)}
    sent = len(update_blob(np.zeros(size, np.float32), dtype))
    received = 0
    for p, (a, b) in enumerate(ranges):
        if p in mine:
            n = np.zeros(b - a, np.float32)
            sent += len(part_blob(n, n if momentum else None, dtype))
            received += (replicas - 1) * WIRE_SIZES[dtype] * (b - a)
        else:
            received += 4 * (b - a)
    return sent, received


def parts_uploaded(
    orch: InProcessOrchestrator, run_id: str, replicas: list[Replica], epoch: int = 0
) -> Callable[[], bool]:
    """Whether every owner has uploaded its part blobs for the round (their reports may still wait): then
    no owner can find the round closed under it while it reads, so every one reduces all it owns."""
    from iota_orchestrator import rounds

    ids = sorted(r.worker.state.contributor_id for r in replicas)
    blobs = orch.state.blobs
    keys = [rounds.part_key(run_id, TAIL, epoch, p, cid) for i, cid in enumerate(ids) for p in range(len(ids))
            if i in owners(p, len(ids))]  # fmt: skip
    return lambda: all(blobs.path(k).exists() for k in keys)


def reducing(api: SwarmApi, run_id: str, epoch: int = 0) -> Callable[[], bool]:
    """Whether the round of epoch has every contribution it will take (so CONTRIBUTE may be closed)."""
    return lambda: api.merge_plan(run_id, TAIL, epoch).state in ("reducing", "closed")
