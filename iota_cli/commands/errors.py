"""One table from the exceptions commands let through to what the user sees: message, hint, exit code.

Commands raise (a bad config file, a missing token, a refused join, an orchestrator that is gone or says
no); `iota`'s root group (app.py) reports them here once, as `error: ...` and `hint: ...` on stderr, with
the exit codes scripts and systemd rely on (output.EXIT_*: 1 failed, 69 unreachable, 78 configuration).
Anything not in the table is a bug: one line says what it was and which file under the log directory
holds its traceback (exit 70); IOTA_DEBUG=1 prints the traceback instead. Ctrl-C exits 130 quietly.
Try it: `IOTA_HOME=/nonexistent iota join`.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iota_cli import output


@dataclass(frozen=True)
class Known:
    """How one kind of exception is reported; code and hint may depend on the exception."""

    code: int | Callable[[Any], int]
    hint: str | Callable[[Any], str | None] | None = None
    prefix: str = ""

    def exit_code(self, e: Exception) -> int:
        return self.code if isinstance(self.code, int) else self.code(e)

    def hint_for(self, e: Exception) -> str | None:
        return self.hint if self.hint is None or isinstance(self.hint, str) else self.hint(e)


def _refused(e: Any) -> int:
    return output.EXIT_CONFIG if e.status in (401, 403) else output.EXIT_FAIL


_URL_HINT = "an orchestrator URL looks like https://swarm.example.org (http:// for loopback)"
_NETWORK_HINT = "check the URL and this machine's network: `iota doctor --orchestrator URL`"
_CHECKPOINT_HINT = "`iota join --fresh` discards local checkpoints and starts from the swarm's weights"

# Most specific first. Named, not imported: an exception can only come from a module already loaded, so
# `iota --help` imports none of these (tests/test_cli_errors.py checks every name resolves).
TABLE: tuple[tuple[str, Known], ...] = (
    (
        "iota_cli.config.settings.SettingsError",
        Known(
            output.EXIT_CONFIG,
            hint="fix or delete the config file (see `iota config path`), or the IOTA_ variable",
        ),
    ),
    ("iota_cli.config.credentials.CredentialsError", Known(output.EXIT_CONFIG)),
    ("iota_cli.output.Failure", Known(lambda e: e.code, hint=lambda e: e.hint)),  # JoinError, SwarmError
    ("iota_cli.train.errors.Unreachable", Known(output.EXIT_UNAVAILABLE)),
    ("iota_cli.train.errors.ApiError", Known(_refused, prefix="the orchestrator refused: ")),
    ("iota_cli.core.urls.UrlError", Known(output.EXIT_CONFIG, hint=lambda e: e.hint)),
    ("iota_cli.core.backend.BackendError", Known(output.EXIT_CONFIG, hint="`iota backends` lists them")),
    ("iota_cli.train.checkpoint.CheckpointError", Known(output.EXIT_FAIL, hint=_CHECKPOINT_HINT)),
    ("iota_cli.headless.service.ServiceError", Known(output.EXIT_FAIL)),
    # The client checks URLs itself; these are the safety net for one that slips past.
    ("requests.exceptions.InvalidURL", Known(output.EXIT_CONFIG, hint=_URL_HINT, prefix="bad URL: ")),
    ("requests.exceptions.MissingSchema", Known(output.EXIT_CONFIG, hint=_URL_HINT, prefix="bad URL: ")),
    ("requests.exceptions.InvalidSchema", Known(output.EXIT_CONFIG, hint=_URL_HINT, prefix="bad URL: ")),
    (
        "requests.exceptions.ConnectionError",
        Known(output.EXIT_UNAVAILABLE, hint=_NETWORK_HINT, prefix="cannot connect: "),
    ),
    ("requests.exceptions.Timeout", Known(output.EXIT_UNAVAILABLE, hint=_NETWORK_HINT, prefix="timed out: ")),
)


def resolve(dotted: str) -> type[BaseException] | None:
    """The class a TABLE name stands for, if its module is loaded."""
    module, _, name = dotted.rpartition(".")
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


def known(e: BaseException) -> Known | None:
    for dotted, how in TABLE:
        kind = resolve(dotted)
        if kind is not None and isinstance(e, kind):
            return how
    return None


def report(e: Exception) -> None:
    """Print e and exit with its code if the table knows it; return (so the caller re-raises) if not."""
    how = known(e)
    if how is not None:
        output.fail(f"{how.prefix}{e}", hint=how.hint_for(e), code=how.exit_code(e))


def report_unexpected(e: BaseException) -> None:
    """A bug: one line and where its traceback was written, then exit 70 (IOTA_DEBUG=1: return, so the
    caller re-raises and the traceback prints here)."""
    if os.environ.get("IOTA_DEBUG"):
        return
    where = _write_traceback(e)
    saved = f"the full traceback is in {where}" if where else "its traceback could not be saved"
    first = (str(e).strip().splitlines() or ["(no message)"])[0]
    output.fail(
        f"unexpected {type(e).__name__}: {first}",
        hint=f"this is a bug in iota; {saved} (please attach it to a bug report; IOTA_DEBUG=1 shows it here)",
        code=output.EXIT_BUG,
    )


def _write_traceback(e: BaseException) -> Path | None:
    """Write e's traceback to a new file in the log directory (the temp dir when that fails)."""
    import tempfile

    text = "".join(traceback.format_exception(e))
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (_log_dir(), Path(tempfile.gettempdir())):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            with open(path, "x") as f:
                f.write(f"iota {' '.join(sys.argv[1:])}\n\n{text}")
            return path
        except OSError:
            continue
    return None


def _log_dir() -> Path | None:
    try:
        from iota_cli.config.settings import paths

        return paths().log_dir
    except Exception:  # noqa: BLE001 - reporting a bug must not raise another
        return None
