"""End to end: a real orchestrator process and real `iota join` worker processes on loopback.

These start 7 Python processes each, so they are marked slow (CI runs them). Data is a small directory
of real text (a slice of the standard library's source) so an epoch stays short.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from iota_cli.swarm.local import Swarm, SwarmOptions, default_data
from iota_cli.train.api import SwarmApi

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout: float, every: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def worker_status(home: Path) -> dict:
    """`iota status --json` for one worker's IOTA_HOME: the real CLI reading its checkpoints."""
    out = subprocess.run(
        [sys.executable, "-m", "iota_cli", "status", "--json"],
        env={**os.environ, "IOTA_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


def checkpoint_step(home: Path) -> int:
    cks = worker_status(home)["checkpoints"]
    return max((c["step"] for c in cks), default=-1)


RESUMED = re.compile(r"(?:resuming from|merged past) checkpoint (\S+) \(step (\d+),")


@pytest.fixture
def swarm(tmp_path):
    made: list[Swarm] = []

    def make(max_steps: int, workers: int = 6) -> Swarm:
        s = Swarm.create(
            SwarmOptions(workers=workers, max_steps=max_steps, data=default_data()), tmp_path / "swarm"
        )
        made.append(s)
        s.start()
        return s

    yield make
    for s in made:
        s.stop_workers(grace_s=10)
        s.stop_server()


def books(folder: Path) -> Path:
    """Plain text that is not Python: generated prose with a learnable structure."""
    folder.mkdir()
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbled boxes"
    words = words.split()  # noqa: SIM905 - a sentence reads better than 16 quoted words
    for i in range(4):
        lines = [" ".join(words[(j * 7 + k * (i + 1)) % len(words)] for k in range(12)) for j in range(2000)]
        (folder / f"book-{i}.txt").write_text("\n".join(lines))
    return folder


def test_iota_swarm_trains_and_loss_falls(tmp_path):
    """The README's command on a directory of text: `iota swarm --data DIR --json` exits 0, 6 workers on 3
    stages x 2, torch and mlx mixed. (The other swarm tests train on the default, the stdlib's source.)"""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "iota_cli",
            "swarm",
            "--workers",
            "6",
            "--max-steps",
            "25",
            "--data",
            str(books(tmp_path / "books")),
            "--json",
            "--home",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["state"] == "finished"
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/ ", out.stderr), out.stderr[:2000]  # at start
    # Each replica ends near --max-steps, which the workers get as a cap too (31-49 at 40 before).
    steps = [(w["stage"], w["steps"]) for w in summary["workers"]]
    assert all(20 <= s <= 25 for _, s in steps), steps
    # Without a terminal a stage's line comes every 5 s (and when its workers come or go), not every poll.
    lines = re.findall(r"iota\.progress: (stage \d)", out.stderr)
    expected = summary["wall_s"] / 5
    for stage in ("stage 0", "stage 1", "stage 2"):
        assert expected - 4 <= lines.count(stage) <= expected + 8, (stage, lines.count(stage), expected)
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0 and summary["wall_s"] > 0
    assert summary["last_loss"] < summary["first_loss"] - 1.0, summary
    workers = summary["workers"]
    assert len(workers) == 6 and all(w["exit_code"] == 0 for w in workers)
    assert sorted(w["stage"] for w in workers) == [0, 0, 1, 1, 2, 2]
    assert {w["backend"] for w in workers} == {"torch-cpu", "mlx-cpu"}
    assert all(w["credits"] > 0 for w in workers)


def test_killed_worker_resumes_from_its_checkpoint_then_a_killed_orchestrator_comes_back(swarm):
    """Two crashes in one run (one swarm start instead of two): a worker's, then the orchestrator's. The
    run is stopped once both are shown: max_steps only has to outlast them."""
    s = swarm(max_steps=80)
    victim = s.workers[1]  # a body replica
    wait_for(lambda: checkpoint_step(victim.home) >= 3, 240, 1.0, "the victim's first checkpoints")
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    # Damage the newest checkpoint as a crash during a disk flush might: the older one must be used.
    files = sorted(
        (victim.home / "data" / "checkpoints").rglob("ckpt-*.safetensors"),
        key=lambda p: int(p.stem.split("-")[1]),
    )
    assert len(files) == 2, files
    newest = files[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    step_at_kill = int(files[0].stem.split("-")[1])
    before = s.status().samples_completed
    # The other body replica carries the stage: samples keep completing without the victim.
    wait_for(lambda: s.status().samples_completed >= before + 4, 120, 1.0, "progress without the victim")
    victim.start(s.url, s.run_id)
    log = victim.home / "worker.log"
    # The older checkpoint restores the step and optimizer state; its weights too, unless the swarm merged
    # past its epoch while the victim was down (at the default interval it usually has): then the
    # swarm's weights.
    resumed = wait_for(lambda: RESUMED.search(log.read_text()), 120, 0.5, "the resume message")
    assert resumed.group(1) == files[0].name and int(resumed.group(2)) == step_at_kill, resumed.group(0)
    assert newest.name in log.read_text()  # the corrupt file was named in a warning
    wait_for(lambda: checkpoint_step(victim.home) > step_at_kill, 240, 1.0, "steps after the resume")

    # Now the orchestrator: kill -9, and every worker waits for it and carries on when it is back.
    pids = [w.proc.pid for w in s.workers]
    s.orchestrator.kill()
    time.sleep(4)  # workers now see connection refused and wait with backoff
    assert all(w.running() for w in s.workers), "a worker died while the orchestrator was down"
    logs = [(w.home / "worker.log").read_text() for w in s.workers]
    assert any("unreachable" in text for text in logs)
    s.start_server()  # same port, same data dir
    status = wait_for(s.status, 30, 0.5, "the orchestrator to answer again")
    completed_before = status.samples_completed
    wait_for(lambda: s.status().samples_completed >= completed_before + 6, 240, 1.0, "progress after restart")
    assert [w.proc.pid for w in s.workers] == pids  # nobody was restarted
    with SwarmApi.connect(s.url, s.admin_token) as admin:
        admin.stop_run(s.run_id)  # the rest of the run proves nothing more: it drains and finishes
    wait_for(lambda: not s.any_running(), 400, 2.0, "the run to finish")
    # Every worker exits 0: none was banned for results sent across the restart or a merge.
    assert all(w.proc.returncode == 0 for w in s.workers), [w.proc.returncode for w in s.workers]
    final = s.status()
    assert final.state == "finished" and final.last_loss < final.first_loss


class Terminal:
    """A command on a pseudo-terminal of its own, as in a shell: a session whose controlling terminal is
    the pty, so its stderr is a tty (progress bars) and a Ctrl-C goes to its whole process group."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        import fcntl
        import pty
        import struct
        import termios

        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
        self.proc = subprocess.Popen(
            args,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # noqa: PLW1509 - no threads yet
        )
        os.close(slave)
        self.master, self.out = master, bytearray()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every process holding the pty has exited
                return
            if not chunk:
                return
            self.out.extend(chunk)

    def ctrl_c(self) -> None:
        """What the terminal does for Ctrl-C: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def close(self) -> str:
        """Kill what is left, read the rest of the output and return all of it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.reader.join(timeout=5)
        os.close(self.master)
        return self.out.decode(errors="replace")


def checkpoints(home: Path) -> list[Path]:
    return list((home / "data" / "checkpoints").rglob("ckpt-*.safetensors"))


SWARM_3 = [sys.executable, "-m", "iota_cli", "swarm", "--workers", "3", "--max-steps", "1000", "--home"]


def test_ctrl_c_in_a_terminal_stops_the_workers_first_and_ends_on_a_clean_line(tmp_path):
    """Ctrl-C as a terminal sends it, to the process group: the launcher alone gets it (each child has a
    session of its own), so every worker gives back its work, checkpoints and leaves while the
    orchestrator still answers; the bars are closed, the summary prints, exit 0."""
    home = tmp_path / "s"
    term = Terminal([*SWARM_3, str(home)])
    try:
        wait_for(lambda: all(checkpoints(home / f"worker-{i}") for i in range(3)), 180, 1.0, "training")
        term.ctrl_c()
        asked = time.monotonic()
        code = term.proc.wait(90)
        took = time.monotonic() - asked
    finally:
        out = term.close()
    assert code == 0, out[-3000:]
    assert took < 30, f"the clean stop took {took:.0f} s"
    assert "Traceback" not in out and "unreachable" not in out
    assert "stopping: the workers first" in out
    assert re.search(r"worker\s+stage\s+backend", out) and f"Files: {home}\r\n" in out
    assert out.endswith("\r\n"), repr(out[-200:])  # the terminal is left on a clean line
    for i in range(3):
        log = (home / f"worker-{i}" / "worker.log").read_text()
        assert "checkpointing" in log and "stopped" in log, log[-2000:]
        for bad in ("connection refused", "unreachable", "could not give back", "could not tell the orch"):
            assert bad not in log, f"worker {i}: {bad!r} in\n{log[-2000:]}"


def training(home: Path) -> bool:
    log = home / "worker.log"
    return log.exists() and ", training" in log.read_text()


def swarm_pids(marker: str) -> list[int]:
    """Processes whose environment carries marker (everything a swarm started inherits it)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def test_a_second_ctrl_c_kills_every_process_at_once(tmp_path):
    home, marker = tmp_path / "s", f"IOTA_TEST_SWARM={os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "IOTA_TEST_SWARM": marker.split("=", 1)[1]}
    term = Terminal([*SWARM_3, str(home)], env=env)
    try:
        wait_for(lambda: len(swarm_pids(marker)) >= 6, 120, 0.5, "launcher, orchestrator, validator, workers")
        # Busy workers, so that their clean stop takes the seconds a second Ctrl-C cuts short.
        wait_for(lambda: all(training(home / f"worker-{i}") for i in range(3)), 120, 0.5, "training")
        term.ctrl_c()
        time.sleep(0.5)
        term.ctrl_c()
        asked = time.monotonic()
        code = term.proc.wait(30)
        took = time.monotonic() - asked
        wait_for(lambda: not swarm_pids(marker), 10, 0.2, "every process of the swarm to be gone")
    finally:
        out = term.close()
    assert code == 130, out[-3000:]
    assert took < 5, f"the second Ctrl-C took {took:.1f} s"
    assert "Traceback" not in out and out.endswith("\n"), repr(out[-200:])
