"""`iota config show|get|set|unset|path`: the TOML config file and its IOTA_<NAME> overrides.

All the logic is config/settings.py's; this module parses and prints. A file that cannot be read is
reported by commands/errors.py (exit 78); a bad setting name or value here is a usage error (exit 2).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

config_app = typer.Typer(
    help="Show and change settings (a TOML file; IOTA_<NAME> environment variables override it).",
    no_args_is_help=True,
)
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")


def _fmt(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


@config_app.command("show")
def show(as_json: JsonOption = False) -> None:
    """Every setting, its value and where it comes from (default, file or env)."""
    from dataclasses import asdict

    from iota_cli import output
    from iota_cli.config import settings

    values = asdict(settings.load())
    result = {
        "settings": values,
        "sources": settings.sources(),
        "config_file": str(settings.paths().config_file),
    }
    output.Sink(as_json).result(result, _render_settings)


def _render_settings(r: dict[str, Any]) -> str:
    from iota_cli import output
    from iota_cli.config import settings

    rows = [(k, _fmt(v), r["sources"][k], settings.SETTING_HELP[k]) for k, v in r["settings"].items()]
    return output.table(["setting", "value", "source", "meaning"], rows)


@config_app.command("get")
def get(key: Annotated[str, typer.Argument(help="Setting name, e.g. orchestrator.")]) -> None:
    """Print one setting's effective value."""
    from iota_cli import output
    from iota_cli.config import settings

    try:
        key = settings.check_key(key)
    except settings.SettingsError as e:
        output.fail(str(e), code=output.EXIT_USAGE)
    output.echo(_fmt(getattr(settings.load(), key)))


@config_app.command("set")
def set_(
    key: Annotated[str, typer.Argument(help="Setting name, e.g. orchestrator.")],
    value: Annotated[str, typer.Argument(help="New value.")],
) -> None:
    """Store a setting in the config file.

    \b
    Example:
      iota config set orchestrator https://swarm.example.org
    """
    import os

    from iota_cli import output
    from iota_cli.config import settings

    path = settings.paths().config_file
    settings.load()  # refuse to rewrite a file we cannot read
    try:
        stored = settings.set_value(key, value)
        key = settings.check_key(key)
    except settings.SettingsError as e:
        output.fail(str(e), code=output.EXIT_USAGE)
    output.echo(f"{key} = {_fmt(stored)}  (in {path})")
    if f"IOTA_{key.upper()}" in os.environ:
        output.warn(f"IOTA_{key.upper()} is set in the environment and overrides this value")


@config_app.command("unset")
def unset(key: Annotated[str, typer.Argument(help="Setting name.")]) -> None:
    """Remove a setting from the config file (back to its default)."""
    from iota_cli import output
    from iota_cli.config import settings

    settings.load()
    try:
        settings.unset_value(key)
    except settings.SettingsError as e:
        output.fail(str(e), code=output.EXIT_USAGE)


@config_app.command("path")
def path(as_json: JsonOption = False) -> None:
    """Where the config file, data, cache and logs live (IOTA_HOME relocates them all)."""
    from iota_cli import output
    from iota_cli.config import settings

    output.Sink(as_json).result(
        settings.paths().to_dict(), lambda p: output.table(["what", "path"], list(p.items()))
    )
