"""Start an orchestrator as a child process and wait until it listens: for `iota swarm`, tests, benchmarks.

The child is `python -m iota_cli orchestrator serve ...`, the command an operator runs, so this module
never imports the server (it needs the [orchestrator] extra installed, not imported):

    with OrchestratorProcess(tmp_dir, admin_token="t") as orch:
        print(SwarmApi.connect(orch.url).health())

Without admin_token the server makes one and writes it to `<data-dir>/admin-token`; `admin_token_file`
says where, for a caller that needs it. The child runs in a session of its own (so does the validator):
a terminal's Ctrl-C never reaches it, only the SIGTERM of whoever started it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from iota_cli.core.protocol import LISTENING


class OrchestratorProcess:
    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        admin_token: str = "",
        tick_s: float = 1.0,
        sync: str = "normal",
        host: str = "127.0.0.1",
        extra_env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir, self.port, self.host = Path(data_dir), port, host
        self.admin_token, self.tick_s, self.sync = admin_token, tick_s, sync
        # The database it keeps its state in (IOTA_DATABASE), fixed when made: a restart finds the same state.
        pinned = {"IOTA_DATABASE": os.environ["IOTA_DATABASE"]} if os.environ.get("IOTA_DATABASE") else {}
        self.extra_env, self.extra_args = pinned | (extra_env or {}), tuple(extra_args)
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.lines: list[str] = []

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "iota_cli",
            "orchestrator",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--tick",
            str(self.tick_s),
            "--sync",
            self.sync,
            *self.extra_args,
        ]

    def start(self, timeout: float = 60.0) -> OrchestratorProcess:
        # Without admin_token the server makes one and writes it to <data-dir>/admin-token (it never
        # prints it); an IOTA_ADMIN_TOKEN of our own environment is not passed on by accident.
        env = {k: v for k, v in os.environ.items() if k != "IOTA_ADMIN_TOKEN"} | self.extra_env
        if self.admin_token:
            env["IOTA_ADMIN_TOKEN"] = self.admin_token
        # A session of its own, as the workers and the validator have: a terminal's Ctrl-C must reach only
        # the launcher, which stops the workers first; an orchestrator that died first would leave them
        # unable to give back their work or say they are leaving.
        self.proc = subprocess.Popen(
            self.command(),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        found = threading.Event()
        self.url = ""  # a restart that fails must not pass for started on the last run's address

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if line.startswith(LISTENING):
                    self.url = line.split()[-1]
                    found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(timeout) or not self.url:
            self.kill()
            raise RuntimeError("orchestrator did not start:\n" + "\n".join(self.lines[-30:]))
        port = urlsplit(self.url).port if self.url.startswith("http") else None
        if not port:
            self.kill()
            raise RuntimeError(
                f"orchestrator printed no address ({self.url!r}):\n" + "\n".join(self.lines[-30:])
            )
        self.port = port
        return self

    @property
    def admin_token_file(self) -> Path:
        """Where the server writes the admin token it makes (when none was given)."""
        return self.data_dir / "admin-token"  # datadir.ADMIN_TOKEN_FILE; iota_cli never imports the server

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the crash case (nothing gets to clean up)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        return 0 if self.proc is None else terminate(self.proc, timeout)

    def __enter__(self) -> OrchestratorProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *_: object) -> None:
        self.stop()


class ValidatorProcess:
    """`iota orchestrator validate` beside a local orchestrator: it judges the sampled checks."""

    def __init__(self, url: str, admin_token: str, log_path: Path, backend: str = "torch-cpu") -> None:
        self.url, self.admin_token, self.log_path, self.backend = url, admin_token, log_path, backend
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ValidatorProcess:
        env = os.environ | {"IOTA_ADMIN_TOKEN": self.admin_token, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "iota_cli", "orchestrator", "validate", "--url", self.url]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*cmd, "--backend", self.backend],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def ask_to_stop(self) -> None:
        """SIGTERM without waiting: it stops once its long poll for a check (up to 10 s) comes back, so a
        caller that has other processes to stop first can let that wait run beside theirs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0, patience_s: float = 1.0) -> int | None:
        """SIGTERM (it finishes the check in hand and prints its tally), SIGKILL after timeout.

        Still waiting for a check after patience_s, it gets a SIGINT, which ends that wait at once (it
        still prints its tally); the orchestrator then gives up the abandoned request within its 5 s of
        graceful shutdown, sooner than the 10 s poll would have ended."""
        if self.proc is None:
            return None
        self.ask_to_stop()
        try:
            self.proc.wait(patience_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
        return terminate(self.proc, timeout)


def terminate(proc: subprocess.Popen[Any], timeout: float) -> int:
    """SIGTERM a child and wait for it, SIGKILL it after timeout; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.1) -> bool:
    """Poll predicate until it is truthy (True) or timeout seconds pass (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False
