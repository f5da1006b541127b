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

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:  # the typed API and its models load only when a command runs
    from iota_cli.core.manifest import RunManifest
    from iota_cli.core.protocol import RunStatus
    from iota_cli.train.api import SwarmApi

orch_app = typer.Typer(
    help="Run the reference orchestrator that coordinates a swarm (operators only).", no_args_is_help=True
)
run_app = typer.Typer(
    help="Create, stop and abort training runs (needs the admin token).", no_args_is_help=True
)
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
        help="The admin token (or set IOTA_ADMIN_TOKEN; default for the local orchestrator: "
        "<data-dir>/admin-token).",
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
        data_dir=_data_dir(data_dir),
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


@contextlib.contextmanager
def _api(url: str, token: str | None = None) -> Iterator[SwarmApi]:
    """The typed API without waiting for a server that is down: an operator wants the answer now.

    A refusal (ApiError) or no answer (Unreachable) is raised for iota's error table to report.
    """
    from iota_cli.train.api import SwarmApi
    from iota_cli.train.errors import Unreachable

    # retries=0: a 5xx is reported as it came; timeout: creating a run may take minutes (encoding the corpus).
    with SwarmApi.connect(url, token, timeout=(5.0, 300.0), retries=0) as api:
        try:
            yield api
        except Unreachable as e:
            raise Unreachable(f"{url}: {e}") from None  # the URL may be a stale server.json


def _admin(flag: str | None, url: str | None, data_dir: Path | None) -> str:
    """The admin token: given, or the local orchestrator's <data-dir>/admin-token (never sent elsewhere)."""
    from iota_cli import output
    from iota_orchestrator.datadir import read_admin_token

    token = flag or (None if url else read_admin_token(_data_dir(data_dir)))
    if not token:
        output.fail(
            "the admin token is required",
            hint="pass --admin-token or set IOTA_ADMIN_TOKEN",
            code=output.EXIT_CONFIG,
        )
    return token


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

    token = _admin(admin_token, url, data_dir)
    try:
        m = RunManifest.load(manifest)
    except (OSError, ValueError, TypeError) as e:
        output.fail(f"{manifest}: {e}", code=output.EXIT_CONFIG)
    with _api(_url(url, data_dir), token) as api:
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
    admin_token: AdminOption = None,
    url: UrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Issue no new samples; the run finishes once the work in flight drains."""
    from iota_cli import output

    with _api(_url(url, data_dir), _admin(admin_token, url, data_dir)) as api:
        api.stop_run(run_id, wait=False)
    output.echo(f"run {run_id} is stopping")


@run_app.command("abort")
def abort_run(
    run_id: Annotated[str, typer.Argument(help="The run to abort.")],
    admin_token: AdminOption = None,
    url: UrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Finish a run now: work in flight is dropped and every worker is told the run has finished.

    The weights merged so far are kept; samples in the pipeline are counted as dropped. For a run
    that will not drain (a stopped run with no workers left, say).
    """
    from iota_cli import output

    with _api(_url(url, data_dir), _admin(admin_token, url, data_dir)) as api:
        info = api.abort_run(run_id, wait=False)
    output.echo(f"run {run_id} is {info.state} (aborted)")


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
    with _api(base) as api:
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
    admin_token: AdminOption = None,
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
    with _api(_url(url, data_dir), _admin(admin_token, url, data_dir)) as api:
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
