"""Progress: steady plain lines off a terminal, a tqdm bar on one, the same facts to sd_notify STATUS."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import time

import pytest
from notify_listener import NotifyListener

from iota_cli.headless.notify import Notifier
from iota_cli.headless.progress import Facts, Progress, describe, si


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "iota.progress"]


def test_plain_lines_at_a_steady_rate_with_the_facts(caplog):
    clock = Clock()
    p = Progress("tail", interactive=False, interval_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="iota.progress"):
        for step in range(1, 26):  # one step a second, 2048 tokens a step
            clock.t = float(step)
            p.update(
                step=step, tokens=2048 * step, loss=5.0 - step * 0.1, credits=step * 1.5, state="training"
            )
        p.close(state="stopped")
    got = lines(caplog)
    # a line at the start, at 11 s and 21 s, and the final one
    assert len(got) == 4, got
    assert got[0] == "tail: step 1, loss 4.900, 1.5 credits, training"  # no rate from one sample
    assert got[1] == "tail: step 11, 2.0k tok/s, loss 3.900, 16.5 credits, training"
    assert got[-1].startswith("tail: step 25, 2.0k tok/s, loss 2.500") and got[-1].endswith("stopped")


def test_state_changes_are_shown_at_once(caplog):
    clock = Clock()
    p = Progress("head", interactive=False, interval_s=60, clock=clock)
    with caplog.at_level(logging.INFO, logger="iota.progress"):
        p.update(state="waiting for work")
        clock.t = 1
        p.update(state="orchestrator unreachable, retrying in 8 s")
        clock.t = 2
        p.update(state="orchestrator unreachable, retrying in 8 s")  # same state: nothing new
    assert lines(caplog) == [
        "head: step 0, waiting for work",
        "head: step 0, orchestrator unreachable, retrying in 8 s",
    ]


def test_tokens_per_second_over_a_window():
    clock = Clock()
    p = Progress("body", interactive=False, window_s=10, clock=clock)
    for t in range(0, 30):  # 100 tok/s for 20 s, then 1000 tok/s
        clock.t = float(t)
        p.update(tokens=100 * t if t <= 20 else 2000 + 1000 * (t - 20))
    assert p.facts.tokens_per_s == pytest.approx((11000 - 2000 + 900) / 10, rel=0.15)


def test_status_goes_to_sd_notify(tmp_path):
    with NotifyListener(tmp_path / "n.sock") as ln:
        clock = Clock()
        p = Progress("tail", interactive=False, notifier=Notifier(str(tmp_path / "n.sock")), clock=clock)
        p.update(step=3, credits=4.0, state="training")
        clock.t = 0.5
        p.update(step=4)  # within a second of the last STATUS: not sent
        clock.t = 1.5
        p.update(step=5)
        p.close(state="stopped")
        ln.wait_for("STATUS=tail: step 5, 4 credits, stopped")
        assert ln.fields() == [
            "STATUS=tail: step 3, 4 credits, training",
            "STATUS=tail: step 5, 4 credits, training",
            "STATUS=tail: step 5, 4 credits, stopped",
        ]


def test_tqdm_bar_in_a_terminal():
    out = io.StringIO()
    p = Progress("tail", interactive=True, total=100, stream=out)
    p.update(step=7, tokens=1000, loss=4.25, credits=12.0, state="waiting for work")
    p.close()
    text = out.getvalue()
    assert "tail: 7/100 steps" in text and "loss 4.250" in text and "12 credits, waiting for work" in text


def test_interactive_is_decided_by_the_terminal_and_systemd(monkeypatch):
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        monkeypatch.delenv("INVOCATION_ID", raising=False)
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        p = Progress("x", stream=tty)
        assert p.interactive
        p.close()
        monkeypatch.setenv("INVOCATION_ID", "abc")
        p = Progress("x", stream=tty)
        assert not p.interactive
        p.close()
    os.close(master)
    assert not Progress("x", stream=io.StringIO()).interactive


def test_formatting():
    assert [si(3100), si(12), si(2.5), si(1.5e6), si(0)] == ["3.1k", "12", "2.5", "1.5M", "0"]
    assert describe(Facts(step=2, state="waiting for work")) == "step 2, waiting for work"


def test_tqdm_is_not_imported_off_a_terminal():
    code = (
        "import sys\n"
        "from iota_cli.headless.progress import Progress\n"
        "p = Progress('x', interactive=False); p.update(step=1); p.close()\n"
        "assert 'tqdm' not in sys.modules, 'tqdm imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_rate_falls_toward_zero_while_no_tokens_come():
    clock = Clock()
    p = Progress("head", interactive=False, window_s=10, clock=clock)
    for t in range(11):  # 100 tok/s for 10 s
        clock.t = float(t)
        p.update(tokens=100 * t, state="training")
    assert p.facts.tokens_per_s == pytest.approx(100)
    clock.t = 15.0
    p.update(state="waiting for work: stage 1 has no worker")  # a wait alone brings the rate up to now
    assert p.facts.tokens_per_s == pytest.approx(50)  # 500 tokens in the 10 s up to now
    clock.t = 21.0
    p.tick()
    assert p.facts.tokens_per_s == 0


def test_the_bar_clock_ticks_while_waiting():
    out = io.StringIO()
    p = Progress("head", interactive=True, stream=out, tick_s=0.05)
    p.update(step=3, state="waiting for work: stage 1 has no worker")
    time.sleep(1.3)  # no update: only the ticker redraws
    shown = out.getvalue()
    p.close()
    assert "3 steps [00:01, waiting for work: stage 1 has no worker]" in shown


def test_the_bar_never_shows_a_bare_comma():
    out = io.StringIO()
    p = Progress("head", interactive=True, stream=out)  # its first draw has no facts yet
    p.update(state="training")
    p.close()
    text = out.getvalue()
    assert "head: 0 steps [00:00]" in text and "head: 0 steps [00:00, training]" in text
    assert "] ," not in text and ", ]" not in text


def test_close_leaves_a_clean_line_after_ctrl_c_and_then_the_summary(caplog):
    out = io.StringIO()
    p = Progress("head", interactive=True, stream=out)
    p.update(step=2, state="training")
    out.write("^C")  # what the terminal echoes when Ctrl-C is pressed on the bar's line
    p.interrupted()
    assert out.getvalue().endswith("\r\x1b[K\rhead: 2 steps [00:00, training]"), "the ^C is wiped"
    with caplog.at_level(logging.INFO, logger="iota.progress"):
        p.close(state="stopped by you", summary="stopped by you: 2 steps, 4,096 tokens, 0.50 credits")
        p.update(state="too late")  # a wait message after the end draws nothing
        p.close(state="again")  # closes once
    text = out.getvalue()
    assert text.endswith("\r\x1b[K\rhead: 2 steps [00:00, stopped by you]\n"), repr(text[-80:])
    assert lines(caplog) == ["stopped by you: 2 steps, 4,096 tokens, 0.50 credits"]


def test_off_a_terminal_the_summary_is_the_last_line(caplog):
    p = Progress("tail", interactive=False, clock=Clock())
    with caplog.at_level(logging.INFO, logger="iota.progress"):
        p.update(step=2, state="checkpointing")
        p.close(state="run finished", summary="run finished: 2 steps, 4,096 tokens, 1.00 credits")
    assert lines(caplog) == [
        "tail: step 2, checkpointing",
        "tail: step 2, run finished",
        "run finished: 2 steps, 4,096 tokens, 1.00 credits",
    ]
