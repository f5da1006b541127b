"""sd_notify against a real AF_UNIX datagram socket (path and abstract), as systemd would receive it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from notify_listener import NotifyListener

from iota_cli.headless.notify import Notifier, socket_address, watchdog_interval


@pytest.fixture
def listener(tmp_path):
    with NotifyListener(tmp_path / "notify.sock") as ln:
        yield ln


def test_unset_socket_sends_nothing():
    n = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.watchdog_s is None
    assert not any([n.ready("x"), n.status("x"), n.watchdog(), n.stopping(), n.extend_timeout(5)])


def test_messages_on_a_path_socket(listener):
    n = Notifier.from_env({"NOTIFY_SOCKET": listener.env_value})
    assert n.ready("training, step 0")
    assert n.status("step 3, 1.2k tok/s\nsecond line")
    assert n.extend_timeout(30)
    assert n.stopping("checkpointing")
    listener.wait_for("STATUS=checkpointing")
    assert listener.fields() == [
        "READY=1",
        "STATUS=training, step 0",
        "STATUS=step 3, 1.2k tok/s second line",  # a newline would start a new field
        "EXTEND_TIMEOUT_USEC=30000000",
        "STOPPING=1",
        "STATUS=checkpointing",
    ]


def test_abstract_socket():
    with NotifyListener.abstract() as ln:
        assert ln.env_value.startswith("@")
        n = Notifier.from_env({"NOTIFY_SOCKET": ln.env_value})
        assert n.address == b"\0" + ln.env_value[1:].encode()
        n.ready()
        assert ln.wait_for("READY") == "READY=1"


def test_watchdog_pings_at_half_the_interval_with_a_fake_clock(listener):
    now = [0.0]
    env = {"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "2000000"}
    n = Notifier(
        socket_address(env["NOTIFY_SOCKET"]), watchdog_interval(env, os.getpid()), clock=lambda: now[0]
    )
    assert n.watchdog_s == 1.0
    sent = []
    for i in range(50):  # the loop calls every 0.1 s for 5 s
        now[0] = i * 0.1
        if n.watchdog():
            sent.append(round(now[0], 1))
    assert sent == [0.0, 1.0, 2.0, 3.0, 4.0]
    now[0] = 100.0  # a stalled loop calls nothing: nothing is sent, however long it stalls
    time.sleep(0.1)
    assert len(listener.times("WATCHDOG=1")) == 5


def test_watchdog_real_time_rate_and_silence_when_not_called(listener):
    n = Notifier.from_env({"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "200000"})
    assert n.watchdog_s == pytest.approx(0.1)
    start = time.monotonic()
    while time.monotonic() - start < 1.0:  # a busy loop: many calls, few pings
        n.watchdog()
        time.sleep(0.005)
    time.sleep(0.1)
    pings = listener.times("WATCHDOG=1")
    assert 8 <= len(pings) <= 12, pings
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert min(gaps) > 0.08
    time.sleep(0.5)  # the "loop" is stalled now
    assert len(listener.times("WATCHDOG=1")) == len(pings)


def test_watchdog_pid_must_be_ours():
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000"}
    assert watchdog_interval({**env, "WATCHDOG_PID": str(os.getpid())}, os.getpid()) == 0.5
    assert watchdog_interval({**env, "WATCHDOG_PID": "1"}, os.getpid()) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}, 1) is None
    assert socket_address("vsock:2:1234") is None


def test_a_missing_socket_is_not_an_error(tmp_path):
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled
    assert n.ready() is False


def test_a_separate_process_notifies_and_hides_the_socket_from_its_children(listener):
    code = (
        "import os, subprocess, sys\n"
        "from iota_cli.headless.notify import Notifier\n"
        "n = Notifier.from_env(unset=True)\n"
        "n.ready('up'); n.watchdog(); n.stopping()\n"
        "print(os.environ.get('NOTIFY_SOCKET'), os.environ.get('WATCHDOG_USEC'))\n"
    )
    env = {
        **os.environ,
        "NOTIFY_SOCKET": listener.env_value,
        "WATCHDOG_USEC": "100000",
        "WATCHDOG_PID": "",
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"]
    listener.wait_for("STOPPING=1")
    # READY resets the watchdog clock, so the immediate watchdog() call is (correctly) not sent.
    assert listener.fields() == ["READY=1", "STATUS=up", "STOPPING=1"]
