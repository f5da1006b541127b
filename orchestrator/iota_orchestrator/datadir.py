"""The data dir: private (folders 0700, files 0600), proven writable at start, and the admin token file.

Everything the orchestrator keeps lives here: the SQLite database (and its -wal and -shm), the blobs,
encoded token caches, server.json and admin-token. The database holds the key that signs blob URLs, so
nobody but the owner may read any of it; `iota orchestrator serve` also sets umask 077 so that what it
makes later is private too. A data dir left open by an older version is closed up once, at start.
Problems come out as one line for the operator (DataDirError), never a traceback.

Try it: python -c "import pathlib, iota_orchestrator.datadir as d; d.prepare(pathlib.Path('/tmp/o'))"
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from iota_cli.core.files import atomic_write

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
DATABASE = "orchestrator.sqlite3"
ADMIN_TOKEN_FILE = "admin-token"
SERVER_INFO = "server.json"
# The files that hold secrets (or lead to them); kept 0600 even where a file was made outside serve.
INVITE_FILE = "invite"  # invites.py: the operator's invite, with serve --invite-required
SECRET_FILES = (DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm", ADMIN_TOKEN_FILE, SERVER_INFO, INVITE_FILE)
TRANSIENT = (errno.ENOSPC, errno.EDQUOT)  # a restart once space is freed may work


class DataDirError(Exception):
    """The data dir cannot be used; str() is one line saying what and why."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient  # a full disk: retrying later may help; anything else needs a fix


def failure(path: Path, doing: str, e: OSError) -> DataDirError:
    reason = e.strerror or str(e)
    return DataDirError(f"data dir {path}: cannot {doing}: {reason}", transient=e.errno in TRANSIENT)


def prepare(path: Path) -> None:
    """Create path if it is missing, make it private, and prove it takes a write (DataDirError if not)."""
    try:
        if path.exists() and not path.is_dir():
            raise DataDirError(f"data dir {path} exists and is not a directory")
        path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    except OSError as e:
        raise failure(path, "create it", e) from None
    try:
        close_up(path)
    except OSError as e:
        raise failure(path, "make it private", e) from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check.")
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise failure(path, "write to it", e) from None


def close_up(path: Path) -> None:
    """Make path 0700; if it was open to others (an older version's), make everything in it private."""
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, PRIVATE_DIR)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), PRIVATE_DIR, follow_symlinks=False)
            for f in files:
                full = os.path.join(root, f)
                if not os.path.islink(full):
                    os.chmod(full, PRIVATE_FILE)
    secure_files(path)


def secure_files(path: Path) -> None:
    """The secret-holding files that exist now: 0600 (SQLite makes its -wal and -shm with its own mode)."""
    for name in SECRET_FILES:
        f = path / name
        if f.is_file() and stat.S_IMODE(f.stat().st_mode) != PRIVATE_FILE:
            os.chmod(f, PRIVATE_FILE)


def write_admin_token(path: Path, token: str) -> Path:
    """Write a newly made admin token to <data dir>/admin-token (0600); the caller prints only the path."""
    dest = path / ADMIN_TOKEN_FILE
    try:
        atomic_write(dest, f"{token}\n".encode(), mode=PRIVATE_FILE)
    except OSError as e:
        raise failure(path, f"write {ADMIN_TOKEN_FILE}", e) from None
    return dest


def forget_admin_token(path: Path) -> None:
    (path / ADMIN_TOKEN_FILE).unlink(missing_ok=True)


def read_admin_token(path: Path) -> str | None:
    """The admin token a local operator's command may use: <data dir>/admin-token, if readable."""
    try:
        token = (path / ADMIN_TOKEN_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token or None
