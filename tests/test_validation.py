"""Sampled checks, piece by piece: the comparison, standing, and the audit protocol over real HTTP.

The API tests drive a real orchestrator (in this process) with simulated workers (tests/simworker.py)
and play the validator's side by hand, so each rule is seen on its own: the first item of a newcomer is
always checked, a passed check vets credits, a failed one claws them back with a penalty and bans the
contributor when its standing falls below zero, a missing snapshot fails at the deadline, and a pending
check keeps its chain's blobs from the garbage collector. test_trust_e2e.py has real cheating processes.

    .venv/bin/python -m pytest -q tests/test_validation.py
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
from inprocess_orchestrator import InProcessOrchestrator
from iota_orchestrator import audits, standing
from simworker import SimWorker

from iota_cli.commands.status import render
from iota_cli.core.manifest import TrustConfig, tiny_manifest
from iota_cli.core.validation import EXACT, LOOSE, AuditVerdict, compare, loss_agrees, tolerance
from iota_cli.swarm.corpus import write_corpus
from iota_cli.train.api import SwarmApi
from iota_cli.train.errors import ApiError

ADMIN = "admin-token-for-validation-tests"


# --- the comparison ------------------------------------------------------------------------------------


def test_compare_catches_scaling_noise_and_non_finite_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=4096).astype(np.float32)
    bf16 = (a.view(np.uint32) & 0xFFFF0000).view(np.float32)  # truncated to bf16: an honest wire
    assert compare("x", a, a, EXACT).passed and compare("x", a, bf16, LOOSE).passed
    assert not compare("x", a, 3 * a, LOOSE).passed, "3x has the right direction but not the magnitude"
    assert not compare("x", a, a / 3, LOOSE).passed, "the ratio is symmetric"
    noise = rng.normal(scale=float(np.std(a)), size=a.shape)
    assert not compare("x", a, noise, LOOSE).passed, "random values of the right scale"
    assert not compare("x", a, np.full_like(a, np.nan), LOOSE).passed
    assert not compare("x", a, a[:-1], LOOSE).passed, "a misshapen result"
    assert compare("x", np.zeros(3), np.zeros(3), EXACT).passed


def test_tolerances_follow_the_backend_and_dtypes():
    assert tolerance("torch-cpu", "float32") == EXACT and tolerance("mlx", "float32") == EXACT
    assert tolerance("torch-cuda", "float32") == LOOSE, "CUDA may run bf16 autocast"
    assert tolerance("torch-cpu", "bfloat16") == LOOSE
    assert loss_agrees(3.0001, 3.0, EXACT) and not loss_agrees(0.01, 3.0, LOOSE)
    assert not loss_agrees(None, 3.0, LOOSE)


def test_standing_is_plus_one_minus_three():
    assert standing.score(3, 1, 1, 3) == 0 and standing.score(3, 2, 1, 3) < 0
    assert TrustConfig().pass_reward == 1 and TrustConfig().fail_penalty == 3


def test_a_check_starts_from_the_epoch_its_item_ran_on_within_one_merge():
    # A result sent behind the loop can arrive after its worker's heartbeat announced the next epoch:
    # checked against that epoch's weights, an honest tail was banned (tests/test_swarm_e2e.py).
    assert audits.item_epoch(held=3, ran_on=2) == 2
    assert audits.item_epoch(held=3, ran_on=3) == 3
    assert audits.item_epoch(held=3, ran_on=0) == 3, "older claims would widen the bound: not believed"
    assert audits.item_epoch(held=3, ran_on=4) == 3
    assert audits.item_epoch(held=3, ran_on=None) == 3


# --- the protocol ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def orch(tmp_path_factory):
    base = tmp_path_factory.mktemp("validation")
    with InProcessOrchestrator(base / "data", admin_token=ADMIN, tick_s=0.1) as o:
        o.corpus = write_corpus(base / "text")
        yield o


def make_run(orch, work_timeout_s: float = 30.0, **trust) -> str:
    m = tiny_manifest(str(orch.corpus))
    m = replace(m, train=replace(m.train, work_timeout_s=work_timeout_s), trust=TrustConfig(**trust))
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        return admin.create_run(m).run_id


def pinned(orch, run_id: str, stage: int, name: str) -> SimWorker:
    w = SimWorker(orch.url, name).register()
    w.assign(run_id, stage=stage)
    return w


def validator(orch) -> SwarmApi:
    return SwarmApi.connect(orch.url, ADMIN, retries=0, max_wait_s=0.0)


def me(w: SimWorker) -> dict:
    return w.call("GET", "/v1/contributors/me")


def credits(orch, w: SimWorker) -> float:
    return requests.get(f"{orch.url}/v1/contributors/{w.contributor_id}/credits", timeout=10).json()["total"]


def worker_status(orch, run_id: str, w: SimWorker) -> dict:
    st = requests.get(f"{orch.url}/v1/runs/{run_id}/status", timeout=10).json()
    return next(x for s in st["stages"] for x in s["workers"] if x["contributor_id"] == w.contributor_id)


def test_a_newcomers_first_item_is_checked_and_a_pass_vets_it(orch, tmp_path):
    run_id = make_run(orch)
    head = pinned(orch, run_id, 0, "head")
    item = head.claim()
    reply = head.do(item)
    assert reply["audit"], "no credit without a first check: the first forward item is always sampled"
    second = head.do(head.claim())
    assert not second["audit"], "one check in flight at a time while the contributor is new"
    body = pinned(orch, run_id, 1, "body")
    body.do(body.claim())  # the chain ends only with its backward; the tail is missing: nothing to wait on
    with validator(orch) as v:
        assert v.next_audit() is None, "a head's check waits for its backward (or its chain's end)"
    requests.post(f"{orch.url}/v1/runs/{run_id}/abort", headers={"Authorization": f"Bearer {ADMIN}"})
    with validator(orch) as v:
        task = None
        deadline = time.monotonic() + 10
        while task is None and time.monotonic() < deadline:
            task = v.next_audit(wait_s=1.0)
            if task is not None and task.stage != 0:
                v.judge(task.audit_id, AuditVerdict(passed=True))
                task = None
        assert task is not None and task.stage == 0 and task.tokens and task.output and task.weights
        assert task.grad is None, "its chain ended before the backward: the forward alone is judged"
        time.sleep(0.5)  # a few reaper ticks: the aborted chain's blobs would be collected by now
        for ref in (task.tokens, task.output, task.weights):
            assert v.download(ref, tmp_path / ref.sha256).stat().st_size == ref.size, "pinned by the check"
        v.judge(task.audit_id, AuditVerdict(passed=True, detail="ok"))
        v.judge(task.audit_id, AuditVerdict(passed=False, detail="a repeated verdict changes nothing"))
    ws = worker_status(orch, run_id, head)
    assert ws["checks"] == {"passed": 1, "failed": 0} and ws["standing"] == 1 and not ws["banned"]
    assert credits(orch, head) > 0


def test_a_failed_check_claws_back_charges_and_bans(orch):
    run_id = make_run(orch)
    head = pinned(orch, run_id, 0, "cheat")
    earned = [head.do(head.claim()) for _ in range(2)]
    assert earned[0]["audit"] and sum(r["credits"] for r in earned) > 0
    requests.post(f"{orch.url}/v1/runs/{run_id}/abort", headers={"Authorization": f"Bearer {ADMIN}"})
    with validator(orch) as v:
        task = v.next_audit(wait_s=5.0)
        while task is not None and task.run_id != run_id:
            v.judge(task.audit_id, AuditVerdict(passed=True))
            task = v.next_audit(wait_s=5.0)
        assert task is not None
        v.judge(task.audit_id, AuditVerdict(passed=False, detail="activations: cosine 0.01"))
    assert credits(orch, head) < 0, "everything since the last vetted item, plus 3x the failed item"
    ws = worker_status(orch, run_id, head)
    assert ws["banned"] and ws["standing"] == -3 and ws["checks"] == {"passed": 0, "failed": 1}
    assert ws["faults"].get("failed_check") == 1
    with pytest.raises(ApiError) as e:
        head.heartbeat()
    assert e.value.status == 403 and "banned" in e.value.detail


def test_a_snapshot_never_sent_fails_at_the_deadline(orch):
    run_id = make_run(orch, work_timeout_s=0.5)
    head = pinned(orch, run_id, 0, "silent")
    item = head.claim()
    data = head.boundary_tensor("activations")
    reply = head.complete(item, head.upload(item["upload"], data), len(data))
    assert reply["audit"], "sampled, but this worker never sends the weights"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not worker_status(orch, run_id, head)["banned"]:
        time.sleep(0.2)
    ws = worker_status(orch, run_id, head)
    assert ws["banned"] and ws["checks"]["failed"] == 1 and credits(orch, head) < 0


def test_a_complete_sent_again_gets_its_check_again_and_the_snapshot_passes(orch):
    """A cut connection loses the complete's reply; the client sends it again. The check it asked for
    must come back with it, or the weights are never sent and an honest worker fails at the deadline."""
    run_id = make_run(orch, work_timeout_s=3.0)
    head = pinned(orch, run_id, 0, "cut-off")
    item = head.claim()
    data = head.boundary_tensor("activations")
    sha = head.upload(item["upload"], data)
    first = head.complete(item, sha, len(data))
    again = head.complete(item, sha, len(data))
    assert first["audit"] and again["audit"], "the check's upload comes back with the repeated complete"
    assert again["audit"]["url"].split("?")[0] == first["audit"]["url"].split("?")[0]
    assert again["credits"] == first["credits"], "credited once"
    head.snapshot(item["work_id"], again["audit"])
    third = head.complete(item, sha, len(data))
    assert third["audit"] is None, "sent: nothing waits on this item's weights any more"
    time.sleep(3.5)  # past the snapshot's deadline: a check still waiting for weights would fail now
    ws = worker_status(orch, run_id, head)
    assert not ws["banned"] and ws["checks"]["failed"] == 0


def test_a_snapshot_that_is_not_the_stages_weights_fails(orch):
    run_id = make_run(orch)
    head = pinned(orch, run_id, 0, "garbled")
    item = head.claim()
    data = head.boundary_tensor("activations")
    reply = head.complete(item, head.upload(item["upload"], data), len(data))
    sha = head.upload(reply["audit"], data)  # activations where the weights belong
    r = head.request("POST", f"/v1/work/{item['work_id']}/weights", json={"sha256": sha, "size": len(data)})
    assert r.status_code == 422 and "snapshot" in r.json()["detail"]
    assert worker_status(orch, run_id, head)["banned"]


def test_iota_status_shows_an_unchecked_contributors_standing(orch):
    run_id = make_run(orch, sample_rate=0.0)
    honest = pinned(orch, run_id, 0, "honest")
    honest.do(honest.claim())
    info = me(honest)
    assert info["standing"] == 0 and info["checks"] == {"passed": 0, "failed": 0}
    text = render({"orchestrator": info, "checkpoints": [], "orchestrator_url": orch.url})
    assert "Standing +0: 0 checks passed, 0 failed" in text


# --- merge updates on held-out tokens (the validator's arithmetic, on the real torch backend) ------------


def test_a_merge_update_that_raises_the_held_out_loss_fails_within_the_bound():
    pytest.importorskip("torch")
    from iota_cli.core.backend import get_factory
    from iota_cli.core.bounds import update_bound
    from iota_cli.core.flat import FlatLayout, update_blob
    from iota_cli.core.protocol import BlobRef
    from iota_cli.core.tensors import RawTensor, column_slice, decode
    from iota_cli.core.validation import AuditTask
    from iota_cli.validate.recompute import judge_merge

    m = tiny_manifest("unused")
    cfg, tail = m.model, m.model.n_stages - 1
    factory = get_factory("torch-cpu")
    stages = [factory.create(cfg, s, m.optim, m.seed) for s in range(cfg.n_stages)]
    text = (Path(np.__file__).parent / "__init__.py").read_bytes()
    b, t = m.train.batch_size, m.train.seq_len

    def batch(k: int) -> RawTensor:
        ids = np.frombuffer(text[k * b * (t + 1) : (k + 1) * b * (t + 1)], dtype=np.uint8).astype("<i4")
        return RawTensor("I32", (b, t + 1), ids.reshape(b, t + 1).tobytes())

    base = [s.weights() for s in stages]
    layout = FlatLayout.of(cfg, tail)
    for k in range(2):  # two honest local steps of the tail, on training batches
        for n in range(m.train.backward_per_step):
            tokens, key = batch(1 + 2 * k + n), f"train{k}{n}"
            x = stages[0].forward(key, {"tokens": column_slice(tokens, 0, -1)})
            x = stages[1].forward(key, x)
            stages[tail].forward(key, x)
            stages[tail].backward(key, {"targets": column_slice(tokens, 1, None)})
            stages[0].free(key)
            stages[1].free(key)
        stages[tail].step()
    honest = layout.flatten(base[tail]) - layout.flatten(stages[tail].weights())
    bound = update_bound(m.optim, 2, float(np.abs(layout.flatten(base[tail])).max()))
    ascent = -np.sign(honest) * 0.9 * bound  # uphill at the optimizer's bound on every coordinate
    assert np.abs(honest).max() <= bound and np.abs(ascent).max() <= bound

    blobs = {"w0": base[0], "w1": base[1], "w2": base[tail], "held": {"tokens": batch(0)}}

    def task(update: np.ndarray) -> AuditTask:
        blobs["u"] = decode(update_blob(update.astype(np.float32), m.merge.wire_dtype))[0]
        ref = lambda name: BlobRef(url=name, sha256="0" * 64, size=0)  # noqa: E731
        return AuditTask(
            audit_id=1, kind="merge", run_id="r", manifest=m, stage=tail, backend="torch-cpu",
            update=ref("u"), pipeline=[ref("w0"), ref("w1"), ref("w2")], heldout=ref("held"),
        )  # fmt: skip

    def fetch(ref):
        return blobs[ref.url]

    good, bad = judge_merge(task(honest), stages, fetch), judge_merge(task(ascent), stages, fetch)
    assert good.passed, good.detail
    assert not bad.passed, bad.detail
    assert bad.loss is not None and good.loss is not None and bad.loss > good.loss
