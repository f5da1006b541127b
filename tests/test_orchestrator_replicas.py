"""Several API replicas on one PostgreSQL: claims no two replicas both win, wakeups that cross replicas, and
a replica killed mid-run that loses nothing acknowledged.

Real `iota orchestrator serve` processes on a throwaway PostgreSQL (tests/pg_server.py), simulated
workers over HTTP (tests/simworker.py). Two `serve` processes on one data dir and one database stand for
two hosts (each reachable at its own address); `serve --workers 3` is three replicas behind one port.
    .venv/bin/python -m pytest -q tests/test_orchestrator_replicas.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from iota_orchestrator import db
from iota_orchestrator.leader import Leader
from iota_orchestrator.state import ServerConfig, connect, prepare
from simworker import SimWorker
from sqlalchemy import insert
from sqlalchemy.exc import DBAPIError

from iota_cli.core.manifest import tiny_manifest
from iota_cli.swarm.corpus import write_corpus
from iota_cli.swarm.orchestrator import OrchestratorProcess, wait_until
from iota_cli.train.api import SwarmApi
from iota_cli.train.client import Client

ADMIN = "admin-for-replica-tests"


def serve(data_dir: Path, database: str, *args: str, tick_s: float = 0.2) -> OrchestratorProcess:
    return OrchestratorProcess(
        data_dir, admin_token=ADMIN, tick_s=tick_s, extra_env={"IOTA_DATABASE": database}, extra_args=args
    ).start()


def make_run(url: str, corpus: Path, **train: Any) -> str:
    m = tiny_manifest(str(corpus))
    m = replace(m, train=replace(m.train, **train))
    with SwarmApi.connect(url, ADMIN) as admin:
        return admin.create_run(m).run_id


def pinned(url: str, run_id: str, stage: int, name: str) -> SimWorker:
    w = SimWorker(url, name).register()
    w.assign(run_id, stage=stage)
    return w


@pytest.fixture(scope="module")
def two_hosts(
    tmp_path_factory, postgres_server
) -> Iterator[tuple[OrchestratorProcess, OrchestratorProcess, Path]]:
    """Two serve processes sharing one data dir (the blobs) and one database; a long tick, so only a
    wakeup, never the reaper, can end a long-poll early."""
    base = tmp_path_factory.mktemp("hosts")
    database = postgres_server.create_database()
    a = serve(base / "data", database, tick_s=3600)
    b = serve(base / "data", database, tick_s=3600)
    try:
        yield a, b, write_corpus(base / "text", files=2, words=3000)
    finally:
        a.stop()
        b.stop()


def test_claims_racing_on_two_replicas_never_both_win(two_hosts):
    a, b, corpus = two_hosts
    run_id = make_run(a.url, corpus, max_inflight_per_head=12)
    head = pinned(a.url, run_id, 0, "head")
    bodies = [pinned((a, b)[i % 2].url, run_id, 1, f"body{i}") for i in range(6)]
    got: dict[str, list[str]] = defaultdict(list)  # work id -> who it was handed to
    lock, start = threading.Lock(), threading.Barrier(len(bodies) + 1)

    def claim_all(w: SimWorker) -> None:
        start.wait()
        while (item := w.claim(wait_s=3.0)) is not None:
            with lock:
                got[item["work_id"]].append(w.name)
            w.do(item)  # a newcomer holds one claim until it delivered

    threads = [threading.Thread(target=claim_all, args=(w,)) for w in bodies]
    for t in threads:
        t.start()
    start.wait()  # every body worker long-polls on its replica while the head makes 12 items at once
    for _ in range(12):
        head.do(head.claim())
    for t in threads:
        t.join(60)
    assert len(got) == 12, f"every item was claimed once it existed ({len(got)} of 12)"
    twice = {wid: who for wid, who in got.items() if len(who) > 1}
    assert not twice, f"items handed to two workers: {twice}"
    assert {n for who in got.values() for n in who} & {w.name for w in bodies[1::2]}, (
        "replica b served claims"
    )


def test_a_retried_claim_and_complete_racing_on_two_replicas_count_once(two_hosts):
    a, b, corpus = two_hosts
    run_id = make_run(a.url, corpus)
    head = pinned(a.url, run_id, 0, "head")
    on_b = SimWorker(b.url, "head-via-b")
    on_b.api.client.token, on_b.assignment = head.token, head.assignment  # the same worker, another replica
    claim_id, out = uuid.uuid4().hex, {}

    def race(name: str, fn: Any) -> None:
        out[name] = fn()

    def in_threads(calls: dict[str, Any]) -> None:
        threads = [threading.Thread(target=race, args=item) for item in calls.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    in_threads(
        {f"{w.name}{i}": lambda w=w: w.claim(claim_id=claim_id) for i in range(4) for w in (head, on_b)}
    )
    assert len({item["work_id"] for item in out.values()}) == 1, "one item for one claim id"
    item = next(iter(out.values()))
    data = head.boundary_tensor("activations")
    sha = head.upload(item["upload"], data)
    out.clear()
    in_threads(
        {f"{w.name}{i}": lambda w=w: w.complete(item, sha, len(data)) for i in range(4) for w in (head, on_b)}
    )
    # (A repeated complete answers no `audit`, which only the first carries: scheduler.complete.)
    answers = {(r["credits"], r["total_credits"]) for r in out.values()}
    assert len(answers) == 1, f"every retry gets the first answer: {answers}"
    with SwarmApi.connect(a.url) as api:
        total = api.credits(head.contributor_id).total
    assert total == pytest.approx(next(iter(out.values()))["credits"]), "credited once"


def test_a_claim_waiting_on_one_replica_wakes_on_a_complete_on_another(two_hosts):
    a, b, corpus = two_hosts
    run_id = make_run(a.url, corpus)
    head, body = pinned(a.url, run_id, 0, "head"), pinned(b.url, run_id, 1, "body")
    item, waited = head.claim(), {}

    def wait_on_b() -> None:
        t0 = time.monotonic()
        waited["item"], waited["s"] = body.claim(wait_s=25.0), time.monotonic() - t0

    t = threading.Thread(target=wait_on_b)
    t.start()
    time.sleep(1.0)  # the claim is waiting on replica b by now
    done_at = time.monotonic()
    head.do(item)  # completed on replica a: stage 1 work exists
    t.join(30)
    assert waited["item"] is not None and waited["item"]["stage"] == 1
    assert time.monotonic() - done_at < 3.0, f"the wakeup took {waited['s']:.1f} s (the long-poll is 25 s)"


class Recorder:
    """What the swarm was told: each claimed item by who got it, each acknowledged complete."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.claimed: dict[str, list[str]] = defaultdict(list)
        self.acked: list[str] = []
        self.errors: list[str] = []


def patient(w: SimWorker) -> SimWorker:
    """Wait out a replica that went away, as `iota join` does (every POST in the protocol is idempotent)."""
    w.api = SwarmApi(Client(w.url, token=w.token, max_wait_s=60.0))
    return w


def work_loop(w: SimWorker, rec: Recorder, stop: threading.Event) -> None:
    try:
        while not stop.is_set():
            item = w.claim(wait_s=1.0, claim_id=uuid.uuid4().hex)  # a retried claim gets the same item
            if item is None:
                continue
            with rec.lock:
                rec.claimed[item["work_id"]].append(w.name)
            w.do(item)
            with rec.lock:
                rec.acked.append(item["work_id"])
    except Exception as e:  # the test reports it: a worker must never see a failure it cannot wait out
        rec.errors.append(f"{w.name}: {type(e).__name__}: {e}")


@pytest.mark.slow
def test_kill_9_of_one_of_three_replicas_loses_nothing_acknowledged(tmp_path, postgres_server):
    database = postgres_server.create_database()
    corpus = write_corpus(tmp_path / "text", files=2, words=3000)
    with serve(tmp_path / "data", database, "--workers", "3") as orch:
        info = json.loads((tmp_path / "data" / "server.json").read_text())
        assert len(info["replicas"]) == 3 and orch.pid == info["pid"]
        run_id = make_run(orch.url, corpus, lease_s=60.0, work_timeout_s=60.0, max_inflight_per_head=4)
        workers = [patient(pinned(orch.url, run_id, s, f"w{s}{k}")) for s in range(3) for k in range(2)]
        rec, stop = Recorder(), threading.Event()
        threads = [threading.Thread(target=work_loop, args=(w, rec, stop), daemon=True) for w in workers]
        for t in threads:
            t.start()
        assert wait_until(lambda: len(rec.acked) >= 20 or rec.errors, 120), "20 completes before the kill"
        victim = info["replicas"][1]
        os.kill(victim, signal.SIGKILL)
        at_kill = len(rec.acked)
        assert wait_until(lambda: len(rec.acked) >= at_kill + 40 or rec.errors, 180), "40 completes after"
        stop.set()
        for t in threads:
            t.join(60)

        def replaced() -> bool:
            now = json.loads((tmp_path / "data" / "server.json").read_text())["replicas"]
            return victim not in now and len(now) == 3

        assert wait_until(replaced, 30), "the dead replica was replaced"
    assert not rec.errors, rec.errors
    twice = {wid: who for wid, who in rec.claimed.items() if len(who) > 1}
    assert not twice, f"items handed to two workers: {twice}"
    ids = [int(wid.removeprefix("w")) for wid in rec.acked]
    with psycopg.connect(postgres_server.url(database.rsplit("/", 1)[-1])) as conn:
        rows = dict(conn.execute("SELECT id, state FROM work WHERE id = ANY(%s)", (ids,)).fetchall())
        credited = {r[0] for r in conn.execute("SELECT work_id FROM ledger WHERE run_id = %s", (run_id,))}
        doubled = conn.execute(
            "SELECT sample_id, stage, kind FROM work WHERE run_id = %s AND state = 'done' "
            "GROUP BY sample_id, stage, kind HAVING count(*) > 1",
            (run_id,),
        ).fetchall()
    assert all(rows.get(i) == "done" for i in ids), "every acknowledged complete is recorded done"
    assert set(rec.acked) <= credited, "every acknowledged complete is credited"
    assert not doubled, f"work done twice: {doubled}"


def test_the_leader_lease_passes_to_another_replica_when_its_holder_goes(pg_url):
    first, second = Leader(pg_url), Leader(pg_url)
    try:
        assert first.holds() and first.holds(), "the first to ask leads, and keeps leading"
        assert not second.holds(), "one leader at a time"
        assert first.conn is not None
        first.conn.close()  # its session dies, as a killed replica's does
        assert wait_until(second.holds, 10), "another replica takes the lease"
        assert not first.holds(), "the old leader, back, finds the lease taken"
    finally:
        first.close()
        second.close()


def test_workers_above_one_on_sqlite_is_a_usage_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "IOTA_DATABASE"}
    cmd = [sys.executable, "-m", "iota_cli", "orchestrator", "serve", "--data-dir", str(tmp_path)]
    r = subprocess.run([*cmd, "--workers", "2"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--workers above 1 needs --database" in r.stderr + r.stdout
    assert not (tmp_path / "orchestrator.sqlite3").exists(), "refused before anything was made"


def test_reads_skip_the_write_lock_another_replica_holds_and_writes_wait_for_it(tmp_path, pg_url):
    config = ServerConfig(tmp_path / "data", database=pg_url)
    prepare(config)
    one, other = connect(config), connect(config)  # two replicas' States
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with one.tx() as conn:
            conn.execute(insert(db.meta).values(key="held", value="1"))
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        t0 = time.monotonic()
        with other.read() as conn:
            assert db.get_meta(conn, "held") is None, "a snapshot of what was committed"
        assert time.monotonic() - t0 < 1.0, "a read waited for the write lock"
        with pytest.raises(DBAPIError, match="read-only"), other.read() as conn:
            conn.execute(insert(db.meta).values(key="x", value="1"))
        t1 = time.monotonic()
        threading.Timer(0.5, release.set).start()
        with other.tx() as conn:  # waits for the holder to commit, then sees its row
            assert time.monotonic() - t1 >= 0.4 and db.get_meta(conn, "held") == "1"
    finally:
        release.set()
        holder.join(10)
        one.close()
        other.close()
