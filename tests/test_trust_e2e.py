"""Trust end to end: an honest swarm, a validator, and four cheating `iota join` processes beside it.

A real orchestrator and validator (`iota orchestrator validate`) on loopback, one honest torch-cpu worker
per stage, and one real cheating process per kind (tests/cheat_worker.py: the product's worker with one
method changed), each its own contributor pinned to a stage: random activations (body), scaled
activations (head), a fake loss (tail), backward items completed without running them (head), honest
compute with weights of its own (body), honest work but merge updates that push the loss up within the
optimizer's bound (tail; caught by the held-out loss check). For each
cheater: it is caught (a failed check, banned from the run), its credit balance ends at or below zero,
and it never moved the merged weights beyond the optimizer's bound; the honest workers pass their checks
and the swarm's vetted loss falls. The merge poisoner has its own test (test_trust_merge_e2e.py).

    timeout 900 .venv/bin/python -m pytest -q -x -p no:cacheprovider tests/test_trust_e2e.py
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests

from iota_cli.core.bounds import update_bound
from iota_cli.core.flat import FlatLayout
from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.protocol import RegisterRequest, RunStatus, WorkerStatus
from iota_cli.core.tensors import decode
from iota_cli.swarm.corpus import default_data
from iota_cli.swarm.local import Swarm, SwarmOptions, WorkerProcess
from iota_cli.train.api import SwarmApi

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SAMPLES = 180
CHEATS = {
    "random-activations": 1,
    "scaled-activations": 0,
    "fake-loss": 2,
    "no-backward": 0,
    "own-weights": 1,
    "ascent": 2,
}
SCRIPT = Path(__file__).parent / "cheat_worker.py"


def start_cheaters(swarm: Swarm) -> dict[str, WorkerProcess]:
    out = {}
    with SwarmApi.connect(swarm.url, swarm.admin_token) as admin:
        for i, (kind, stage) in enumerate(CHEATS.items()):
            reply = admin.register(RegisterRequest(name=kind, backend="torch-cpu"))
            w = WorkerProcess(
                index=100 + i,
                stage=stage,
                backend="torch-cpu",
                contributor_id=reply.contributor_id,
                token=reply.token,
                home=swarm.home / f"cheater-{kind}",
                launcher=(str(SCRIPT), kind),
            )
            w.start(swarm.url, swarm.run_id)
            out[kind] = w
    return out


def wait_placed(swarm: Swarm, timeout: float = 120.0) -> None:
    want = {w.contributor_id: w.stage for w in swarm.workers}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = swarm.status()
        placed = {ws.contributor_id: st.stage for st in s.stages for ws in st.workers} if s else {}
        if all(placed.get(c) == stage for c, stage in want.items()):
            return
        time.sleep(0.5)
    raise AssertionError("the honest workers did not take their stages")


def by_id(status: RunStatus) -> dict[str, WorkerStatus]:
    return {w.contributor_id: w for st in status.stages for w in st.workers}


def log_tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def trust_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("trust")
    options = SwarmOptions(workers=3, backends=("torch-cpu",), data=default_data(), home=home)
    m = tiny_manifest(options.data)
    swarm = Swarm(
        options=options, home=home, manifest=replace(m, train=replace(m.train, max_samples=SAMPLES))
    )
    cheaters: dict[str, WorkerProcess] = {}
    try:
        swarm.prepare()
        swarm.launch()
        wait_placed(swarm)
        cheaters = start_cheaters(swarm)
        deadline = time.monotonic() + 600
        status = swarm.status()
        while time.monotonic() < deadline and not (status and status.state == "finished"):
            time.sleep(1.0)
            status = swarm.status() or status
        end = time.monotonic() + 60  # the workers see the run's end and leave by themselves
        while swarm.any_running() and time.monotonic() < end:
            time.sleep(0.5)
        codes = swarm.stop_workers()
        for w in cheaters.values():
            w.signal(15)
            w.wait(30)
        status = swarm.status() or status
        credits = {
            w.contributor_id: requests.get(f"{swarm.url}/v1/contributors/{w.contributor_id}/credits").json()
            for w in [*swarm.workers, *cheaters.values()]
        }
        weights = published_epochs(swarm)
    finally:
        for w in cheaters.values():
            w.signal(9)
        swarm.stop_workers(grace_s=5)
        swarm.stop_server()
    assert status is not None
    return swarm, cheaters, status, codes, credits, weights


def published_epochs(swarm: Swarm) -> dict[int, list[bytes]]:
    """Every stage's published weights, epoch by epoch, as the orchestrator keeps them on disk."""
    out: dict[int, list[bytes]] = {}
    root = swarm.home / "orchestrator" / "blobs" / "runs" / swarm.run_id / "weights"
    for stage_dir in sorted(root.glob("s*")) if root.is_dir() else []:
        files = sorted(stage_dir.glob("e*.safetensors"), key=lambda p: int(p.stem.split(".")[0][1:]))
        out[int(stage_dir.name[1:])] = [p.read_bytes() for p in files]
    return out


def test_the_run_finishes_and_the_honest_workers_pass_their_checks(trust_run):
    swarm, _, status, codes, credits, _ = trust_run
    workers = by_id(status)
    assert status.state == "finished", f"the run did not finish: {status.samples_completed} samples done"
    for w in swarm.workers:
        ws = workers[w.contributor_id]
        assert codes[w.index] == 0, (
            f"honest worker {w.index} exited {codes[w.index]}:\n{log_tail(w.home / 'worker.log')}"
        )
        assert not ws.banned and ws.checks.get("failed", 0) == 0 and ws.checks.get("passed", 0) >= 1, ws
        assert credits[w.contributor_id]["total"] > 0
    assert status.checks.get("passed", 0) >= 3 and status.checks.get("failed", 0) >= len(WORK_CHEATS), (
        status.checks
    )
    validator = (swarm.home / "validator.log").read_text()
    assert "checks judged" in validator, validator[-2000:]


def test_the_vetted_loss_falls(trust_run):
    _, _, status, _, _, _ = trust_run
    assert status.loss_vetted, "a validator judged checks, so only vetted tails' losses count"
    assert status.first_loss is not None and status.last_loss is not None
    assert status.last_loss < status.first_loss - 0.3, (status.first_loss, status.last_loss)
    assert status.last_loss > 1.0, "a fake loss of 0.01 must not reach the run's loss"


WORK_CHEATS = sorted(k for k in CHEATS if k != "ascent")


@pytest.mark.parametrize("kind", WORK_CHEATS)
def test_each_cheater_is_caught_banned_and_earns_nothing(trust_run, kind):
    _, cheaters, status, _, credits, _ = trust_run
    w = cheaters[kind]
    ws = by_id(status).get(w.contributor_id)
    assert ws is not None, f"{kind} never joined:\n{log_tail(w.home / 'worker.log')}"
    assert ws.checks.get("failed", 0) >= 1 and ws.banned and ws.standing < 0, ws
    assert credits[w.contributor_id]["total"] <= 0, credits[w.contributor_id]
    log = (w.home / "worker.log").read_text(errors="replace")
    assert "banned" in log, f"the cheater was never told it is banned:\n{log_tail(w.home / 'worker.log')}"


def test_updates_that_raise_the_held_out_loss_are_left_out_and_unpaid(trust_run):
    """The ascent cheater works honestly, so its work passes; every update it sends is scored on held-out
    tokens (it never passes that test), left out of its round and the work it carried is not paid."""
    _, cheaters, status, _, credits, _ = trust_run
    w = cheaters["ascent"]
    ws = by_id(status)[w.contributor_id]
    assert ws.faults.get("harmful_update", 0) >= 1, ws
    assert credits[w.contributor_id]["clawed_back"] > 0, credits[w.contributor_id]


def test_no_contributor_moved_the_merged_weights_beyond_the_bound(trust_run):
    """Each published epoch is the mean of updates each within bounds.update_bound of the steps its
    replica took; no replica of a stage took more than the stage's busiest one, which bounds them all."""
    swarm, _, status, _, _, weights = trust_run
    layouts = {s: FlatLayout.of(swarm.manifest.model, s) for s in weights}
    checked = 0
    for stage, epochs in weights.items():
        steps = max(w.steps for w in status.stages[stage].workers)
        vecs = [layouts[stage].flatten(decode(blob)[0]) for blob in epochs]
        for before, after in zip(vecs, vecs[1:], strict=False):
            bound = update_bound(swarm.manifest.optim, steps, float(np.abs(before).max()))
            moved = float(np.abs(after - before).max())
            assert moved <= bound, f"stage {stage}: an epoch moved {moved:.3g}, past the bound {bound:.3g}"
            checked += 1
    assert checked >= 3, f"too few consecutive epochs kept to compare ({checked})"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
