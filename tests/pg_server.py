"""A throwaway PostgreSQL for tests: Debian's binaries, a data dir in /tmp, loopback TCP, one database each.

initdb refuses to run as root, so as root the cluster belongs to the `postgres` user (Debian's package
makes it) or, lacking that, `nobody`. It runs with fsync off (a test database need not survive power
loss) and is stopped with `pg_ctl -m immediate`. Each test asks for a database of its own:

    with PostgresServer.start_new() as pg:
        url = pg.create_database()   # postgresql://postgres@127.0.0.1:PORT/t_1a2b3c

tests/conftest.py takes its fixtures from here (postgres_server, pg_url) and the `--database` option:
    .venv/bin/python -m pytest --database postgresql tests/test_orchestrator_api.py
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

BIN_DIRS = [Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15, 14, 13)]


def binaries() -> Path | None:
    """Where initdb and pg_ctl are (PG_BIN, else Debian's layout), or None."""
    env = os.environ.get("PG_BIN")
    for d in [Path(env)] if env else BIN_DIRS:
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    return None


def _owner() -> pwd.struct_passwd | None:
    """The user to run the cluster as (None: this one, when not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root with no postgres or nobody user to own the test cluster")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="iota-pg-"))
        self.data = self.root / "data"
        self.port = 0
        self.user = _owner()

    @classmethod
    def start_new(cls) -> PostgresServer:
        bin_dir = binaries()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL binaries (apt-get install postgresql)")
        return cls(bin_dir).start()

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        kw: dict = {}
        if self.user is not None:
            uid, gid = self.user.pw_uid, self.user.pw_gid
            kw = {"user": uid, "group": gid, "extra_groups": []}
        return subprocess.run(
            list(args), check=True, capture_output=True, text=True, cwd=self.root, timeout=120, **kw
        )

    def start(self) -> PostgresServer:
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        initdb = str(self.bin / "initdb")
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        opts = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": "",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "64MB",
        }
        with (self.data / "postgresql.conf").open("a") as f:
            f.writelines(f"{k} = '{v}'\n" for k, v in opts.items())
        for _ in range(5):  # the port was free a moment ago; another process may take it meanwhile
            self.port = _free_port()
            log = str(self.root / "server.log")
            pg_ctl = str(self.bin / "pg_ctl")
            try:
                self._run(pg_ctl, "-D", str(self.data), "-l", log, "-o", f"-p {self.port}", "-w", "start")
                return self
            except subprocess.CalledProcessError:
                continue
        raise RuntimeError("PostgreSQL did not start:\n" + (self.root / "server.log").read_text()[-2000:])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


# --- pytest: `--database postgresql` (or IOTA_TEST_DATABASE=postgresql) runs the orchestrator on it ------
# Every orchestrator a test starts (`iota orchestrator serve` reads IOTA_DATABASE; InProcessOrchestrator
# too) then gets a fresh database: one per test, and one per module for module-scoped servers.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--database",
        choices=("sqlite", "postgresql"),
        default=os.environ.get("IOTA_TEST_DATABASE", "sqlite"),
        help="where the orchestrators the tests start keep their state (postgresql: a throwaway server)",
    )


def on_postgres(config: pytest.Config) -> bool:
    return config.getoption("--database") == "postgresql"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    if binaries() is None:
        pytest.skip("no PostgreSQL binaries (/usr/lib/postgresql/*/bin; apt-get install postgresql)")
    server = PostgresServer.start_new()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the test server."""
    return postgres_server.create_database()


@pytest.fixture(scope="module", autouse=True)
def _module_database(request: pytest.FixtureRequest) -> Iterator[None]:
    if not on_postgres(request.config):
        yield
        return
    url = request.getfixturevalue("postgres_server").create_database()
    before = os.environ.get("IOTA_DATABASE")
    os.environ["IOTA_DATABASE"] = url
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("IOTA_DATABASE", None)
        else:
            os.environ["IOTA_DATABASE"] = before


@pytest.fixture(autouse=True)
def _test_database(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if on_postgres(request.config):
        monkeypatch.setenv("IOTA_DATABASE", request.getfixturevalue("postgres_server").create_database())


def state_engine(data_dir: Path) -> Engine:
    """The engine of the database the test's orchestrators use: IOTA_DATABASE (--database postgresql),
    else the SQLite file in data_dir. Dispose of it when done."""
    from iota_orchestrator.state import ServerConfig, open_engine

    return open_engine(ServerConfig(data_dir, database=os.environ.get("IOTA_DATABASE") or None))
