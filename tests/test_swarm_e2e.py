"""End to end: a real orchestrator process and real `iota join` worker processes on loopback.

These start 7 Python processes each, so they are marked slow (CI runs them). Data is a small directory
of real text (a slice of the standard library's source) so an epoch stays short.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from iota_cli.swarm.local import Swarm, SwarmOptions, default_data

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout: float, every: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def worker_status(home: Path) -> dict:
    """`iota status --json` for one worker's IOTA_HOME: the real CLI reading its checkpoints."""
    out = subprocess.run(
        [sys.executable, "-m", "iota_cli", "status", "--json"],
        env={**os.environ, "IOTA_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


def checkpoint_step(home: Path) -> int:
    cks = worker_status(home)["checkpoints"]
    return max((c["step"] for c in cks), default=-1)


RESUMED = re.compile(r"(?:resuming from|merged past) checkpoint (\S+) \(step (\d+),")


@pytest.fixture
def swarm(tmp_path):
    made: list[Swarm] = []

    def make(max_steps: int, workers: int = 6) -> Swarm:
        s = Swarm.create(
            SwarmOptions(workers=workers, max_steps=max_steps, data=default_data()), tmp_path / "swarm"
        )
        made.append(s)
        s.start()
        return s

    yield make
    for s in made:
        s.stop_workers(grace_s=10)
        s.stop_server()


def test_iota_swarm_trains_and_loss_falls(tmp_path):
    """The README's command: `iota swarm --json` exits 0, 6 workers on 3 stages x 2, torch and mlx mixed."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "iota_cli",
            "swarm",
            "--workers",
            "6",
            "--max-steps",
            "25",
            "--json",
            "--home",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["state"] == "finished"
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0 and summary["wall_s"] > 0
    assert summary["last_loss"] < summary["first_loss"] - 0.5, summary
    workers = summary["workers"]
    assert len(workers) == 6 and all(w["exit_code"] == 0 for w in workers)
    assert sorted(w["stage"] for w in workers) == [0, 0, 1, 1, 2, 2]
    assert {w["backend"] for w in workers} == {"torch-cpu", "mlx-cpu"}
    assert all(w["credits"] > 0 for w in workers)


def test_killed_worker_resumes_from_its_checkpoint_while_the_swarm_goes_on(swarm):
    s = swarm(max_steps=60)
    victim = s.workers[1]  # a body replica
    wait_for(lambda: checkpoint_step(victim.home) >= 3, 240, 1.0, "the victim's first checkpoints")
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    # Damage the newest checkpoint as a crash during a disk flush might: the older one must be used.
    files = sorted(
        (victim.home / "data" / "checkpoints").rglob("ckpt-*.safetensors"),
        key=lambda p: int(p.stem.split("-")[1]),
    )
    assert len(files) == 2, files
    newest = files[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    step_at_kill = int(files[0].stem.split("-")[1])
    before = s.status().samples_completed
    # The other body replica carries the stage: samples keep completing without the victim.
    wait_for(lambda: s.status().samples_completed >= before + 4, 120, 1.0, "progress without the victim")
    victim.start(s.url, s.run_id)
    log = victim.home / "worker.log"
    # The older checkpoint restores the step and optimizer state; its weights too, unless the swarm merged
    # past its epoch while the victim was down (at the default interval it usually has): then the
    # swarm's weights.
    resumed = wait_for(lambda: RESUMED.search(log.read_text()), 120, 0.5, "the resume message")
    assert resumed.group(1) == files[0].name and int(resumed.group(2)) == step_at_kill, resumed.group(0)
    assert newest.name in log.read_text()  # the corrupt file was named in a warning
    wait_for(lambda: checkpoint_step(victim.home) > step_at_kill, 240, 1.0, "steps after the resume")
    wait_for(lambda: not s.any_running(), 400, 2.0, "the run to finish")
    assert all(w.proc.returncode == 0 for w in s.workers), [w.proc.returncode for w in s.workers]
    assert s.status().state == "finished"


def test_killed_orchestrator_comes_back_and_workers_carry_on(swarm):
    s = swarm(max_steps=40)
    wait_for(lambda: getattr(s.status(), "samples_completed", 0) >= 6, 240, 1.0, "training to start")
    pids = [w.proc.pid for w in s.workers]
    s.orchestrator.kill()
    time.sleep(4)  # workers now see connection refused and wait with backoff
    assert all(w.running() for w in s.workers), "a worker died while the orchestrator was down"
    logs = [(w.home / "worker.log").read_text() for w in s.workers]
    assert any("unreachable" in text for text in logs)
    s.start_server()  # same port, same data dir
    status = wait_for(s.status, 30, 0.5, "the orchestrator to answer again")
    completed_before = status.samples_completed
    wait_for(lambda: s.status().samples_completed >= completed_before + 6, 240, 1.0, "progress after restart")
    assert [w.proc.pid for w in s.workers] == pids  # nobody was restarted
    wait_for(lambda: not s.any_running(), 400, 2.0, "the run to finish")
    assert all(w.proc.returncode == 0 for w in s.workers)
    final = s.status()
    assert final.state == "finished" and final.last_loss < final.first_loss


def test_iota_swarm_trains_on_another_directory_of_text(tmp_path):
    """--data DIR: plain text that is not Python (generated prose with a learnable structure)."""
    data = tmp_path / "books"
    data.mkdir()
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbled boxes"
    words = words.split()  # noqa: SIM905 - a sentence reads better than 16 quoted words
    for i in range(4):
        lines = [" ".join(words[(j * 7 + k * (i + 1)) % len(words)] for k in range(12)) for j in range(2000)]
        (data / f"book-{i}.txt").write_text("\n".join(lines))
    stop = threading.Event()
    from iota_cli.swarm.local import run_swarm

    summary = run_swarm(
        SwarmOptions(workers=6, max_steps=20, data=str(data), home=tmp_path / "s"), stop, interactive=False
    )
    assert summary["state"] == "finished"
    assert all(w["exit_code"] == 0 for w in summary["workers"])
    assert summary["last_loss"] < summary["first_loss"] - 1.0, summary


def test_ctrl_c_stops_the_whole_swarm_cleanly(tmp_path):
    """Ctrl-C in the middle of a long run: every worker checkpoints and exits 0, the summary still prints."""
    home = tmp_path / "s"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "iota_cli",
            "swarm",
            "--workers",
            "3",
            "--max-steps",
            "1000",
            "--json",
            "--home",
            str(home),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: checkpoint_step(home / "worker-2") >= 2, 180, 1.0, "the tail's first checkpoints")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["state"] == "running"  # stopped early, not finished
    assert summary["tokens"] > 0 and len(summary["workers"]) == 3
    assert all(w["exit_code"] == 0 for w in summary["workers"])
