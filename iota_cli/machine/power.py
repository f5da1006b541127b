"""Power and sleep: keep the machine awake while iota works, and pause work on battery.

`KeepAwake.start(pid)` holds an OS sleep inhibitor for as long as process `pid` lives (macOS:
`caffeinate -w`; Linux: `systemd-inhibit` around `tail --pid`), so even a kill -9 releases it.
`PowerGuard.should_pause()` is asked once per loop iteration and returns a reason while on battery.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

WHY = "training a language model with iota"


def keep_awake_command(
    pid: int, system: str | None = None, which: Callable[[str], str | None] = shutil.which
) -> list[str] | None:
    """The command that inhibits sleep until `pid` exits, or None where there is none."""
    system = system or platform.system()
    if system == "Darwin" and (caff := which("caffeinate")):
        # -i: no idle sleep; -s: no system sleep on AC; -w: exit when pid does.
        return [caff, "-i", "-s", "-w", str(pid)]
    if system == "Linux" and (inhibit := which("systemd-inhibit")) and (tail := which("tail")):
        # The lock lives as long as the command it wraps; GNU tail --pid exits when pid does.
        return [
            inhibit,
            "--what=sleep:idle",
            "--who=iota",
            f"--why={WHY}",
            "--mode=block",
            tail,
            f"--pid={pid}",
            "-f",
            "/dev/null",
        ]
    return None


class KeepAwake:
    """A child process holding a sleep inhibitor; stop() (or our exit) releases it."""

    def __init__(self, command: Sequence[str] | None) -> None:
        self.command = list(command) if command else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: str | None = None

    @classmethod
    def for_pid(cls, pid: int | None = None, **kw: Any) -> KeepAwake:
        return cls(keep_awake_command(os.getpid() if pid is None else pid, **kw))

    def start(self, settle_s: float = 0.3) -> bool:
        """Start the inhibitor; False (with .error) when there is none or it exits at once (no logind)."""
        if not self.command:
            self.error = "no sleep inhibitor on this system"
            return False
        try:
            # Own process group, so stop() reaches the wrapped tail too; stderr kept to explain a failure.
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            self.error = str(e)
            return False
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=settle_s)
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
            self.error = err.splitlines()[-1] if err else f"exited with {self.proc.returncode}"
            self.proc = None
            log.info("could not keep the machine awake: %s", self.error)
            return False
        log.debug("keeping the machine awake: %s", " ".join(self.command))
        return True

    @property
    def active(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def __enter__(self) -> KeepAwake:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _default_probe() -> Any:
    from iota_cli.machine.hardware import probe_power

    return probe_power()


class PowerGuard:
    """Battery policy: pause on battery unless allowed; unknown power never pauses.

    `probe` returns an object with `.on_ac: bool | None` (and optionally `.battery_percent`); it is
    called at most every `check_every_s`, because reading power can cost a subprocess (pmset).
    """

    def __init__(
        self,
        probe: Callable[[], Any] | None = None,
        allow_battery: bool = False,
        check_every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe = probe or _default_probe
        self.allow_battery = allow_battery
        self.check_every_s = check_every_s
        self._clock = clock
        self._checked_at: float | None = None
        self.reason: str | None = None  # why we are paused now; None while running

    @property
    def paused(self) -> bool:
        return self.reason is not None

    def should_pause(self) -> str | None:
        """None to keep working, or the reason to pause (logged once when it starts and when it ends)."""
        if self.allow_battery:
            return None
        now = self._clock()
        if self._checked_at is not None and now - self._checked_at < self.check_every_s:
            return self.reason
        self._checked_at = now
        try:
            status = self.probe()
        except Exception as e:  # a broken probe must not stop the work
            log.debug("power probe failed: %s", e)
            status = None
        on_ac = getattr(status, "on_ac", None)
        if on_ac is False:
            if self.reason is None:
                pct = getattr(status, "battery_percent", None)
                level = f" ({pct:.0f}%)" if isinstance(pct, int | float) else ""
                self.reason = (
                    f"on battery{level}: paused until AC power returns (--allow-battery to keep going)"
                )
                log.warning(self.reason)
        elif self.reason is not None:
            log.info("AC power is back: resuming")
            self.reason = None
        return self.reason
