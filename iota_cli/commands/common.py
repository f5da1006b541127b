"""Small pieces several commands share, so each says the same thing the same way."""

from __future__ import annotations

from iota_cli import output


def orchestrator_url(url: str) -> str:
    """The orchestrator to use (the flag, else the configured one), checked by core/urls.py; exit 78 if
    there is none, urls.UrlError (exit 78, from the error map) if it is not one."""
    from iota_cli.core import urls

    if not url.strip():
        output.fail(
            "no orchestrator configured",
            hint="pass --orchestrator URL or run `iota config set orchestrator URL`",
            code=output.EXIT_CONFIG,
        )
    return urls.check(url)
