"""`iota doctor`: can this machine join a swarm, and if not, exactly why and what to do.

Probes once (hardware.probe), checks against the minimums (requirements.check), prints a table or
--json. Exit 0 when nothing fails (warnings do not fail), 1 when any check fails.
"""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command(epilog="Exit status: 0 when every check passes or only warns, 1 when any fails.")(doctor)


def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks and the report as JSON.")] = False,
    backend: Annotated[
        str | None, typer.Option(help="Check this backend instead of the configured one (e.g. torch-cpu).")
    ] = None,
    orchestrator: Annotated[
        str | None, typer.Option(help="Check this orchestrator URL instead of the configured one.")
    ] = None,
) -> None:
    """Check this machine against the minimums for joining a training swarm.

    \b
    Examples:
      iota doctor
      iota doctor --json | jq '.checks[] | select(.status == "fail")'
      iota doctor --orchestrator https://swarm.example.org
    """
    from iota_cli import output
    from iota_cli.config import settings
    from iota_cli.machine import hardware, requirements

    s = settings.load()
    report = hardware.probe(
        orchestrator=s.orchestrator if orchestrator is None else orchestrator,
        backend=backend or s.backend,
    )
    checks = requirements.check(report)
    ok = not requirements.failed(checks)
    result = {"ok": ok, "checks": [c.to_dict() for c in checks], "report": report.to_dict()}
    output.Sink(as_json).result(result, lambda _: render(report, checks))
    raise typer.Exit(output.EXIT_OK if ok else output.EXIT_FAIL)


def render(report, checks) -> str:
    from iota_cli import output

    rows = [(c.name, c.status, c.found, c.required, c.hint) for c in checks]
    table = output.table(["check", "status", "found", "required", "fix"], rows)
    return f"{_summary_line(report)}\n\n{table}\n\n{_verdict(checks)}"


def _summary_line(r) -> str:
    from iota_cli.machine.requirements import gib

    cpu = f"{r.cpu_model or 'unknown CPU'} ({r.cpu_count or '?'} cores)"
    return f"This machine: {r.os} {r.arch}, {cpu}, {gib(r.ram_bytes)} RAM, Python {r.python.split()[0]}"


def _verdict(checks) -> str:
    fails = [c.name for c in checks if c.status == "fail"]
    warns = [c.name for c in checks if c.status == "warn"]
    parts = []
    if fails:
        parts.append(f"{len(fails)} failed ({', '.join(fails)})")
    if warns:
        parts.append(f"{len(warns)} warning{'s' * (len(warns) > 1)} ({', '.join(warns)})")
    if fails:
        return "; ".join(parts) + ". This machine cannot join a swarm yet: see the fix column."
    if warns:
        return "; ".join(parts) + ". This machine can join a swarm."
    return "All checks passed. This machine can join a swarm."
