"""The one output sink: human text by default, JSON with --json, errors on stderr, meaningful exit codes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NoReturn

import typer

# Exit codes scripts (and systemd's RestartPreventExitStatus=) can trust.
EXIT_OK = 0
EXIT_FAIL = 1  # a check failed, or the command could not do its job
EXIT_USAGE = 2  # bad arguments (Typer's own)
EXIT_UNAVAILABLE = 69  # the orchestrator or a service could not be reached
EXIT_CONFIG = 78  # bad configuration or credentials: restarting will not help


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def echo(text: str = "") -> None:
    typer.echo(text)


def warn(text: str) -> None:
    typer.echo(f"warning: {text}", err=True)


def fail(message: str, hint: str | None = None, code: int = EXIT_FAIL) -> NoReturn:
    """Print an error (and what to do about it) to stderr and exit with code."""
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    raise typer.Exit(code)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (no colour, so it reads the same in a terminal and in a journal)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
