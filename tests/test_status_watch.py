"""`iota status --watch`: the worker's live file, redrawn in a terminal or a line per refresh, Ctrl-C exits 0;
`--json` prints once. The real CLI in a subprocess; the orchestrator's part from a real one in-process."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from inprocess_orchestrator import InProcessOrchestrator
from simworker import SimWorker

from iota_cli.config import settings
from iota_cli.core.manifest import tiny_manifest
from iota_cli.headless import livefile
from iota_cli.headless.livefile import LiveFile
from iota_cli.headless.progress import Progress
from iota_cli.swarm.corpus import write_corpus

IOTA = [sys.executable, "-m", "iota_cli", "status"]


def live_worker(
    stage: int = 1, kind: str = "body", pid: int | None = None, run_id: str = "run-1"
) -> Progress:
    """A worker's Progress writing the live file where `iota status` looks (IOTA_HOME from conftest)."""
    live = LiveFile(
        settings.paths().data_dir / livefile.NAME, run_id=run_id, stage=stage, kind=kind, backend="torch-cpu"
    )
    if pid is not None:
        live.about["pid"] = pid
    return Progress(f"stage {stage} {kind}", interactive=False, live=live)


def watch_json(**env: str) -> dict:
    out = subprocess.run(
        [*IOTA, "--watch", "--json"], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_json_prints_the_live_facts_once():
    p = live_worker()
    p.update(step=12, tokens=6144, credits=3.5, state="training")
    p.update(state="waiting for work: nothing from stage 0 or 2 yet")
    v = watch_json()
    assert v["running"] is True and v["stage"] == 1 and v["kind"] == "body" and v["run_id"] == "run-1"
    assert v["step"] == 12 and v["credits"] == 3.5 and v["loss"] is None
    assert v["state"] == "waiting for work: nothing from stage 0 or 2 yet"
    assert v["worker"]["backend"] == "torch-cpu" and v["worker"]["age_s"] < 30
    p.close(state="stopped by you")
    assert watch_json()["state"] == "stopped by you"  # the final word is written at once


def test_a_worker_that_is_gone_shows_as_not_running():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    p = live_worker(stage=2, kind="tail", pid=dead.pid)
    p.update(step=3, tokens=100, loss=4.2, state="training")
    v = watch_json()
    assert v["running"] is False and v["loss"] == 4.2 and v["loss_of"] == "this worker"
    out = subprocess.run([*IOTA], capture_output=True, text=True, timeout=60)  # plain status shows it too
    assert out.returncode == 0, out.stderr


def ctrl_c_as_in_a_shell() -> None:
    """A shell's child takes SIGINT by default; this test process may have it ignored or blocked by what
    ran before it in the suite (the child inherits both), and then Ctrl-C would never reach the watch."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def read_until(fd: int, want: int, needle: bytes, timeout: float = 30.0) -> bytes:
    """Bytes from fd until `needle` was seen `want` times."""
    got, deadline = b"", time.monotonic() + timeout
    while got.count(needle) < want and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    return got


def test_not_a_terminal_prints_a_line_per_refresh_and_ctrl_c_exits_0():
    p = live_worker()
    p.update(step=7, tokens=512, credits=1.25, state="waiting for work: stage 0 has no worker")
    proc = subprocess.Popen(
        [*IOTA, "--watch", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=ctrl_c_as_in_a_shell,
    )
    try:
        got = read_until(proc.stdout.fileno(), 3, b"\n")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0, proc.stderr.read().decode()
    finally:
        proc.kill()
    lines = got.decode().splitlines()
    assert len(lines) >= 3 and "\x1b[" not in got.decode()
    assert all("stage 1: step 7" in line and "credits 1.25" in line for line in lines[:3]), lines
    assert "waiting for work: stage 0 has no worker (for " in lines[0]


def test_a_terminal_redraws_the_block_in_place():
    p = live_worker()
    p.update(step=9, tokens=512, state="training")
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [*IOTA, "--watch", "--interval", "0.2"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        close_fds=True,
        preexec_fn=ctrl_c_as_in_a_shell,
    )
    os.close(follower)
    try:
        got = read_until(leader, 2, b"iota status --watch")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        os.close(leader)
    text = got.decode(errors="replace")
    assert text.count("iota status --watch") >= 2
    first = text.split("\x1b[J", 1)[1].split("\x1b[", 1)[0]  # the first block drawn
    assert f"\x1b[{first.count(chr(10))}F\x1b[J" in text  # the next moved up over all of it and cleared
    assert "stage 1 body, run run-1" in text and "step      9" in text


def test_the_orchestrator_supplies_credits_and_the_runs_loss(tmp_path: Path):
    with InProcessOrchestrator(tmp_path / "orch", admin_token="adm") as orch:
        m = tiny_manifest(str(write_corpus(tmp_path / "text")))
        r = requests.post(
            f"{orch.url}/v1/runs", json={"manifest": m.to_dict()}, headers={"Authorization": "Bearer adm"}
        )
        run_id = r.json()["run_id"]
        workers = [SimWorker(orch.url, f"w{i}").register() for i in range(3)]
        for stage, w in enumerate(workers):
            w.assign(run_id, stage=stage)
        for _ in range(4):
            for w in workers:
                if (item := w.claim()) is not None:
                    w.do(item)
        body = workers[1]
        p = live_worker(run_id=run_id)
        p.update(step=1, tokens=512, credits=0.01, state="training")
        v = watch_json(IOTA_ORCHESTRATOR=orch.url, IOTA_TOKEN=body.token)
        status = requests.get(f"{orch.url}/v1/runs/{run_id}/status", timeout=10).json()
        mine = next(
            w for s in status["stages"] for w in s["workers"] if w["contributor_id"] == body.contributor_id
        )
    assert v["credits"] == mine["credits"] > 0.01  # the orchestrator's total, not the local guess
    assert v["loss"] == status["last_loss"] and v["loss_of"] == "the run"  # a body computes no loss
    assert v["orchestrator"]["contributor_id"] == body.contributor_id
