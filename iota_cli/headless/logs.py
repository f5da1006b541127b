"""Logging setup: readable lines in a terminal, plain levelled lines under systemd or in a pipe.

Call `setup_logging()` once at the start of a long-running command. When stderr is the journal
($JOURNAL_STREAM matches it) every line starts with journald's `<N>` syslog priority, so
`journalctl -p warning` works without any systemd library. Never colour, never a bar here.
Secrets passed to `redact()` are masked in every record.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

# sd-daemon(3) prefixes: journald reads them from each line of a unit's stdout/stderr.
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

_secrets: set[str] = set()


def redact(secret: str | None) -> None:
    """Never let this string reach a log line (the token, say)."""
    if secret and len(secret) >= 4:
        _secrets.add(secret)


def _mask(text: str) -> str:
    for s in _secrets:
        text = text.replace(s, "***")
    return text


def under_systemd(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("INVOCATION_ID") or env.get("JOURNAL_STREAM"))


def is_journal(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """Whether stream is connected to journald: $JOURNAL_STREAM is '<dev>:<inode>' of that very fd."""
    env = os.environ if env is None else env
    try:
        dev, ino = (int(x) for x in env.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class PlainFormatter(logging.Formatter):
    """`LEVEL name: message`, with `<N>` journald priority on each line when `journal`."""

    def __init__(self, journal: bool = False, timestamps: bool = True) -> None:
        fmt = "%(levelname)s %(name)s: %(message)s"
        if timestamps:
            fmt = "%(asctime)s " + fmt
        super().__init__(fmt, datefmt="%Y-%m-%dT%H:%M:%S%z")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = _mask(super().format(record))
        if not self.journal:
            return text
        prefix = f"<{PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)}>"
        # journald makes one entry per line; prefix each so a traceback keeps its priority.
        return "\n".join(prefix + line for line in text.splitlines())


class TerminalFormatter(logging.Formatter):
    """Short lines for a person at a terminal: `12:01:02 warning: message`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord(record.__dict__)
        record.levelname = record.levelname.lower()
        return _mask(super().format(record))


_HANDLER_MARK = "_iota_handler"


def setup_logging(
    level: int | str = logging.INFO,
    interactive: bool | None = None,
    stream: TextIO | None = None,
    env: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Install iota's one root handler (replacing an earlier one) and return it."""
    env = os.environ if env is None else env
    stream = sys.stderr if stream is None else stream
    if interactive is None:
        interactive = not under_systemd(env) and stream.isatty()
    if interactive:
        formatter: logging.Formatter = TerminalFormatter()
    else:
        journal = is_journal(stream, env)
        formatter = PlainFormatter(journal=journal, timestamps=not journal)  # journald stamps lines itself
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # urllib3 logs every quick retry; the client reports outages itself, once per wait.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    return handler
