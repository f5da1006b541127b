"""Battery pause/resume with injected power facts; the keep-awake inhibitor as real processes."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from iota_cli.machine import hardware
from iota_cli.machine.power import KeepAwake, PowerGuard, keep_awake_command


def facts(*on_ac):
    """A probe that reports these power states one call after another."""
    seq = iter(on_ac)
    calls = []

    def probe():
        calls.append(1)
        return SimpleNamespace(on_ac=next(seq), battery_percent=42.0)

    probe.calls = calls  # type: ignore[attr-defined]
    return probe


def test_battery_pauses_and_ac_resumes(caplog):
    guard = PowerGuard(probe=facts(True, False, False, True, True), check_every_s=0)
    with caplog.at_level(logging.INFO, logger="iota_cli.machine.power"):
        answers = [guard.should_pause() for _ in range(5)]
    assert answers[0] is None and answers[3] is None and answers[4] is None
    assert answers[1] == answers[2] and "on battery (42%)" in answers[1] and "--allow-battery" in answers[1]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # said once, not every iteration
    assert any("resuming" in r.getMessage() for r in caplog.records)
    assert not guard.paused


def test_allow_battery_never_pauses_and_never_probes():
    probe = facts(False, False)
    guard = PowerGuard(probe=probe, allow_battery=True, check_every_s=0)
    assert [guard.should_pause(), guard.should_pause()] == [None, None]
    assert probe.calls == []


def test_unknown_power_never_pauses():
    def broken():
        raise OSError("no sysfs")

    assert PowerGuard(probe=facts(None, None), check_every_s=0).should_pause() is None
    assert PowerGuard(probe=broken, check_every_s=0).should_pause() is None
    assert PowerGuard(probe=lambda: None, check_every_s=0).should_pause() is None
    guard = PowerGuard(probe=facts(False, None), check_every_s=0)  # paused, then power turns unknown
    assert guard.should_pause() is not None and guard.should_pause() is None


def test_probe_is_rate_limited():
    now = [0.0]
    probe = facts(False, True, True)
    guard = PowerGuard(probe=probe, check_every_s=15, clock=lambda: now[0])
    assert guard.should_pause() is not None
    now[0] = 10.0
    assert guard.should_pause() is not None and len(probe.calls) == 1  # the cached answer
    now[0] = 15.0
    assert guard.should_pause() is None and len(probe.calls) == 2


def _supply(root: Path, name: str, **files: str) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    for k, v in files.items():
        (root / name / k).write_text(v + "\n")


def test_with_the_real_sysfs_probe_on_a_fake_laptop(tmp_path):
    """hardware.probe_power reads a sysfs tree; only the hardware facts are fake."""
    _supply(tmp_path, "BAT0", type="Battery", capacity="57", status="Discharging")
    _supply(tmp_path, "AC", type="Mains", online="0")
    guard = PowerGuard(probe=lambda: hardware.probe_power(root=tmp_path, system="Linux"), check_every_s=0)
    assert "57%" in (guard.should_pause() or "")
    (tmp_path / "AC" / "online").write_text("1\n")
    assert guard.should_pause() is None


def test_keep_awake_commands():
    found = {
        "caffeinate": "/usr/bin/caffeinate",
        "systemd-inhibit": "/bin/systemd-inhibit",
        "tail": "/bin/tail",
    }
    assert keep_awake_command(77, "Darwin", found.get) == ["/usr/bin/caffeinate", "-i", "-s", "-w", "77"]
    linux = keep_awake_command(77, "Linux", found.get)
    assert linux is not None and linux[0] == "/bin/systemd-inhibit" and "--what=sleep:idle" in linux
    assert linux[-4:] == ["/bin/tail", "--pid=77", "-f", "/dev/null"]
    assert keep_awake_command(77, "Linux", {}.get) is None
    assert keep_awake_command(77, "Windows", found.get) is None
    assert not KeepAwake(None).start()


def _group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d.name))
    return out


@pytest.fixture
def fake_inhibit(tmp_path):
    """A systemd-inhibit without logind (absent here): runs and waits for its command like the real one."""
    path = tmp_path / "systemd-inhibit"
    path.write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\n"$@"\n')
    path.chmod(0o755)
    tools = {"systemd-inhibit": str(path), "tail": shutil.which("tail")}
    return tools.get


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and GNU tail")
def test_inhibitor_lives_while_the_process_does_and_stop_cleans_up(fake_inhibit):
    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        awake = KeepAwake.for_pid(target.pid, system="Linux", which=fake_inhibit)
        assert awake.start(), awake.error
        pgid = awake.proc.pid
        assert awake.active and len(_group_alive(pgid)) == 2  # the inhibitor and the tail it wraps
        awake.stop()
        assert not awake.active and _group_alive(pgid) == []
    finally:
        target.kill()
        target.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and GNU tail")
def test_inhibitor_ends_by_itself_when_the_process_dies(fake_inhibit):
    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    awake = KeepAwake.for_pid(target.pid, system="Linux", which=fake_inhibit)
    assert awake.start(), awake.error
    target.kill()  # like kill -9 of `iota join`: nobody calls stop()
    target.wait()
    awake.proc.wait(timeout=10)  # tail --pid notices within a second or so
    assert not awake.active
    awake.stop()


def test_real_systemd_inhibit_starts_or_explains():
    """Here logind is absent, so the real tool fails at once; where it runs, stop() must clean up."""
    awake = KeepAwake.for_pid(os.getpid(), system="Linux")
    if awake.command is None:
        pytest.skip("no systemd-inhibit")
    if awake.start():
        pgid = awake.proc.pid
        awake.stop()
        time.sleep(0.1)
        assert _group_alive(pgid) == []
    else:
        assert awake.error and awake.proc is None
