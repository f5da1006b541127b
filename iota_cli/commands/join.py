"""`iota join`: train a slice of the model for a swarm until stopped (see iota_cli/train/join.py).

Errors (bad settings, a refused join, an orchestrator gone) are reported by commands/errors.py. The
orchestrator URL is checked here, once (core/urls.py); IOTA_FIRST_CONTACT_S (default 20) bounds how long
a first join tries an orchestrator that does not answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from iota_cli.config.settings import Paths
    from iota_cli.train.join import JoinOptions


def register(app: typer.Typer) -> None:
    app.command(
        epilog="Exit status: 0 after a clean stop, 1 on a failed check, 69 orchestrator gone, "
        "78 bad configuration or token (systemd does not restart on 78)."
    )(join)


def join(
    orchestrator: Annotated[
        str | None, typer.Option(help="Orchestrator URL (default: the configured one).")
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="Compute backend: auto, torch-cuda, mlx, torch-cpu, ...")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many local optimizer steps.")
    ] = None,
    run: Annotated[str | None, typer.Option(help="Run id to join (default: the newest running run).")] = None,
    stage: Annotated[int | None, typer.Option(min=0, help="Prefer this pipeline stage.")] = None,
    fresh: Annotated[
        bool, typer.Option(help="Discard local checkpoints and start from the swarm's weights.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Join even when the doctor's checks fail.")] = False,
    allow_battery: Annotated[bool, typer.Option(help="Keep training on battery power.")] = False,
    token: Annotated[
        str | None, typer.Option(help="Contributor token (default: IOTA_TOKEN, credential, keyring).")
    ] = None,
) -> None:
    """Join a training swarm: get a stage, train it, upload results, earn credits.

    A first join registers (with the operator's invite in IOTA_INVITE, where one is required).
    Stops cleanly on Ctrl-C or SIGTERM (the item in flight is finished or given back, a checkpoint is
    written); a second Ctrl-C exits at once, the last checkpoint intact.

    \b
    Examples:
      iota join --orchestrator https://swarm.example.org
      iota join --backend torch-cpu --max-steps 100
    """
    import os

    from iota_cli.commands.common import orchestrator_url
    from iota_cli.config import settings
    from iota_cli.headless.logs import setup_logging
    from iota_cli.train.join import JoinOptions

    setup_logging()
    s = settings.load()
    opts = JoinOptions(
        orchestrator=orchestrator_url(orchestrator or s.orchestrator),
        backend=backend or s.backend,
        run_id=run or s.run or None,
        max_steps=max_steps,
        fresh=fresh,
        force=force,
        allow_battery=allow_battery or s.allow_battery,
        name=s.name,
        token=token,
        stage=stage,
        max_memory_gb=s.max_memory_gb,
        invite=os.environ.get("IOTA_INVITE", ""),  # a secret: never an option (ps shows those) or config
        first_contact_s=_seconds("IOTA_FIRST_CONTACT_S", 20.0),
    )
    raise typer.Exit(_train(opts, settings.paths()))


def _seconds(name: str, default: float) -> float:
    import os

    from iota_cli import output

    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        output.fail(f"{name}={raw!r} is not a number of seconds", code=output.EXIT_CONFIG)
    return value


def _train(opts: JoinOptions, paths: Paths) -> int:
    """Join until stopped: Ctrl-C or SIGTERM ask for a clean stop, a second Ctrl-C leaves at once."""
    import os
    import signal
    import threading

    from iota_cli import output
    from iota_cli.train.errors import Stopped
    from iota_cli.train.join import join as run_join

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            os._exit(130)  # checkpoints are atomic, so the last one is intact
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        return run_join(opts, paths, stop)
    except Stopped:
        return output.EXIT_OK  # stopped while still waiting to join: nothing to save
