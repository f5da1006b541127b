"""A contributor is the same contributor after a kill -9, on a host with no OS keyring.

A local swarm (a real orchestrator, three `iota join` processes, one per stage); the tail worker has no
token and keyring's fail backend, as on a headless server. It registers, keeps its token in a 0600 file
in its data dir, earns credits, is killed with SIGKILL and started again: the same contributor id, its
credits kept and growing, one registration in its log, and the token in no log.
Run: .venv/bin/python -m pytest tests/test_join_identity.py -q
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from iota_cli.swarm.corpus import write_corpus
from iota_cli.swarm.local import Swarm, SwarmOptions, WorkerProcess
from iota_cli.swarm.orchestrator import wait_until

pytestmark = pytest.mark.slow

NO_KEYRING = {"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}


def status_json(w: WorkerProcess, url: str) -> dict:
    """`iota status --json` as the worker's own user sees it: its home, no keyring, no IOTA_TOKEN."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTA_")}
    env |= {"IOTA_HOME": str(w.home), **NO_KEYRING}
    cmd = [sys.executable, "-m", "iota_cli", "status", "--json", "--orchestrator", url]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout)["orchestrator"]


def credits_of(swarm: Swarm, contributor_id: str) -> float:
    status = swarm.status()
    found = [ws.credits for s in status.stages for ws in s.workers if ws.contributor_id == contributor_id]
    return found[0] if status and found else 0.0


def test_a_killed_worker_without_a_keyring_comes_back_as_the_same_contributor(tmp_path: Path):
    data = str(write_corpus(tmp_path / "text"))
    # No validator: one process less on a small machine (trust is not what this test is about).
    options = SwarmOptions(workers=3, max_steps=500, data=data, backends=("torch-cpu",), validate=False)
    swarm = Swarm.create(options, tmp_path / "swarm")
    try:
        swarm.prepare()
        tail = swarm.workers[2]
        tail.token, tail.env = "", dict(NO_KEYRING)  # no token: it registers on its own
        swarm.launch()
        files = lambda: list((tail.home / "data" / "tokens").glob("*.token"))  # noqa: E731
        assert wait_until(files, timeout=120), (tail.home / "worker.log").read_text()[-3000:]
        (token_file,) = files()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        me = status_json(tail, swarm.url)
        cid = me["contributor_id"]
        assert wait_until(lambda: credits_of(swarm, cid) > 0, timeout=120), "no credits before the kill"

        tail.signal(signal.SIGKILL)
        assert tail.wait(10) == -signal.SIGKILL
        before = credits_of(swarm, cid)
        tail.start(swarm.url, swarm.run_id)
        assert wait_until(lambda: credits_of(swarm, cid) > before, timeout=120), "credits stopped growing"

        again = status_json(tail, swarm.url)
        assert again["contributor_id"] == cid and again["credits"] > before
    finally:
        swarm.stop_workers(grace_s=10)
        swarm.stop_server()
    log = (tail.home / "worker.log").read_text()
    assert log.count("registered as") == 1 and "token kept in" in log and str(token_file) in log
    assert "using the token from token file" in log
    token = token_file.read_text().strip()
    for path in tmp_path.rglob("*.log"):
        assert token not in path.read_text(errors="replace"), path
