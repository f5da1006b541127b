"""Log lines: journald priority prefixes under systemd, plain lines in pipes, no colour, no secrets."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from iota_cli.headless.logs import is_journal, redact, setup_logging, under_systemd

SECRET = "tok_5e1f0a9b8c7d6e5f4a3b"

CHILD = """
import logging, sys
from iota_cli.headless.logs import redact, setup_logging
redact(sys.argv[1])
setup_logging("DEBUG")
log = logging.getLogger("iota.worker")
log.info("joined run tiny as tail")
log.warning("orchestrator unreachable, retrying in 8 s")
log.debug("token is %s", sys.argv[1])
try:
    1 / 0
except ZeroDivisionError:
    log.exception("step failed")
"""


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def run_child(tmp_path, journal: bool) -> str:
    """Run a real process whose stderr is a file; JOURNAL_STREAM names that file when `journal`."""
    path = tmp_path / "stderr.txt"
    with open(path, "w") as err:
        st = os.fstat(err.fileno())
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
        env["INVOCATION_ID"] = "0123456789abcdef"
        if journal:
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", CHILD, SECRET], stderr=err, env=env, check=True, timeout=60)
    return path.read_text()


def test_journal_lines_carry_syslog_priorities(tmp_path):
    text = run_child(tmp_path, journal=True)
    lines = text.splitlines()
    assert lines[0] == "<6>INFO iota.worker: joined run tiny as tail"
    assert lines[1] == "<4>WARNING iota.worker: orchestrator unreachable, retrying in 8 s"
    assert lines[2] == "<7>DEBUG iota.worker: token is ***"
    assert lines[3] == "<3>ERROR iota.worker: step failed"
    traceback = lines[4:]
    assert traceback and all(ln.startswith("<3>") for ln in traceback)  # one journal entry per line
    assert "ZeroDivisionError" in traceback[-1]
    assert SECRET not in text and "\x1b[" not in text


def test_plain_lines_with_timestamps_when_not_the_journal(tmp_path):
    text = run_child(tmp_path, journal=False)
    first = text.splitlines()[0]
    assert first.endswith(" INFO iota.worker: joined run tiny as tail") and first[:4].isdigit()
    assert "<6>" not in text and SECRET not in text and "\x1b[" not in text


def test_interactive_lines_are_short(tmp_path):
    path = tmp_path / "out.txt"
    with open(path, "w") as stream:
        setup_logging(interactive=True, stream=stream)
        logging.getLogger("iota.worker").warning("on battery")
    line = path.read_text().strip()
    assert line.endswith(" warning: on battery") and len(line.split()[0]) == 8  # HH:MM:SS


def test_setup_replaces_its_own_handler_only(tmp_path):
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)
    with open(tmp_path / "a", "w") as a:
        setup_logging(stream=a, env={})
        setup_logging(stream=a, env={})
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_iota_handler", False)]
    assert len(ours) == 1 and other in logging.getLogger().handlers


def test_detection(tmp_path):
    assert under_systemd({"INVOCATION_ID": "x"}) and under_systemd({"JOURNAL_STREAM": "1:2"})
    assert not under_systemd({})
    with open(tmp_path / "f", "w") as f:
        st = os.fstat(f.fileno())
        assert is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not is_journal(f, {"JOURNAL_STREAM": "garbage"})


def test_redact_masks_every_record(tmp_path):
    redact(SECRET)
    with open(tmp_path / "log", "w") as f:
        setup_logging(stream=f, env={})
        logging.getLogger("x").error("request failed with Authorization: Bearer %s", SECRET)
    assert SECRET not in (tmp_path / "log").read_text()
