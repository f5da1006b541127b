"""Merges no single contributor can steer (issue 13), end to end: a real swarm and merge poisoners.

A real orchestrator process and one real `iota join` (torch-cpu) per stage train the tiny run; once they
hold their stages, three merge poisoners join stage 1 as separate processes (tests/cheaters.py, kinds
scaled x1000, uniform random, and x1000 with "weight": 1e18 sent by raw HTTP), each heartbeating a
made-up huge step and contributing to every round it is offered. While the swarm trains, this test
copies every published weights blob off the orchestrator's disk. It asserts: every poisoner is caught
(its update refused, a failed check and a ban in the database, no contribution of its in any round), its
credit balance ends at or below zero, every published epoch of every stage moved from the one before by
at most the bound core.bounds gives for the work the orchestrator counted for that round's contributors,
no honest worker crashes, and the honest swarm's loss falls.

    timeout 600 .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/test_trust_merge_e2e.py
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from iota_cli.core import bounds
from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.tensors import decode
from iota_cli.swarm.corpus import default_data
from iota_cli.swarm.local import Swarm, SwarmOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SAMPLES = 120
POISONED_STAGE = 1
KINDS = ("scaled", "random", "weight")
ROOT = Path(__file__).resolve().parents[1]


def make_swarm(home: Path) -> Swarm:
    options = SwarmOptions(workers=3, backends=("torch-cpu",), data=default_data(), home=home)
    m = tiny_manifest(options.data)
    return Swarm(options=options, home=home, manifest=replace(m, train=replace(m.train, max_samples=SAMPLES)))


def query(path: Path, sql: str, args: tuple = ()) -> list[tuple]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


class Copier:
    """Copies each stage's published weights blob (key from the stages table) before it is deleted."""

    def __init__(self, data: Path, out: Path) -> None:
        self.db, self.blobs, self.out = data / "orchestrator.sqlite3", data / "blobs", out
        self.got: dict[tuple[int, int], Path] = {}  # (stage, epoch) -> copy
        out.mkdir(parents=True, exist_ok=True)

    def poll(self) -> None:
        try:
            rows = query(self.db, "SELECT stage, epoch, weights_key FROM stages")
        except sqlite3.Error:
            return
        for stage, epoch, key in rows:
            if (stage, epoch) in self.got:
                continue
            dest = self.out / f"s{stage}-e{epoch}.safetensors"
            try:
                shutil.copyfile(self.blobs / key, dest)
                decode(dest.read_bytes())
            except (OSError, ValueError):
                continue  # deleted or half-written meanwhile: the next poll sees the next epoch
            self.got[(stage, epoch)] = dest


def flat(path: Path) -> np.ndarray:
    tensors = decode(path.read_bytes())[0]
    return np.concatenate([np.frombuffer(tensors[n].data, "<f4") for n in sorted(tensors)])


def round_bound(db: Path, swarm: Swarm, run_id: str, stage: int, epoch: int, base: np.ndarray) -> float:
    """The largest per-coordinate bound the orchestrator allowed any contributor of round (stage, epoch):
    core.bounds for the steps its counted passes since the previous round opened, up to its report."""
    m, n_stages = swarm.manifest, swarm.manifest.model.n_stages
    prev = query(
        db,
        "SELECT max(opened) FROM merge_rounds WHERE run_id = ? AND stage = ? AND epoch < ?",
        (run_id, stage, epoch),
    )[0][0]
    out = 0.0
    for cid, t in query(
        db,
        "SELECT contributor_id, t FROM merge_contribs WHERE run_id = ? AND stage = ? AND epoch = ?",
        (run_id, stage, epoch),
    ):
        tokens = query(
            db,
            "SELECT coalesce(sum(tokens), 0) FROM ledger WHERE run_id = ? AND contributor_id = ?"
            " AND stage = ? AND kind IN ('forward', 'backward') AND (kind = 'backward' OR stage = ?)"
            " AND t > ? AND t <= ?",
            (run_id, cid, stage, n_stages - 1, -1e300 if prev is None else prev, t),
        )[0][0]
        items = tokens / (m.train.batch_size * m.train.seq_len)  # tokens per item
        steps = bounds.steps_from_items(items, m.train.backward_per_step)
        out = max(out, bounds.update_bound(m.optim, steps, float(np.abs(base).max()), m.merge.wire_dtype))
    return out


def test_merge_poisoners_are_caught_and_never_move_the_weights_past_the_bound(tmp_path):
    swarm = make_swarm(tmp_path / "swarm")
    copier = Copier(swarm.home / "orchestrator", tmp_path / "weights")
    procs: list[subprocess.Popen] = []
    try:
        swarm.start()
        honest = {w.contributor_id: w.stage for w in swarm.workers}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = swarm.status()
            placed = {ws.contributor_id: s.stage for s in status.stages for ws in s.workers} if status else {}
            if all(placed.get(c) == s for c, s in honest.items()):
                break
            time.sleep(0.3)
        for kind in KINDS:
            cmd = [sys.executable, "tests/cheaters.py", f"merge-{kind}", swarm.url, swarm.run_id]
            procs.append(
                subprocess.Popen(
                    [*cmd, "--stage", str(POISONED_STAGE), "--seconds", "240"],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        status = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            copier.poll()
            status = swarm.status()
            if status is not None and status.state == "finished":
                break
            assert all(w.running() for w in swarm.workers), "an honest worker exited during the run"
            time.sleep(0.1)
        copier.poll()
    finally:
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        codes = swarm.stop_workers(grace_s=30)
        swarm.stop_server()
    lines = [
        json.loads(x)
        for p in procs
        for x in (p.stdout.read() if p.stdout else "").splitlines()
        if x[:1] == "{"
    ]
    print("\n".join(json.dumps(x) for x in lines))
    assert status is not None and status.state == "finished", status
    assert all(code == 0 for code in codes.values()), f"honest workers did not exit 0: {codes}"
    logs = {f"worker {w.index}": w.home / "worker.log" for w in swarm.workers}
    for who, path in {**logs, "orchestrator": swarm.home / "orchestrator.log"}.items():
        assert "Traceback" not in path.read_text(errors="replace"), f"{who} logged a traceback"

    db = swarm.home / "orchestrator" / "orchestrator.sqlite3"
    poisoners = {x["contributor_id"]: x["kind"] for x in lines if x["event"] == "joined"}
    assert len(poisoners) == len(KINDS), lines
    tried = [x for x in lines if x["event"] == "contributed"]
    assert {x["kind"] for x in tried} == set(KINDS), f"every poisoner contributed at least once: {lines}"
    assert all(x["status"] in (403, 422) for x in tried), f"a poisoned update was taken: {tried}"
    for cid, kind in poisoners.items():
        ((state, credits),) = query(
            db,
            "SELECT state, credits FROM assignments WHERE run_id = ? AND contributor_id = ?",
            (swarm.run_id, cid),
        )
        assert state == "banned" and credits <= 0, f"{kind}: state {state}, credits {credits}"
        assert not query(db, "SELECT 1 FROM merge_contribs WHERE contributor_id = ?", (cid,)), kind
        assert query(db, "SELECT 1 FROM ledger WHERE contributor_id = ? AND work_id LIKE 'merge:%'", (cid,))

    ratios, pairs = [], 0
    for (stage, epoch), path in sorted(copier.got.items()):
        nxt = copier.got.get((stage, epoch + 1))
        if nxt is None:
            continue
        base = flat(path)
        moved = float(np.abs(flat(nxt).astype(np.float64) - base).max())
        bound = round_bound(db, swarm, swarm.run_id, stage, epoch, base)
        assert moved <= bound, f"stage {stage} epoch {epoch} -> {epoch + 1} moved {moved:.3g} > {bound:.3g}"
        ratios.append(moved / bound)
        pairs += 1
    assert pairs >= 3, f"too few consecutive epochs were seen to check: {sorted(copier.got)}"
    # Each stage has one honest replica (the poisoners are left out), so an epoch's move is its update.
    print(
        f"{pairs} published epochs checked; honest update / bound: max {max(ratios):.3f}, "
        f"mean {float(np.mean(ratios)):.3f}"
    )
    assert status.first_loss is not None and status.last_loss is not None
    assert status.first_loss > status.last_loss, (status.first_loss, status.last_loss)
