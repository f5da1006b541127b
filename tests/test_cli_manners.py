"""How `iota` behaves when a newcomer gets things wrong: one error map, plain usage lines, checked settings,
an example manifest that works as it is. Everything runs through the real `iota` entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from iota_cli import output
from iota_cli.app import Root
from iota_cli.swarm.orchestrator import OrchestratorProcess

DOCS = Path(__file__).resolve().parent.parent / "docs"


def iota(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "iota_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_the_example_manifest_is_accepted_as_it_is(tmp_path):
    with OrchestratorProcess(tmp_path / "orch", admin_token="admin-token-1") as orch:
        made = iota(
            "orchestrator", "run", "create", str(DOCS / "example-run.toml"), "--url", orch.url, "--json",
            env={"IOTA_ADMIN_TOKEN": "admin-token-1"},
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        run_id = json.loads(made.stdout)["run_id"]
        st = iota("orchestrator", "status", run_id, "--url", orch.url, "--json")
        (run,) = json.loads(st.stdout)["runs"]
        assert run["state"] == "running" and len(run["stages"]) == 3 and run["max_samples"] == 20000


def test_usage_lines_name_arguments_plainly():
    usage = iota("orchestrator", "run", "create", "--help").stdout.splitlines()[0]
    assert usage.endswith("[OPTIONS] MANIFEST") and "{" not in usage
    assert iota("config", "get", "--help").stdout.splitlines()[0].endswith("[OPTIONS] KEY")


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("backend", "bogus", "unknown backend 'bogus'"),
        ("orchestrator", "not-a-url", "is not an orchestrator URL"),
        ("max_memory_gb", "lots", "max_memory_gb"),
    ],
)
def test_config_set_refuses_a_value_that_cannot_work(tmp_path, key, value, words):
    done = iota("config", "set", key, value, env={"IOTA_HOME": str(tmp_path)})
    assert done.returncode == output.EXIT_USAGE and words in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "config.toml").exists()
    assert iota("config", "set", "backend", "torch-cpu", env={"IOTA_HOME": str(tmp_path)}).returncode == 0


def _app_raising(e: BaseException) -> typer.Typer:
    """A group like `iota`'s whose one command raises e: the root's reporting, without a real bug to hit."""
    app = typer.Typer(cls=Root)

    @app.command()
    def boom() -> None:
        raise e

    @app.command()
    def other() -> None:
        pass

    return app


def test_an_unexpected_error_is_one_line_and_a_log_file(tmp_path, monkeypatch):
    monkeypatch.setenv("IOTA_HOME", str(tmp_path))
    monkeypatch.delenv("IOTA_DEBUG", raising=False)
    result = CliRunner().invoke(_app_raising(ZeroDivisionError("division by zero")), ["boom"])
    assert result.exit_code == output.EXIT_BUG
    assert "error: unexpected ZeroDivisionError: division by zero" in result.stderr
    (log,) = (tmp_path / "logs").glob("crash-*.log")
    assert str(log) in result.stderr and "Traceback" not in result.stderr
    assert "ZeroDivisionError" in log.read_text() and "Traceback" in log.read_text()


def test_iota_debug_keeps_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("IOTA_HOME", str(tmp_path))
    monkeypatch.setenv("IOTA_DEBUG", "1")
    result = CliRunner().invoke(_app_raising(ZeroDivisionError("x")), ["boom"])
    assert isinstance(result.exception, ZeroDivisionError) and not (tmp_path / "logs").exists()


def test_ctrl_c_exits_130_without_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("IOTA_HOME", str(tmp_path))
    result = CliRunner().invoke(_app_raising(KeyboardInterrupt()), ["boom"])
    assert result.exit_code == output.EXIT_INTERRUPTED and "Traceback" not in result.output
