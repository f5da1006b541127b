"""`iota orchestrator serve | run create | status` as real processes, the way an operator runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

from typer.testing import CliRunner

from iota_cli import output
from iota_cli.app import app
from iota_cli.swarm.corpus import write_corpus

MANIFEST = """
name = "cli-run"
[model]
d_model = 64
n_layers = 4
n_heads = 4
n_kv_heads = 2
ffn_dim = 176
context = 128
bottleneck_dim = 4
stages = [1, 2, 1]
[train]
batch_size = 4
seq_len = 32
max_samples = 10
[data]
source = "text"
shard_bytes = 65536
"""


def iota(*args, env=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "iota_cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def start_serve(data_dir, env):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "iota_cli",
            "orchestrator",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.startswith("iota orchestrator listening on"):
            break
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    return proc, lines


def test_serve_create_run_status_and_clean_shutdown(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "IOTA_ADMIN_TOKEN"}
    data = tmp_path / "orch"
    write_corpus(tmp_path / "text", files=2, words=3000)
    (tmp_path / "run.toml").write_text(MANIFEST)
    proc, lines = start_serve(data, env)
    try:
        token_line = [ln for ln in lines if ln.startswith("admin token")]
        assert token_line == [f"admin token written to {data / 'admin-token'} (readable by this user only)"]
        admin = (data / "admin-token").read_text().strip()
        assert not any(admin in ln for ln in lines), "the token itself is never printed"
        url = lines[-1].split()[-1]
        info = json.loads((data / "server.json").read_text())
        assert info == {"url": url, "pid": proc.pid}
        denied = iota(
            "orchestrator",
            "run",
            "create",
            str(tmp_path / "run.toml"),
            "--data-dir",
            str(data),
            "--admin-token",
            "wrong",
            env=env,
        )
        assert denied.returncode == output.EXIT_CONFIG and "401" in denied.stderr
        made = iota(
            "orchestrator",
            "run",
            "create",
            str(tmp_path / "run.toml"),
            "--data-dir",
            str(data),
            env={**env, "IOTA_ADMIN_TOKEN": admin},
        )
        assert made.returncode == 0, made.stderr
        run_id = made.stdout.split()[2]
        st = iota("orchestrator", "status", "--json", "--url", url, env=env)
        runs = json.loads(st.stdout)["runs"]
        assert [r["run_id"] for r in runs] == [run_id] and runs[0]["state"] == "running"
        assert runs[0]["max_samples"] == 10 and len(runs[0]["stages"]) == 3
        human = iota("orchestrator", "status", "--data-dir", str(data), env=env)
        assert run_id in human.stdout and "fwd queue" in human.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not (data / "server.json").exists()
        proc, lines = start_serve(data, env)
        assert not any(ln.startswith("admin token") for ln in lines), "the admin token is made only once"
        st = iota("orchestrator", "status", "--json", "--data-dir", str(data), env=env)
        assert [r["run_id"] for r in json.loads(st.stdout)["runs"]] == [run_id]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_status_without_a_server_says_how_to_start_one(tmp_path):
    r = CliRunner().invoke(app, ["orchestrator", "status", "--data-dir", str(tmp_path)])
    assert r.exit_code == output.EXIT_UNAVAILABLE and "iota orchestrator serve" in r.stderr


def test_serve_without_the_extra_explains_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the [orchestrator] extra were missing
    r = CliRunner().invoke(app, ["orchestrator", "serve", "--data-dir", str(tmp_path)])
    assert r.exit_code == output.EXIT_CONFIG and "iota-cli[orchestrator]" in r.stderr


def test_a_long_poll_in_flight_ends_at_shutdown_without_a_traceback(tmp_path):
    """SIGTERM while a validator waits 30 s for a check: the wait answers 204 at once and the server
    exits 0 well inside uvicorn's 5 s graceful timeout, which would otherwise cancel it mid-request."""
    import time

    import requests

    from iota_cli.swarm.orchestrator import OrchestratorProcess

    orch = OrchestratorProcess(tmp_path / "orch", admin_token="admin-1").start()
    replies: list[int] = []

    def poll() -> None:
        reply = requests.get(
            f"{orch.url}/v1/audits/next?wait_s=30", headers={"Authorization": "Bearer admin-1"}, timeout=40
        )
        replies.append(reply.status_code)

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(1.0)  # the poll is waiting now
    start = time.monotonic()
    assert orch.stop() == 0
    waiter.join(10)
    assert replies == [204] and time.monotonic() - start < 4.0
    assert not any("Traceback" in ln or "Cancel" in ln for ln in orch.lines), orch.lines
