"""`iota orchestrator serve|status|validate|run ...`: run the reference orchestrator and drive it.

This package adds the group to `iota` through the `iota.commands` entry point (`register`), so the
contributor CLI never imports the server. Importing this module loads Typer only: `serve` imports the
[orchestrator] extra (`pip install 'iota-cli[orchestrator]'`) when it runs, and the other commands are
HTTP calls through the contributor's one client. They find a local orchestrator through
`<data-dir>/server.json`, or take --url; the admin token comes from --admin-token, IOTA_ADMIN_TOKEN or,
for the local orchestrator only, `<data-dir>/admin-token`.
Try it: `iota orchestrator serve --port 0 --data-dir /tmp/o`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from iota_orchestrator.cli_runs import run_app
from iota_orchestrator.cli_shared import (
    AdminOption,
    DataDirOption,
    JsonOption,
    UrlOption,
    admin_token,
    connect,
    data_dir_of,
    server_url,
)

if TYPE_CHECKING:  # the typed API and its models load only when a command runs
    from iota_cli.core.protocol import RunStatus

orch_app = typer.Typer(
    help="Run the reference orchestrator that coordinates a swarm (operators only).", no_args_is_help=True
)
orch_app.add_typer(run_app, name="run")


def register(app: typer.Typer) -> None:
    """The `iota.commands` entry point: add `iota orchestrator` to the CLI."""
    app.add_typer(orch_app, name="orchestrator")


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
        bool, typer.Option(help="Replace the admin token (written to <data-dir>/admin-token).")
    ] = False,
    register_burst: Annotated[
        int, typer.Option(min=1, help="Registrations one client address may make at once.")
    ] = 20,
    register_rate: Annotated[
        float, typer.Option(help="Registrations a second per client address after the burst (0: no limit).")
    ] = 2.0,
    invite_required: Annotated[
        bool,
        typer.Option(
            help="Registering needs the operator's invite: IOTA_INVITE, else <data-dir>/invite (made once)."
        ),
    ] = False,
    database: Annotated[
        str | None,
        typer.Option(
            envvar="IOTA_DATABASE",
            show_envvar=True,
            metavar="URL",
            help="postgresql://user@host:port/db keeps the state there (default: SQLite in the data dir).",
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="API replica processes serving the port (PostgreSQL only past 1).")
    ] = 1,
    blob_store: Annotated[
        str | None,
        typer.Option(
            envvar="IOTA_BLOB_STORE",
            metavar="s3://BUCKET[/PREFIX]",
            help="Blobs on an S3-compatible store, keys from the environment (docs/deploy.md).",
        ),
    ] = None,
) -> None:
    """Serve the orchestrator until Ctrl-C or SIGTERM.

    At first start writes a new admin token to <data-dir>/admin-token (mode 0600) and prints that
    path, never the token (unless IOTA_ADMIN_TOKEN is set: then that is the token), then prints
    `iota orchestrator listening on http://HOST:PORT`. A data dir it cannot use (read-only, not a
    directory, not writable) is one error line and exit code 78; a full disk, 69. Registrations are
    limited per client address (429 past the limit; the admin token's are not), and with
    --invite-required need the invite that contributors set as IOTA_INVITE.

    \b
    Examples:
      iota orchestrator serve --port 8700
      iota orchestrator serve --host 0.0.0.0 --data-dir /srv/iota
      iota orchestrator serve --host 0.0.0.0 --invite-required --register-rate 0.5
      IOTA_DATABASE=postgresql://iota@db:5432/iota iota orchestrator serve --workers 4
    """
    from iota_cli import output

    try:
        import fastapi  # noqa: F401  (the extra's packages, checked up front for a clear message)
        import uvicorn  # noqa: F401

        from iota_orchestrator.datadir import DataDirError
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
    from iota_orchestrator import postgres

    if database and not postgres.is_url(database):
        output.fail(
            f"--database must be a postgresql:// URL, not {postgres.shown(database)}", code=output.EXIT_USAGE
        )
    if workers > 1 and not database:
        output.fail(
            "--workers above 1 needs --database postgresql://...: SQLite has one writer, in one process",
            code=output.EXIT_USAGE,
        )
    config = ServerConfig(
        data_dir=data_dir_of(data_dir),
        database=database or None,
        sync=sync,
        tick_s=max(tick, 0.05),
        register_burst=register_burst,
        register_rate=register_rate,
        blob_store=blob_store or None,
    )
    try:
        code = run_server(
            config, host, port, new_admin_token, invite_required=invite_required, workers=workers
        )
    except DataDirError as e:  # restarting helps only when the disk was full
        output.fail(str(e), code=output.EXIT_UNAVAILABLE if e.transient else output.EXIT_CONFIG)
    except OSError as e:
        output.fail(f"cannot serve on {host}:{port}: {e.strerror or e}", code=output.EXIT_UNAVAILABLE)
    raise typer.Exit(code)


@orch_app.command()
def status(
    run_id: Annotated[str | None, typer.Argument(help="Run to show (default: every run).")] = None,
    url: UrlOption = None,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Runs, workers per stage, queue depths, tokens processed and loss."""
    from iota_cli import output

    base = server_url(url, data_dir)
    with connect(base) as api:
        ids = [run_id] if run_id else [r.run_id for r in api.runs(wait=False)]
        statuses = [api.run_status(rid, wait=False) for rid in ids]
    result = {"url": base, "runs": [s.model_dump(mode="json") for s in statuses]}
    output.Sink(as_json).result(result, lambda _: _render_all(base, statuses))


def _render_all(base: str, statuses: list) -> str:
    if not statuses:
        return f"{base}: no runs yet (create one with `iota orchestrator run create MANIFEST`)"
    return "\n".join(_render(s) for s in statuses)


@orch_app.command()
def validate(
    backend: Annotated[
        str, typer.Option(help="Backend to recompute with (float32 torch-cpu is the reference).")
    ] = "torch-cpu",
    token_flag: AdminOption = None,
    url: UrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Recompute the sampled work of contributors and judge it, until Ctrl-C (docs/trust.md)."""
    import signal
    import threading

    from iota_cli import output
    from iota_cli.config import settings
    from iota_cli.validate.validator import Validator

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with connect(server_url(url, data_dir), admin_token(token_flag, url, data_dir)) as api:
        validator = Validator(api, backend, settings.paths().cache_dir / "validator")
        output.echo(f"validating with {backend}; Ctrl-C to stop")
        try:
            tally = validator.run(stop)
        except KeyboardInterrupt:
            tally = validator.tally
    output.echo(tally.line())


def _render(s: RunStatus) -> str:
    from iota_cli import output

    def loss(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    head = (
        f"run {s.run_id} ({s.name}): {s.state}\n"
        f"  samples {s.samples_issued} issued of {s.max_samples or 'unlimited'}, {s.samples_completed} done, "
        f"{s.samples_dropped} dropped; tokens {s.tokens_processed:,}; "
        f"loss {loss(s.first_loss)} -> {loss(s.last_loss)}{'' if s.loss_vetted else ' (unvetted)'}"
    )
    if s.checks:
        head += "\n  checks " + ", ".join(f"{n} {k}" for k, n in sorted(s.checks.items()))
    banned = [w.name for st in s.stages for w in st.workers if w.banned]
    if banned:
        head += f"\n  banned: {', '.join(banned)}"
    rows = [
        (
            st.stage,
            st.kind,
            sum(w.alive for w in st.workers),
            len(st.workers),
            st.queue_forward,
            st.queue_backward,
            st.epoch,
            st.optimizer_steps,
        )
        for st in s.stages
    ]
    table = output.table(
        ["stage", "kind", "alive", "workers", "fwd queue", "bwd queue", "epoch", "steps"], rows
    )
    return head + "\n" + "\n".join("  " + line for line in table.splitlines())
