"""One table from the exceptions commands let through to what the user sees: message, hint, exit code.

Commands raise (a bad config file, a missing token, a refused join, an orchestrator that is gone or says
no); `iota`'s root group (app.py) reports them here once, as `error: ...` and `hint: ...` on stderr, with
the exit codes scripts and systemd rely on (output.EXIT_*: 1 failed, 69 unreachable, 78 configuration).
Anything not in the table is a bug and keeps its traceback. Try it: `IOTA_HOME=/nonexistent iota join`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
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
    ("iota_cli.train.join.JoinError", Known(lambda e: e.code, hint=lambda e: e.hint)),
    ("iota_cli.train.errors.Unreachable", Known(output.EXIT_UNAVAILABLE)),
    ("iota_cli.train.errors.ApiError", Known(_refused, prefix="the orchestrator refused: ")),
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
