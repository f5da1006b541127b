"""Sybil resistance: registering costs something, and claims made at registration steer nothing.

The probe of issue 13 registered 3,000 contributors in 10.6 s from one address, all accepted, and a
claimed `throughput: 1e18` decided where honest newcomers landed. Here, against the real orchestrator
in this process (uvicorn on a loopback port, real HTTP): a flood from one address is held to the
configured rate (429 with Retry-After past the burst, which the contributor's client waits out), an
invite is required where the operator asks for one, and newcomers land where they would have landed
had the fakes claimed nothing special.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import replace

import pytest
import requests
from inprocess_orchestrator import InProcessOrchestrator
from iota_orchestrator import db, invites, measure
from simworker import SimWorker
from sqlalchemy import create_engine, insert

from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.protocol import RegisterRequest
from iota_cli.swarm.corpus import write_corpus
from iota_cli.swarm.orchestrator import OrchestratorProcess
from iota_cli.train.api import SwarmApi
from iota_cli.train.client import Client

ADMIN = "admin-token-for-sybil-tests"
BURST, RATE = 5, 2.0
FLOOD = 60


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "text")


def register(url: str, token: str | None = None, **body) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"{url}/v1/contributors", json={"name": "x", **body}, headers=headers, timeout=30)


def make_run(url: str, corpus) -> str:
    m = tiny_manifest(str(corpus))
    m = replace(m, train=replace(m.train, lease_s=600.0))  # nobody heartbeats here; nobody may lapse
    r = requests.post(
        f"{url}/v1/runs",
        json={"manifest": m.to_dict()},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=120,
    )
    assert r.status_code == 201, r.text
    return r.json()["run_id"]


def test_a_flood_from_one_address_is_held_to_the_rate(tmp_path):
    with (
        InProcessOrchestrator(tmp_path / "orch", ADMIN, register_burst=BURST, register_rate=RATE) as orch,
        requests.Session() as s,
    ):
        start = time.monotonic()
        replies = [s.post(f"{orch.url}/v1/contributors", json={"name": f"sybil-{i}"}) for i in range(FLOOD)]
        elapsed = time.monotonic() - start
        accepted = [r for r in replies if r.status_code == 201]
        refused = [r for r in replies if r.status_code == 429]
        assert len(accepted) + len(refused) == FLOOD, {r.status_code for r in replies}
        # A bucket of BURST that refills at RATE a second admits at most this many in `elapsed`.
        assert BURST <= len(accepted) <= BURST + RATE * elapsed + 1, (len(accepted), elapsed)
        assert len(refused) > FLOOD / 2, "most of the flood is refused"
        for r in refused:
            assert int(r.headers["Retry-After"]) >= 1
            assert "too many registrations" in r.json()["detail"]

        # Another address has a bucket of its own (Linux answers all of 127/8 on loopback).
        conn = http.client.HTTPConnection("127.0.0.1", int(orch.url.rsplit(":", 1)[1]), timeout=30)
        conn.source_address = ("127.0.0.2", 0)
        conn.request(
            "POST",
            "/v1/contributors",
            json.dumps({"name": "neighbour"}),
            {"Content-Type": "application/json"},
        )
        assert conn.getresponse().status == 201
        conn.close()

        # The operator's own registrations (the admin token: `iota swarm`) are not limited.
        assert register(orch.url, ADMIN).status_code == 201

        # The contributor's client waits out the 429 (its Retry-After) and then registers.
        waits: list[str] = []
        with Client(orch.url, max_wait_s=30.0, on_wait=lambda msg, _s: waits.append(msg)) as c:
            reply = SwarmApi(c).register(RegisterRequest(name="patient"))
        assert reply.token and any("HTTP 429" in w for w in waits), waits


def test_an_invite_is_required_where_the_operator_asks(tmp_path):
    with InProcessOrchestrator(tmp_path / "orch", ADMIN, invite="open-sesame") as orch:
        for body in ({}, {"invite": "guess"}):
            r = register(orch.url, **body)
            assert r.status_code == 403 and "invite" in r.json()["detail"], r.text
        assert register(orch.url, invite="open-sesame").status_code == 201
        assert register(orch.url, ADMIN).status_code == 201, "the operator needs no invite"
        assert register(orch.url, "not-the-admin").status_code == 403


def test_the_invite_is_kept_private(tmp_path, monkeypatch):
    invite, path = invites.ensure(tmp_path, None)
    assert path == tmp_path / "invite" and path.read_text().strip() == invite
    assert path.stat().st_mode & 0o777 == 0o600
    assert invites.ensure(tmp_path, None) == (invite, path), "kept across restarts"
    assert invites.ensure(tmp_path, "from-env") == ("from-env", None)
    assert invites.valid(invite, invite) and not invites.valid(invite, "") and not invites.valid(invite, "x")


def test_serve_takes_the_limits_and_the_invite(tmp_path):
    """`iota orchestrator serve` as an operator runs it: the flags reach it, the invite stays private."""
    args = ("--invite-required", "--register-burst", "3", "--register-rate", "0.1")
    with OrchestratorProcess(tmp_path / "data", admin_token=ADMIN, extra_args=args) as orch:
        invite = (tmp_path / "data" / "invite").read_text().strip()
        log = "\n".join(orch.lines)
        assert str(tmp_path / "data" / "invite") in log and invite not in log
        assert register(orch.url).status_code == 403
        # A refused invite drew from the bucket too (guessing invites is as slow as registering).
        assert [register(orch.url, invite=invite).status_code for _ in range(2)] == [201, 201]
        r = register(orch.url, invite=invite)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 5, "0.1 a second: 10 s a token"


def placements(url: str, run_id: str, fake_claim: float) -> tuple[list[int], list[int]]:
    """Two fakes claiming fake_claim join first, then five honest newcomers: everyone's stage."""
    fakes = [SimWorker(url, f"fake{i}", throughput=fake_claim).register() for i in range(2)]
    fake_stages = [w.assign(run_id)["stage"] for w in fakes]
    honest = [SimWorker(url, f"honest{i}", throughput=10.0).register() for i in range(5)]
    return fake_stages, [w.assign(run_id)["stage"] for w in honest]


def test_a_claimed_throughput_does_not_place_newcomers(tmp_path, corpus):
    with InProcessOrchestrator(tmp_path / "orch", ADMIN) as orch:
        claimed = placements(orch.url, make_run(orch.url, corpus), fake_claim=1e18)
        control = placements(orch.url, make_run(orch.url, corpus), fake_claim=10.0)
    assert claimed == control, "the fakes' claim of 1e18 moved the honest newcomers"
    # Believing the claim would have sent every newcomer to the one stage without a fake.
    assert len(set(control[1])) > 1, control


def test_placement_throughput_is_measured_from_credited_work():
    engine = create_engine("sqlite://")
    db.metadata.create_all(engine)
    now = 10_000.0
    rows = []
    for i in range(10):  # "fast": 10 items of 100 GFLOP, one a second, the last just now
        rows.append(("fast", f"f{i}", 100.0, now - 9 + i))
    for i in range(10):  # "slow": the same items, one every 10 s
        rows.append(("slow", f"s{i}", 100.0, now - 90 + 10 * i))
    rows.append(("new", "n0", 1e12, now))  # one item is not a measurement
    rows.append(("stale", "o0", 100.0, now - 2 * measure.WINDOW_S))
    rows.append(("stale", "o1", 100.0, now - 2 * measure.WINDOW_S))
    rows.append(("stale", "o2", 100.0, now - 2 * measure.WINDOW_S))
    with engine.begin() as conn:
        for cid, work_id, credits, t in rows:
            conn.execute(
                insert(db.ledger).values(
                    run_id="r", contributor_id=cid, work_id=work_id, kind="forward",
                    stage=0, tokens=1, credits=credits, t=t,
                )
            )  # fmt: skip
        assert measure.rate(conn, "fast", now) == pytest.approx(900 / 9)
        assert measure.rate(conn, "slow", now) == pytest.approx(900 / 90)
        assert measure.rate(conn, "new", now) is None
        assert measure.rate(conn, "stale", now) is None
        got = measure.rates(conn, ["fast", "slow", "new", "stale", "never"], now)
    median = (900 / 9 + 900 / 90) / 2
    assert got == pytest.approx(
        {"fast": 100.0, "slow": 10.0, "new": median, "stale": median, "never": median}
    )
