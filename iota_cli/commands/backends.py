"""`iota backends` [--json]: every installed compute backend, whether it runs here, and which one auto picks.

Asking a backend whether it is available imports its framework (torch, mlx), so this command takes a
second or two; the imports happen inside the command, never when `iota --help` loads this module.
"""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("backends")(backends)


def backends(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the compute backends, whether each is available here and why not, and which auto would use."""
    from iota_cli import output
    from iota_cli.core import backend

    infos = backend.list_backends()
    auto = backend.detect_auto_choice()
    if not infos:
        output.fail("no backends are installed", hint="pip install 'iota-cli[torch]' (or [mlx] on a Mac)")
    usable = {i.name for i in infos if i.available}
    rows = [
        {"name": i.name, "available": i.available, "detail": i.detail, "description": i.description}
        for i in infos
    ]
    result = {"backends": rows, "auto": auto, "auto_available": auto in usable}
    output.Sink(json_out).result(result, render)


def render(r: dict) -> str:
    from iota_cli import output

    rows = [[b["name"], "yes" if b["available"] else "no", b["detail"]] for b in r["backends"]]
    table = output.table(["BACKEND", "AVAILABLE", "VERSION OR WHY NOT"], rows)
    if r["auto"] is None:
        auto = "auto: none (no Apple Silicon or NVIDIA GPU here); --backend torch-cpu uses the CPU"
    elif r["auto_available"]:
        auto = f"auto: {r['auto']}"
    else:
        auto = f"auto: {r['auto']}, but it is not available here (see above)"
    return f"{table}\n\n{auto}"
