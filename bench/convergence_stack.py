"""The real stack for bench/convergence.py: an orchestrator and 3 x R `iota join` processes on one machine.

run_stack() starts a local swarm (iota_cli.swarm.local, as the end-to-end tests do) for a manifest built by
the bench, waits for the run to finish (every worker exits by itself once the last merge round has
published), and reads what it left: the orchestrator's final published weights of every stage (its
SQLite `stages` rows and blob files), the merge bytes the workers logged ("merge round E: sent X,
received Y") and the rounds the orchestrator recorded.

    .venv/bin/python bench/convergence.py --quick        # the reference, then this at R = 2 and 4
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from iota_cli.core.manifest import RunManifest
from iota_cli.core.tensors import TensorDict, decode
from iota_cli.swarm.local import Swarm, SwarmOptions

MERGE_LINE = re.compile(r"merge round (\d+): sent (\d+), received (\d+)")
POLL_S = 2.0


@dataclass
class StackRun:
    """What a finished real-stack run left behind."""

    weights: list[TensorDict]  # the final published weights, stage by stage
    epochs: list[int]  # the epoch of each stage's final weights: the rounds it merged
    tokens: int  # tokens through the tail
    logged_bytes: int | None  # merge bytes every worker logged, sent + received; None: nothing logged
    wall_s: float
    problems: list[str] = field(default_factory=list)

    def bytes_per_token(self, computed: Callable[[int], float]) -> float:
        """The logged bytes over the tokens trained, else the design's accounting for the rounds run."""
        if self.logged_bytes is not None and self.tokens:
            return self.logged_bytes / self.tokens
        return computed(max(self.epochs))


def run_stack(m: RunManifest, replicas: int, home: Path, timeout_s: float = 1800.0) -> StackRun:
    """Train m with `replicas` torch-cpu workers per stage to the end of the run, then read the results."""
    options = SwarmOptions(
        workers=replicas * m.model.n_stages,
        data=m.data.source,
        backends=("torch-cpu",),
        home=home,
        timeout_s=timeout_s,
    )
    swarm = Swarm(options=options, home=home, manifest=m)
    problems: list[str] = []
    started = time.monotonic()
    try:
        launch(swarm, started + timeout_s)
        while swarm.any_running() and time.monotonic() < started + timeout_s:
            time.sleep(POLL_S)
        if swarm.any_running():
            problems.append(f"the run did not finish in {timeout_s:.0f} s")
        status = swarm.status()
    finally:
        codes = swarm.stop_workers(grace_s=30)
        swarm.stop_server()
    wall = time.monotonic() - started
    if bad := {i: c for i, c in codes.items() if c != 0}:
        problems.append(f"workers exited with {bad}")
    logs = [w.home / "worker.log" for w in swarm.workers]
    for path in [*logs, home / "orchestrator.log"]:
        if "Traceback" in (text := path.read_text(errors="replace") if path.exists() else ""):
            at = text.index("Traceback")
            problems.append(f"{path} logged a traceback:\n{text[max(0, at - 300) : at + 1200]}")
    if status is None or status.state != "finished":
        problems.append(f"the run ended {status.state if status else 'unreachable'}, not finished")
    weights, epochs = final_weights(home / "orchestrator", swarm.run_id, m.model.n_stages)
    counts = replicas_per_stage(home / "orchestrator", swarm.run_id, m.model.n_stages)
    if counts != [replicas] * m.model.n_stages:
        problems.append(f"the stages ended with {counts} replicas, not {replicas} each (a worker moved)")
    tokens = status.tokens_processed if status else 0
    return StackRun(weights, epochs, tokens, logged_bytes(logs), wall, problems)


def launch(swarm: Swarm, deadline: float) -> None:
    """Start one worker per stage, and the rest once those hold their stages.

    The orchestrator moves a replica of the most crowded stage to a stage that has no live worker
    (assignment.rebalance); started all at once, a worker that joins before any of another stage's
    would be moved there, and the stages would not hold R replicas each. The first three train alone
    until the others have joined (seconds: a few percent of a bench run's samples)."""
    swarm.prepare()
    n_stages = swarm.manifest.model.n_stages
    first, rest = swarm.workers[:n_stages], swarm.workers[n_stages:]
    for w in first:
        w.start(swarm.url, swarm.run_id)
    want = {w.contributor_id: w.stage for w in first}
    while time.monotonic() < deadline:
        status = swarm.status()
        placed = {ws.contributor_id: s.stage for s in status.stages for ws in s.workers} if status else {}
        if all(placed.get(cid) == stage for cid, stage in want.items()):
            break
        if not all(w.running() for w in first):
            raise RuntimeError("a worker exited while joining; see its worker.log under the run's home")
        time.sleep(0.2)
    for w in rest:
        w.start(swarm.url, swarm.run_id)


def final_weights(data_dir: Path, run_id: str, n_stages: int) -> tuple[list[TensorDict], list[int]]:
    """Each stage's current published weights, read from the orchestrator's database and blob store."""
    db = sqlite3.connect(f"file:{data_dir / 'orchestrator.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT stage, epoch, weights_key FROM stages WHERE run_id = ? ORDER BY stage", (run_id,)
        ).fetchall()
    finally:
        db.close()
    if [r[0] for r in rows] != list(range(n_stages)):
        raise RuntimeError(f"the run's stages table holds stages {[r[0] for r in rows]}")
    weights = []
    for _, _, key in rows:
        tensors, _ = decode((data_dir / "blobs" / key).read_bytes())
        weights.append(tensors)
    return weights, [int(r[1]) for r in rows]


def replicas_per_stage(data_dir: Path, run_id: str, n_stages: int) -> list[int]:
    """How many contributors each stage's assignment rows hold at the end of the run."""
    db = sqlite3.connect(f"file:{data_dir / 'orchestrator.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT stage, count(*) FROM assignments WHERE run_id = ? GROUP BY stage", (run_id,)
        ).fetchall()
    finally:
        db.close()
    found = dict(rows)
    return [int(found.get(s, 0)) for s in range(n_stages)]


def logged_bytes(logs: list[Path]) -> int | None:
    """Sent + received over every "merge round E: sent X, received Y" line of the worker logs."""
    total, seen = 0, False
    for path in logs:
        if not path.exists():
            continue
        for match in MERGE_LINE.finditer(path.read_text(errors="replace")):
            total += int(match.group(2)) + int(match.group(3))
            seen = True
    return total if seen else None
