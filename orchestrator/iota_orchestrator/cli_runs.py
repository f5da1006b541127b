"""`iota orchestrator run create|stop|abort`: drive a swarm's training runs (needs the admin token).

iota orchestrator run create docs/example-run.toml
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from iota_orchestrator.cli_shared import (
    AdminOption,
    DataDirOption,
    JsonOption,
    UrlOption,
    admin_token,
    connect,
    server_url,
)

if TYPE_CHECKING:
    from iota_cli.core.manifest import RunManifest
    from iota_cli.core.protocol import Encoding, RunLifecycle
    from iota_cli.train.api import SwarmApi

run_app = typer.Typer(
    help="Create, stop and abort training runs (needs the admin token).", no_args_is_help=True
)


@run_app.command("create")
def create_run(
    manifest: Annotated[
        Path,
        typer.Argument(
            metavar="MANIFEST",
            help="Run manifest (TOML or JSON; docs/example-run.toml is one).",
            exists=True,
            dir_okay=False,
        ),
    ],
    token_flag: AdminOption = None,
    url: UrlOption = None,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return once the run is created, before its corpus is encoded.")
    ] = False,
) -> None:
    """Create a run from a manifest; relative data.source and model.tokenizer paths are taken from its folder.

    A run with a tokenizer.json has its corpus encoded in the background: this waits for that, showing
    how far it is (--no-wait: return at once; the run's status shows it).

    \b
    Example:
      iota orchestrator run create run.toml
    """
    from iota_cli import output
    from iota_cli.core.manifest import RunManifest

    token = admin_token(token_flag, url, data_dir)
    try:
        m = RunManifest.load(manifest)
    except (OSError, ValueError, TypeError) as e:
        output.fail(f"{manifest}: {e}", code=output.EXIT_CONFIG)
    with connect(server_url(url, data_dir), token) as api:
        reply = api.create_run(_rebase(m, manifest.resolve().parent), wait=False)
        if reply.state == "preparing" and not no_wait:
            reply.state = _wait_ready(api, reply.run_id)
    output.Sink(as_json).result(
        reply.model_dump(mode="json"),
        lambda _: f"created run {reply.run_id} ({m.name}, {m.model.n_stages} stages)",
    )


def _wait_ready(api: SwarmApi, run_id: str) -> RunLifecycle:
    """Wait for a run's background encoding, a line on stderr every few seconds; its state once ready."""
    import time

    from iota_cli import output
    from iota_cli.train.errors import ApiError

    shown = [float("-inf")]

    def show(e: Encoding) -> None:
        if time.monotonic() - shown[0] >= 2.0 and e.phase != "failed":
            shown[0] = time.monotonic()
            typer.echo(f"run {run_id}: {e.line()}", err=True)

    try:
        return api.wait_ready(run_id, on_progress=show, wait=False).state
    except ApiError as e:
        if e.status != 409:
            raise
        output.fail(e.detail, hint="fix what it names and create the run again")


def _rebase(m: RunManifest, folder: Path) -> RunManifest:
    """Relative data.source and model.tokenizer paths made absolute from folder (the server's cwd differs)."""
    import dataclasses
    import os

    def relative(path: str) -> bool:
        return bool(path) and not os.path.isabs(os.path.expanduser(path))

    if relative(m.data.source):
        m = dataclasses.replace(m, data=dataclasses.replace(m.data, source=str(folder / m.data.source)))
    if m.model.tokenizer != "bytes" and relative(m.model.tokenizer):
        model = dataclasses.replace(m.model, tokenizer=str(folder / m.model.tokenizer))
        m = dataclasses.replace(m, model=model)
    return m


@run_app.command("stop")
def stop_run(
    run_id: Annotated[str, typer.Argument(help="The run to stop.")],
    token_flag: AdminOption = None,
    url: UrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Issue no new samples; the run finishes once the work in flight drains."""
    from iota_cli import output

    with connect(server_url(url, data_dir), admin_token(token_flag, url, data_dir)) as api:
        api.stop_run(run_id, wait=False)
    output.echo(f"run {run_id} is stopping")


@run_app.command("abort")
def abort_run(
    run_id: Annotated[str, typer.Argument(help="The run to abort.")],
    token_flag: AdminOption = None,
    url: UrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Finish a run now: work in flight is dropped and every worker is told the run has finished.

    The weights merged so far are kept; samples in the pipeline are counted as dropped. For a run
    that will not drain (a stopped run with no workers left, say).
    """
    from iota_cli import output

    with connect(server_url(url, data_dir), admin_token(token_flag, url, data_dir)) as api:
        info = api.abort_run(run_id, wait=False)
    output.echo(f"run {run_id} is {info.state} (aborted)")
