"""`iota orchestrator serve|status|run create|run stop`: run the reference orchestrator and drive it.

This package adds the group to `iota` through the `iota.commands` entry point (`register`), so the
contributor CLI never imports the server. Importing this module loads Typer only: `serve` imports the
[orchestrator] extra (`pip install 'iota-cli[orchestrator]'`) when it runs, and the other commands are
HTTP calls through the contributor's one client. They find a local orchestrator through
`<data-dir>/server.json`, or take --url. Try it: `iota orchestrator serve --port 0 --data-dir /tmp/o`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

orch_app = typer.Typer(
    help="Run the reference orchestrator that coordinates a swarm (operators only).", no_args_is_help=True
)
run_app = typer.Typer(help="Create and stop training runs (needs the admin token).", no_args_is_help=True)
orch_app.add_typer(run_app, name="run")

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        metavar="DIR",
        help="Orchestrator state: database and blobs (default: under the data dir).",
    ),
]
UrlOption = Annotated[
    str | None,
    typer.Option("--url", metavar="URL", help="Orchestrator URL (default: from <data-dir>/server.json)."),
]
AdminOption = Annotated[
    str | None,
    typer.Option(
        "--admin-token",
        envvar="IOTA_ADMIN_TOKEN",
        metavar="TOKEN",
        show_default=False,
        help="The admin token printed at first start (or set IOTA_ADMIN_TOKEN).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def register(app: typer.Typer) -> None:
    """The `iota.commands` entry point: add `iota orchestrator` to the CLI."""
    app.add_typer(orch_app, name="orchestrator")


def _data_dir(flag: Path | None) -> Path:
    from iota_cli.config import settings

    return flag if flag is not None else settings.paths().data_dir / "orchestrator"


@orch_app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8700,
    data_dir: DataDirOption = None,
    sync: Annotated[
        str, typer.Option(help="normal: survives a crashed process; full: also power loss (fsync, slower).")
    ] = "normal",
    tick: Annotated[
        float, typer.Option(help="Seconds between lease and deadline checks.", hidden=True)
    ] = 1.0,
    new_admin_token: Annotated[
        bool, typer.Option(help="Replace the admin token and print the new one.")
    ] = False,
) -> None:
    """Serve the orchestrator until Ctrl-C or SIGTERM.

    Prints the admin token once at first start (unless IOTA_ADMIN_TOKEN is set), then
    `iota orchestrator listening on http://HOST:PORT`.

    \b
    Examples:
      iota orchestrator serve --port 8700
      iota orchestrator serve --host 0.0.0.0 --data-dir /srv/iota
    """
    from iota_cli import output

    try:
        import fastapi  # noqa: F401  (the extra's packages, checked up front for a clear message)
        import uvicorn  # noqa: F401

        from iota_orchestrator.serve import serve as run_server
        from iota_orchestrator.state import ServerConfig
    except ImportError as e:
        output.fail(
            f"the orchestrator is not installed ({e.name or e})",
            hint="pip install 'iota-cli[orchestrator]'",
            code=output.EXIT_CONFIG,
        )
    if sync not in ("normal", "full"):
        output.fail("--sync must be 'normal' or 'full'", code=output.EXIT_USAGE)
    config = ServerConfig(data_dir=_data_dir(data_dir), sync=sync, tick_s=max(tick, 0.05))
    try:
        code = run_server(config, host, port, new_admin_token)
    except OSError as e:
        output.fail(f"cannot serve on {host}:{port}: {e.strerror or e}", code=output.EXIT_UNAVAILABLE)
    raise typer.Exit(code)


def _url(url: str | None, data_dir: Path | None) -> str:
    import json

    from iota_cli import output

    if url:
        return url.rstrip("/")
    info = _data_dir(data_dir) / "server.json"
    try:
        return str(json.loads(info.read_text())["url"]).rstrip("/")
    except (OSError, ValueError, KeyError):
        output.fail(
            f"no running orchestrator found ({info} is missing)",
            hint="start one with `iota orchestrator serve`, or pass --url",
            code=output.EXIT_UNAVAILABLE,
        )


def _call(method: str, url: str, path: str, token: str | None = None, body: Any = None) -> Any:
    """One request, without waiting for a server that is down: an operator wants the answer now.

    A refusal (ApiError) or no answer (Unreachable) is raised for iota's error table to report.
    """
    from iota_cli.train.client import Client
    from iota_cli.train.errors import Unreachable

    # retries=0: a 5xx is reported as it came; timeout: creating a run may take minutes (encoding the corpus).
    with Client(url, token, timeout=(5.0, 300.0), retries=0) as client:
        try:
            return client.request(method, path, json=body, wait=False).data
        except Unreachable as e:
            raise Unreachable(f"{url}: {e}") from None  # the URL may be a stale server.json


def _require(admin_token: str | None) -> None:
    from iota_cli import output

    if not admin_token:
        output.fail(
            "the admin token is required",
            hint="pass --admin-token or set IOTA_ADMIN_TOKEN",
            code=output.EXIT_CONFIG,
        )


@run_app.command("create")
def create_run(
    manifest: Annotated[
        Path, typer.Argument(help="Run manifest (TOML or JSON).", exists=True, dir_okay=False)
    ],
    admin_token: AdminOption = None,
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

    _require(admin_token)
    try:
        m = RunManifest.load(manifest)
    except (OSError, ValueError, TypeError) as e:
        output.fail(f"{manifest}: {e}", code=output.EXIT_CONFIG)
    body = {"manifest": _rebase(m.to_dict(), manifest.resolve().parent)}
    reply = _call("POST", _url(url, data_dir), "/v1/runs", admin_token, body)
    if as_json:
        output.print_json(reply)
    else:
        output.echo(f"created run {reply['run_id']} ({m.name}, {m.model.n_stages} stages)")


def _rebase(manifest: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative data.source and model.tokenizer paths made absolute from folder (the server's cwd differs)."""
    import os

    def relative(path: str | None) -> bool:
        return bool(path) and not os.path.isabs(os.path.expanduser(str(path)))

    data, model = dict(manifest["data"]), dict(manifest["model"])
    if relative(data.get("source")):
        data["source"] = str(folder / data["source"])
    if model.get("tokenizer") != "bytes" and relative(model.get("tokenizer")):
        model["tokenizer"] = str(folder / model["tokenizer"])
    return {**manifest, "data": data, "model": model}


@run_app.command("stop")
def stop_run(
    run_id: Annotated[str, typer.Argument(help="The run to stop.")],
    admin_token: AdminOption = None,
    url: UrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Issue no new samples; the run finishes once the work in flight drains."""
    from iota_cli import output

    _require(admin_token)
    _call("POST", _url(url, data_dir), f"/v1/runs/{run_id}/stop", admin_token)
    output.echo(f"run {run_id} is stopping")


@orch_app.command()
def status(
    run_id: Annotated[str | None, typer.Argument(help="Run to show (default: every run).")] = None,
    url: UrlOption = None,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Runs, workers per stage, queue depths, tokens processed and loss."""
    from iota_cli import output

    base = _url(url, data_dir)
    ids = [run_id] if run_id else [r["run_id"] for r in _call("GET", base, "/v1/runs")]
    statuses = [_call("GET", base, f"/v1/runs/{rid}/status") for rid in ids]
    if as_json:
        output.print_json({"url": base, "runs": statuses})
        return
    if not statuses:
        output.echo(f"{base}: no runs yet (create one with `iota orchestrator run create MANIFEST`)")
    for s in statuses:
        output.echo(_render(s))


def _render(s: dict[str, Any]) -> str:
    from iota_cli import output

    def loss(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    limit = s["max_samples"] or "unlimited"
    head = (
        f"run {s['run_id']} ({s['name']}): {s['state']}\n"
        f"  samples {s['samples_issued']} issued of {limit}, {s['samples_completed']} done, "
        f"{s['samples_dropped']} dropped; tokens {s['tokens_processed']:,}; "
        f"loss {loss(s['first_loss'])} -> {loss(s['last_loss'])}"
    )
    rows = [
        (
            st["stage"],
            st["kind"],
            sum(w["alive"] for w in st["workers"]),
            len(st["workers"]),
            st["queue_forward"],
            st["queue_backward"],
            st["epoch"],
            st["optimizer_steps"],
        )
        for st in s["stages"]
    ]
    table = output.table(
        ["stage", "kind", "alive", "workers", "fwd queue", "bwd queue", "epoch", "steps"], rows
    )
    return head + "\n" + "\n".join("  " + line for line in table.splitlines())
