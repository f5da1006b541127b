"""Run the orchestrator in this process: what `iota orchestrator serve` calls (see iota_orchestrator/cli.py).

At first start (or with --new-admin-token) it writes the admin token to `<data-dir>/admin-token` (0600)
and prints that path, never the token: under systemd stdout goes to the journal. Prints
`iota orchestrator listening on http://HOST:PORT` once it accepts requests and writes
`<data-dir>/server.json` ({url, pid}) for scripts; SIGTERM or Ctrl-C shut it down cleanly (exit 0).
With invite_required the invite comes from IOTA_INVITE or `<data-dir>/invite` (invites.py), and again
only the file's path is printed.
A data dir it cannot use raises DataDirError before anything listens.
With --database the state is on PostgreSQL (postgres.py); --workers N serves the port from N replica
processes (replicas.py), the database readied once before any of them starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import uvicorn

from iota_cli.core.files import atomic_write
from iota_cli.core.protocol import LISTENING
from iota_orchestrator.state import ServerConfig, State, open_state, prepare
from iota_orchestrator.wakeups import Wakeups


class Server(uvicorn.Server):
    """uvicorn's server, ending the long-polls first when it shuts down, so no request is still waiting
    (and then cancelled, with a traceback) when the graceful-shutdown timeout ends."""

    def __init__(self, wake: Wakeups, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.wake = wake

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.wake.close()
        await super().shutdown(sockets)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP (not 0): asyncio only sets TCP_NODELAY on accepted sockets that say so, and
    # without it every small response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # Restarting on the same port right after a crash must not wait for TIME_WAIT to pass.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


def url_for(host: str, port: int) -> str:
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(state: State, log_level: str) -> Server:
    """uvicorn serving the app on an opened State (this process's replica)."""
    from iota_orchestrator.app import create_app

    return Server(
        state.wake,
        uvicorn.Config(
            create_app(state),
            log_level=log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            timeout_keep_alive=30,
            backlog=4096,
        ),
    )


def setup_process(log_level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.WARNING), format="%(levelname)s %(message)s"
    )
    # Everything made from here on (database, blobs, caches) is the owner's only: the database holds
    # the key that signs blob URLs.
    os.umask(0o077)


def serve(
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8700,
    rotate_admin: bool = False,
    log_level: str = "warning",
    invite_required: bool = False,
    workers: int = 1,
) -> int:
    """Serve until a signal arrives; return the exit code. workers > 1: that many replica processes
    on one port (replicas.py; PostgreSQL only)."""
    setup_process(log_level)
    if invite_required:
        from iota_orchestrator import datadir, invites

        datadir.prepare(config.data_dir)
        invite, invite_file = invites.ensure(config.data_dir, os.environ.get("IOTA_INVITE") or None)
        config = replace(config, invite=invite)
        where = invite_file or "IOTA_INVITE"
        print(f"registration needs the invite in {where} (readable by this user only)", flush=True)
    admin_from_env = os.environ.get("IOTA_ADMIN_TOKEN") or None
    if workers > 1:  # the database is readied once, before any replica serves
        _say_token(prepare(config, admin_from_env, rotate_admin))
        from iota_orchestrator import replicas

        sock = bind(host, port)
        try:
            return replicas.run(config, sock, url_for(host, sock.getsockname()[1]), workers, log_level)
        finally:
            sock.close()
    opened = open_state(config, admin_from_env, rotate_admin)
    _say_token(opened.admin_token_file)
    sock = bind(host, port)
    bound_port = sock.getsockname()[1]
    url = url_for(host, bound_port)
    server = make_server(opened.state, log_level)
    quiet_signals()
    info = config.data_dir / "server.json"
    try:
        asyncio.run(_run(server, sock, url, info))
    finally:
        with contextlib.suppress(OSError):
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            info.unlink()
    return 0 if server.started else 1


def _say_token(token_file: Path | None) -> None:
    if token_file:
        print(f"admin token written to {token_file} (readable by this user only)", flush=True)


def quiet_signals() -> None:
    """uvicorn re-raises the signal that stopped it once it is done; make that a no-op so we exit 0."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)


def write_info(info: Path, fields: dict[str, object]) -> None:
    """<data-dir>/server.json, for scripts: {url, pid} (and the replicas' pids)."""
    try:
        atomic_write(info, json.dumps(fields).encode(), mode=0o600)
    except OSError as e:  # only scripts read it; the server itself is up
        logging.getLogger("iota_orchestrator").warning("cannot write %s: %s", info, e.strerror or e)


async def serve_until_done(server: Server, sock: socket.socket, started: Callable[[], None]) -> None:
    """Serve on sock; call started() once requests are accepted."""
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        started()
    await task


async def _run(server: Server, sock: socket.socket, url: str, info: Path) -> None:
    def started() -> None:
        write_info(info, {"url": url, "pid": os.getpid()})
        print(f"{LISTENING} {url}", flush=True)

    await serve_until_done(server, sock, started)
