"""The operator's invite: with `serve --invite-required`, registering needs a shared secret.

The invite is held like the admin token: IOTA_INVITE in the server's environment, or else
`<data-dir>/invite` (0600), made at first start and kept across restarts (delete it to issue a new
one). The server prints the file's path, never the invite; the invite is never stored in the database,
the config or a log. Contributors pass it in their registration (`iota join` reads IOTA_INVITE).
A registration sent with the admin token needs no invite: the operator is registering its own worker.
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

from iota_cli.core.files import atomic_write
from iota_orchestrator.datadir import INVITE_FILE, PRIVATE_FILE, DataDirError, failure


def ensure(data_dir: Path, from_env: str | None) -> tuple[str, Path | None]:
    """The invite to require, and the file it was read from or written to (None: from the environment)."""
    if from_env:
        return from_env, None
    path = data_dir / INVITE_FILE
    try:
        invite = path.read_text().strip() if path.exists() else ""
        if not invite:
            invite = "iota_invite_" + secrets.token_urlsafe(24)
            atomic_write(path, f"{invite}\n".encode(), mode=PRIVATE_FILE)
    except OSError as e:
        raise failure(data_dir, f"read or write {INVITE_FILE}", e) from None
    except UnicodeDecodeError:
        why = f"{INVITE_FILE} is not text; delete it to make a new one"
        raise DataDirError(f"data dir {data_dir}: {why}") from None
    return invite, path


def valid(expected: str, given: str | None) -> bool:
    """Whether the invite a registration carries is the operator's (in constant time)."""
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())
