"""A chain stalled behind another worker's long-held claim stops counting toward its head's pipeline depth.

One slow or hoarding body worker would otherwise pin a head's slot for a whole work timeout (what made the
adversarial hoarding case lose a fifth of its throughput). Real orchestrator in process, simulated workers:
    timeout 300 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_scheduler_stall.py
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
from inprocess_orchestrator import InProcessOrchestrator
from iota_orchestrator.scheduler import STALLED_SHARE
from simworker import SimWorker

from iota_cli.core.manifest import tiny_manifest
from iota_cli.swarm.corpus import write_corpus
from iota_cli.train.api import SwarmApi

ADMIN = "admin-for-stall-tests"
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def orch(tmp_path_factory) -> Iterator[InProcessOrchestrator]:
    base = tmp_path_factory.mktemp("stall")
    with InProcessOrchestrator(base / "data", ADMIN, tick_s=0.1) as o:
        o.corpus = write_corpus(base / "text", files=2, words=3000)
        yield o


def pinned(orch: InProcessOrchestrator, run_id: str, stage: int, name: str) -> SimWorker:
    w = SimWorker(orch.url, name).register()
    w.assign(run_id, stage=stage)
    return w


def test_a_held_item_frees_its_heads_slot_after_a_share_of_the_timeout(orch):
    m = tiny_manifest(str(orch.corpus))
    m = replace(m, train=replace(m.train, max_inflight_per_head=1, work_timeout_s=TIMEOUT_S, lease_s=30.0))
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        run_id = admin.create_run(m).run_id
    head, holder = pinned(orch, run_id, 0, "head"), pinned(orch, run_id, 1, "holder")
    head.do(head.claim())
    held = holder.claim()
    assert held is not None and held["stage"] == 1
    assert head.claim() is None, "the head is at its cap while the body item is fresh"
    time.sleep(STALLED_SHARE * TIMEOUT_S + 0.2)
    second = head.claim()
    assert second is not None and second["sample_id"] != held["sample_id"], "the stalled chain's slot is free"
    head.do(second)
    assert head.claim() is None, "the new chain counts: the cap still holds"
