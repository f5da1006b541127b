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
) -> None:
    """Create a run from a manifest; relative data.source and model.tokenizer paths are taken from its folder.

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
    output.Sink(as_json).result(
        reply.model_dump(mode="json"),
        lambda _: f"created run {reply.run_id} ({m.name}, {m.model.n_stages} stages)",
    )


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
