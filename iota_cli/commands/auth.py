"""`iota login`, `iota logout`, `iota whoami`: the orchestrator token in the OS keyring (else a 0600 file).

On a host without a keyring the token goes to `<data dir>/tokens/` (mode 0600; config/credentials.py).
The token never reaches the terminal, the config file or a log; only its sha256 fingerprint is shown.
Try it: PYTHON_KEYRING_BACKEND=keyring.backends.fail.Keyring iota login --orchestrator http://h:8 < tok
"""

from __future__ import annotations

from typing import Annotated

import typer

OrchestratorOption = Annotated[
    str | None,
    typer.Option(metavar="URL", help="The orchestrator this token is for (default: the configured one)."),
]


def register(app: typer.Typer) -> None:
    app.command()(login)
    app.command()(logout)
    app.command()(whoami)


def _orchestrator(flag: str | None) -> str:
    """The orchestrator the token is for (the flag, else the configured one), checked; "" for none."""
    from iota_cli.config import settings
    from iota_cli.core import urls

    url = flag if flag is not None else settings.load().orchestrator
    if not url.strip():
        return ""
    return urls.check(url)  # a UrlError is reported by the error map (exit 78)


def _read_token() -> str:
    import sys

    if sys.stdin.isatty():
        return typer.prompt("Token", hide_input=True)
    return sys.stdin.readline()


def login(
    token: Annotated[
        str | None,
        typer.Option(
            metavar="TOKEN", help="The token (stdin is safer: a flag shows in shell history and ps)."
        ),
    ] = None,
    orchestrator: OrchestratorOption = None,
) -> None:
    """Store the orchestrator token in the OS keyring (without one: a file only you can read).

    Reads the token from --token, else from stdin (a hidden prompt in a terminal).

    \b
    Examples:
      iota login                      (paste the token at the prompt)
      iota login < ~/iota-token.txt
    """
    from iota_cli import output
    from iota_cli.config import credentials

    url = _orchestrator(orchestrator)
    if token is None:
        token = _read_token()
    kept = credentials.keep_token(token, url)
    account = credentials.account_for(url)
    fp = credentials.fingerprint(token.strip())
    output.echo(f"Stored the token for {account} {kept.describe()}; fingerprint {fp}.")


def logout(orchestrator: OrchestratorOption = None) -> None:
    """Remove the stored token from the OS keyring and the token file."""
    import os

    from iota_cli import output
    from iota_cli.config import credentials

    url = _orchestrator(orchestrator)
    account = credentials.account_for(url)
    removed = credentials.delete_token(url)
    output.echo(f"Removed the token for {account}." if removed else f"No token was stored for {account}.")
    if os.environ.get("IOTA_TOKEN"):
        output.warn("IOTA_TOKEN is still set in this environment and will be used")


def whoami(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Say which token would be used and where it comes from (never the token itself).

    Sources, first found wins: --token, IOTA_TOKEN, $CREDENTIALS_DIRECTORY/iota-token, the OS keyring,
    the token file (<data dir>/tokens/, on a host without a keyring).
    """
    from iota_cli import output
    from iota_cli.config import credentials

    url = _orchestrator(None)
    out = output.Sink(as_json)
    where = url or None
    try:
        found = credentials.resolve_token(None, orchestrator=url)
    except credentials.CredentialsError as e:
        result = {"authenticated": False, "orchestrator": where, "error": str(e)}
        out.failure(result, str(e), code=output.EXIT_CONFIG)
    fp = credentials.fingerprint(found.token)
    result = {"authenticated": True, "orchestrator": where, "source": found.source, "fingerprint": fp}
    out.result(
        result,
        lambda r: f"Token from {r['source']} (fingerprint {fp}) for {url or 'no orchestrator configured'}.",
    )
