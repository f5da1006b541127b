"""The `iota` command line: assembles the command modules and plug-in groups; no logic lives here.

Run `iota --help`. Every command module imports its heavy dependencies inside the command, so help
stays fast (see bench/startup.py). Other packages add command groups through the `iota.commands`
entry-point group, as backends do through `iota.backends`: the orchestrator adds `iota orchestrator` so,
and this package never imports the server.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperArgument, TyperGroup

from iota_cli import __version__, output
from iota_cli.commands import auth, backends, config, doctor, errors, join, service, status, swarm

COMMANDS_GROUP = "iota.commands"  # entry points: register(app: typer.Typer) -> None


class Root(TyperGroup):
    """The `iota` group: every command runs inside it, so known exceptions are reported in one place."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            plain_usage(command)
        return command

    def invoke(self, ctx: Any) -> Any:
        from typer.exceptions import Abort, Exit, TyperException

        try:
            return super().invoke(ctx)
        except (Exit, Abort, TyperException):
            raise  # exit codes and usage errors: Typer reports those itself
        except KeyboardInterrupt:
            typer.echo("", err=True)  # end the line the ^C was echoed on
            raise typer.Exit(output.EXIT_INTERRUPTED) from None
        except Exception as e:
            errors.report(e)  # exits with the table's code; returns for anything it does not know
            errors.report_unexpected(e)  # exits 70, the traceback in a log file (IOTA_DEBUG=1: returns)
            raise


class PlainArgument(TyperArgument):
    """An argument shown in usage lines as gh and git show them: KEY, or [KEY] when optional (Typer 0.29
    writes a required one as {key}, which reads as a placeholder left unfilled)."""

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        name = (self.metavar or self.name or "").upper()
        name = name if self.required else f"[{name}]"
        return [name + ("..." if self.nargs != 1 else "")]


def plain_usage(command: Any) -> None:
    """Give every argument of command (and of its subcommands) the plain usage form."""
    for param in command.params:
        if type(param) is TyperArgument:
            param.__class__ = PlainArgument
    for sub in getattr(command, "commands", {}).values():
        plain_usage(sub)


app = typer.Typer(
    cls=Root,
    name="iota",
    help=(
        "Contribute your computer to training a large language model with thousands of others.\n\n"
        "\b\nExamples:\n"
        "  iota doctor                 check this machine against the minimums\n"
        "  iota swarm                  train a tiny model with a local swarm\n"
        "  iota join --orchestrator https://swarm.example.org\n"
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"iota {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Contribute compute to a decentralized LLM pretraining swarm."""


def add_plugins(app: typer.Typer) -> None:
    """Every command group installed packages register; one that fails to load is skipped, with a warning."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=COMMANDS_GROUP):
        try:
            ep.load()(app)
        except Exception as e:  # a broken plug-in must not take the whole CLI down
            typer.echo(f"warning: skipping the `{ep.name}` commands ({ep.value}): {e}", err=True)


for module in (doctor, backends, config, auth, join, status, swarm, service):
    module.register(app)
add_plugins(app)


def main() -> None:
    app(prog_name="iota")
