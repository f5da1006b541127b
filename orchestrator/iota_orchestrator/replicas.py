"""`iota orchestrator serve --workers N`: N replica processes serving one listening socket.

serve.py readies the database once (migrations, the admin token, the URL secret: state.prepare) and
binds the port; this starts N replicas (multiprocessing spawn: fresh interpreters, each with its own
State, database connections, wakeup listener and reaper) that all accept on that one socket. The kernel
hands each connection to whichever replica accepts it first, so any replica serves any request, and
connections waiting in the backlog when a replica dies are taken by the others. Nothing a replica holds
matters to the others: the state is in PostgreSQL, blobs in the store, wakeups go through NOTIFY, and
only the replica holding the leader lease runs the reaper (leader.py).

The parent prints the LISTENING line once every replica serves and writes `<data-dir>/server.json`
({url, pid, replicas: [pids]}; kept current). A replica that dies is started again (after a pause when
it died young). SIGTERM or Ctrl-C stops them all, each ending its long-polls and requests as one process
does; a replica whose parent is gone (kill -9) stops by itself.

    iota orchestrator serve --database postgresql://iota@db/iota --workers 3
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

from iota_cli.core.protocol import LISTENING
from iota_orchestrator.state import ServerConfig

log = logging.getLogger("iota_orchestrator")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0  # uvicorn's graceful shutdown (5 s) and the reaper's last tick
YOUNG_S = 10.0  # a replica that dies sooner waits RESTART_PAUSE_S before the next try
RESTART_PAUSE_S = 2.0


@dataclass
class Slot:
    index: int
    proc: BaseProcess
    ready: Any  # multiprocessing Event: the replica accepts requests
    started: float


def run(config: ServerConfig, sock: socket.socket, url: str, n: int, log_level: str) -> int:
    """Start n replicas on sock, serve until SIGTERM/SIGINT, stop them; the exit code."""
    ctx = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())

    def start(index: int) -> Slot:
        ready = ctx.Event()
        proc = ctx.Process(
            target=replica_main,
            args=(config, sock, log_level, ready, os.getpid()),
            name=f"iota-replica-{index}",
            daemon=False,
        )
        proc.start()
        return Slot(index, proc, ready, time.monotonic())

    from iota_orchestrator.serve import write_info

    info = config.data_dir / "server.json"
    slots = [start(i) for i in range(n)]
    try:
        if not _all_ready(slots, stopping):
            return 1
        write_info(info, _fields(url, slots))
        print(f"{LISTENING} {url}", flush=True)
        while not stopping.is_set():
            wait([s.proc.sentinel for s in slots], timeout=0.5)
            for i, s in enumerate(slots):
                if s.proc.is_alive() or stopping.is_set():
                    continue
                log.warning(
                    "replica %d (pid %s) exited with %s; starting another", i, s.proc.pid, s.proc.exitcode
                )
                if time.monotonic() - s.started < YOUNG_S:
                    stopping.wait(RESTART_PAUSE_S)
                slots[i] = start(i)
                write_info(info, _fields(url, slots))
        return 0
    finally:
        _stop(slots)
        info.unlink(missing_ok=True)


def _fields(url: str, slots: list[Slot]) -> dict[str, object]:
    return {"url": url, "pid": os.getpid(), "replicas": [s.proc.pid for s in slots]}


def _all_ready(slots: list[Slot], stopping: threading.Event) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all(s.ready.is_set() for s in slots):
        dead = [s for s in slots if not s.proc.is_alive()]
        if dead or stopping.is_set() or time.monotonic() > deadline:
            if dead:
                log.error("replica %d exited with %s before it served", dead[0].index, dead[0].proc.exitcode)
            return False
        time.sleep(0.05)
    return True


def _stop(slots: list[Slot]) -> None:
    for s in slots:
        if s.proc.is_alive():
            s.proc.terminate()  # SIGTERM: a graceful stop
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for s in slots:
        s.proc.join(max(0.1, deadline - time.monotonic()))
        if s.proc.is_alive():
            s.proc.kill()
            s.proc.join(5)


def replica_main(config: ServerConfig, sock: socket.socket, log_level: str, ready: Any, parent: int) -> None:
    """One replica: its own State on the prepared database, serving on the shared socket."""
    from iota_orchestrator.serve import make_server, quiet_signals, serve_until_done, setup_process
    from iota_orchestrator.state import connect

    setup_process(log_level)
    server = make_server(connect(config), log_level)
    quiet_signals()

    def orphaned() -> None:  # the parent was killed: nobody would ever stop this replica
        while not server.should_exit:
            if os.getppid() != parent:
                log.warning("the orchestrator's parent process is gone; this replica stops")
                server.should_exit = True
            time.sleep(1.0)

    threading.Thread(target=orphaned, name="iota-orphan-watch", daemon=True).start()
    asyncio.run(serve_until_done(server, sock, ready.set))
