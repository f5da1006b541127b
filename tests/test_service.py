"""The systemd unit: systemd-analyze verify on both forms, and install/uninstall with a recording runner."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from iota_cli.app import app
from iota_cli.headless import host
from iota_cli.headless import service as svc

TOKEN = "tok_9f3c1d2e7a6b5c4d3e2f1a0b"
URL = "https://swarm.example.org/run%201?a=$b"  # % and $ must survive unit-file escaping
ANALYZE = shutil.which("systemd-analyze")


class Recorder:
    """Stands in for systemctl / systemd-creds / loginctl: records argv, answers like the real tools."""

    def __init__(self, show: str = "", linger: str = "no") -> None:
        self.calls: list[list[str]] = []
        self.inputs: list[str | None] = []
        self.show, self.linger = show, linger

    def __call__(self, argv, input=None):
        argv = list(argv)
        self.calls.append(argv)
        self.inputs.append(input)
        out = ""
        if argv[:2] == ["systemd-creds", "encrypt"]:  # a stand-in cipher: real encryption needs a host key
            Path(argv[-1]).write_text(base64.b64encode(input.encode()[::-1]).decode())
        elif argv[:2] == ["systemd-creds", "decrypt"]:
            out = base64.b64decode(Path(argv[-2]).read_text())[::-1].decode()
        elif "show" in argv:
            out = self.show
        elif argv[0] == "loginctl":
            out = self.linger + "\n"
        elif argv[:2] == ["systemctl", "--version"]:
            out = "systemd 252 (252.38-1~deb12u1)\n+PAM +AUDIT\n"
        return subprocess.CompletedProcess(argv, 0, out, "")

    def systemctl(self) -> list[list[str]]:
        return [c for c in self.calls if c[0] == "systemctl"]


def options(scope, tmp_path, **kw):
    layout = svc.Layout(tmp_path / "units", tmp_path / "credstore")
    env = {"IOTA_HOME": str(tmp_path / "iota home")}
    return svc.unit_options(scope, URL, "torch-cpu", layout=layout, env=env, **kw), layout


def verify(text: str, scope: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    d = tmp_path / f"verify-{scope}"
    d.mkdir(exist_ok=True)
    (d / svc.UNIT_NAME).write_text(text)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)  # --user verify needs a runtime dir for its manager
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0"}
    cmd = [ANALYZE, *(["--user"] if scope == "user" else []), "verify", str(d / svc.UNIT_NAME)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


@needs_analyze
@pytest.mark.parametrize(
    "scope,kw",
    [
        ("user", {}),
        ("user", {"sandbox": False}),
        ("system", {"run_as": "root"}),
        ("system", {"encrypt": True}),
    ],
)
def test_rendered_unit_passes_systemd_analyze_verify(scope, kw, tmp_path):
    opts, _ = options(scope, tmp_path, **kw)
    assert Path(opts.exec_start[0]).is_file()  # the venv's real iota
    out = verify(svc.render_unit(opts), scope, tmp_path)
    assert out.returncode == 0 and out.stderr == "" and out.stdout == "", out


@needs_analyze
def test_verify_check_is_sensitive_to_warnings(tmp_path):
    """Keys newer than this host's systemd only warn (exit 0): the stderr check is what catches them."""
    version = host.systemd_version()
    if version >= 254:
        pytest.skip("RestartSteps= is known to this systemd")
    opts, _ = options("system", tmp_path, version=254)
    assert "RestartSteps=" in svc.render_unit(opts)
    out = verify(svc.render_unit(opts), "system", tmp_path)
    assert "RestartSteps" in out.stderr


def test_unit_contents(tmp_path):
    user = svc.render_unit(options("user", tmp_path)[0])
    system = svc.render_unit(options("system", tmp_path, run_as="alice")[0])
    for text in (user, system):
        lines = text.splitlines()
        for want in (
            "Type=notify",
            "NotifyAccess=main",
            "Restart=on-failure",
            "RestartPreventExitStatus=78",
            "KillSignal=SIGTERM",
            "KillMode=mixed",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "Environment=PYTHONUNBUFFERED=1",
        ):
            assert want in lines
        assert any(ln.startswith("WatchdogSec=") for ln in lines)
        assert "PrivateDevices" not in text  # it would hide /dev/nvidia*
        assert "RestartSteps" not in text  # unknown to systemd 252
        assert TOKEN not in text
        exec_start = next(ln for ln in lines if ln.startswith("ExecStart="))
        assert exec_start.endswith(
            "join --orchestrator https://swarm.example.org/run%%201?a=$$b --backend torch-cpu"
        )
    assert "StateDirectory" not in user and "WantedBy=default.target" in user
    assert f'ReadWritePaths="-{tmp_path}/iota home"' in user
    assert f'Environment="IOTA_HOME={tmp_path}/iota home"' in user
    assert f"LoadCredential=iota-token:{tmp_path}/credstore/iota-token" in user
    assert (
        "StateDirectory=iota" in system and "User=alice" in system and "WantedBy=multi-user.target" in system
    )


def test_render_refuses_a_relative_executable(tmp_path):
    opts, layout = options("user", tmp_path, executable=["iota"])
    with pytest.raises(svc.ServiceError, match="absolute"):
        svc.render_unit(opts)


def test_install_sequence_and_idempotency(tmp_path):
    opts, layout = options("user", tmp_path)
    run = Recorder()
    first = svc.install(opts, layout, TOKEN, runner=run)
    unit = layout.unit_dir / svc.UNIT_NAME
    cred = layout.credential_dir / "iota-token"
    assert run.systemctl() == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "iota.service"],
    ]
    assert first.unit_changed and first.credential_changed
    assert unit.read_text() == svc.render_unit(opts) and TOKEN not in unit.read_text()
    assert cred.read_text() == TOKEN
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    assert stat.S_IMODE(cred.parent.stat().st_mode) == 0o700
    assert (tmp_path / "iota home").is_dir()  # ReadWritePaths= needs it to exist before the start

    run.calls.clear()  # the same install again changes nothing and restarts nothing
    again = svc.install(opts, layout, TOKEN, runner=run)
    assert not again.unit_changed and not again.credential_changed
    assert run.systemctl() == [["systemctl", "--user", "enable", "--now", "iota.service"]]

    run.calls.clear()  # a new token: the running service is restarted to load it
    svc.install(opts, layout, TOKEN + "x", runner=run, start=False)
    assert run.systemctl() == [
        ["systemctl", "--user", "try-restart", "iota.service"],
        ["systemctl", "--user", "enable", "iota.service"],
    ]

    run.calls.clear()  # a changed unit: reload, restart
    opts2, _ = options("user", tmp_path, sandbox=False)
    svc.install(opts2, layout, TOKEN + "x", runner=run)
    assert [c[2] for c in run.systemctl()] == ["daemon-reload", "try-restart", "enable"]


def test_install_encrypted_credential_keeps_the_token_off_argv(tmp_path):
    opts, layout = options("system", tmp_path, encrypt=True)
    run = Recorder()
    svc.install(opts, layout, TOKEN, runner=run)
    cred = Path(opts.credential.path)
    assert cred.parent.name == "credstore.encrypted" and cred.exists()
    assert TOKEN not in cred.read_text()
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    assert run.calls[0] == ["systemd-creds", "encrypt", "--name=iota-token", "-", str(cred)]
    assert run.inputs[0] == TOKEN and all(TOKEN not in " ".join(c) for c in run.calls)
    assert "LoadCredentialEncrypted=iota-token:" in (layout.unit_dir / svc.UNIT_NAME).read_text()
    assert run.systemctl() == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "iota.service"],
    ]
    run.calls.clear()
    svc.install(opts, layout, TOKEN, runner=run)  # unchanged: decrypt to compare, nothing rewritten
    assert [c[:2] for c in run.calls] == [["systemd-creds", "decrypt"], ["systemctl", "enable"]]


def test_install_without_a_token_fails_before_writing(tmp_path):
    opts, layout = options("user", tmp_path)
    with pytest.raises(svc.ServiceError, match="no token"):
        svc.install(opts, layout, None, runner=Recorder())
    assert not (layout.unit_dir / svc.UNIT_NAME).exists()


def test_failing_systemctl_is_reported(tmp_path):
    opts, layout = options("user", tmp_path)

    def broken(argv, input=None):
        return subprocess.CompletedProcess(argv, 1, "", "Failed to connect to bus: No medium found\n")

    with pytest.raises(svc.ServiceError, match="daemon-reload.*No medium found"):
        svc.install(opts, layout, TOKEN, runner=broken)


def test_uninstall_removes_unit_and_credential_and_is_idempotent(tmp_path):
    opts, layout = options("user", tmp_path)
    svc.install(opts, layout, TOKEN, runner=Recorder())
    run = Recorder()
    removed = svc.uninstall("user", layout, runner=run)
    assert removed == [layout.unit_dir / svc.UNIT_NAME, layout.credential_dir / "iota-token"]
    assert run.calls == [
        ["systemctl", "--user", "disable", "--now", "iota.service"],
        ["systemctl", "--user", "daemon-reload"],
    ]
    run.calls.clear()
    assert svc.uninstall("user", layout, runner=run) == [] and run.calls == []


def test_status_logs_linger():
    show = "LoadState=loaded\nActiveState=active\nStatusText=tail: step 12, training\nMainPID=42\n"
    props = svc.status("system", runner=Recorder(show=show))
    assert props["StatusText"] == "tail: step 12, training" and props["MainPID"] == "42"
    assert props["NRestarts"] == ""
    assert svc.logs_command("user", follow=True, lines=50) == [
        "journalctl",
        "--user",
        "--unit",
        "iota.service",
        "--lines",
        "50",
        "--follow",
    ]
    assert svc.logs_command("system") == ["journalctl", "--unit", "iota.service"]
    assert host.linger("alice", Recorder(linger="yes")) is True
    assert host.linger("alice", Recorder(linger="no")) is False
    assert host.systemd_version(Recorder()) == 252


def test_userns_detection(tmp_path):
    (tmp_path / "kernel").mkdir()
    assert host.userns_available(tmp_path)
    (tmp_path / "kernel" / "apparmor_restrict_unprivileged_userns").write_text("1\n")
    assert not host.userns_available(tmp_path)


# -- the CLI ------------------------------------------------------------------------------------------------


def test_cli_print_shows_the_unit_but_never_the_token():
    result = CliRunner().invoke(
        app,
        ["service", "install", "--user", "--print", "--orchestrator", "http://127.0.0.1:9"],
        env={"IOTA_TOKEN": TOKEN},
    )
    assert result.exit_code == 0, result.output
    assert "Type=notify" in result.output and "LoadCredential=iota-token:" in result.output
    assert TOKEN not in result.output


def test_cli_install_user_unit(tmp_path, monkeypatch, iota_home):
    run = Recorder(linger="no")
    monkeypatch.setattr(host, "run_command", run)
    monkeypatch.setattr(host, "systemd_running", lambda: True)
    env = {"IOTA_TOKEN": TOKEN, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    args = ["service", "install", "--user", "--orchestrator", "http://127.0.0.1:9", "--backend", "torch-cpu"]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    unit = tmp_path / "xdg" / "systemd" / "user" / svc.UNIT_NAME
    assert unit.exists() and TOKEN not in unit.read_text()
    assert (iota_home / "credentials" / "iota-token").read_text() == TOKEN
    assert TOKEN not in result.output and "loginctl enable-linger" in result.output
    assert ["systemctl", "--user", "enable", "--now", "iota.service"] in run.calls

    status = CliRunner().invoke(app, ["service", "status", "--user", "--json"], env=env)
    assert status.exit_code == 1  # the recorder's `show` says nothing is active

    result = CliRunner().invoke(app, ["service", "uninstall"], env=env)  # finds the user unit by itself
    assert result.exit_code == 0 and not unit.exists()


def test_cli_install_without_token_exits_78(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "run_command", Recorder())
    monkeypatch.setattr(host, "systemd_running", lambda: True)
    monkeypatch.setattr("iota_cli.config.credentials._keyring_get", lambda accounts: (None, "no keyring"))
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    result = CliRunner().invoke(app, ["service", "install", "--user", "--orchestrator", "http://x"], env=env)
    assert result.exit_code == 78
    assert not (tmp_path / "xdg" / "systemd" / "user" / svc.UNIT_NAME).exists()


def test_cli_install_without_systemd_points_to_print():
    result = CliRunner().invoke(
        app, ["service", "install", "--orchestrator", "http://x"], env={"IOTA_TOKEN": TOKEN}
    )
    if host.systemd_running():
        pytest.skip("systemd runs here")
    assert result.exit_code == 69 and "--print" in result.output
