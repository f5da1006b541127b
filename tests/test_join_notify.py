"""sd_notify from a real `iota join` against a local orchestrator, as systemd would receive it."""

from __future__ import annotations

import signal
import time

import pytest
from notify_listener import NotifyListener

from iota_cli.swarm import Swarm, SwarmOptions, default_data

pytestmark = pytest.mark.slow


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_join_notifies_ready_watchdog_status_and_stopping(tmp_path):
    s = Swarm.create(SwarmOptions(workers=3, max_steps=400, data=default_data()), tmp_path / "swarm")
    with NotifyListener(tmp_path / "notify.sock") as ln:
        try:
            s.prepare()
            tail = s.workers[2]
            # WatchdogSec=2s: systemd expects a ping every 2 s; iota pings at half that.
            tail.env = {"NOTIFY_SOCKET": ln.env_value, "WATCHDOG_USEC": "2000000"}
            s.launch()
            ln.wait_for("READY=1", timeout=120)
            ready_at = ln.times("READY=1")[0]
            wait_status = time.monotonic() + 60
            while not any(f.startswith("STATUS=") and "step 1" in f for f in ln.fields()):
                assert time.monotonic() < wait_status, ln.fields()
                time.sleep(0.2)
            time.sleep(6)
            pings = [t for t in ln.times("WATCHDOG=1") if t > ready_at]
            assert len(pings) >= 4, pings
            assert all(0.8 <= g <= 1.9 for g in gaps(pings[-5:])), gaps(pings)
            statuses = [f for f in ln.fields() if f.startswith("STATUS=")]
            assert any("loss" in f and "credits" in f and "tok/s" in f for f in statuses), statuses[-5:]
            assert not [f for f in ln.fields() if f.startswith("ERRNO=")]  # no child speaks for us

            # Stall the loop for real: freeze the orchestrator, so the worker blocks in an HTTP read.
            s.orchestrator.proc.send_signal(signal.SIGSTOP)
            try:
                time.sleep(3)  # the iteration in progress may still ping once
                frozen_at = time.monotonic()
                time.sleep(4)
                assert not [t for t in ln.times("WATCHDOG=1") if t > frozen_at], "a stalled loop kept pinging"
            finally:
                s.orchestrator.proc.send_signal(signal.SIGCONT)
            resumed_at = time.monotonic()
            deadline = resumed_at + 15
            while time.monotonic() < deadline and not [t for t in ln.times("WATCHDOG=1") if t > resumed_at]:
                time.sleep(0.1)
            assert [t for t in ln.times("WATCHDOG=1") if t > resumed_at], "pings did not resume"

            tail.signal(signal.SIGTERM)
            assert tail.wait(20) == 0
            ln.wait_for("STOPPING=1", timeout=5)
            log = (tail.home / "worker.log").read_text()
            assert tail.token not in log
            assert tail.token not in "\n".join(ln.fields())
        finally:
            s.stop_workers(grace_s=10)
            s.stop_server()
