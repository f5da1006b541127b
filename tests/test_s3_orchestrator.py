"""The orchestrator with `--blob-store s3://...` on a real SeaweedFS: it hands out presigned URLs, serves
no blob bytes itself, and checks each upload's sha256 and size when the report about it comes.

A real orchestrator serves in this process (tests/inprocess_orchestrator.py); simulated workers
(tests/simworker.py) play the protocol with the worker's own client.

    .venv/bin/python -m pytest -q tests/test_s3_orchestrator.py
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import requests
from inprocess_orchestrator import InProcessOrchestrator, until
from iota_orchestrator.s3blobs import S3Store
from simworker import SimWorker

from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.protocol import INLINE_MAX
from iota_cli.swarm.corpus import write_corpus
from iota_cli.train.api import SwarmApi

ADMIN = "admin-for-s3-tests"


@pytest.fixture(scope="module")
def orch(seaweed, tmp_path_factory) -> Iterator[InProcessOrchestrator]:
    base = tmp_path_factory.mktemp("s3-orch")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in seaweed.env().items():
            mp.setenv(k, v)
        with InProcessOrchestrator(base / "data", ADMIN, tick_s=0.1, blob_store=seaweed.spec()) as o:
            o.corpus = write_corpus(base / "text", files=2, words=3000)
            o.data_dir = base / "data"
            yield o


def store(orch: InProcessOrchestrator) -> S3Store:
    assert orch.state is not None and isinstance(orch.state.blobs, S3Store)
    return orch.state.blobs


def make_run(orch: InProcessOrchestrator, **trust: float) -> str:
    m = tiny_manifest(str(orch.corpus))
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        return admin.create_run(replace(m, trust=replace(m.trust, **trust))).run_id


def pinned(orch: InProcessOrchestrator, run_id: str, stage: int, name: str) -> SimWorker:
    w = SimWorker(orch.url, name).register()
    w.assign(run_id, stage=stage)
    return w


def credits(w: SimWorker) -> float:
    return sum(c.total for c in w.api.run_status(w.run_id).credits)


def complete(w: SimWorker, item: dict, sha: str, size: int) -> requests.Response:
    return w.request("POST", f"/v1/work/{item['work_id']}/complete", json={"sha256": sha, "size": size})


def test_it_hands_out_presigned_urls_and_serves_no_blob_bytes(orch, seaweed):
    run_id = make_run(orch)
    head = pinned(orch, run_id, 0, "head")
    weights = head.assigned.weights
    assert weights.url.startswith(seaweed.endpoint + "/"), weights.url
    assert hashlib.sha256(head.download(weights.model_dump())).hexdigest() == weights.sha256
    item = head.claim(inline_max=INLINE_MAX)  # asked for, but an object store carries no bytes here
    assert item is not None
    for ref in (item["tokens"], item["upload"]):
        assert ref["url"].startswith(seaweed.endpoint + "/") and "X-Amz-Signature=" in ref["url"]
    assert item["tokens"]["data"] is None and item["upload"]["inline_max"] == 0
    data = head.boundary_tensor("activations")
    inline = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "data": base64.b64encode(data).decode(),
    }
    r = head.request("POST", f"/v1/work/{item['work_id']}/complete", json=inline)
    assert r.status_code == 400 and "object store" in r.json()["detail"], r.text
    key = f"runs/{run_id}/weights/0/e0.safetensors"
    for method in ("GET", "PUT", "HEAD"):
        r = head.request(method, f"/v1/blobs/{key}?exp=9999999999&sig={'0' * 40}", data=b"x")
        assert r.status_code == 404, (method, r.status_code)
    assert "object store" in head.request("GET", f"/v1/blobs/{key}?exp=1&sig=1").json()["detail"]
    assert not (orch.data_dir / "blobs").exists(), "no blob is kept in the data dir"


def test_a_result_with_the_wrong_sha256_or_size_is_refused_at_complete_and_not_counted(orch):
    run_id = make_run(orch)
    head = pinned(orch, run_id, 0, "head")
    item = head.claim()
    data = head.boundary_tensor("activations")
    sha = hashlib.sha256(data).hexdigest()
    r = complete(head, item, sha, len(data))
    assert r.status_code == 400 and "no result uploaded" in r.json()["detail"], r.text
    head.upload(item["upload"], data)
    for bad_sha, bad_size in (("0" * 64, len(data)), (sha, len(data) + 1)):
        r = complete(head, item, bad_sha, bad_size)
        assert r.status_code == 400 and "not what you sent" in r.json()["detail"], r.text
    assert credits(head) == 0, "a refused result earns nothing"
    # The bytes a worker sent were damaged on the way: the store holds other bytes than it reports.
    head.upload(item["upload"], data[:-1] + bytes([data[-1] ^ 1]))
    assert complete(head, item, sha, len(data)).status_code == 400
    assert credits(head) == 0
    head.upload(item["upload"], data)  # sent again, whole: the item was still the worker's
    assert complete(head, item, sha, len(data)).status_code == 200
    assert credits(head) > 0


def test_an_oversized_result_is_refused_at_complete(orch):
    run_id = make_run(orch)
    head = pinned(orch, run_id, 0, "head")
    item = head.claim()
    limit = item["upload"]["max_size"]
    head.upload(item["upload"], b"\0" * (limit + 1))  # a presigned PUT cannot bound its size
    r = complete(head, item, "0" * 64, limit + 1)
    assert r.status_code == 413, r.text
    assert credits(head) == 0
    key = f"incoming/runs/{run_id}/"
    listed = store(orch).s3.list_objects_v2(Bucket=store(orch).bucket, Prefix=store(orch).prefix + key)
    assert listed.get("KeyCount", 0) == 0, "the oversized upload is deleted"


def test_an_accepted_result_cannot_be_replaced_and_a_repeated_complete_counts_once(orch):
    run_id = make_run(orch)
    head, mid = pinned(orch, run_id, 0, "head"), pinned(orch, run_id, 1, "mid")
    item = head.claim()
    data = head.boundary_tensor("activations")
    sha = head.upload(item["upload"], data)
    first = complete(head, item, sha, len(data)).json()["total_credits"]
    # The upload URL still lives: the worker uploads other bytes and reports again.
    other = b"\1" * len(data)
    head.upload(item["upload"], other)
    for again in (other, data):
        total = complete(head, item, hashlib.sha256(again).hexdigest(), len(again)).json()["total_credits"]
        assert total == first, "credited once"
    # The next stage downloads exactly the accepted bytes, from the store.
    nxt = mid.claim()
    assert nxt is not None and nxt["input"]["sha256"] == sha
    assert mid.download(nxt["input"]) == data


def test_a_sample_goes_through_every_stage_and_its_blobs_are_collected(orch):
    run_id = make_run(orch, verdict_timeout_s=1.0)  # no validator here: its checks lapse at once
    workers = [pinned(orch, run_id, s, f"s{s}") for s in range(3)]
    for _ in range(6):  # forward 0, 1, 2 (the tail's forward and backward), backward 1, 0
        for w in workers:
            if (item := w.claim()) is not None:
                w.do(item)
    assert workers[0].api.run_status(run_id).tokens_processed > 0
    s = store(orch)

    def of_sample_0() -> list[str]:
        """Sample 0's objects: its token batch, activations and gradients (it was carried through)."""
        listed = s.s3.list_objects_v2(Bucket=s.bucket, Prefix=f"{s.prefix}blobs/runs/{run_id}/")
        names = [o["Key"].removeprefix(f"{s.prefix}blobs/runs/{run_id}/") for o in listed["Contents"]]
        return [n for n in names if n.startswith(("tokens/0.", "act/0/", "grad/0/"))]

    until(lambda: not of_sample_0(), 20, "the reaper to delete the finished chain's objects")
    listed = s.s3.list_objects_v2(Bucket=s.bucket, Prefix=f"{s.prefix}incoming/runs/{run_id}/")
    assert listed.get("KeyCount", 0) == 0, "every upload was taken in"
    assert not list(Path(s.cache.root).glob("*.part")), "no half-written copy left behind"
