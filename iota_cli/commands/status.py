"""`iota status`: this machine's assignment, standing, last checkpoint, local counters and credits;
`--watch` follows the running worker live (stage, step, tokens/s, loss, credits, what it waits for)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from iota_cli.train.status import Watch


def register(app: typer.Typer) -> None:
    app.command()(status)


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    orchestrator: Annotated[
        str | None, typer.Option(help="Orchestrator URL (default: the configured one).")
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Follow the worker live until Ctrl-C (--json: once).")
    ] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes (--watch).")] = 2.0,
) -> None:
    """Show this machine's assignment, last checkpoint, step counters and credits.

    Local facts come from the checkpoints on disk and the running worker's live file; the assignment
    and credits from the orchestrator when it answers (within a few seconds). --watch redraws the
    worker's stage, step, tokens/s, loss, credits and what it waits for in place (a line per refresh
    when not a terminal); Ctrl-C ends it (exit 0).

    \b
    Examples:
      iota status
      iota status --watch
      iota status --json | jq .checkpoints
    """
    from iota_cli import output
    from iota_cli.config import settings
    from iota_cli.train.status import Watch, gather

    s = settings.load()
    url = orchestrator or s.orchestrator
    if not watch:
        output.Sink(as_json).result(gather(settings.paths(), url), render)
        return
    source = Watch(settings.paths(), url)
    if as_json:
        output.Sink(True).result(source.view())
        return
    follow(source, interval)


def follow(source: Watch, interval: float) -> None:
    """Redraw source.view() every interval seconds until Ctrl-C, which is a normal end here (exit 0)."""
    import time

    from iota_cli import output

    screen = output.Redraw()
    try:
        while True:
            view = source.view()
            screen.draw(render_live(view, interval), live_line(view))
            time.sleep(interval)
    except KeyboardInterrupt:
        if screen.tty:
            typer.echo("")  # end the line the terminal echoed ^C on


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


def _facts(v: dict) -> dict[str, str]:
    from iota_cli.headless.progress import si

    def num(x: object, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    loss = num(v["loss"], ".3f") + (f" ({v['loss_of']})" if v["loss_of"] == "the run" else "")
    return {
        "step": num(v["step"], "d"),
        "tokens/s": "n/a" if v["tokens_per_s"] is None else si(v["tokens_per_s"]),
        "loss": loss,
        "credits": num(v["credits"], ".2f"),
    }


def _doing(v: dict) -> str:
    import time

    w = v["worker"]
    if w is None:
        return "no worker has run here yet (start one with `iota join`)"
    if not v["running"]:
        return f"not running; its last state: {w.get('state')} ({_ago(time.time() - w['updated'])} ago)"
    since = f" (for {_ago(time.time() - v['state_since'])})" if v.get("state_since") else ""
    return f"{v['state']}{since}"


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s // 3600} h"


def render_live(v: dict, interval: float) -> str:
    """The block `iota status --watch` redraws in a terminal."""
    import time

    where = (
        "no stage yet"
        if v["stage"] is None
        else f"stage {v['stage']}" + (f" {v['kind']}" if v["kind"] else "")
    )
    run = f", run {v['run_id']}" if v["run_id"] else ""
    remote = v.get("orchestrator") or {}
    lines = [
        f"iota status --watch  (every {interval:g} s; Ctrl-C to quit)  {time.strftime('%H:%M:%S')}",
        f"  {'where':<9} {where}{run}",
        *(f"  {k:<9} {val}" for k, val in _facts(v).items()),
        f"  {'doing':<9} {_doing(v)}",
    ]
    if remote.get("error"):
        lines.append(f"  {'note':<9} orchestrator: {remote['error']}")
    return "\n".join(lines)


def live_line(v: dict) -> str:
    """One refresh as one line (not a terminal)."""
    import time

    stage = "stage -" if v["stage"] is None else f"stage {v['stage']}"
    facts = ", ".join(f"{k} {val}" for k, val in _facts(v).items())
    return f"{time.strftime('%H:%M:%S')} {stage}: {facts}; {_doing(v)}"
