"""Facts about this host that a systemd service depends on: is systemd running, its version, user
namespaces, credential encryption, lingering, and the absolute `iota` command a unit runs.

Every systemctl / loginctl call goes through an injectable Runner (see service.py), so tests need no systemd:
    python -c "from iota_cli.headless import host; print(host.systemd_running(), host.systemd_version())"
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

BASELINE_SYSTEMD = 252  # Debian 12; newer keys are rendered only when the host's systemd knows them

Scope = Literal["user", "system"]
Runner = Callable[..., "subprocess.CompletedProcess[str]"]  # runner(argv, input=None)


def iota_executable() -> tuple[str, ...]:
    """The absolute command that runs this iota (units don't get the user's PATH)."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "iota" and argv0.is_file():
        return (str(argv0.absolute()),)
    # Keep the venv's bin path unresolved: resolving its python symlink would leave the venv.
    beside = Path(sys.executable).parent / "iota"
    if beside.is_file():
        return (str(beside.absolute()),)
    if found := shutil.which("iota"):
        return (str(Path(found).absolute()),)
    return (str(Path(sys.executable).absolute()), "-m", "iota_cli")


def systemd_running(marker: Path = Path("/run/systemd/system")) -> bool:
    """sd_booted(): true when systemd is PID 1 here (false in most containers)."""
    return marker.is_dir()


def userns_available(proc: Path = Path("/proc/sys")) -> bool:
    """Whether a user manager can sandbox (ProtectSystem= etc. need unprivileged user namespaces)."""

    def read(rel: str) -> str | None:
        with contextlib.suppress(OSError):
            return (proc / rel).read_text().strip()
        return None

    if read("kernel/unprivileged_userns_clone") == "0" or read("user/max_user_namespaces") == "0":
        return False
    # Ubuntu 24.04+: AppArmor strips capabilities inside unprivileged user namespaces.
    return read("kernel/apparmor_restrict_unprivileged_userns") != "1"


def run_command(argv: Sequence[str], input: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real runner: capture output, never raise for a missing binary or a non-zero exit."""
    try:
        return subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return subprocess.CompletedProcess(list(argv), 127, "", f"{argv[0]}: command not found")


def systemd_version(runner: Runner = run_command) -> int:
    out = runner(["systemctl", "--version"])
    m = re.match(r"systemd (\d+)", out.stdout or "")
    return int(m.group(1)) if out.returncode == 0 and m else BASELINE_SYSTEMD


def can_encrypt(scope: Scope, which: Callable[[str], str | None] = shutil.which) -> bool:
    # `systemd-creds --user` needs systemd 256; for user units a 0600 file is what works on 252.
    return scope == "system" and which("systemd-creds") is not None


def linger(user: str, runner: Runner = run_command) -> bool | None:
    """Whether the user's services run without a login session (None: unknown)."""
    out = runner(["loginctl", "show-user", user, "--property=Linger", "--value"])
    value = (out.stdout or "").strip()
    return {"yes": True, "no": False}.get(value) if out.returncode == 0 else None
