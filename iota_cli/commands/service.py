"""`iota service install|uninstall|status|logs`: run `iota join` headless under systemd.

The unit text comes from iota_cli/headless/service.py (`iota service install --print` shows it); status and
logs wrap `systemctl show` and `journalctl`. See docs/headless.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, cast

import typer

if TYPE_CHECKING:
    from iota_cli.headless.service import InstallResult, Layout, Scope, UnitOptions

ScopeFlag = Annotated[
    bool | None,
    typer.Option(
        "--user/--system",
        help="A user unit (~/.config/systemd/user) or a system unit (/etc/systemd/system). "
        "Default: system as root, user otherwise (status/logs/uninstall: whichever is installed).",
    ),
]


def register(app: typer.Typer) -> None:
    svc = typer.Typer(
        name="service",
        help="Run `iota join` in the background under systemd (headless servers).",
        no_args_is_help=True,
    )
    svc.command("install")(install)
    svc.command("uninstall")(uninstall)
    svc.command("status")(status)
    svc.command("logs")(logs)
    app.add_typer(svc, name="service")


def _default_scope() -> Scope:
    return "system" if os.geteuid() == 0 else "user"


def _installed_scope(flag: bool | None) -> Scope:
    """The scope asked for, else the one whose unit file exists, else the default."""
    from iota_cli.headless import service as svc

    if flag is not None:
        return "user" if flag else "system"
    for scope in cast("tuple[Scope, ...]", ("user", "system")):
        if (svc.default_layout(scope).unit_dir / svc.UNIT_NAME).exists():
            return scope
    return _default_scope()


def _token(from_stdin: bool, orchestrator: str) -> str:
    import sys

    from iota_cli import output
    from iota_cli.config import credentials

    flag = sys.stdin.readline().strip() if from_stdin else None
    try:
        found = credentials.resolve_token(flag, orchestrator=orchestrator)
    except credentials.CredentialsError as e:
        output.fail(
            str(e), hint="or pipe it in: ... | iota service install --token-stdin", code=output.EXIT_CONFIG
        )
    from iota_cli.headless.logs import redact

    redact(found.token)
    return found.token


def install(
    scope_flag: ScopeFlag = None,
    orchestrator: Annotated[
        str | None, typer.Option(help="Orchestrator URL (default: the configured one).")
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="Compute backend (default: the configured one).")
    ] = None,
    show: Annotated[bool, typer.Option("--print", help="Print the unit instead of installing it.")] = False,
    run_as: Annotated[
        str | None,
        typer.Option("--run-as", help="System units: the user the service runs as (default: $SUDO_USER)."),
    ] = None,
    start: Annotated[bool, typer.Option("--start/--no-start", help="Start the service now.")] = True,
    sandbox: Annotated[
        bool,
        typer.Option("--sandbox/--no-sandbox", help="Filesystem hardening (ProtectSystem= and friends)."),
    ] = True,
    token_stdin: Annotated[bool, typer.Option("--token-stdin", help="Read the token from stdin.")] = False,
) -> None:
    """Write a systemd unit for `iota join`, reload systemd, enable and start it.

    The token (from --token-stdin, IOTA_TOKEN or the keyring) is handed to the service as a systemd
    credential, never written into the unit.

    \b
    Examples:
      iota service install --orchestrator https://swarm.example.org
      sudo --preserve-env=IOTA_TOKEN iota service install --system --run-as alice
      iota service install --print
    """
    from iota_cli import output
    from iota_cli.commands.common import orchestrator_url
    from iota_cli.config import settings
    from iota_cli.headless import host
    from iota_cli.headless import service as svc

    scope: Scope = "user" if scope_flag else "system" if scope_flag is False else _default_scope()
    conf = settings.load()
    url = orchestrator_url((orchestrator or conf.orchestrator).strip())
    plan = _plan(
        scope, url, backend or conf.backend, run_as, sandbox, live=not show and host.systemd_running()
    )
    opts = plan.options(host.can_encrypt(scope))
    if show:
        output.echo(svc.render_unit(opts).rstrip("\n"))
        return
    _check_installable(plan)
    opts, result = _write(plan, opts, _token(token_stdin, url), start)
    _report_installed(plan, opts, result, start)


@dataclass(frozen=True)
class _Plan:
    """What the unit depends on, but whether its credential is encrypted (tried first, dropped on failure)."""

    scope: Scope
    url: str
    backend: str
    layout: Layout
    run_as: str | None
    sandbox: bool  # asked for
    boxed: bool  # what this host can give: user units need unprivileged user namespaces
    live: bool  # systemd runs here and the unit is to be installed, not printed
    version: int

    def options(self, encrypt: bool) -> UnitOptions:
        from iota_cli.headless import service as svc

        return svc.unit_options(
            self.scope,
            self.url,
            self.backend,
            layout=self.layout,
            encrypt=encrypt,
            run_as=self.run_as,
            sandbox=self.boxed,
            version=self.version,
        )


def _plan(scope: Scope, url: str, backend: str, run_as: str | None, sandbox: bool, live: bool) -> _Plan:
    import pwd

    from iota_cli import output
    from iota_cli.headless import host
    from iota_cli.headless import service as svc

    if scope == "system":
        run_as = run_as or os.environ.get("SUDO_USER") or None
        if run_as:
            try:
                pwd.getpwnam(run_as)
            except KeyError:
                output.fail(f"no such user: {run_as}", hint="create it or pick another with --run-as")
    return _Plan(
        scope=scope,
        url=url,
        backend=backend,
        layout=svc.default_layout(scope),
        run_as=run_as,
        sandbox=sandbox,
        boxed=sandbox and (scope == "system" or host.userns_available()),
        live=live,
        version=host.systemd_version(host.run_command) if live else host.BASELINE_SYSTEMD,
    )


def _check_installable(plan: _Plan) -> None:
    from iota_cli import output

    if not plan.live:
        output.fail(
            "systemd is not running on this machine (no /run/systemd/system)",
            hint="`iota service install --print` shows the unit to install by hand",
            code=output.EXIT_UNAVAILABLE,
        )
    if plan.scope == "system" and not os.access(plan.layout.unit_dir, os.W_OK):
        output.fail(
            f"cannot write {plan.layout.unit_dir}",
            hint="a system unit needs root: sudo iota service install --system",
        )
    if plan.sandbox and not plan.boxed:
        output.warn("unprivileged user namespaces are unavailable: installing without filesystem sandboxing")


def _write(plan: _Plan, opts: UnitOptions, token: str, start: bool) -> tuple[UnitOptions, InstallResult]:
    """Install the unit; if the credential cannot be encrypted here, fall back to a 0600 file."""
    from iota_cli import output
    from iota_cli.headless import host
    from iota_cli.headless import service as svc

    try:
        try:
            return opts, svc.install(opts, plan.layout, token, runner=host.run_command, start=start)
        except svc.EncryptError as e:
            output.warn(f"{e}; storing the token as a 0600 file instead")
            opts = plan.options(encrypt=False)
            return opts, svc.install(opts, plan.layout, token, runner=host.run_command, start=start)
    except (svc.ServiceError, OSError) as e:
        output.fail(str(e), hint="user units need a running user manager: see docs/headless.md")


def _report_installed(plan: _Plan, opts: UnitOptions, result: InstallResult, start: bool) -> None:
    import getpass

    from iota_cli import output
    from iota_cli.headless import host
    from iota_cli.headless import service as svc

    cred = opts.credential
    output.echo(f"{'wrote' if result.unit_changed else 'unchanged:'} {result.unit_path}")
    if cred:
        how = "encrypted with systemd-creds" if cred.encrypted else "file mode 0600"
        output.echo(f"token: systemd credential {svc.CREDENTIAL_ID} from {cred.path} ({how})")
    output.echo(f"{'enabled and started' if start else 'enabled'} {svc.UNIT_NAME} ({plan.scope} unit)")
    flag = "--user" if plan.scope == "user" else "--system"
    output.echo(f"next: iota service status {flag}; iota service logs {flag} -f")
    if plan.scope == "user":
        user = getpass.getuser()
        if host.linger(user, host.run_command) is not True:
            output.echo(
                f"note: lingering is off for {user}, so the service stops when you log out and does not "
                f"start at boot. To keep it running: sudo loginctl enable-linger {user}"
            )


def uninstall(scope_flag: ScopeFlag = None) -> None:
    """Stop and disable the service and remove its unit and credential (training data is kept)."""
    from iota_cli import output
    from iota_cli.config import settings
    from iota_cli.headless import host
    from iota_cli.headless import service as svc

    scope = _installed_scope(scope_flag)
    try:
        removed = svc.uninstall(scope, svc.default_layout(scope), runner=host.run_command)
    except (svc.ServiceError, OSError) as e:
        output.fail(str(e))
    if not removed:
        output.echo(f"no {scope} unit installed: nothing to do")
        return
    for path in removed:
        output.echo(f"removed {path}")
    output.echo(f"checkpoints and cache are kept in {settings.paths().data_dir.parent}")


def status(
    scope_flag: ScopeFlag = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the unit's state as JSON.")] = False,
) -> None:
    """Whether the service runs, and what it last reported (step, tokens/s, credits)."""
    from iota_cli import output
    from iota_cli.headless import host
    from iota_cli.headless import service as svc

    scope = _installed_scope(scope_flag)
    try:
        props = svc.status(scope, runner=host.run_command)
    except svc.ServiceError as e:
        output.fail(str(e), hint="is systemd running here?", code=output.EXIT_UNAVAILABLE)
    output.Sink(as_json).result({"unit": svc.UNIT_NAME, "scope": scope, **props}, _render_status)
    raise typer.Exit(output.EXIT_OK if props["ActiveState"] == "active" else output.EXIT_FAIL)


def _render_status(p: dict) -> str:
    if p["LoadState"] == "not-found":
        return f"{p['unit']} is not installed ({p['scope']} unit); install it with `iota service install`"
    return (
        f"{p['unit']} ({p['scope']}): {p['ActiveState']} ({p['SubState']}), {p['UnitFileState']}\n"
        f"status: {p['StatusText'] or '-'}\n"
        f"pid {p['MainPID']}, restarts {p['NRestarts']}, since {p['ActiveEnterTimestamp'] or '-'}"
    )


def logs(
    scope_flag: ScopeFlag = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    lines: Annotated[int | None, typer.Option("--lines", "-n", help="Show this many recent lines.")] = None,
) -> None:
    """Show the service's log from the journal (journalctl)."""
    from iota_cli.headless import service as svc

    argv = svc.logs_command(_installed_scope(scope_flag), follow=follow, lines=lines)
    raise typer.Exit(svc.run_foreground(argv))
