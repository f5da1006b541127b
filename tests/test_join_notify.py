"""A real `iota join` as systemd and a laptop see it: sd_notify, battery pause, and stopping.

One local swarm (orchestrator + 3 workers) serves the module; the tail worker gets a real
NOTIFY_SOCKET (WatchdogSec=2s) and a battery through IOTA_POWER_SUPPLY_DIR, the one hardware fact
this machine lacks. The tests run in file order and share the swarm.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from notify_listener import NotifyListener

from iota_cli.swarm.local import Swarm, SwarmOptions, default_data
from iota_cli.train.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def set_power(root: Path, on_ac: bool) -> None:
    """A laptop's sysfs: a battery and a mains adapter, as /sys/class/power_supply shows them."""
    (root / "BAT0").mkdir(parents=True, exist_ok=True)
    (root / "AC").mkdir(parents=True, exist_ok=True)
    (root / "BAT0" / "type").write_text("Battery\n")
    (root / "BAT0" / "capacity").write_text("77\n")
    (root / "BAT0" / "status").write_text("Charging\n" if on_ac else "Discharging\n")
    (root / "AC" / "type").write_text("Mains\n")
    (root / "AC" / "online").write_text("1\n" if on_ac else "0\n")


def statuses(ln: NotifyListener, since: float = 0.0) -> list[str]:
    with ln._lock:
        return [f for t, f in ln.messages if t >= since and f.startswith("STATUS=")]


def last_step(ln: NotifyListener) -> int:
    steps = [int(m.group(1)) for f in statuses(ln) if (m := re.search(r"step (\d+)", f))]
    return steps[-1] if steps else -1


def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    base = tmp_path_factory.mktemp("notify")
    power = base / "power_supply"
    set_power(power, on_ac=True)
    s = Swarm.create(SwarmOptions(workers=3, max_steps=500, data=default_data()), base / "swarm")
    with NotifyListener(base / "notify.sock") as ln:
        try:
            s.prepare()
            tail = s.workers[2]
            tail.env = {
                "NOTIFY_SOCKET": ln.env_value,
                "WATCHDOG_USEC": "2000000",  # systemd expects a ping every 2 s; iota pings at half that
                "IOTA_POWER_SUPPLY_DIR": str(power),
            }
            s.launch()
            s.ln, s.tail, s.power = ln, tail, power
            yield s
        finally:
            s.stop_workers(grace_s=10)
            s.stop_server()


def test_ready_then_watchdog_at_half_the_interval_and_status(swarm):
    ln = swarm.ln
    ln.wait_for("READY=1", timeout=120)
    until(lambda: last_step(ln) >= 2, 60, "training steps in STATUS")
    ready_at = ln.times("READY=1")[0]
    time.sleep(5)
    pings = [t for t in ln.times("WATCHDOG=1") if t > ready_at]
    assert len(pings) >= 4, pings
    assert all(0.8 <= g <= 1.9 for g in gaps(pings[-5:])), gaps(pings)
    assert any("loss" in f and "credits" in f and "tok/s" in f for f in statuses(ln))
    assert not [f for f in ln.fields() if f.startswith("ERRNO=")]  # no child process speaks for us


def test_battery_pauses_training_and_ac_resumes_it(swarm):
    ln = swarm.ln
    set_power(swarm.power, on_ac=False)
    until(lambda: any("on battery (77%)" in f for f in statuses(ln)), 20, "the battery pause")
    paused_at, step = time.monotonic(), last_step(ln)
    time.sleep(4)
    assert last_step(ln) == step, "training went on while on battery"
    assert [t for t in ln.times("WATCHDOG=1") if t > paused_at], "a pause is not a hang: keep pinging"
    set_power(swarm.power, on_ac=True)
    until(lambda: last_step(ln) > step, 30, "training to resume on AC")


def test_a_stalled_loop_stops_the_watchdog(swarm):
    ln, orch = swarm.ln, swarm.orchestrator.proc
    # Freeze the orchestrator: the worker's loop blocks in an HTTP read, as in a real hang.
    orch.send_signal(signal.SIGSTOP)
    try:
        time.sleep(3)  # the iteration in progress may still ping once
        frozen_at = time.monotonic()
        time.sleep(4)
        assert not [t for t in ln.times("WATCHDOG=1") if t > frozen_at], "a stalled loop kept pinging"
    finally:
        orch.send_signal(signal.SIGCONT)
    resumed_at = time.monotonic()
    until(lambda: [t for t in ln.times("WATCHDOG=1") if t > resumed_at], 15, "pings to resume")


def test_sigterm_stops_cleanly_with_stopping_and_no_token_in_logs(swarm):
    tail, ln = swarm.tail, swarm.ln
    started = time.monotonic()
    tail.signal(signal.SIGTERM)
    assert tail.wait(15) == 0
    assert time.monotonic() - started < 10, "a clean stop should take seconds"
    ln.wait_for("STOPPING=1", timeout=1)
    assert tail.token not in (tail.home / "worker.log").read_text()
    assert tail.token not in "\n".join(ln.fields())


def test_second_ctrl_c_exits_at_once_and_the_checkpoint_is_intact(swarm):
    head, orch = swarm.workers[0], swarm.orchestrator.proc
    orch.send_signal(signal.SIGSTOP)  # a hung orchestrator: the clean stop cannot finish
    try:
        head.signal(signal.SIGINT)
        time.sleep(1.5)
        assert head.running(), "the first Ctrl-C should be trying to stop cleanly"
        head.signal(signal.SIGINT)
        started = time.monotonic()
        assert head.wait(5) == 130
        assert time.monotonic() - started < 2
    finally:
        orch.send_signal(signal.SIGCONT)
    out = subprocess.run(
        [sys.executable, "-m", "iota_cli", "status", "--json"],
        env={**os.environ, "IOTA_HOME": str(head.home)},
        capture_output=True,
        text=True,
        check=True,
    )
    checkpoints = json.loads(out.stdout)["checkpoints"]
    assert checkpoints and checkpoints[0]["step"] > 0
    full = CheckpointStore(Path(checkpoints[0]["path"]).parent).load_latest()  # sha256-verified load
    assert full is not None and full.state.step == checkpoints[0]["step"]
