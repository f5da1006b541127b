"""End to end over bad home links: every worker reaches the orchestrator through a LinkProxy of its own.

    .venv/bin/python -m pytest tests/test_swarm_link.py -q -m slow

A real orchestrator process and one real `iota join` process per stage; each worker's --orchestrator is
its own proxy (iota_cli/swarm/link.py) with a round trip of 60-100 ms and a share of its connections
cut mid-transfer. Blob URLs are relative to the orchestrator URL, so blobs take the same bad line (the
bytes counted by each proxy show it). The run is small and sized by max_samples; once it finishes,
the run's status and the orchestrator's database must agree that every issued sample was either
completed or dropped, none lost and none counted twice, and the loss must have fallen.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from iota_cli.swarm.link import Link, LinkProxy
from iota_cli.swarm.local import Swarm, SwarmOptions, default_data

pytestmark = pytest.mark.slow

MAX_STEPS = 20  # one replica per stage: 20 steps x 2 backward per step = 40 samples
# Kept-alive connections are few (a handful per worker), so a quarter of them are cut: seeded, the
# same connections are cut on every run with the same traffic.
LINKS = [Link(rtt_ms=60 + 20 * i, loss=0.25, seed=11 + i) for i in range(3)]


def wait_for(predicate, timeout: float, every: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def db_rows(data_dir: Path, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(f"file:{data_dir / 'orchestrator.sqlite3'}?mode=ro", uri=True) as db:
        return db.execute(sql, args).fetchall()


def test_a_swarm_over_lossy_delayed_links_trains_and_accounts_for_every_sample(tmp_path):
    swarm = Swarm.create(SwarmOptions(workers=3, max_steps=MAX_STEPS, validate=False), tmp_path / "s")
    assert swarm.manifest.data.source == default_data()
    # What a run over home links ships: the int8 wire, zstd-framed (core/wire.py).
    m = swarm.manifest
    swarm.manifest = replace(m, model=replace(m.model, wire_dtype="int8"))
    assert swarm.manifest.train.wire_codec == "zstd"
    proxies: list[LinkProxy] = []
    try:
        swarm.prepare()  # the orchestrator, the run, one contributor per worker: on loopback, no proxy
        target = ("127.0.0.1", swarm.orchestrator.port)
        for w, link in zip(swarm.workers, LINKS, strict=True):
            proxies.append(proxy := LinkProxy(target, link))
            proxy.start()
            w.start(proxy.url, swarm.run_id)
        status = wait_for(
            lambda: (s := swarm.status()) is not None and s.state == "finished" and s, 240, 1.0, "the run"
        )
        codes = [w.wait(60) for w in swarm.workers]
    finally:
        swarm.stop_workers(grace_s=10)
        for p in proxies:
            p.close()
        swarm.stop_server()
    logs = [(w.home / "worker.log").read_text(errors="replace") for w in swarm.workers]
    assert codes == [0, 0, 0], [log[-3000:] for log in logs]
    for log in logs:
        assert "Traceback" not in log, log[-3000:]

    # The links did what they say: connections were cut, and the blobs went through them as well.
    cuts = [p.cuts for p in proxies]
    assert sum(cuts) >= 1, [(p.connections, p.cuts) for p in proxies]
    data_dir = swarm.home / "orchestrator"
    weights = dict(
        db_rows(data_dir, "SELECT s.stage, b.size FROM stages s JOIN blobs b ON b.key = s.weights_key")
    )
    for w, p in zip(swarm.workers, proxies, strict=True):
        assert p.bytes_down > weights[w.stage], (w.stage, p.bytes_down, weights)

    # Every sample is accounted for: issued = completed + dropped, in the status and in the chains.
    assert status.samples_issued == status.max_samples == MAX_STEPS * 2
    assert status.samples_completed + status.samples_dropped == status.samples_issued, status
    assert status.samples_completed > 0
    chains = Counter(
        state for (state,) in db_rows(data_dir, "SELECT state FROM chains WHERE run_id = ?", swarm.run_id)
    )
    assert (
        chains == Counter({"done": status.samples_completed, "dropped": status.samples_dropped}) - Counter()
    )
    assert sum(chains.values()) == status.samples_issued

    # None counted twice: one finished item per (sample, stage, kind), one ledger row per finished item,
    # one loss per sample, and tokens only for those losses.
    twice = db_rows(
        data_dir,
        "SELECT sample_id, stage, kind, COUNT(*) FROM work WHERE run_id = ? AND state = 'done' "
        "GROUP BY sample_id, stage, kind HAVING COUNT(*) > 1",
        swarm.run_id,
    )
    assert twice == []
    ((done_items,),) = db_rows(
        data_dir, "SELECT COUNT(*) FROM work WHERE run_id = ? AND state = 'done'", swarm.run_id
    )
    ((entries, distinct),) = db_rows(
        data_dir, "SELECT COUNT(*), COUNT(DISTINCT work_id) FROM ledger WHERE run_id = ?", swarm.run_id
    )
    assert entries == distinct == done_items
    ((losses, loss_samples),) = db_rows(
        data_dir, "SELECT COUNT(*), COUNT(DISTINCT sample_id) FROM losses WHERE run_id = ?", swarm.run_id
    )
    assert losses == loss_samples == status.losses_reported
    train = swarm.manifest.train
    assert status.tokens_processed == train.batch_size * train.seq_len * losses
    # A completed sample went all the way: its tail's loss is in, and the head's backward is done once.
    ((completed_heads,),) = db_rows(
        data_dir,
        "SELECT COUNT(*) FROM chains c WHERE c.run_id = ? AND c.state = 'done' AND EXISTS (SELECT 1 FROM "
        "losses l WHERE l.run_id = c.run_id AND l.sample_id = c.sample_id) AND (SELECT COUNT(*) FROM work "
        "w WHERE w.run_id = c.run_id AND w.sample_id = c.sample_id AND w.stage = 0 AND w.kind = 'backward' "
        "AND w.state = 'done') = 1",
        swarm.run_id,
    )
    assert completed_heads == status.samples_completed

    assert status.first_loss is not None and status.last_loss is not None
    assert status.last_loss < status.first_loss, (status.first_loss, status.last_loss)
    print(
        f"\nlinks: {[(p.connections, p.cuts, p.bytes_up, p.bytes_down) for p in proxies]}; samples "
        f"{status.samples_issued} issued, {status.samples_completed} done, {status.samples_dropped} dropped; "
        f"loss {status.first_loss:.3f} -> {status.last_loss:.3f}"
    )
