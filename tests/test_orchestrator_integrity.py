"""Issue 11 on the server: every upload checked, no fault loops forever, fair queues, stopped runs end.

A real orchestrator serves in this process (tests/inprocess_orchestrator.py), so a test can damage the
blob files on its disk and read its database; simulated workers (tests/simworker.py) drive it over HTTP
with the worker's own SwarmApi. Each test creates its own run.

    timeout 600 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_orchestrator_integrity.py
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import replace
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from inprocess_orchestrator import InProcessOrchestrator, until
from iota_orchestrator import chains, db
from simworker import SimWorker
from sqlalchemy import func, inspect, select, text

from iota_cli.core import flat, tensors
from iota_cli.core.flat import FlatLayout
from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.protocol import Abandon
from iota_cli.core.tensors import RawTensor, encode
from iota_cli.swarm.corpus import write_corpus
from iota_cli.train.api import SwarmApi
from iota_cli.train.errors import ApiError, IntegrityError

ADMIN = "admin-for-integrity-tests"
LIMIT = chains.MAX_ITEM_FAILURES


@pytest.fixture(scope="module")
def orch(tmp_path_factory) -> Iterator[InProcessOrchestrator]:
    base = tmp_path_factory.mktemp("integrity")
    with InProcessOrchestrator(base / "data", ADMIN, tick_s=0.1) as o:
        o.corpus = write_corpus(base / "text", files=2, words=3000)
        yield o


def make_run(orch: InProcessOrchestrator, merge: dict | None = None, **train) -> str:
    m = tiny_manifest(str(orch.corpus))
    m = replace(m, train=replace(m.train, **train), merge=replace(m.merge, **(merge or {})))
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        return admin.create_run(m).run_id


def pinned(orch: InProcessOrchestrator, run_id: str, stage: int, name: str) -> SimWorker:
    w = SimWorker(orch.url, name).register()
    w.assign(run_id, stage=stage)
    return w


def status(w: SimWorker):
    return w.api.run_status(w.run_id)


def faults_of(w: SimWorker) -> dict[str, int]:
    found = [ws for s in status(w).stages for ws in s.workers if ws.contributor_id == w.contributor_id]
    return found[0].faults


def stored(orch: InProcessOrchestrator, ref: dict):
    """The file on the orchestrator's disk behind a blob URL."""
    assert orch.state is not None
    return orch.state.blobs.path(unquote(urlsplit(ref["url"]).path.removeprefix("/v1/blobs/")))


def send(w: SimWorker, item: dict, data: bytes, loss: float | None = None):
    """Upload data as the item's result and complete it; the raw reply."""
    sha = w.upload(item["upload"], data)
    body = {"sha256": sha, "size": len(data), "loss": loss}
    return w.request("POST", f"/v1/work/{item['work_id']}/complete", json=body)


def give_back(w: SimWorker, item: dict, reason: str = "stopping") -> None:
    w.api.abandon(item["work_id"], Abandon(reason=reason, detail="test"))  # type: ignore[arg-type]


def tries(orch: InProcessOrchestrator, run_id: str) -> dict[tuple[int, int, str], int]:
    """Work rows per (sample, stage, kind): how often each item was issued."""
    assert orch.state is not None
    W = db.work
    with orch.state.tx() as conn:
        rows = conn.execute(
            select(W.c.sample_id, W.c.stage, W.c.kind, func.count())
            .where(W.c.run_id == run_id)
            .group_by(W.c.sample_id, W.c.stage, W.c.kind)
        ).all()
    return {(s, st, k): n for s, st, k, n in rows}


def activations(w: SimWorker, fill: float) -> bytes:
    m = w.assigned.manifest
    shape = (m.train.batch_size, m.train.seq_len, m.model.bottleneck_dim)
    a = np.full(shape, fill, dtype="<f4")
    return encode({"activations": RawTensor("F32", shape, a.tobytes())})


def container(header: str, data: bytes) -> bytes:
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def malformed(w: SimWorker) -> dict[str, bytes]:
    m = w.assigned.manifest
    shape = [m.train.batch_size, m.train.seq_len, m.model.bottleneck_dim]
    n = math.prod(shape) * 4
    entry = {"dtype": "F32", "shape": shape, "data_offsets": [0, n]}
    good = json.dumps({"activations": entry})
    return {
        "float data_offsets": container(good.replace(f"[0, {n}]", f"[0.0, {float(n)}]"), bytes(n)),
        "list metadata": container(json.dumps({"__metadata__": [1], "activations": entry}), bytes(n)),
        "deep nesting": container(good[:-1] + ', "x": ' + "[" * 1500 + "]" * 1500 + "}", bytes(n)),
        "shape 1e999": container(good.replace(f"[{shape[0]},", "[1e999,"), bytes(n)),
        "gap": container(good.replace(f"[0, {n}]", f"[8, {n + 8}]"), bytes(n + 8)),
    }


# --- every upload is checked -------------------------------------------------------------------------


def test_non_finite_results_are_refused_charged_and_can_be_corrected(orch):
    run_id = make_run(orch)
    head = pinned(orch, run_id, 0, "head")
    item = head.claim()
    for fill in (math.nan, math.inf, -math.inf):
        r = send(head, item, activations(head, fill))
        assert r.status_code == 422 and "NaN or infinite" in r.json()["detail"], r.text
    assert faults_of(head) == {"rejected": 3}
    assert status(head).credits[0].total == 0, "a refused result earns nothing"
    assert send(head, item, activations(head, 0.5)).status_code == 200, "the item stays claimed"


def test_malformed_headers_are_refused_and_charged(orch):
    run_id = make_run(orch)
    head = pinned(orch, run_id, 0, "head")
    item = head.claim()
    bad = malformed(head)
    for label, data in bad.items():
        r = send(head, item, data)
        assert r.status_code == 422 and "not a valid safetensors" in r.json()["detail"], (label, r.text)
    assert faults_of(head) == {"rejected": len(bad)}


def test_a_non_finite_gradient_and_loss_from_the_tail_are_refused(orch):
    run_id = make_run(orch)
    head, body, tail = (pinned(orch, run_id, s, n) for s, n in enumerate(("h", "b", "t")))
    head.do(head.claim())
    body.do(body.claim())
    item = tail.claim()
    m = tail.assigned.manifest
    shape = (m.train.batch_size, m.train.seq_len, m.model.bottleneck_dim)
    nan = np.zeros(shape, "<f4")
    nan.flat[7] = math.nan
    grad = encode({"grad": RawTensor("F32", shape, nan.tobytes())})
    assert send(tail, item, grad, loss=3.0).status_code == 422
    r = send(tail, item, tail.boundary_tensor("grad"), loss=None)
    assert r.status_code == 422 and "finite loss" in r.json()["detail"]
    assert faults_of(tail) == {"rejected": 2}
    assert send(tail, item, tail.boundary_tensor("grad"), loss=3.0).status_code == 200


def test_non_finite_merge_updates_and_parts_are_refused(orch):
    run_id = make_run(orch, merge={"interval": 1, "strategy": "diloco"}, backward_per_step=1)
    head, tail = pinned(orch, run_id, 0, "head"), pinned(orch, run_id, 2, "tail")
    r0, r1 = pinned(orch, run_id, 1, "r0"), pinned(orch, run_id, 1, "r1")
    r0.heartbeat()
    r1.heartbeat()
    for w in (head, r1, tail, r1, head):  # a round opens from counted work (merge_checks), not a step
        w.do(w.claim())
    offer = r1.heartbeat()["merge"]
    layout = FlatLayout.of(r1.assigned.manifest.model, 1)
    base = layout.flatten(r1.weights())
    update = np.zeros(layout.size, np.float32)
    update[0] = math.inf
    with pytest.raises(ApiError) as e:  # r0's: a non-finite update is a failed check too (and a ban)
        r0.contribute(r0.heartbeat()["merge"], update)
    assert e.value.status == 422 and "NaN or infinite" in e.value.detail
    assert faults_of(r0) == {"rejected": 1, "failed_check": 1}
    wrong = flat.update_blob(np.zeros(layout.size, np.float32), "BF16")  # the run's wire dtype is F32
    with pytest.raises(ApiError) as e:
        r1.contribute(offer, wrong)
    assert e.value.status == 422 and faults_of(r1) == {"rejected": 1}
    assert r1.contribute(offer, np.zeros(layout.size, np.float32))["accepted"]
    plan = until(lambda: (p := r1.plan(0, wait_s=1.0)).state == "reducing" and p, what="the reducing phase")
    (part,) = plan.parts
    assert part.owned and part.upload is not None and part.start == 0 and part.stop == layout.size
    n = part.stop - part.start
    bad = np.zeros(n, np.float32)
    bad[3] = math.nan
    for data in (flat.part_blob(bad, np.zeros(n, np.float32), "F32"), flat.part_blob(base, None, "F32")):
        sha = r1.api.upload(part.upload, data)
        body = {"run_id": run_id, "stage": 1, "epoch": 0, "part": 0, "sha256": sha, "size": len(data)}
        r = r1.request("POST", "/v1/merge/part", json=body)
        assert r.status_code == 422, r.text  # a NaN; then no momentum, which diloco needs
    assert faults_of(r1) == {"rejected": 3}
    assert r1.reduce(0, base) == 1
    until(lambda: r1.heartbeat()["epoch"] == 1, what="epoch 1")


# --- no fault loops forever ----------------------------------------------------------------------------


def test_an_item_given_back_as_bad_input_is_dropped_after_the_limit(orch):
    run_id = make_run(orch)
    head, body = pinned(orch, run_id, 0, "head"), pinned(orch, run_id, 1, "body")
    first = head.claim()
    head.do(first)
    for n in range(LIMIT):
        item = body.claim()
        assert item is not None and item["sample_id"] == first["sample_id"], f"try {n + 1}"
        give_back(body, item, "bad_input")
    assert body.claim() is None, "the chain was dropped: nothing of it is issued again"
    st = status(head)
    assert st.samples_dropped == 1 and st.stages[1].queue_forward == 0
    assert head.heartbeat()["drop"] == [first["sample_id"]], "its head frees what it saved"
    assert faults_of(head) == {"bad_output": LIMIT}, "bad input is charged to whoever produced it"
    assert max(tries(orch, run_id).values()) == LIMIT


def test_an_empty_give_back_means_stopping_and_is_nobodys_fault(orch):
    run_id = make_run(orch)
    head, other = pinned(orch, run_id, 0, "head"), pinned(orch, run_id, 0, "other")
    item = head.claim()
    r = head.request("POST", f"/v1/work/{item['work_id']}/abandon")
    assert r.status_code == 200 and r.json() == {"ok": True}
    again = other.claim()
    assert again["sample_id"] == item["sample_id"], "a given-back item goes to another worker"
    assert faults_of(head) == {} and faults_of(other) == {}


def test_an_item_that_keeps_expiring_is_dropped(orch):
    run_id = make_run(orch, work_timeout_s=0.3)
    head, body = pinned(orch, run_id, 0, "head"), pinned(orch, run_id, 1, "body")
    first = head.claim()
    head.do(first)
    for n in range(LIMIT):  # the lone body worker gets back what it let lapse: nobody else could take it
        item = until(body.claim, what=f"try {n + 1}")
        assert item["sample_id"] == first["sample_id"]
        until(lambda n=n: faults_of(body).get("expired") == n + 1, what=f"lapse {n + 1}")
    until(lambda: status(head).samples_dropped == 1, what="the chain to be dropped")
    assert body.claim() is None and max(tries(orch, run_id).values()) == LIMIT


def test_a_worker_whose_claims_lapse_gets_fewer(orch):
    run_id = make_run(orch, work_timeout_s=1.5, max_inflight_per_head=4, max_claims_per_worker=2)
    head, body = pinned(orch, run_id, 0, "head"), pinned(orch, run_id, 1, "body")
    for _ in range(4):
        head.do(head.claim())
    first = body.claim()
    assert first and body.claim() is None, "a newcomer holds one claim until it delivers"
    body.do(first)
    assert body.claim() and body.claim() and body.claim() is None, "then two claims at once"
    until(lambda: faults_of(body).get("expired") == 2, what="both claims to lapse")
    assert body.claim() is None, "two lapses: no claim at all for a back-off after the latest"
    held = until(body.claim, what="the back-off to end by itself")
    assert body.claim() is None, "then one claim at a time while claims lapse"
    body.do(held)
    assert body.claim() is not None and body.claim() is None, "one lapse is still not made up for"
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        lapses = admin.run_status(run_id)
    assert lapses.stages[1].workers[0].faults == {"expired": 2}


# --- quarantine --------------------------------------------------------------------------------------------


def test_activations_damaged_on_disk_are_quarantined_not_refetched(orch):
    run_id = make_run(orch)
    head, body = pinned(orch, run_id, 0, "head"), pinned(orch, run_id, 1, "body")
    head.do(head.claim())
    item = body.claim()
    path = stored(orch, item["input"])
    path.write_bytes(b"rot" + path.read_bytes()[3:])
    with pytest.raises(IntegrityError):
        body.download(item["input"])
    give_back(body, item, "unverified")
    assert status(head).samples_dropped == 1 and body.claim() is None, "never issued again"
    r = body.request("GET", item["input"]["url"])
    assert r.status_code in (404, 410), "quarantined (410), then collected with its dropped chain (404)"
    assert not path.exists()


def test_a_damaged_token_batch_is_made_again_from_the_corpus(orch):
    run_id = make_run(orch)
    head = pinned(orch, run_id, 0, "head")
    item = head.claim()
    path = stored(orch, item["tokens"])
    good = path.read_bytes()
    path.write_bytes(good[:-4] + b"\xff\xff\xff\x7f")
    give_back(head, item, "unverified")
    again = head.claim()
    assert again["sample_id"] == item["sample_id"] and again["tokens"]["sha256"] == item["tokens"]["sha256"]
    assert head.download(again["tokens"]) == good
    assert head.do(again)["credits"] > 0
    assert status(head).samples_dropped == 0


def test_an_intact_blob_given_back_unverified_is_only_retried(orch):
    run_id = make_run(orch)
    head = pinned(orch, run_id, 0, "head")
    item = head.claim()
    give_back(head, item, "unverified")
    assert head.claim()["sample_id"] == item["sample_id"]
    assert status(head).samples_dropped == 0


def test_damaged_weights_are_rebuilt_or_failed_loudly(orch):
    run_id = make_run(orch, merge={"interval": 1, "timeout_s": 0.5})
    r1 = pinned(orch, run_id, 1, "r1")
    beat = r1.heartbeat()
    epoch0 = r1.download(beat["weights"])
    path0 = stored(orch, beat["weights"])
    path0.write_bytes(epoch0[:100] + bytes(64) + epoch0[164:])
    until(lambda: path0.read_bytes() == epoch0, what="epoch 0 to be made again from the init")
    # A merge makes epoch 1; damaged, it is replaced by a copy of epoch 0 published as epoch 2.
    head, tail = pinned(orch, run_id, 0, "head"), pinned(orch, run_id, 2, "tail")
    for _ in range(2):  # a round opens from counted work (merge_checks): backward_per_step passes
        for w in (head, r1, tail, r1, head):
            w.do(w.claim())
    zeros = np.zeros(FlatLayout.of(r1.assigned.manifest.model, 1).size, np.float32)
    assert r1.merge(r1.heartbeat()["merge"], zeros) == 1
    until(lambda: r1.heartbeat()["epoch"] == 1, what="epoch 1")
    beat = r1.heartbeat()
    path1 = stored(orch, beat["weights"])
    path1.write_bytes(b"\0" * 16 + path1.read_bytes()[16:])
    until(lambda: r1.heartbeat()["epoch"] == 2, what="the copy of epoch 0 as epoch 2")
    assert r1.download(r1.heartbeat()["weights"]) == epoch0
    assert r1.request("GET", beat["weights"]["url"]).status_code == 410
    assert status(r1).stages[1].weights_ok
    # With no intact copy left, the stage's weights fail loudly and a merge round opens to replace them:
    # its owner reduces from its own copy of epoch 2 (the orchestrator's is gone).
    path2 = stored(orch, r1.heartbeat()["weights"])
    path2.write_bytes(b"junk")
    until(lambda: not status(r1).stages[1].weights_ok, what="the weights to fail in the status")
    r1.epoch = 2
    offer = r1.heartbeat()["merge"]
    assert offer is not None and offer["epoch"] == 2
    base = FlatLayout.of(r1.assigned.manifest.model, 1).flatten(tensors.decode(epoch0)[0])
    r1.contribute(offer, zeros)
    assert r1.reduce(2, base) == 1
    until(lambda: status(r1).stages[1].weights_ok and r1.heartbeat()["epoch"] == 3, what="epoch 3")


# --- fair queues -----------------------------------------------------------------------------------------


def test_a_contributor_cannot_hoard_claims_on_a_stage(orch):
    run_id = make_run(orch, max_inflight_per_head=8)
    head = pinned(orch, run_id, 0, "head")
    hoarder, honest = pinned(orch, run_id, 1, "hoarder"), pinned(orch, run_id, 1, "honest")
    for _ in range(8):
        head.do(head.claim())
    first = hoarder.claim()
    assert first and hoarder.claim() is None, "a newcomer holds one claim until it delivers"
    hoarder.do(first)  # proven: from now on max_claims_per_worker = 6
    held = [hoarder.claim() for _ in range(7)]
    assert [h is not None for h in held] == [True] * 6 + [False], "max_claims_per_worker = 6"
    taken = [honest.claim()]
    assert all(taken), "the rest goes to others"
    assert {i["sample_id"] for i in taken}.isdisjoint({i["sample_id"] for i in held if i})


def test_claim_and_abandon_cannot_pass_the_in_flight_cap(orch):
    run_id = make_run(orch, max_inflight_per_head=2)
    honest, looper = pinned(orch, run_id, 0, "honest"), pinned(orch, run_id, 0, "looper")
    for _ in range(2):
        honest.do(honest.claim())
    assert honest.claim() is None, "the honest head is at its cap"
    given = 0
    for _ in range(30):
        item = looper.claim()
        if item is not None:
            give_back(looper, item)
            given += 1
    st = status(honest)
    active = st.samples_issued - st.samples_completed - st.samples_dropped
    assert given >= 1 and active <= 2 * 2, f"{active} samples in flight, over two heads' caps"
    assert max(tries(orch, run_id).values()) <= LIMIT
    # Alone, the looper gets each of its samples back at most LIMIT times.
    alone = make_run(orch, max_inflight_per_head=2)
    solo = pinned(orch, alone, 0, "solo")
    for _ in range(20):
        item = solo.claim()
        if item is not None:
            give_back(solo, item)
    counts = tries(orch, alone)
    assert counts and max(counts.values()) == LIMIT
    assert status(solo).samples_issued - status(solo).samples_dropped <= 2


# --- runs end ------------------------------------------------------------------------------------------


def test_a_stopped_run_with_no_workers_finishes(orch):
    run_id = make_run(orch, lease_s=0.5)
    head = pinned(orch, run_id, 0, "head")
    head.do(head.claim())
    head.claim()  # held when the head goes silent
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        admin.stop_run(run_id)
        assert until(lambda: admin.run_status(run_id).state == "finished", what="the run to finish")
        assert admin.run_status(run_id).samples_dropped == 2


def test_a_stopped_run_drops_what_no_live_worker_can_drain(orch):
    run_id = make_run(orch, merge={"timeout_s": 0.5})
    head = pinned(orch, run_id, 0, "head")  # no body or tail ever comes
    head.do(head.claim())
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        admin.stop_run(run_id)
        until(lambda: head.heartbeat()["run_state"] == "finished", what="the run to finish")


# --- the schema --------------------------------------------------------------------------------------------


def test_a_v2_database_gains_faults_lapses_reasons_and_quarantine(tmp_path):
    engine = db.open_engine(tmp_path / "v2.sqlite3")
    added = [("assignments", "lapses"), ("work", "reason"), ("work", "avoid"), ("blobs", "quarantined")]
    with engine.begin() as conn:
        db.metadata.create_all(conn, tables=[t for t in db.metadata.sorted_tables if t.name != "faults"])
        conn.execute(text("DROP INDEX ix_work_held"))
        for table, column in added:
            conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        row = "INSERT INTO blobs (key, sha256, size, created, sealed) VALUES ('k', 's', 1, 0, 1)"
        conn.execute(text(row))
        db.set_meta(conn, "schema_version", "2")
    assert db.migrate(engine) == db.SCHEMA_VERSION == 6
    found = inspect(engine)
    for table, column in added:
        assert column in {c["name"] for c in found.get_columns(table)}
    assert "faults" in found.get_table_names()
    with engine.connect() as conn:
        assert conn.execute(select(db.blobs.c.quarantined)).scalar_one() is False
    engine.dispose()


def test_a_v3_database_loses_only_its_rounds_in_flight(tmp_path):
    engine = db.open_engine(tmp_path / "v3.sqlite3")
    added = [
        ("merge_rounds", "reducing"),
        ("merge_rounds", "momentum_key"),
        *(("merge_contribs", c) for c in ("sha256", "step", "ledger_mark", "slices")),
    ]
    with engine.begin() as conn:
        db.metadata.create_all(conn, tables=[t for t in db.metadata.sorted_tables if t.name != "merge_parts"])
        for table, column in added:
            conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        for epoch, state in ((0, "closed"), (1, "open")):
            conn.execute(
                text(
                    "INSERT INTO merge_rounds (run_id, stage, epoch, state, opened, deadline, contributions)"
                    f" VALUES ('r', 0, {epoch}, '{state}', 0, 0, 1)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO merge_contribs (run_id, stage, epoch, contributor_id, blob_key, weight, t)"
                    f" VALUES ('r', 0, {epoch}, 'c', 'k{epoch}', 1, 0)"
                )
            )
        db.set_meta(conn, "schema_version", "3")
    assert db.migrate(engine) == db.SCHEMA_VERSION == 6
    found = inspect(engine)
    for table, column in added:
        assert column in {c["name"] for c in found.get_columns(table)}
    assert "merge_parts" in found.get_table_names()
    with engine.connect() as conn:
        assert conn.execute(select(db.merge_rounds.c.epoch, db.merge_rounds.c.state)).all() == [(0, "closed")]
        assert conn.execute(select(db.merge_contribs.c.blob_key)).scalars().all() == ["k0"]
    engine.dispose()
