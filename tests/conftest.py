"""Shared fixtures: every test gets its own IOTA_HOME, so no test touches the real ~/.config."""

from __future__ import annotations

import signal

import pytest
import quiet

# The throwaway PostgreSQL and `--database postgresql` (tests/pg_server.py).
from pg_server import _module_database, _test_database, pg_url, postgres_server, pytest_addoption  # noqa: F401

# A real SeaweedFS for the object-store tests, one a session (tests/seaweedfs.py).
from seaweedfs import seaweed  # noqa: F401


@pytest.fixture(autouse=True)
def iota_home(tmp_path, monkeypatch):
    home = tmp_path / "iota-home"
    monkeypatch.setenv("IOTA_HOME", str(home))
    for var in ("IOTA_TOKEN", "IOTA_ORCHESTRATOR", "IOTA_BACKEND", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(autouse=True)
def signals():
    """What a test leaves of this process's signal handling is undone: a command run in-process keeps
    its Ctrl-C handler, and a later test's child (which inherits an ignored or blocked SIGINT) would not
    stop on Ctrl-C (tests/test_status_watch.py failed so under xdist)."""
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    for signum, handler in kept.items():
        if handler is not None:
            signal.signal(signum, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def pytest_collection_modifyitems(items):
    """End-to-end modules first: the longest start at once, and the short tests fill in around them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Two tests share the cores at a time; one that measures time has them alone (tests/quiet.py)."""
    with quiet.cores(item.get_closest_marker("quiet") is not None):
        yield
