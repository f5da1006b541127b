"""Merges no single contributor can steer (issue 13): the optimizer's bound, and what rounds do with it.

core.bounds is checked against torch's own AdamW (every backend's optimizer) on gradients chosen to push
the Adam ratio up; the rounds' side runs a real orchestrator in this process (tests/inprocess_orchestrator.py)
with replicas simulated over HTTP (tests/simworker.py) that carry real samples, so the ledger counts work.

    timeout 600 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_merge_trust.py
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from inprocess_orchestrator import InProcessOrchestrator, until
from iota_orchestrator import db
from simworker import SimWorker
from sqlalchemy import select

from iota_cli.core import bounds, flat
from iota_cli.core.manifest import OptimConfig, RunManifest, tiny_manifest
from iota_cli.swarm.corpus import write_corpus
from iota_cli.train.api import SwarmApi
from iota_cli.train.errors import ApiError

ADMIN = "admin-for-merge-trust-tests"
STAGE = 1


# --- the bound ----------------------------------------------------------------------------------------


def test_the_adam_ratio_bound_is_its_closed_form_limit():
    assert bounds.adam_ratio_bound(0.9, 0.95) == pytest.approx(0.1 / math.sqrt(0.05 * (1 - 0.81 / 0.95)))
    assert bounds.adam_ratio_bound(0.9, 0.95) == pytest.approx(1.165, abs=1e-3)
    assert bounds.adam_ratio_bound(0.9, 0.999) == pytest.approx(7.27, abs=1e-2)
    assert bounds.adam_ratio_bound(0.9, 0.9) == pytest.approx(1.0)  # r = 0.9: never above a first step
    assert bounds.adam_ratio_bound(0.95, 0.9) == math.inf  # b1^2 > b2: no bound free of the step count
    assert bounds.update_bound(OptimConfig(betas=(0.95, 0.9)), 3, 1.0) == math.inf


def test_steps_come_from_counted_passes_with_one_step_of_slack():
    assert bounds.steps_from_items(0, 4) == 1
    assert bounds.steps_from_items(4, 4) == 2
    assert bounds.steps_from_items(5, 4) == 3
    assert bounds.steps_from_items(9, 1) == 10


def test_stats_and_violations():
    assert bounds.violation(bounds.UpdateStats.of(np.array([0.1, -0.2], np.float32)), 0.25) is None
    assert "exceeds" in str(bounds.violation(bounds.UpdateStats.of(np.array([0.3], np.float32)), 0.2))
    nan = bounds.UpdateStats.of(np.array([0.0, np.nan], np.float32))
    assert not nan.finite and "NaN" in str(bounds.violation(nan, 1.0))


def _grads(
    kind: str, steps: int, size: int, rng: np.random.Generator, growth: float = 1.0
) -> list[np.ndarray]:
    if kind == "constant":  # the same sign every step: each step moves by lr (the ratio stays 1)
        return [np.full(size, 0.3)] * steps
    if kind == "noise":
        return [rng.normal(0, 1, size) for _ in range(steps)]
    if kind == "spike":  # quiet, then one large gradient: m jumps faster than sqrt(v) (ratio above 1)
        return [np.full(size, 1e-4)] * (steps - 1) + [np.full(size, 10.0)]
    if kind == "growing":  # growing by b2 / b1 a step: Cauchy-Schwarz is tight, the ratio reaches c
        return [np.full(size, growth**i) for i in range(steps)]
    raise ValueError(kind)


@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.9, 0.999)])
@pytest.mark.parametrize("kind", ["constant", "noise", "spike", "growing"])
def test_torch_adamw_never_moves_a_weight_past_the_bound(betas, kind):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    optim = OptimConfig(lr=1e-2, betas=betas, weight_decay=0.1)
    w = torch.nn.Parameter(torch.tensor(rng.normal(0, 1, 256), dtype=torch.float32))
    opt = torch.optim.AdamW([w], lr=optim.lr, betas=betas, eps=optim.eps, weight_decay=optim.weight_decay)
    worst = 0.0
    for warm in (0, 40):  # from a fresh optimizer, and from one that has stepped before the round
        for g in _grads("noise", warm, 256, rng):
            w.grad = torch.tensor(g, dtype=torch.float32)
            opt.step()
        base = w.detach().clone().numpy()
        for n, g in enumerate(_grads(kind, 30, 256, rng, betas[1] / betas[0]), start=1):
            w.grad = torch.tensor(g, dtype=torch.float32)
            opt.step()
            moved = float(np.abs(base - w.detach().numpy()).max())
            bound = bounds.update_bound(optim, n, float(np.abs(base).max()), "BF16")
            assert moved <= bound, (kind, warm, n, moved, bound)
            worst = max(worst, moved / bound)
    # With the default betas a steady gradient, and the worst one, come close: the bound is not loose.
    # (With b2 = 0.999 the ratio nears its limit only after thousands of steps, which the bound, free of
    # the step count a replica could lie about, must allow: there it is loose by about 7x early on.)
    if kind in ("constant", "growing") and betas == (0.9, 0.95):
        assert worst > 0.6, f"the bound is loose: {worst:.3f}"


# --- rounds -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def orch(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("trust") / "text", files=1, words=3000)
    with InProcessOrchestrator(tmp_path_factory.mktemp("trust-orch") / "data", ADMIN, tick_s=0.1) as o:
        o.corpus = corpus
        yield o


def make_run(
    orch: InProcessOrchestrator,
    timeout_s: float = 20.0,
    interval: int = 1,
    max_samples: int = 0,
    **trust: Any,
) -> str:
    m: RunManifest = tiny_manifest(str(orch.corpus))
    m = replace(
        m,
        train=replace(m.train, backward_per_step=1, max_samples=max_samples),
        merge=replace(m.merge, interval=interval, strategy="average", timeout_s=timeout_s),
        trust=replace(m.trust, **trust),
    )
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        return admin.create_run(m).run_id


class Crew:
    """A head, a tail and replicas of stage 1 that carry samples forward and back (counted work)."""

    def __init__(self, orch: InProcessOrchestrator, run_id: str, n: int) -> None:
        self.orch, self.run_id = orch, run_id
        self.head, self.tail = self.sim("head", 0), self.sim("tail", 2)
        self.reps = [self.sim(f"r{i}", STAGE) for i in range(n)]
        for r in self.reps:
            r.heartbeat()

    def sim(self, name: str, stage: int) -> SimWorker:
        w = SimWorker(self.orch.url, name).register()
        w.assign(self.run_id, stage=stage)
        return w

    def carry(self, rep: SimWorker, samples: int = 1) -> None:
        for _ in range(samples):
            for w in (self.head, rep, self.tail, rep, self.head):
                w.do(w.claim())

    def row(self, table: Any, cid: str) -> Any:
        assert self.orch.state is not None
        with self.orch.state.tx() as conn:
            return conn.execute(
                select(table).where(table.c.run_id == self.run_id, table.c.contributor_id == cid)
            ).all()

    def layout(self) -> flat.FlatLayout:
        return flat.FlatLayout.of(self.reps[0].assigned.manifest.model, STAGE)

    def bound(self, steps: int, rep: SimWorker) -> float:
        m = rep.assigned.manifest
        base = float(np.abs(self.layout().flatten(rep.weights())).max())
        return bounds.update_bound(m.optim, steps, base, m.merge.wire_dtype)


def test_a_made_up_step_opens_no_round_but_counted_work_does(orch):
    crew = Crew(orch, make_run(orch), 1)
    (r,) = crew.reps
    r.step = 10**9
    assert r.heartbeat()["merge"] is None, "a reported step opens nothing"
    crew.carry(r)
    offer = r.heartbeat()["merge"]
    assert offer is not None and offer["phase"] == "contribute"


def test_an_update_past_the_bound_is_left_out_and_its_sender_pays(orch):
    crew = Crew(orch, make_run(orch), 2)
    honest, cheat = crew.reps
    for r in crew.reps:
        crew.carry(r)
    earned = crew.row(db.assignments, cheat.contributor_id)[0].credits
    assert earned > 0
    offer = honest.heartbeat()["merge"]
    u = np.full(crew.layout().size, crew.bound(2, honest) * 0.5, np.float32)
    with pytest.raises(ApiError) as e:
        cheat.contribute(cheat.heartbeat()["merge"], u * 1000)
    assert e.value.status == 422 and "bound" in e.value.detail
    (a,) = crew.row(db.assignments, cheat.contributor_id)
    assert a.fails == 1 and a.state == "banned" and a.credits <= 0, (a.fails, a.state, a.credits)
    clawback = [x for x in crew.row(db.ledger, cheat.contributor_id) if x.kind == "clawback"]
    assert len(clawback) == 1 and clawback[0].work_id.startswith(f"merge:{STAGE}:0:")
    assert not crew.row(db.merge_contribs, cheat.contributor_id), "its update is in no round"
    with pytest.raises(ApiError) as e:  # banned: refused from now on
        cheat.contribute(offer, u)
    assert e.value.status == 403
    assert honest.contribute(offer, u)["accepted"]
    # The round does not wait for the cheater: it reduces with the honest update alone.
    base = crew.layout().flatten(honest.weights())
    assert honest.reduce(0, base) >= 1
    published = crew.layout().flatten(honest.weights())
    np.testing.assert_array_equal(published, base - flat.wire_round(u, "F32"))


def test_a_claimed_weight_is_ignored_and_the_counted_work_weighs(orch):
    crew = Crew(orch, make_run(orch), 1)
    (r,) = crew.reps
    crew.carry(r, 2)
    offer = r.heartbeat()["merge"]
    data = flat.update_blob(np.zeros(crew.layout().size, np.float32), "F32")
    sha = r.upload(offer["upload"], data)
    body = {"run_id": crew.run_id, "stage": STAGE, "epoch": 0, "sha256": sha, "size": len(data)}
    reply = r.request("POST", "/v1/merge/complete", json={**body, "weight": 1e18, "step": 10**12})
    assert reply.status_code == 200, reply.text
    (c,) = crew.row(db.merge_contribs, r.contributor_id)
    per_item = r.assigned.manifest.train.batch_size * r.assigned.manifest.train.seq_len
    assert c.weight == 2 * per_item, "the weight is the backward work counted, not the claim"


def test_a_non_finite_update_is_a_failed_check_and_a_malformed_one_only_refused(orch):
    crew = Crew(orch, make_run(orch), 1)
    (r,) = crew.reps
    crew.carry(r)
    offer = r.heartbeat()["merge"]
    size = crew.layout().size
    with pytest.raises(ApiError) as e:
        r.contribute(offer, np.zeros(size - 1, np.float32))
    assert e.value.status == 422
    assert crew.row(db.assignments, r.contributor_id)[0].fails == 0, "a malformed blob is no failed check"
    bad = np.zeros(size, np.float32)
    bad[size // 2] = np.nan
    with pytest.raises(ApiError) as e:
        r.contribute(offer, bad)
    assert e.value.status == 422
    assert crew.row(db.assignments, r.contributor_id)[0].fails == 1
    faults = {f.kind: f.count for f in crew.row(db.faults, r.contributor_id)}
    assert faults.get("failed_check") == 1 and faults.get("rejected") == 2, faults


def test_a_run_that_admits_only_vetted_contributors_to_merges(orch):
    crew = Crew(orch, make_run(orch, merge_requires_pass=True), 1)
    (r,) = crew.reps
    crew.carry(r)
    a = crew.row(db.assignments, r.contributor_id)[0]
    if a.passes:
        pytest.skip("the replica passed a check already (a validator ran): nothing to refuse")
    assert r.heartbeat()["merge"] is None, "no round is offered to an unvetted replica"
    fake = {"run_id": crew.run_id, "stage": STAGE, "epoch": 0, "sha256": "0" * 64, "size": 1}
    reply = r.request("POST", "/v1/merge/complete", json=fake)
    assert reply.status_code in (403, 409), reply.text  # 409: no round is open (none could open)
    assert json.loads(reply.text)["detail"]


def test_a_partition_owner_that_reduces_wrong_is_overruled_and_pays(orch):
    crew = Crew(orch, make_run(orch), 2)
    for r in crew.reps:
        crew.carry(r)
    honest, cheat = crew.reps
    size, cfg = crew.layout().size, honest.assigned.manifest.merge
    u = np.full(size, crew.bound(2, honest) * 0.5, np.float32)
    base = crew.layout().flatten(honest.weights())
    offer = honest.heartbeat()["merge"]
    assert (
        honest.contribute(offer, u)["accepted"]
        and cheat.contribute(cheat.heartbeat()["merge"], -u)["accepted"]
    )
    plan = until(lambda: (pl := cheat.plan(0, wait_s=2.0)).state == "reducing" and pl, what="reducing")
    for p in plan.parts:  # the cheater's results come first: right shape, wrong values
        assert p.upload is not None
        data = flat.part_blob(base[p.start : p.stop] + 0.5, None, cfg.wire_dtype)
        sha = cheat.upload(p.upload.model_dump(mode="json"), data)
        body = {"run_id": crew.run_id, "stage": STAGE, "epoch": 0, "part": p.part, "sha256": sha}
        assert cheat.request("POST", "/v1/merge/part", json={**body, "size": len(data)}).status_code == 200
    assert honest.reduce(0, base) == len(plan.parts)
    published = crew.layout().flatten(honest.weights())
    # The mean of u and -u (equal counted work): the honest owner's reduction, not the first result.
    np.testing.assert_array_equal(published, base)
    (a,) = crew.row(db.assignments, cheat.contributor_id)
    assert a.state == "banned" and a.credits <= 0
    assert any(x.work_id.startswith(f"part:{STAGE}:0:") for x in crew.row(db.ledger, cheat.contributor_id))
    assert crew.row(db.assignments, honest.contributor_id)[0].fails == 0


def test_clip_scales_keep_each_norm_within_three_times_the_median_per_counted_step():
    from iota_cli.core.outer import clip_scales, weighted_mean

    assert clip_scales([1.0, 100.0], [1, 1]) == [1.0, 1.0], "two contributions: no median to trust"
    assert clip_scales([1.0, 1.2, 100.0], [1, 1, 1]) == [1.0, 1.0, pytest.approx(3 * 1.2 / 100)]
    assert clip_scales([1.0, 2.0, 3.0], [1, 2, 3]) == [1.0, 1.0, 1.0], "norms grow with counted steps"
    u = [np.ones(4, np.float32), np.full(4, 9.0, np.float32)]
    np.testing.assert_allclose(weighted_mean(u, [1.0, 1.0], [1.0, 0.5]), np.full(4, 2.75), rtol=1e-7)


def test_with_three_replicas_an_outsized_update_within_the_bound_is_clipped(orch):
    # Nobody reduces: after the 2 s reducing phase the orchestrator does, with the plan's clips.
    crew = Crew(orch, make_run(orch, timeout_s=2.0), 3)
    for r in crew.reps:
        crew.carry(r)
    size = crew.layout().size
    b = crew.bound(2, crew.reps[0])
    rng = np.random.default_rng(1)
    small = [rng.uniform(-0.1 * b, 0.1 * b, size).astype(np.float32) for _ in range(2)]
    big = np.full(size, 0.9 * b, np.float32)  # every coordinate near the bound: ~15x their norm
    base = crew.layout().flatten(crew.reps[0].weights())
    offers = [r.heartbeat()["merge"] for r in crew.reps]
    for r, offer, u in zip(crew.reps, offers, [*small, big], strict=True):
        assert r.contribute(offer, u)["accepted"]
    plan = until(lambda: (p := crew.reps[0].plan(0, wait_s=2.0)).state == "reducing" and p, what="reducing")
    ids = sorted(r.contributor_id for r in crew.reps)
    scales = dict(zip(ids, next(p for p in plan.parts if p.scales).scales, strict=True))
    assert scales[crew.reps[2].contributor_id] < 0.2 and scales[crew.reps[0].contributor_id] == 1.0
    until(lambda: crew.reps[0].heartbeat()["epoch"] == 1, timeout=20, what="the orchestrator to publish")
    moved = base - crew.layout().flatten(crew.reps[0].weights())
    assert np.abs(moved).max() < 0.3 * b, "the outsized update moved the mean by a clipped share only"


def test_a_made_up_step_at_the_drain_opens_no_final_round_and_the_run_ends(orch):
    crew = Crew(orch, make_run(orch, timeout_s=1.0, interval=1000, max_samples=1), 1)
    (r,) = crew.reps
    liar = crew.sim("liar", STAGE)
    liar.heartbeat()
    liar.step = 10**9  # it never works, but says it stepped
    crew.carry(r)  # the run's only sample
    base = crew.layout().flatten(r.weights())
    r.step += 1
    everyone = (crew.head, crew.tail, r, liar)

    def offered() -> Any:  # the end waits for every live replica's heartbeat since the drain
        return [w.heartbeat() for w in everyone][2]["merge"]

    offer = until(offered, what="the final round of the replica that worked")
    r.contribute(offer, np.zeros(crew.layout().size, np.float32))
    r.reduce(0, base)

    def beat() -> bool:
        liar.step += 1000  # ever further "ahead", and holding the current epoch
        liar.epoch = r.heartbeat()["epoch"]
        told = liar.heartbeat()
        assert told["merge"] is None, "the liar's steps opened a round"
        return told["run_state"] == "finished" and all(
            w.heartbeat()["run_state"] == "finished" for w in everyone
        )

    until(beat, timeout=20, what="the run to finish despite the liar's steps")
