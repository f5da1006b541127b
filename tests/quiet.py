"""Quiet cores for the tests that measure time: the suite runs two tests at once (pytest-xdist, `-n 2` in
pyproject.toml), except that a test marked `quiet` runs with no other test beside it.

A readers-writer lock on two files that every xdist worker (and any other pytest on this machine) opens:
each test holds `cores` shared, a quiet one holds it exclusive. flock has no writer preference, so a
`turnstile` taken briefly before `cores` keeps a waiting quiet test from being starved by a stream of
others: once it holds the turnstile, nobody new gets in until it has the cores. The lock covers a test's
whole protocol, module fixtures included (a quiet module's baseline run is measured alone too).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

_DIR = Path(tempfile.gettempdir()) / f"iota-tests-{os.getuid()}"


@contextlib.contextmanager
def cores(quiet: bool) -> Iterator[None]:
    """Hold the cores for one test: alone when `quiet`, beside other non-quiet tests otherwise."""
    _DIR.mkdir(exist_ok=True)
    with open(_DIR / "turnstile", "a") as turnstile, open(_DIR / "cores", "a") as held:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(held, fcntl.LOCK_EX if quiet else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
