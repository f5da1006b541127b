"""`iota swarm`: a local orchestrator and N workers training a tiny model on this machine."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    import threading

    from iota_cli.swarm.local import Swarm

log = logging.getLogger("iota.swarm")


def register(app: typer.Typer) -> None:
    app.command(
        epilog="Exit status: 0 when every worker stopped cleanly; 2 for a bad argument (--backends, "
        "--data); a worker's own 69 or 78 when it could not start, 1 for any other failure; 130 after "
        "a second Ctrl-C."
    )(swarm)


def swarm(
    workers: Annotated[
        int, typer.Option(min=3, max=64, help="Worker processes (spread over the 3 stages).")
    ] = 6,
    max_steps: Annotated[int, typer.Option(min=1, help="Optimizer steps per stage replica.")] = 40,
    data: Annotated[
        Path | None,
        typer.Option(help="Directory of text files to train on (default: Python's stdlib source)."),
    ] = None,
    backends: Annotated[
        str, typer.Option(help="Comma-separated backends, alternated across workers.")
    ] = "torch-cpu,mlx-cpu",
    home: Annotated[
        Path | None, typer.Option(help="Keep the swarm's files here (default: a temp dir).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Train a tiny model with a whole swarm on this machine: the first thing to run.

    Starts an orchestrator and WORKERS `iota join` processes on loopback, shows one line per stage,
    and prints a summary. Ctrl-C stops everything cleanly.

    \b
    Examples:
      iota swarm
      iota swarm --workers 6 --max-steps 100 --data ~/books
      iota swarm --json | jq .last_loss
    """
    from iota_cli import output
    from iota_cli.headless.logs import setup_logging
    from iota_cli.swarm.launcher import run_swarm
    from iota_cli.swarm.local import SwarmOptions

    setup_logging()
    if data is not None and not data.exists():
        output.fail(f"{data} does not exist", code=output.EXIT_USAGE)
    names = tuple(b.strip() for b in backends.split(",") if b.strip())
    opts = SwarmOptions(
        workers=workers,
        max_steps=max_steps,
        data=str(data.resolve()) if data else "",
        backends=names,
        home=home,
        cap_steps=True,
    )
    stop, started = on_ctrl_c()
    summary = run_swarm(opts, stop, interactive=None if not as_json else False, on_start=started.append)
    ok = all(w["exit_code"] == 0 for w in summary["workers"]) and len(summary["workers"]) == workers
    output.Sink(as_json).result(summary, render_summary)
    raise typer.Exit(output.EXIT_OK if ok else output.EXIT_FAIL)


def on_ctrl_c() -> tuple[threading.Event, list[Swarm]]:
    """Ctrl-C or SIGTERM sets the event (the launcher stops the workers, then the orchestrator); a second
    Ctrl-C kills every process of the swarms in the list at once and exits 130."""
    import os
    import shutil
    import signal
    import threading

    stop = threading.Event()
    swarms: list[Swarm] = []

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            for s in swarms:
                s.kill()
                if s.options.home is None:  # a temp home, as after any failed swarm
                    shutil.rmtree(s.home, ignore_errors=True)
            if sys.stderr.isatty():
                sys.stderr.write("\n")  # end the line the terminal echoed ^C on
            sys.stderr.flush()
            os._exit(130)  # no cleanup can be waited for; the workers' checkpoints are written atomically
        if not stop.is_set():
            log.info("stopping: the workers first, then the orchestrator (Ctrl-C again to kill them all now)")
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop, swarms


def render_summary(s: dict) -> str:
    from iota_cli import output

    loss = "n/a"
    if s["first_loss"] is not None and s["last_loss"] is not None:
        loss = f"{s['first_loss']:.3f} -> {s['last_loss']:.3f}"
    head = (
        f"Trained {s['tokens']:,} tokens in {s['wall_s']:.1f} s ({s['tokens_per_s']:,.0f} tokens/s); "
        f"tail loss {loss}."
    )
    rows = [
        (w["worker"], w["stage"], w["backend"], w["steps"], f"{w['credits']:.2f}", w["exit_code"])
        for w in s["workers"]
    ]
    table = output.table(["worker", "stage", "backend", "steps", "credits", "exit"], rows)
    return f"{head}\n\n{table}\n\nFiles: {s['home']}"
