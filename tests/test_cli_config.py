"""`iota config`: the TOML file under IOTA_HOME, IOTA_<NAME> overrides, and clear errors."""

from __future__ import annotations

import json
import tomllib

from typer.testing import CliRunner

from iota_cli.app import app


def invoke(*args, env=None):
    return CliRunner().invoke(app, list(args), prog_name="iota", env=env)


def test_set_get_unset_round_trip(iota_home):
    r = invoke("config", "set", "orchestrator", "https://swarm.example.org")
    assert r.exit_code == 0 and str(iota_home / "config.toml") in r.stdout
    assert invoke("config", "set", "allow-battery", "yes").exit_code == 0  # dashes and bool words work
    assert invoke("config", "set", "max_memory_gb", "12.5").exit_code == 0
    stored = tomllib.loads((iota_home / "config.toml").read_text())
    assert stored == {
        "orchestrator": "https://swarm.example.org",
        "allow_battery": True,
        "max_memory_gb": 12.5,
    }
    assert invoke("config", "get", "orchestrator").stdout == "https://swarm.example.org\n"
    assert invoke("config", "get", "allow_battery").stdout == "true\n"
    assert invoke("config", "unset", "orchestrator").exit_code == 0
    assert invoke("config", "get", "orchestrator").stdout == "\n"


def test_env_overrides_file_and_show_says_so(iota_home):
    invoke("config", "set", "backend", "torch-cuda")
    r = invoke("config", "show", "--json", env={"IOTA_BACKEND": "torch-cpu"})
    data = json.loads(r.stdout)
    assert data["settings"]["backend"] == "torch-cpu" and data["sources"]["backend"] == "env"
    assert data["sources"]["orchestrator"] == "default"
    r = invoke("config", "show")
    assert "torch-cuda" in r.stdout and "file" in r.stdout
    r = invoke("config", "set", "backend", "mlx", env={"IOTA_BACKEND": "torch-cpu"})
    assert r.exit_code == 0 and "IOTA_BACKEND" in r.stderr  # the stored value would be shadowed


def test_bad_input_is_a_usage_error(iota_home):
    for args in (("set", "colour", "blue"), ("set", "allow_battery", "maybe"), ("get", "nope")):
        r = invoke("config", *args)
        assert r.exit_code == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert not (iota_home / "config.toml").exists()


def test_broken_config_file_is_a_config_error(iota_home):
    iota_home.mkdir(parents=True)
    (iota_home / "config.toml").write_text("orchestrator = [unclosed\n")
    for args in (("show",), ("get", "backend"), ("set", "backend", "mlx")):
        r = invoke("config", *args)
        assert r.exit_code == 78 and "not valid TOML" in r.stderr
    assert (iota_home / "config.toml").read_text() == "orchestrator = [unclosed\n"  # not overwritten


def test_path_lists_every_location(iota_home):
    data = json.loads(invoke("config", "path", "--json").stdout)
    assert data == {
        "config_file": str(iota_home / "config.toml"),
        "data_dir": str(iota_home / "data"),
        "cache_dir": str(iota_home / "cache"),
        "log_dir": str(iota_home / "logs"),
    }
    assert str(iota_home / "logs") in invoke("config", "path").stdout


def test_without_iota_home_paths_follow_platformdirs(monkeypatch, tmp_path):
    monkeypatch.delenv("IOTA_HOME")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    data = json.loads(invoke("config", "path", "--json").stdout)
    assert data["config_file"] == str(tmp_path / "cfg" / "iota" / "config.toml")
    assert data["data_dir"].startswith(str(tmp_path / "data" / "iota"))
