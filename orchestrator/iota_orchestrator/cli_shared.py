"""What the `iota orchestrator` commands share: their options, and how they reach an orchestrator.

A local orchestrator is found through `<data-dir>/server.json`, or --url is given; the admin token comes
from --admin-token, IOTA_ADMIN_TOKEN or, for the local orchestrator only, `<data-dir>/admin-token`.
Importing this module loads Typer only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from iota_cli.train.api import SwarmApi

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


def data_dir_of(flag: Path | None) -> Path:
    from iota_cli.config import settings

    return flag if flag is not None else settings.paths().data_dir / "orchestrator"


def server_url(url: str | None, data_dir: Path | None) -> str:
    import json

    from iota_cli import output

    if url:
        return url.rstrip("/")
    info = data_dir_of(data_dir) / "server.json"
    try:
        return str(json.loads(info.read_text())["url"]).rstrip("/")
    except (OSError, ValueError, KeyError):
        output.fail(
            f"no running orchestrator found ({info} is missing)",
            hint="start one with `iota orchestrator serve`, or pass --url",
            code=output.EXIT_UNAVAILABLE,
        )


@contextlib.contextmanager
def connect(url: str, token: str | None = None) -> Iterator[SwarmApi]:
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


def admin_token(flag: str | None, url: str | None, data_dir: Path | None) -> str:
    """The admin token: given, or the local orchestrator's <data-dir>/admin-token (never sent elsewhere)."""
    from iota_cli import output
    from iota_orchestrator.datadir import read_admin_token

    token = flag or (None if url else read_admin_token(data_dir_of(data_dir)))
    if not token:
        output.fail(
            "the admin token is required",
            hint="pass --admin-token or set IOTA_ADMIN_TOKEN",
            code=output.EXIT_CONFIG,
        )
    return token
