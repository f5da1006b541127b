"""Butterfly merge rounds over real HTTP (issue 12): the replicas reduce, the orchestrator coordinates.

A real orchestrator serves in this process (tests/inprocess_orchestrator.py; the crash test runs one as a
child process and SIGKILLs it); the replicas are simulated here with requests and core.flat/core.outer,
as `iota join` plays them: upload an update, read the ranges of the partitions they own with HTTP Range
(checked against the plan's sha256), reduce, upload the part, then read every other partition from the
published weights. Each counts the bytes it sends
and receives in a round. What the published weights must equal is computed with this file's own numpy.

    timeout 600 .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/test_merge_rounds.py
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import requests
from inprocess_orchestrator import InProcessOrchestrator, until
from iota_orchestrator import db
from pg_server import state_engine
from simworker import SimWorker
from sqlalchemy import select

from iota_cli.core import flat, outer
from iota_cli.core.manifest import MergeConfig, RunManifest, tiny_manifest
from iota_cli.core.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION, SHA256_HEADER, MergePlan
from iota_cli.core.tensors import decode
from iota_cli.core.validation import AuditVerdict
from iota_cli.swarm.corpus import write_corpus
from iota_cli.swarm.orchestrator import OrchestratorProcess
from iota_cli.train.api import SwarmApi

ADMIN = "admin-for-merge-tests"
STAGE = 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("merge") / "text", files=1, words=3000)


@pytest.fixture(scope="module")
def orch(tmp_path_factory, corpus):
    with InProcessOrchestrator(tmp_path_factory.mktemp("merge-orch") / "data", ADMIN, tick_s=0.1) as o:
        o.corpus = corpus
        yield o


def manifest(corpus: Any, merge: dict[str, Any] | None = None, **train: Any) -> RunManifest:
    m = tiny_manifest(str(corpus))
    knobs = {"interval": 1, "wire_dtype": "BF16", "timeout_s": 20.0, "strategy": "diloco", **(merge or {})}
    # One backward pass a step, so one sample of counted work opens a round; an lr of 1 puts the
    # optimizer's bound on an update (core.bounds, about 1.2 a step) above these tests' made-up updates.
    train = {"backward_per_step": 1, **train}
    return replace(
        m,
        train=replace(m.train, **train),
        merge=replace(m.merge, **knobs),
        optim=replace(m.optim, lr=1.0),
    )


def make_run(orch: InProcessOrchestrator, m: RunManifest) -> str:
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        return admin.create_run(m).run_id


# --- the test's own arithmetic ----------------------------------------------------------------------


def bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16 (to nearest, ties to even) and back to float32."""
    bits = np.asarray(x, dtype="<f4").view("<u4").astype(np.uint64)
    kept = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return kept.astype("<u4").view("<f4")


def nesterov(
    cfg: MergeConfig, base: np.ndarray, ups: list[np.ndarray], w: list[float], m: np.ndarray, epoch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(new weights, new momentum, how far bf16 rounding of the momentum may move the weights)."""
    mean = sum(wi * u.astype(np.float64) for wi, u in zip(w, ups, strict=True)) / sum(w)
    mu = cfg.momentum_start + (cfg.outer_momentum - cfg.momentum_start) * min(
        1.0, epoch / cfg.momentum_warmup
    )
    m_new = mu * m.astype(np.float64) + mean
    new = base.astype(np.float64) - cfg.outer_lr * (mean + mu * m_new)
    slack = cfg.outer_lr * mu * np.abs(m_new) * 2.0**-8 + 1e-6 * (np.abs(base) + np.abs(mean))
    return new, m_new, slack


# --- a replica, over raw HTTP -----------------------------------------------------------------------


class Replica:
    """A replica of stage 1 that merges the way `iota join` does, counting the merge's bytes."""

    def __init__(self, sim: SimWorker) -> None:
        self.sim, self.url, self.token = sim, sim.url, sim.token
        self.cid = sim.contributor_id
        self.sent = self.received = 0
        self.layout = flat.FlatLayout.of(sim.assigned.manifest.model, STAGE)
        self.cfg = sim.assigned.manifest.merge
        self.step, self.epoch = 0, 0

    def http(self, method: str, path: str, body: bytes = b"", count: bool = True, **headers: str) -> Any:
        headers = {PROTOCOL_HEADER: str(PROTOCOL_VERSION), "Authorization": f"Bearer {self.token}", **headers}
        r = requests.request(method, self.url + path, data=body or None, headers=headers, timeout=60)
        if count:
            self.sent += len(body)
            self.received += len(r.content)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text[:300]}"
        return r

    def post(self, path: str, obj: dict[str, Any], count: bool = True) -> Any:
        body = json.dumps(obj).encode()
        return self.http("POST", path, body, count, **{"Content-Type": "application/json"}).json()

    def heartbeat(self) -> dict[str, Any]:
        beat = {"run_id": self.sim.run_id, "stage": STAGE, "step": self.step, "epoch": self.epoch}
        return self.post("/v1/heartbeat", {**beat, "tokens_per_s": 1.0}, count=False)

    def weights(self) -> np.ndarray:
        """The stage's current weights, flat (and take their epoch), as a replica syncs to them."""
        beat = self.heartbeat()
        data = self.http("GET", beat["weights"]["url"], count=False).content
        self.epoch = beat["epoch"]
        return self.layout.flatten(decode(data)[0])

    def read(self, piece: Any) -> bytes:
        end = piece.offset + piece.length - 1
        r = self.http("GET", piece.url, Range=f"bytes={piece.offset}-{end}")
        assert r.status_code == 206 and r.headers["Content-Range"].startswith(f"bytes {piece.offset}-{end}/")
        assert hashlib.sha256(r.content).hexdigest() == piece.sha256
        return r.content

    def put(self, url: str, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.http("PUT", url, data, **{SHA256_HEADER: sha})
        return sha

    def contribute(self, offer: dict[str, Any], update: np.ndarray) -> None:
        data = flat.update_blob(update, self.cfg.wire_dtype)
        sha = self.put(offer["upload"]["url"], data)
        body = {"run_id": self.sim.run_id, "stage": STAGE, "epoch": offer["epoch"], "sha256": sha}
        assert self.post("/v1/merge/complete", {**body, "size": len(data), "step": self.step})["accepted"]
        self.own_update = update

    def plan(self, epoch: int, wait_s: float) -> MergePlan:
        q = f"run_id={self.sim.run_id}&stage={STAGE}&epoch={epoch}&wait_s={wait_s}"
        return MergePlan.model_validate(self.http("GET", f"/v1/merge/plan?{q}").json())

    def reduce(
        self, epoch: int, base: np.ndarray, skip: frozenset[int] = frozenset()
    ) -> dict[int, np.ndarray]:
        """Reduce the partitions this replica owns (but those in skip); return what it computed."""
        done: dict[int, np.ndarray] = {}
        while True:
            plan = self.plan(epoch, wait_s=5.0)
            todo = [
                p for p in plan.parts if p.upload is not None and p.part not in skip and p.part not in done
            ]
            if plan.state != "open" and not todo:
                return done
            for p in todo:
                ups = []
                for i, s in enumerate(p.sources):
                    if i == p.mine:  # its own upload: from memory, as the wire rounded it
                        ups.append(flat.wire_round(self.own_update[p.start : p.stop], self.cfg.wire_dtype))
                    else:
                        ups.append(flat.from_wire(self.read(s), self.cfg.wire_dtype))
                mom = flat.from_wire(self.read(p.momentum), self.cfg.wire_dtype) if p.momentum else None
                new, m = outer.reduce_partition(
                    self.cfg, base[p.start : p.stop], ups, p.weights, mom, epoch, p.scales
                )
                data = flat.part_blob(new, m, self.cfg.wire_dtype)
                assert p.upload is not None
                sha = self.put(p.upload.url, data)
                body = {"run_id": self.sim.run_id, "stage": STAGE, "epoch": epoch, "part": p.part}
                self.post("/v1/merge/part", {**body, "sha256": sha, "size": len(data)})
                done[p.part] = new

    def collect(self, epoch: int, mine: dict[int, np.ndarray], timeout: float = 30.0) -> np.ndarray:
        """Wait for the round to close; the merged vector from its own parts and the published others."""
        deadline = time.monotonic() + timeout
        while (plan := self.plan(epoch, wait_s=5.0)).state != "closed":
            assert plan.state != "gone" and time.monotonic() < deadline, f"round {epoch} is {plan.state}"
        out = np.empty(plan.size, np.float32)
        for p in plan.parts:
            assert p.result is not None
            out[p.start : p.stop] = (
                mine[p.part] if p.part in mine else np.frombuffer(self.read(p.result), "<f4")
            )
        return out

    def merge(self, epoch: int, base: np.ndarray, skip: frozenset[int] = frozenset()) -> np.ndarray:
        return self.collect(epoch, self.reduce(epoch, base, skip))


def replicas(orch: InProcessOrchestrator, run_id: str, n: int) -> list[Replica]:
    out = []
    for i in range(n):
        sim = SimWorker(orch.url, f"r{i}").register()
        sim.assign(run_id, stage=STAGE)
        out.append(Replica(sim))
    out.sort(key=lambda r: r.cid)  # the order the orchestrator gives partitions in
    for r in out:
        r.heartbeat()  # holds epoch 0 from step 0
    return out


def in_threads(fns: list[Any]) -> list[Any]:
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 (re-raised in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(90)
    if errors:
        raise errors[0]
    return results


_ends: dict[str, tuple[SimWorker, SimWorker]] = {}  # run id -> the head and tail that carry samples


def carry(reps: list[Replica], samples: int = 1) -> None:
    """Each replica carries samples through the stage, forward and back: the work the ledger counts
    (a round opens from counted work only, and weighs each update by it)."""
    run_id = reps[0].sim.run_id
    if run_id not in _ends:
        head, tail = SimWorker(reps[0].url, "head").register(), SimWorker(reps[0].url, "tail").register()
        head.assign(run_id, stage=0)
        tail.assign(run_id, stage=2)
        _ends[run_id] = (head, tail)
    head, tail = _ends[run_id]
    for r in reps:
        for _ in range(samples):
            head.do(head.claim())
            r.sim.do(r.sim.claim())
            tail.do(tail.claim())
            r.sim.do(r.sim.claim())  # the backward, routed back to whoever did the forward
            head.do(head.claim())


def open_round(reps: list[Replica], updates: list[np.ndarray], work: bool = True) -> list[np.ndarray]:
    """Every replica carries a sample (unless work is False: it did already) and syncs, the first one
    past the interval opens the round, all contribute."""
    if work:
        carry(reps)
    bases = [r.weights() for r in reps]
    for r in reps:
        r.step += 1
    for r, u in zip(reps, updates, strict=True):
        offer = r.heartbeat()["merge"]
        assert offer is not None and offer["phase"] == "contribute", offer
        r.contribute(offer, u)
    return bases


def rows(orch: InProcessOrchestrator, table: Any, run_id: str) -> list[Any]:
    assert orch.state is not None
    with orch.state.tx() as conn:
        return list(conn.execute(select(table).where(table.c.run_id == run_id)).all())


# --- the tests --------------------------------------------------------------------------------------


def test_three_replicas_merge_into_the_outer_step_of_their_weighted_mean(orch):
    run_id = make_run(orch, manifest(orch.corpus))
    reps = replicas(orch, run_id, 3)
    work = [3, 2, 1]  # samples each replica carries through the stage: what the orchestrator counts
    for r, n in zip(reps, work, strict=True):
        carry([r], n)
    rng = np.random.default_rng(7)
    size = reps[0].layout.size
    updates = [rng.normal(0, 0.01, size).astype(np.float32) for _ in reps]
    cfg = reps[0].cfg
    base = open_round(reps, updates, work=False)[0]
    merged = in_threads([lambda r=r: r.merge(0, base) for r in reps])
    published = reps[0].weights()
    assert reps[0].epoch == 1
    for got in merged:
        assert got.tobytes() == published.tobytes(), "every replica holds exactly the published weights"
    want, m1, slack = nesterov(cfg, base, [bf16(u) for u in updates], work, np.zeros(size), 0)
    assert np.all(np.abs(published - want) <= slack), np.max(np.abs(published - want) - slack)
    contribs = sorted(rows(orch, db.merge_contribs, run_id), key=lambda c: c.contributor_id)
    weights = [c.weight for c in contribs]
    assert [w / weights[-1] for w in weights] == [3.0, 2.0, 1.0], "weights = backward work counted here"
    parts = rows(orch, db.merge_parts, run_id)
    assert len(parts) == 3 and all(p.agreed for p in parts), "both owners of each partition agree"
    # A second round: a sample each (equal weights), and the momentum the first one left (its slices read
    # by the owners) comes into the outer step.
    updates2 = [rng.normal(0, 0.01, size).astype(np.float32) for _ in reps]
    base2 = open_round(reps, updates2)[0]
    assert base2.tobytes() == published.tobytes()
    in_threads([lambda r=r: r.merge(1, base2) for r in reps])
    final = reps[0].weights()
    want2, _, slack2 = nesterov(
        cfg, base2, [bf16(u) for u in updates2], [1, 1, 1], bf16(m1.astype(np.float32)), 1
    )
    assert np.all(np.abs(final - want2) <= slack2 + 1e-7), np.max(np.abs(final - want2) - slack2)
    assert reps[0].epoch == 2


def test_a_partition_whose_owners_are_gone_is_reduced_by_the_orchestrator(orch):
    # Leases of a second, a phase timeout of a minute: the round must finish because the owners are gone.
    run_id = make_run(orch, manifest(orch.corpus, {"timeout_s": 60.0}, lease_s=1.0))
    reps = replicas(orch, run_id, 3)
    size = reps[0].layout.size
    rng = np.random.default_rng(11)
    updates = [rng.normal(0, 0.01, size).astype(np.float32) for _ in reps]
    base = open_round(reps, updates)[0]
    live = reps[0]  # owns partitions 0 (with r1) and 2 (with r2); r1 and r2 own 1 and fall silent
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.2):
            live.heartbeat()

    beating = threading.Thread(target=beat)
    beating.start()
    started = time.monotonic()
    try:
        got = live.merge(0, base)
    finally:
        stop.set()
        beating.join()
    assert time.monotonic() - started < 30, "the orchestrator did not wait for the phase timeout"
    published = live.weights()
    assert got.tobytes() == published.tobytes() and live.epoch == 1
    want, _, slack = nesterov(live.cfg, base, [bf16(u) for u in updates], [1, 1, 1], np.zeros(size), 0)
    assert np.all(np.abs(published - want) <= slack)
    by = {p.part: p.first_by for p in rows(orch, db.merge_parts, run_id)}
    assert by == {0: live.cid, 1: "orchestrator", 2: live.cid}


def test_a_sigkill_in_the_reducing_phase_and_the_round_completes_once(tmp_path, corpus):
    data = tmp_path / "data"
    orch = OrchestratorProcess(data, admin_token=ADMIN, tick_s=0.1).start()
    try:
        run_id = make_run(orch, manifest(corpus, {"timeout_s": 30.0}))
        reps = replicas(orch, run_id, 3)
        size = reps[0].layout.size
        rng = np.random.default_rng(5)
        updates = [rng.normal(0, 0.01, size).astype(np.float32) for _ in reps]
        base = open_round(reps, updates)[0]
        until(lambda: reps[0].plan(0, wait_s=1.0).state == "reducing", what="the reducing phase")
        first = reps[0].reduce(0, base, skip=frozenset({2}))  # partition 0 only, before the kill
        assert list(first) == [0]
        orch.kill()
        orch = OrchestratorProcess(data, port=orch.port, admin_token=ADMIN, tick_s=0.1).start()
        mine = in_threads([lambda r=r: r.reduce(0, base) for r in reps])
        merged = [
            r.collect(0, {**m, **(first if r is reps[0] else {})}) for r, m in zip(reps, mine, strict=True)
        ]
        published = reps[0].weights()
        assert all(m.tobytes() == published.tobytes() for m in merged)
        want, _, slack = nesterov(reps[0].cfg, base, [bf16(u) for u in updates], [1, 1, 1], np.zeros(size), 0)
        assert np.all(np.abs(published - want) <= slack)
        time.sleep(1.0)  # ticks after the publish change nothing
        assert [r.heartbeat()["epoch"] for r in reps] == [1, 1, 1]
    finally:
        orch.stop()
    engine = state_engine(data)  # SQLite in data, or the test's PostgreSQL
    with engine.connect() as conn:
        S, R = db.stages, db.merge_rounds
        assert (
            conn.execute(select(S.c.epoch).where(S.c.run_id == run_id, S.c.stage == STAGE)).scalar_one() == 1
        )
        # (The head and tail that carried the samples did counted work too: their stages may open rounds.)
        got = conn.execute(select(R.c.epoch, R.c.state).where(R.c.run_id == run_id, R.c.stage == STAGE)).all()
        assert got == [(0, "closed")]
    engine.dispose()


def test_bytes_per_replica_per_round_stay_constant_in_the_number_of_replicas(orch, capsys):
    totals = {}
    lines = ["replicas  sent/replica  received/replica  total/replica  (stage of N params, bf16 updates)"]
    for n in (2, 4, 8):
        run_id = make_run(orch, manifest(orch.corpus))
        reps = replicas(orch, run_id, n)
        size = reps[0].layout.size
        rng = np.random.default_rng(n)
        base = open_round(reps, [rng.normal(0, 0.01, size).astype(np.float32) for _ in reps])[0]
        in_threads([lambda r=r, base=base: r.merge(0, base) for r in reps])
        sent, received = np.mean([r.sent for r in reps]), np.mean([r.received for r in reps])
        totals[n] = sent + received
        lines.append(f"{n:8d}  {sent:12.0f}  {received:16.0f}  {totals[n]:13.0f}  N = {size}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert max(totals.values()) <= 1.1 * min(totals.values()), totals


def test_a_silent_owner_is_covered_once_the_reducing_phase_times_out(orch):
    run_id = make_run(orch, manifest(orch.corpus, {"timeout_s": 1.0, "strategy": "average"}))
    (rep,) = replicas(orch, run_id, 1)
    update = np.random.default_rng(3).normal(0, 0.01, rep.layout.size).astype(np.float32)
    base = open_round([rep], [update])[0]
    until(lambda: (rep.heartbeat()["merge"] or {}).get("phase") == "reduce", what="the reduce offer")
    # It owns the only partition, keeps its lease and never reports it.
    until(lambda: rep.heartbeat()["epoch"] == 1, timeout=10, what="the fallback to publish epoch 1")
    (part,) = rows(orch, db.merge_parts, run_id)
    assert part.first_by == "orchestrator"
    np.testing.assert_array_equal(rep.weights(), base - bf16(update))  # average: base - mean


def test_the_final_round_at_the_end_of_a_run_merges_the_same_way(orch):
    run_id = make_run(orch, manifest(orch.corpus, {"interval": 1000, "timeout_s": 2.0}, max_samples=1))
    head, tail = SimWorker(orch.url, "head").register(), SimWorker(orch.url, "tail").register()
    head.assign(run_id, stage=0)
    tail.assign(run_id, stage=2)
    (rep,) = replicas(orch, run_id, 1)
    for w in (head, rep.sim, tail, rep.sim, head):  # the run's only sample, forward and back
        w.do(w.claim())
    base = rep.weights()
    rep.step += 1  # it stepped since it synced: its last steps are what the final round merges
    offer = until(lambda: rep.heartbeat()["merge"], what="the final round, far before the interval")
    rep.contribute(offer, np.full(rep.layout.size, 0.01, np.float32))
    merged = rep.merge(0, base)
    with SwarmApi.connect(orch.url) as api:
        # Live workers heartbeat; the run ends once each has since the drain, with no round due.
        alive = lambda: [w.heartbeat() for w in (head, tail)]  # noqa: E731
        until(lambda: alive() and api.run_status(run_id).state == "finished", 40, "the run to finish")
    assert merged.tobytes() == rep.weights().tobytes() and rep.epoch == 1
    assert not np.array_equal(merged, base)


def test_a_result_sent_after_its_merge_landed_is_checked_from_the_epoch_it_ran_on(orch):
    """The worker sends results behind its loop: a forward run on epoch 0 may be completed after the
    replica's merge landed and its heartbeat said epoch 1. Its check must start from epoch 0's weights
    (the ones it ran on), or an honest worker fails it."""
    # The held item, and the head whose sample it is (silent meanwhile), outlive the round.
    m = manifest(orch.corpus, work_timeout_s=120.0, lease_s=120.0)
    run_id = make_run(orch, replace(m, trust=replace(m.trust, sample_rate=1.0)))
    (rep,) = replicas(orch, run_id, 1)
    carry([rep])  # its first forward is checked; a pass vets it, and every forward is sampled after
    with SwarmApi.connect(orch.url, ADMIN, retries=0, max_wait_s=0.0) as v:
        while (task := v.next_audit(wait_s=1.0)) is not None:
            v.judge(task.audit_id, AuditVerdict(passed=True))
    head, _ = _ends[run_id]
    head.do(head.claim())
    held = rep.sim.claim()  # computed on epoch 0...
    assert held is not None and held["kind"] == "forward"
    base = open_round([rep], [np.full(rep.layout.size, 1e-3, np.float32)], work=False)[0]
    rep.merge(0, base)
    rep.weights()  # syncs to the merged weights
    rep.heartbeat()  # and says it holds epoch 1
    (a,) = [x for x in rows(orch, db.assignments, run_id) if x.contributor_id == rep.cid]
    assert rep.epoch == 1 and a.epoch == 1
    data = rep.sim.boundary_tensor("activations")
    sha = rep.sim.upload(held["upload"], data)
    reply = rep.sim.complete(held, sha, len(data), epoch=0)  # ...and sent once the merge had landed
    assert reply["audit"], "sampled (rate 1 once vetted)"
    (audit,) = [x for x in rows(orch, db.audits, run_id) if x.forward_id == int(held["work_id"][1:])]
    assert audit.epoch == 0, "checked from the epoch it ran on, not the one its worker holds now"
