"""The orchestrator as a real process on a loopback port, driven over HTTP with requests.

One server serves every test in this module; each test creates its own run (with its own timings).
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import requests
from simworker import SimWorker

from iota_cli.core.flat import FlatLayout
from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.protocol import INLINE_MAX
from iota_cli.core.tensors import RawTensor, decode, encode
from iota_cli.swarm.corpus import write_corpus
from iota_cli.swarm.orchestrator import OrchestratorProcess, wait_until
from iota_cli.train.errors import ApiError

ADMIN = "admin-token-for-tests"


@pytest.fixture(scope="module")
def orch(tmp_path_factory):
    base = tmp_path_factory.mktemp("orch")
    corpus = write_corpus(base / "text")
    with OrchestratorProcess(base / "data", admin_token=ADMIN, tick_s=0.1) as o:
        o.corpus = corpus
        yield o


def post(orch, path, token=None, **kw):
    headers = kw.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(orch.url + path, headers=headers, timeout=30, **kw)


def make_run(orch, max_samples=0, merge=None, **train):
    m = tiny_manifest(str(orch.corpus), max_samples=max_samples)
    m = replace(m, train=replace(m.train, **train), merge=replace(m.merge, **(merge or {})))
    r = post(orch, "/v1/runs", ADMIN, json={"manifest": m.to_dict()})
    assert r.status_code == 201, r.text
    return r.json()["run_id"]


def pinned(orch, run_id, stage, name="w", **kw):
    w = SimWorker(orch.url, name, **kw).register()
    w.assign(run_id, stage=stage)
    return w


def status(orch, run_id):
    return requests.get(f"{orch.url}/v1/runs/{run_id}/status", timeout=30).json()


def test_health_and_protocol_header(orch):
    r = requests.get(orch.url + "/v1/health")
    assert r.status_code == 200 and r.json()["protocol"] == 1
    r = requests.get(orch.url + "/v1/health", headers={"X-Iota-Protocol": "2"})
    assert r.status_code == 400 and "unsupported protocol" in r.json()["detail"]
    assert requests.get(orch.url + "/v1/health", headers={"X-Iota-Protocol": "1"}).status_code == 200


def test_writes_need_a_token(orch):
    run_id = make_run(orch)
    for path, body in [
        ("/v1/assignment", {"run_id": run_id}),
        ("/v1/heartbeat", {"run_id": run_id, "stage": 0}),
        ("/v1/work/claim", {"run_id": run_id}),
        ("/v1/work/w1/complete", {}),
        ("/v1/work/w1/abandon", {}),
        ("/v1/merge/complete", {"run_id": run_id, "stage": 0, "epoch": 0, "sha256": "0" * 64, "size": 1}),
        ("/v1/contributors/me/leave", {}),
        ("/v1/runs", {"manifest": {}}),
        (f"/v1/runs/{run_id}/stop", {}),
    ]:
        assert post(orch, path, json=body).status_code == 401, path
        assert post(orch, path, "not-a-token", json=body).status_code == 401, path
    w = SimWorker(orch.url).register()
    assert post(orch, "/v1/runs", w.token, json={"manifest": {}}).status_code == 403
    assert requests.get(orch.url + "/v1/contributors/me").status_code == 401


def test_bad_input_is_4xx(orch):
    w = SimWorker(orch.url).register()
    big = {"run_id": "x", "pad": "x" * (2 << 20)}
    assert post(orch, "/v1/work/claim", w.token, json=big).status_code == 413
    r = post(orch, "/v1/work/claim", w.token, data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert post(orch, "/v1/heartbeat", w.token, json={"run_id": "x", "stage": "zero"}).status_code == 422
    assert (
        post(orch, "/v1/heartbeat", w.token, json={"run_id": "x", "stage": 0, "step": 2**70}).status_code
        == 422
    )
    assert post(orch, "/v1/work/claim", w.token, json={"run_id": "no-such-run"}).status_code == 404
    assert post(orch, "/v1/work/../../etc/complete", w.token, json={}).status_code == 404
    assert post(orch, "/v1/work/w99999999/complete", w.token, json={}).status_code == 404
    assert requests.get(orch.url + "/v1/runs/nope/status").status_code == 404
    bad = tiny_manifest(str(orch.corpus)).to_dict()
    bad["model"]["d_model"] = 63
    assert post(orch, "/v1/runs", ADMIN, json={"manifest": bad}).status_code == 422
    empty = tiny_manifest(str(orch.corpus / "missing")).to_dict()
    assert post(orch, "/v1/runs", ADMIN, json={"manifest": empty}).status_code == 422


def test_assignment_fits_memory_balances_and_sticks(orch):
    run_id = make_run(orch)
    workers = [SimWorker(orch.url, f"n{i}", throughput=100.0).register() for i in range(3)]
    stages = [w.assign(run_id)["stage"] for w in workers]
    assert sorted(stages) == [0, 1, 2], "the first three workers cover every stage"
    assert [w.assign(run_id)["stage"] for w in workers] == stages, "assignments are sticky"
    assert workers[0].call("GET", "/v1/contributors/me")["assignment"]["stage"] == stages[0]
    # A newcomer goes where capacity (throughput per unit of stage compute) is lowest: the body, which
    # has two layers where the head and tail have one. Nobody here has done work, so every worker counts
    # as the same newcomer whatever it claims (placement uses measured throughput, measure.py): the
    # claims of 100 and 1e18 below change nothing; tests/test_sybil.py holds that against a control.
    fast = SimWorker(orch.url, "fast", throughput=1e18).register()
    assert fast.assign(run_id)["stage"] == 1
    tiny = SimWorker(orch.url, "tiny", memory_bytes=1000).register()
    r = tiny.request("POST", "/v1/assignment", json={"run_id": run_id, **tiny.caps()})
    assert r.status_code == 409 and "fits" in r.json()["detail"]


def test_pipeline_routes_backward_to_its_forward_worker_first(orch):
    run_id = make_run(orch, max_inflight_per_head=2)
    h1, h2 = pinned(orch, run_id, 0, "h1"), pinned(orch, run_id, 0, "h2")
    body, tail = pinned(orch, run_id, 1, "body"), pinned(orch, run_id, 2, "tail")
    paid = {w.name: 0.0 for w in (h1, h2, body, tail)}

    def run(w, item):
        reply = w.do(item)
        paid[w.name] += reply["credits"]
        return reply

    a, b = h1.claim(), h2.claim()
    assert a["kind"] == b["kind"] == "forward" and a["tokens"] and a["input"] is None
    assert a["sample_id"] != b["sample_id"]
    run(h1, a)
    run(h2, b)
    for _ in range(2):
        item = body.claim()
        assert item["kind"] == "forward" and item["stage"] == 1 and item["input"]
        run(body, item)
    for _ in range(2):
        item = tail.claim()
        assert item["stage"] == 2 and item["tokens"] and item["input"]
        run(tail, item)
    run(h1, h1.claim())  # a third sample: forward work now waits on the body stage
    item = body.claim()
    assert item["kind"] == "backward" and item["sample_id"] == a["sample_id"], "backward work goes first"
    run(body, item)
    other = h2.claim()
    assert not (other and other["kind"] == "backward"), "backward work only goes to the forward's worker"
    back = h1.claim()
    assert back["kind"] == "backward" and back["forward_id"] == a["work_id"] and back["upload"]
    assert post(orch, f"/v1/work/{back['work_id']}/complete", h2.token, json={}).status_code == 403
    no_proof = post(orch, f"/v1/work/{back['work_id']}/complete", h1.token, json={})
    assert no_proof.status_code == 400, "the head's backward needs its proof of work"
    proof = h1.proof()
    sha = h1.upload(back["upload"], proof)
    first = h1.complete(back, sha, len(proof))
    paid["h1"] += first["credits"]
    assert h1.complete(back, sha, len(proof)) == first, "completing twice returns the first answer"
    st = status(orch, run_id)
    assert st["samples_completed"] == 1 and st["tokens_processed"] == 2 * 8 * 64
    for w in (h1, h2, body, tail):
        credits = requests.get(f"{orch.url}/v1/contributors/{w.contributor_id}/credits").json()
        assert credits["total"] == pytest.approx(paid[w.name], rel=1e-6) and credits["total"] > 0
    assert paid["tail"] > paid["body"] / 2, "the tail's forward includes its backward"


def test_blob_uploads_are_checked(orch):
    run_id = make_run(orch)
    h = pinned(orch, run_id, 0, "h")
    item = h.claim()
    url = orch.url + item["upload"]["url"]
    good = h.boundary_tensor("activations")
    sha = hashlib.sha256(good).hexdigest()
    r = requests.put(url, data=good, headers={"X-Iota-Sha256": "0" * 64})
    assert r.status_code == 400 and "mismatch" in r.json()["detail"]
    assert (
        post(
            orch, f"/v1/work/{item['work_id']}/complete", h.token, json={"sha256": sha, "size": len(good)}
        ).status_code
        == 400
    )
    too_big = b"x" * (item["upload"]["max_size"] + 1)
    r = requests.put(url, data=too_big, headers={"X-Iota-Sha256": hashlib.sha256(too_big).hexdigest()})
    assert r.status_code == 413
    assert (
        requests.put(url.replace("sig=", "sig=0"), data=good, headers={"X-Iota-Sha256": sha}).status_code
        == 403
    )
    assert requests.put(url.split("?")[0], data=good, headers={"X-Iota-Sha256": sha}).status_code == 401
    assert requests.get(orch.url + "/v1/blobs/a/../../orchestrator.sqlite3?exp=1&sig=x").status_code in (
        400,
        404,
    )
    wrong = encode({"activations": RawTensor("F32", (8, 64, 3), bytes(8 * 64 * 3 * 4))})
    assert (
        requests.put(
            url, data=wrong, headers={"X-Iota-Sha256": hashlib.sha256(wrong).hexdigest()}
        ).status_code
        == 201
    )
    r = post(
        orch,
        f"/v1/work/{item['work_id']}/complete",
        h.token,
        json={"sha256": hashlib.sha256(wrong).hexdigest(), "size": len(wrong)},
    )
    assert r.status_code == 422 and "activations" in r.json()["detail"]
    assert requests.put(url, data=good, headers={"X-Iota-Sha256": sha}).status_code == 201, (
        "a rejected upload is replaced"
    )
    assert requests.put(url, data=good, headers={"X-Iota-Sha256": sha}).status_code == 200, (
        "the same bytes again"
    )
    assert h.complete(item, sha, len(good))["credits"] > 0
    r = requests.put(url, data=wrong, headers={"X-Iota-Sha256": hashlib.sha256(wrong).hexdigest()})
    assert r.status_code == 409, "an accepted blob never changes"
    tokens = item["tokens"]
    full = requests.get(orch.url + tokens["url"])
    assert full.status_code == 200 and hashlib.sha256(full.content).hexdigest() == tokens["sha256"]
    assert full.headers["ETag"] == f'"{tokens["sha256"]}"'
    part = requests.get(orch.url + tokens["url"], headers={"Range": "bytes=100-"})
    assert part.status_code == 206 and part.content == full.content[100:]
    assert part.headers["Content-Range"] == f"bytes 100-{len(full.content) - 1}/{len(full.content)}"
    over = requests.get(orch.url + tokens["url"], headers={"Range": f"bytes={len(full.content)}-"})
    assert over.status_code == 416
    t, _ = decode(full.content)
    assert t["tokens"].dtype == "I32" and t["tokens"].shape == (8, 65)


def test_small_blobs_come_inline_in_the_claim_and_the_complete(orch):
    """Asked for, a claim's inputs carry their bytes and a result may come in its complete: two round
    trips an item, not four. The bytes are checked as an upload's are, and the URLs still serve them."""
    run_id = make_run(orch)
    h, b = pinned(orch, run_id, 0, "h"), pinned(orch, run_id, 1, "b")
    item = h.claim(inline_max=INLINE_MAX)
    tokens = item["tokens"]
    inline = base64.b64decode(tokens["data"])
    assert hashlib.sha256(inline).hexdigest() == tokens["sha256"] and len(inline) == tokens["size"]
    assert h.download({**tokens, "data": None}) == inline, "the URL serves the same bytes"
    assert 0 < item["upload"]["inline_max"] <= item["upload"]["max_size"]
    good = h.boundary_tensor("activations")
    sha = hashlib.sha256(good).hexdigest()
    path = f"/v1/work/{item['work_id']}/complete"
    lying = {"sha256": "0" * 64, "size": len(good), "data": base64.b64encode(good).decode()}
    r = post(orch, path, h.token, json=lying)
    assert r.status_code == 400 and "hashes to" in r.json()["detail"]
    r = post(orch, path, h.token, json={"sha256": sha, "size": len(good), "data": "not base64!"})
    assert r.status_code == 400
    wrong = encode({"activations": RawTensor("F32", (8, 64, 3), bytes(8 * 64 * 3 * 4))})
    with pytest.raises(ApiError) as e:
        h.complete(item, hashlib.sha256(wrong).hexdigest(), len(wrong), data=wrong)
    assert e.value.status == 422, "read and checked as an uploaded result is"
    first = h.complete(item, sha, len(good), data=good)
    assert first["credits"] > 0
    assert h.complete(item, sha, len(good), data=good) == first, "a repeated complete counts once"
    other = h.complete(item, hashlib.sha256(wrong).hexdigest(), len(wrong), data=wrong)
    assert other == first, "done: the answer stands and the accepted result is kept"
    plain = b.claim()  # not asked for: URLs only, as an older worker gets
    assert plain["input"]["data"] is None and b.download(plain["input"]) == good


def test_silent_worker_is_dropped_forward_reissued_backward_discarded(orch):
    run_id = make_run(orch, lease_s=1.0)
    a, b = pinned(orch, run_id, 0, "a"), pinned(orch, run_id, 0, "b")
    body, tail = pinned(orch, run_id, 1, "body"), pinned(orch, run_id, 2, "tail")
    first = a.claim()
    a.do(first)
    body.do(body.claim())
    tail.do(tail.claim())  # backward for stage 1 is now queued for `body`
    held = a.claim()  # a claims a second sample, then a and body go silent
    assert held["kind"] == "forward"
    end, told = time.monotonic() + 2.5, []
    while time.monotonic() < end:
        b.heartbeat()
        told += tail.heartbeat()["drop"]
        time.sleep(0.2)
    alive = {w["name"]: w["alive"] for s in status(orch, run_id)["stages"] for w in s["workers"]}
    assert alive == {"a": False, "b": True, "body": False, "tail": True}
    again = b.claim()
    assert again["sample_id"] == held["sample_id"] and again["work_id"] != held["work_id"], (
        "forward work re-issued"
    )
    late = a.request("POST", f"/v1/work/{held['work_id']}/complete", json={"sha256": None, "size": 0})
    assert late.status_code == 409
    st = status(orch, run_id)
    assert st["samples_dropped"] == 1 and st["stages"][1]["queue_backward"] == 0
    assert told == [first["sample_id"]], "workers that ran the dropped sample are told, once"
    assert a.heartbeat()["drop"] == [first["sample_id"]]
    assert a.heartbeat()["drop"] == []


def test_item_past_its_deadline_is_reissued(orch):
    run_id = make_run(orch, work_timeout_s=0.5)
    slow, quick = pinned(orch, run_id, 0, "slow"), pinned(orch, run_id, 0, "quick")
    held = slow.claim()
    assert wait_until(lambda: status(orch, run_id)["stages"][0]["queue_forward"] == 1, timeout=5)
    again = quick.claim()
    assert again["sample_id"] == held["sample_id"]
    data = slow.boundary_tensor("activations")
    r = requests.put(
        orch.url + held["upload"]["url"],
        data=data,
        headers={"X-Iota-Sha256": hashlib.sha256(data).hexdigest()},
    )
    assert r.status_code == 201
    late = slow.request(
        "POST",
        f"/v1/work/{held['work_id']}/complete",
        json={"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)},
    )
    assert late.status_code == 409 and "re-issued" in late.json()["detail"]
    assert quick.do(again)["credits"] > 0


def test_merge_round_averages_replicas_updates(orch):
    run_id = make_run(orch, merge={"interval": 2, "strategy": "average"})
    r1, r2 = pinned(orch, run_id, 1, "r1"), pinned(orch, run_id, 1, "r2")
    head, tail = pinned(orch, run_id, 0, "head"), pinned(orch, run_id, 2, "tail")
    assert r1.heartbeat()["merge"] is None and r2.heartbeat()["merge"] is None
    r1.step = 2
    assert r1.heartbeat()["merge"] is None, "a reported step opens no round: counted work does"
    for _ in range(4):  # interval 2 x backward_per_step 2 passes, carried by r1 forward and back
        for w in (head, r1, tail, r1, head):
            w.do(w.claim())
    offer = r1.heartbeat()["merge"]
    assert offer and offer["epoch"] == 0 and offer["stage"] == 1 and offer["phase"] == "contribute"
    assert r2.heartbeat()["merge"]["epoch"] == 0, "every live replica is asked once a round is open"
    layout = FlatLayout.of(r1.assigned.manifest.model, 1)
    base = layout.flatten(r1.weights())
    with pytest.raises(Exception, match="422"):
        r1.contribute(offer, np.ones(layout.size - 1, np.float32))  # one element short
    fake = {"run_id": run_id, "stage": 1, "epoch": 0, "sha256": "0" * 64, "size": 1}
    assert head.request("POST", "/v1/merge/complete", json=fake).status_code == 403
    assert r1.contribute(offer, np.full(layout.size, 1e-3, np.float32))["accepted"]
    r2.contribute(r2.heartbeat()["merge"], np.full(layout.size, -3e-3, np.float32))
    again = r1.heartbeat()["merge"]  # (the round may be reducing already: then it is asked to reduce)
    assert again is None or again["phase"] == "reduce", "a contributor is not offered the round again"
    done = []
    threads = [threading.Thread(target=lambda w=w: done.append(w.reduce(0, base))) for w in (r1, r2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert sum(done) == 4, "each of the two partitions is reported by both its owners"
    assert wait_until(lambda: r1.heartbeat()["epoch"] == 1, timeout=10)
    merged = layout.flatten(r2.weights())
    np.testing.assert_allclose(merged, base - 1e-3, atol=1e-6)  # the mean weighs by counted work: r2 did none
    with pytest.raises(Exception, match="409"):
        r1.contribute(offer, np.zeros(layout.size, np.float32))
    assert r1.heartbeat()["merge"] is None, "nobody is kicked; the next round waits for the interval"


def alive(workers) -> bool:
    """Heartbeat as live workers do (a drained run ends once each has spoken since)."""
    return all(w.heartbeat() for w in workers)


def test_run_finishes_with_losses_tokens_steps_and_credits(orch):
    run_id = make_run(orch, max_samples=3, merge={"timeout_s": 0.5})
    workers = [pinned(orch, run_id, s, f"s{s}") for s in range(3)]
    for _ in range(40):
        busy = False
        for w in workers:
            item = w.claim()
            if item:
                w.do(item)
                busy = True
        if not busy:
            break
    workers[2].step = 7  # it stepped: the run's last round waits for its update, then gives up on it
    assert wait_until(lambda: alive(workers) and status(orch, run_id)["state"] == "finished", timeout=10)
    st = status(orch, run_id)
    assert st["samples_issued"] == st["samples_completed"] == 3 and st["samples_dropped"] == 0
    assert st["tokens_processed"] == 3 * 8 * 64 and st["losses_reported"] == 3
    assert st["first_loss"] > st["last_loss"] and len(st["recent_losses"]) == 3
    assert st["stages"][2]["optimizer_steps"] == 7
    assert {c["name"] for c in st["credits"]} == {"s0", "s1", "s2"} and all(
        c["total"] > 0 for c in st["credits"]
    )
    r = workers[0].request("POST", "/v1/work/claim", json={"run_id": run_id})
    assert r.status_code == 204 and r.headers["X-Iota-Run-State"] == "finished"
    assert workers[1].heartbeat()["run_state"] == "finished"


def test_long_poll_claim_wakes_when_work_arrives(orch):
    run_id = make_run(orch)
    head, tail = pinned(orch, run_id, 0, "h"), pinned(orch, run_id, 2, "t")
    body = pinned(orch, run_id, 1, "b")
    got = {}

    def wait_for_work():
        t0 = time.monotonic()
        got["item"] = tail.claim(wait_s=20)
        got["s"] = time.monotonic() - t0

    th = threading.Thread(target=wait_for_work)
    th.start()
    time.sleep(0.3)
    head.do(head.claim())
    body.do(body.claim())
    th.join(25)
    assert got["item"] and got["item"]["stage"] == 2
    assert got["s"] < 10, "the claim returned when work was queued, not at the end of its wait"
    t0 = time.monotonic()
    r = head.request("POST", "/v1/work/claim", json={"run_id": run_id, "wait_s": 0.3})
    assert r.status_code in (200, 204) and time.monotonic() - t0 < 5


def test_leave_reissues_forward_work_and_keeps_the_assignment(orch):
    run_id = make_run(orch)
    a, b = pinned(orch, run_id, 0, "a"), pinned(orch, run_id, 0, "b")
    held = a.claim()
    assert a.call("POST", "/v1/contributors/me/leave", json={}) == {"ok": True}
    assert b.claim()["sample_id"] == held["sample_id"]
    assert a.assign(run_id)["stage"] == 0


def test_an_empty_stage_pulls_a_replica_from_a_crowded_one(orch):
    run_id = make_run(orch, lease_s=1.0)
    head, tail = pinned(orch, run_id, 0, "head"), pinned(orch, run_id, 2, "tail")
    b1, b2 = pinned(orch, run_id, 1, "b1"), pinned(orch, run_id, 1, "b2")
    moved = []
    end = time.monotonic() + 6
    while time.monotonic() < end and not moved:  # the tail goes silent; everyone else keeps beating
        for w in (head, b1, b2):
            if w.heartbeat()["reassign"]:
                moved.append(w)
        time.sleep(0.2)
    assert len(moved) == 1 and moved[0] in (b1, b2), "one body replica is asked to move"
    assert moved[0].assign(run_id)["stage"] == 2
    assert not moved[0].heartbeat()["reassign"]
    assert tail.assign(run_id)["stage"] == 2, "the returning tail keeps its sticky stage"


def test_stop_drains_and_finishes_the_run(orch):
    run_id = make_run(orch, merge={"timeout_s": 0.5})
    workers = [pinned(orch, run_id, s, f"s{s}") for s in range(3)]
    workers[0].do(workers[0].claim())
    r = post(orch, f"/v1/runs/{run_id}/stop", ADMIN)
    assert r.status_code == 200 and r.json()["state"] == "running"
    assert workers[0].claim() is None, "no new samples after stop"
    for s in (1, 2, 1, 0):  # body forward, tail, body backward, head backward
        workers[s].do(workers[s].claim())
    assert wait_until(lambda: alive(workers) and status(orch, run_id)["state"] == "finished", timeout=10)
    assert status(orch, run_id)["samples_completed"] == 1
