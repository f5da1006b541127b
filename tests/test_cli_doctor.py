"""`iota doctor` on this machine (Linux, no GPU) and against a real orchestrator stand-in on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from iota_cli.app import app
from iota_cli.machine.hardware import GIB, cgroup_memory_limit

HAS_NVIDIA = shutil.which("nvidia-smi") is not None


def doctor(*args, env=None):
    return CliRunner().invoke(app, ["doctor", *args], prog_name="iota", env=env)


def rows(table_output: str) -> dict[str, list[str]]:
    """check name -> [status, found...] from the human table."""
    out = {}
    for line in table_output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in ("pass", "warn", "fail", "unknown"):
            out[parts[0]] = parts[1:]
    return out


@pytest.fixture
def orchestrator():
    """A loopback HTTP server answering /v1/health with the status the test sets."""
    state = {"status": 200, "hits": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            state["hits"] += 1
            code = state["status"] if self.path == "/v1/health" else 404
            body = json.dumps({"status": "ok"}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


@pytest.mark.skipif(HAS_NVIDIA, reason="this machine has an NVIDIA driver")
def test_cpu_only_machine_fails_the_gpu_check_and_exits_1():
    r = doctor()
    assert r.exit_code == 1, r.output
    table = rows(r.stdout)
    assert table["gpu"][0] == "fail" and "--backend torch-cpu" in r.stdout
    assert table["platform"][0] == "pass" and table["network"][0] == "warn"
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ram = min(physical, cgroup_memory_limit() or physical)
    assert f"{ram / GIB:.1f} GiB" in r.stdout  # the real RAM
    assert f"{os.cpu_count()} cores" in r.stdout or f"{len(os.sched_getaffinity(0))} cores" in r.stdout
    assert "cannot join" in r.stdout


def test_json_carries_the_same_verdicts_as_the_table():
    human, machine = doctor(), doctor("--json")
    data = json.loads(machine.stdout)
    assert machine.exit_code == human.exit_code == (0 if data["ok"] else 1)
    table = rows(human.stdout)
    assert {c["name"]: c["status"] for c in data["checks"]} == {k: v[0] for k, v in table.items()}
    for c in data["checks"]:
        assert set(c) == {"name", "found", "required", "status", "hint"}
    report = data["report"]
    assert report["os"] == "Linux" and report["disk_free_bytes"] > 0
    assert report["ram_physical_bytes"] == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_reachable_orchestrator_passes_with_latency(orchestrator):
    url, state = orchestrator
    data = json.loads(doctor("--json", "--orchestrator", url).stdout)
    net = next(c for c in data["checks"] if c["name"] == "network")
    assert net["status"] == "pass" and net["found"].endswith(" ms") and state["hits"] == 1
    assert data["report"]["network"]["latency_ms"] > 0


def test_configured_orchestrator_is_used(orchestrator, iota_home):
    url, state = orchestrator
    CliRunner().invoke(app, ["config", "set", "orchestrator", url])
    assert rows(doctor().stdout)["network"][0] == "pass" and state["hits"] == 1


def test_orchestrator_errors_fail_the_network_check(orchestrator):
    url, state = orchestrator
    state["status"] = 404
    r = doctor("--orchestrator", url)
    assert r.exit_code == 1 and rows(r.stdout)["network"][0] == "fail" and "404" in r.stdout
    server_gone = "http://127.0.0.1:9"  # discard port: nothing listens
    r = doctor("--orchestrator", server_gone)
    assert rows(r.stdout)["network"][0] == "fail" and "refused" in r.stdout
    r = doctor("--orchestrator", "swarm.example.org")
    assert rows(r.stdout)["network"][0] == "fail" and "http" in r.stdout


def test_named_backend_is_checked():
    data = json.loads(doctor("--json", "--backend", "mlx-cpu").stdout)
    b = data["report"]["backend"]
    if not b["registered"]:
        pytest.skip("the mlx backend is not installed")
    check = next(c for c in data["checks"] if c["name"] == "backend")
    assert check["status"] == "pass" and b["version"] in check["found"]
    data = json.loads(doctor("--json", "--backend", "no-such-backend").stdout)
    check = next(c for c in data["checks"] if c["name"] == "backend")
    assert check["status"] == "fail" and "iota backends" in check["hint"]


def test_broken_config_is_exit_78(iota_home):
    iota_home.mkdir(parents=True)
    (iota_home / "config.toml").write_text("backend = \n")
    r = doctor()
    assert r.exit_code == 78 and "not valid TOML" in r.stderr


def test_console_script_exit_code_and_json():
    """The installed `iota` really exits 1 on this GPU-less machine, and its --json parses."""
    iota = shutil.which("iota", path=os.path.dirname(sys.executable)) or shutil.which("iota")
    assert iota, "the iota console script is not installed"
    r = subprocess.run([iota, "doctor", "--json"], capture_output=True, text=True, timeout=60)
    data = json.loads(r.stdout)
    assert r.returncode == (0 if data["ok"] else 1)
    if not HAS_NVIDIA:
        assert r.returncode == 1
