"""SwarmApi, the typed protocol calls, against a scripted HTTP server on 127.0.0.1.

What the facade itself decides: request bodies from the protocol models, replies parsed into them,
which calls wait for a busy server and which give up at once, and ids kept to one path segment.
The whole protocol against the real orchestrator is exercised by test_worker.py and the API tests.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from fake_http import Server, fast_client, free_port, ok, sequence, status

from iota_cli.core.protocol import ClaimRequest, Health, Heartbeat, WorkComplete, WorkItem
from iota_cli.train.api import Claim, SwarmApi
from iota_cli.train.errors import ApiError, Unreachable

ITEM = {
    "work_id": "w7",
    "kind": "forward",
    "stage": 0,
    "sample_id": 3,
    "tokens": {"url": "/v1/blobs/t?exp=1&sig=x", "sha256": "0" * 64, "size": 10},
    "deadline_s": 30.0,
}


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


def api(url: str, **kw) -> SwarmApi:
    return SwarmApi(fast_client(url, on_wait=lambda m, s: None, **kw))


def no_work(run_state: str) -> object:
    # Header names in lower case, as ASGI servers send them.
    return lambda h: h.reply(204, None, {"retry-after": "2", "x-iota-run-state": run_state})


def test_claim_sends_the_request_model_and_reads_items_and_the_runs_end(server):
    server.routes["/v1/work/claim"] = sequence(ok(ITEM), no_work("running"), no_work("finished"))
    a = api(server.url)
    request = ClaimRequest(run_id="r1", wait_s=1.5, claim_id="c1", inline_max=4096)
    assert a.claim(request) == Claim(WorkItem.model_validate(ITEM))
    assert a.claim(request) == Claim(None, "running", 2.0)
    assert a.claim(request) == Claim(None, "finished", 2.0)
    sent = {"run_id": "r1", "wait_s": 1.5, "claim_id": "c1", "inline_max": 4096}
    assert json.loads(server.bodies[0]) == sent


def test_a_reply_that_does_not_fit_the_protocol_is_an_api_error(server):
    server.routes["/v1/heartbeat"] = ok({"lease_s": 30, "epoch": "seven"})
    with pytest.raises(ApiError, match="does not fit protocol v1") as e:
        api(server.url).heartbeat(Heartbeat(run_id="r1", stage=0))
    assert e.value.status == 200


def test_parting_calls_and_heartbeats_give_up_at_once_work_calls_wait(server):
    for path in ("/v1/heartbeat", "/v1/work/w7/abandon", "/v1/contributors/me/leave"):
        server.routes[path] = status(503)
    a = api(server.url, backoff=(5.0, 10.0))
    t0 = time.monotonic()
    with pytest.raises(Unreachable):
        a.heartbeat(Heartbeat(run_id="r1", stage=0))
    with pytest.raises(Unreachable):
        a.abandon("w7")
    with pytest.raises(Unreachable):
        a.leave()
    assert time.monotonic() - t0 < 2, "none of them waited out the 5 s backoff"
    assert [server.count(p) for p in ("/v1/heartbeat", "/v1/work/w7/abandon")] == [1, 1]
    reply = {"credits": 1.5, "total_credits": 4.0}
    server.routes["/v1/work/w7/complete"] = sequence(status(503), ok(reply))
    done = api(server.url).complete("w7", WorkComplete(size=0))
    assert (done.credits, done.total_credits) == (1.5, 4.0) and server.count("/v1/work/w7/complete") == 2


def test_ids_stay_one_path_segment(server):
    server.routes["/v1/work/..%2Fadmin/complete"] = ok({"credits": 0.0, "total_credits": 0.0})
    api(server.url).complete("../admin", WorkComplete())
    assert server.seen[-1][1] == "/v1/work/..%2Fadmin/complete"


def test_health_is_typed_and_never_waits(server):
    server.routes["/v1/health"] = ok({"status": "ok", "protocol": 1, "version": "9.9"})
    assert api(server.url).health() == Health(status="ok", protocol=1, version="9.9")
    t0 = time.monotonic()
    with pytest.raises(Unreachable):
        api(f"http://127.0.0.1:{free_port()}", backoff=(10, 30)).health()
    assert time.monotonic() - t0 < 5
