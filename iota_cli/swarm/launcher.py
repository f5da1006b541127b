"""`iota swarm`'s run of a local swarm: check the arguments, start, watch with one line per stage, stop.

    stop = threading.Event()   # set it (Ctrl-C) to stop early; every worker still checkpoints and leaves
    summary = run_swarm(SwarmOptions(workers=3, max_steps=10, cap_steps=True), stop, interactive=False)

Nothing starts for a bad --backends name or a --data directory without enough text (checks.SwarmError,
exit 2). A worker that exits with an error ends the swarm at once: the rest are stopped and run_swarm
raises SwarmError with the reason from that worker's log (a stop before any worker joined raises it too,
with 130). A temp home is removed when the swarm fails; after a run it holds the logs, checkpoints and
the orchestrator's data, and the summary names it. The orchestrator's dashboard URL is logged as soon
as it listens (a log line on stderr: `--json` keeps stdout for the summary).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iota_cli import output
from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.protocol import RunStatus, StageStatus
from iota_cli.swarm.checks import SwarmError, check_backends, check_data
from iota_cli.swarm.local import Swarm, SwarmOptions

log = logging.getLogger("iota.swarm")


def stage_line(
    stage: StageStatus, status: RunStatus, tokens_per_item: int, detail: bool = True
) -> dict[str, Any]:
    """Progress facts of one stage for the display: steps, tokens, loss (tail), credits, state text.

    Without detail the state text holds only what changes rarely (the workers alive): a log line is
    written whenever it changes, and the epoch and queue depths change at nearly every poll."""
    alive = sum(1 for w in stage.workers if w.alive)
    tail = stage.stage == status.n_stages - 1
    state = f"{alive}/{len(stage.workers)} workers"
    if detail:
        state += f", epoch {stage.epoch}, queue fwd {stage.queue_forward} bwd {stage.queue_backward}"
    return {
        "step": stage.optimizer_steps,
        "tokens": stage.forward_done * tokens_per_item,
        "loss": status.last_loss if tail else None,
        "credits": sum(w.credits for w in stage.workers),
        "state": state,
    }


def watch(swarm: Swarm, stop: threading.Event, interactive: bool | None = None) -> RunStatus | None:
    """Show one progress line per stage until the run ends, every worker exits, or stop is set; raise
    SwarmError as soon as a worker exits with an error."""
    from iota_cli.headless.progress import Progress

    kinds = ["head"] + ["body"] * (swarm.manifest.model.n_stages - 2) + ["tail"]
    bars = [
        Progress(f"stage {i} {k}", interactive=interactive, interval_s=5.0, position=i)
        for i, k in enumerate(kinds)
    ]
    train = swarm.manifest.train
    status = None
    deadline = time.monotonic() + swarm.options.timeout_s
    try:
        while not stop.is_set() and swarm.any_running() and time.monotonic() < deadline:
            failed = swarm.failed()
            if failed is not None:
                raise failed
            status = swarm.status() or status
            swarm.end_if_stalled(status)
            if status:
                for bar, stage in zip(bars, status.stages, strict=False):
                    bar.update(**stage_line(stage, status, train.batch_size * train.seq_len, bar.interactive))
            stop.wait(1.0)
        failed = swarm.failed()  # the last worker may have failed just now
        if failed is not None:
            raise failed
    finally:
        for bar in reversed(bars):
            bar.close()
    return status


def run_swarm(
    options: SwarmOptions,
    stop: threading.Event,
    interactive: bool | None = None,
    on_start: Callable[[Swarm], None] | None = None,
) -> dict[str, Any]:
    """Check, start, watch, stop; return the summary (tokens, tokens_per_s, wall_s, first/last loss,
    workers). on_start gets the Swarm before any process starts (a second Ctrl-C kills it)."""
    check_backends(options.backends)
    if options.data and Path(options.data).exists():  # a glob is left to the orchestrator
        check_data(Path(options.data), tiny_manifest(options.data))
    home = options.home or Path(tempfile.mkdtemp(prefix="iota-swarm-"))
    swarm = Swarm.create(options, home)
    if on_start is not None:
        on_start(swarm)
    done = False
    try:
        summary = run(swarm, stop, interactive)
        if stop.is_set() and not summary["workers"]:
            raise SwarmError(
                "stopped before any worker joined: nothing was trained", code=output.EXIT_INTERRUPTED
            )
        done = True
        return summary
    finally:
        if not done and options.home is None:
            shutil.rmtree(home, ignore_errors=True)  # nothing in it to look at: the error says why


def run(swarm: Swarm, stop: threading.Event, interactive: bool | None) -> dict[str, Any]:
    """Start and watch; always stop the workers first (they give back, checkpoint, leave), then the
    validator and the orchestrator, which the workers need until they have left."""
    codes: dict[int, int | None] = {}
    status: RunStatus | None = None
    try:
        if not stop.is_set():  # Ctrl-C while checking: start nothing
            swarm.prepare()
            # As soon as the orchestrator answers: the page shows the workers as they join.
            log.info("dashboard: %s/ (Prometheus metrics: %s/metrics)", swarm.url, swarm.url)
            swarm.launch()
        status = watch(swarm, stop, interactive)
    finally:
        if swarm.validator is not None:
            swarm.validator.ask_to_stop()  # it needs none of the workers; its last wait runs beside theirs
        codes = swarm.stop_workers()
        status = swarm.status() or status
        swarm.stop_server()
    return swarm.summary(status, codes)
