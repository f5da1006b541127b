"""`iota status`: this machine's assignment, standing, last checkpoint, local counters and credits."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command()(status)


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    orchestrator: Annotated[
        str | None, typer.Option(help="Orchestrator URL (default: the configured one).")
    ] = None,
) -> None:
    """Show this machine's assignment, last checkpoint, step counters and credits.

    Local facts come from the checkpoints on disk; the assignment and credits from the orchestrator
    when it answers (within a few seconds).

    \b
    Examples:
      iota status
      iota status --json | jq .checkpoints
    """
    from iota_cli import output
    from iota_cli.config import settings
    from iota_cli.train.status import gather

    s = settings.load()
    report = gather(settings.paths(), orchestrator or s.orchestrator)
    output.Sink(as_json).result(report, render)


def render(r: dict) -> str:
    from iota_cli import output

    lines = []
    remote = r.get("orchestrator") or {}
    if remote.get("error"):
        lines.append(f"Orchestrator: {r['orchestrator_url'] or 'not configured'} ({remote['error']})")
    elif remote:
        a = remote.get("assignment") or {}
        where = f"run {a.get('run_id')}, stage {a.get('stage')}" if a else "no assignment yet"
        lines.append(
            f"Contributor {remote['contributor_id']} ({remote['name']}): {where}; "
            f"{remote['credits']:.2f} credits"
        )
        if remote.get("standing") is not None:
            checks = remote.get("checks") or {}
            lines.append(
                f"Standing {remote['standing']:+d}: {checks.get('passed', 0)} checks passed, "
                f"{checks.get('failed', 0)} failed (docs/trust.md)"
            )
    cks = r["checkpoints"]
    if not cks:
        lines.append("No checkpoints on this machine yet.")
    else:
        rows = [
            (
                c["run_id"],
                c["stage"],
                c["step"],
                c["epoch"],
                c["backward_passes"],
                c["tokens"],
                f"{c['credits_seen']:.2f}",
                c["saved"],
            )
            for c in cks
        ]
        lines.append(
            output.table(["run", "stage", "step", "epoch", "backward", "tokens", "credits", "saved"], rows)
        )
    return "\n".join(lines)
