"""`iota join`: train a slice of the model for a swarm until stopped (see iota_cli/join.py)."""

from __future__ import annotations

from typing import Annotated

import typer


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

    Stops cleanly on Ctrl-C or SIGTERM (the item in flight is finished or given back, a checkpoint is
    written); a second Ctrl-C exits at once, the last checkpoint intact.

    \b
    Examples:
      iota join --orchestrator https://swarm.example.org
      iota join --backend torch-cpu --max-steps 100
    """
    import os
    import signal
    import threading

    from iota_cli import output
    from iota_cli.config import settings
    from iota_cli.headless.logs import setup_logging
    from iota_cli.train.join import JoinError, JoinOptions
    from iota_cli.train.join import join as run_join

    setup_logging()
    try:
        s = settings.load()
    except settings.SettingsError as e:
        output.fail(str(e), code=output.EXIT_CONFIG)
    url = orchestrator or s.orchestrator
    if not url:
        output.fail(
            "no orchestrator configured",
            hint="pass --orchestrator URL or `iota config set orchestrator URL`",
            code=output.EXIT_CONFIG,
        )
    opts = JoinOptions(
        orchestrator=url,
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
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            os._exit(130)  # second Ctrl-C: leave now; checkpoints are atomic, the last one is intact
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    from iota_cli.train.client import ApiError, Stopped, Unreachable

    try:
        code = run_join(opts, settings.paths(), stop)
    except JoinError as e:
        output.fail(str(e), hint=e.hint, code=e.code)
    except Stopped:
        code = output.EXIT_OK  # stopped while still waiting to join: nothing to save
    except Unreachable as e:
        output.fail(str(e), code=output.EXIT_UNAVAILABLE)
    except ApiError as e:
        code = output.EXIT_CONFIG if e.status in (401, 403) else output.EXIT_FAIL
        output.fail(f"the orchestrator refused: {e}", code=code)
    raise typer.Exit(code)
