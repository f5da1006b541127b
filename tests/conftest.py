"""Shared fixtures: every test gets its own IOTA_HOME, so no test touches the real ~/.config."""

from __future__ import annotations

import pytest

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
