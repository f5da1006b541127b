"""The one output sink: human text by default, JSON with --json, errors on stderr, meaningful exit codes.

A command builds its result as plain data and hands it to a Sink with the function that renders it for
people; the sink alone decides between the two, so no command branches on --json:

    out = output.Sink(as_json)
    out.result({"ok": True, "checks": [...]}, render)   # render(data) -> str; --json prints the data
    out.note("Wrote /etc/iota/token")                    # for people only: stderr under --json
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn

import typer

# Exit codes scripts (and systemd's RestartPreventExitStatus=) can trust.
EXIT_OK = 0
EXIT_FAIL = 1  # a check failed, or the command could not do its job
EXIT_USAGE = 2  # bad arguments (Typer's own)
EXIT_UNAVAILABLE = 69  # the orchestrator or a service could not be reached
EXIT_BUG = 70  # an unexpected error inside iota (sysexits' EX_SOFTWARE): the traceback is in a log
EXIT_CONFIG = 78  # bad configuration or credentials: restarting will not help
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C before the command could finish

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


class Failure(Exception):
    """A command cannot do its job, for a reason the user can act on: the error map (commands/errors.py)
    prints the message and hint and exits with code. Raised below the CLI layer, which never exits."""

    def __init__(self, message: str, code: int = EXIT_FAIL, hint: str | None = None) -> None:
        super().__init__(message)
        self.code, self.hint = code, hint


@dataclass(frozen=True)
class Sink:
    """Where a command's result goes: rendered for people, or as one JSON document (json=True)."""

    json: bool = False

    def result(self, data: Any, render: Callable[[Any], str] | None = None) -> None:
        """The command's result: data as JSON, or render(data) (str(data) without render) as text."""
        if self.json:
            print_json(data)
        else:
            echo(render(data) if render else str(data))

    def failure(self, data: Any, message: str, hint: str | None = None, code: int = EXIT_FAIL) -> NoReturn:
        """A result that is a failure: data as JSON on stdout, or `error:`/`hint:` on stderr; exit code."""
        if self.json:
            print_json(data)
            raise typer.Exit(code)
        fail(message, hint=hint, code=code)

    def note(self, text: str) -> None:
        """A line for people beside the result; under --json it goes to stderr so stdout stays JSON."""
        typer.echo(text, err=self.json)


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


class Redraw:
    """A block of text refreshed in place: in a terminal each draw replaces the last (cursor up, clear
    to the end), elsewhere (a pipe, a log) each draw is one line, so a file reads as a history."""

    def __init__(self, tty: bool | None = None) -> None:
        import sys

        self.stream = sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self._lines = 0

    def draw(self, block: str, line: str) -> None:
        """Show `block` (terminal) or `line` (otherwise)."""
        if not self.tty:
            self.stream.write(line + "\n")
        else:
            import shutil

            # A line wider than the terminal wraps, and the next draw would move up too few lines.
            width = max(20, shutil.get_terminal_size().columns - 1)
            block = "\n".join(b[:width] for b in block.split("\n"))
            up = f"\x1b[{self._lines}F" if self._lines else ""
            self.stream.write(up + "\x1b[J" + block + "\n")
            self._lines = block.count("\n") + 1
        self.stream.flush()
