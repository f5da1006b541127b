"""A whole swarm on one machine: a local orchestrator, a tiny run, and N `iota join` worker processes.

`iota swarm` runs this; the end-to-end tests and benchmarks use it as their harness. The workers are the
same `iota join` a remote contributor runs, started as subprocesses on loopback with their own IOTA_HOME.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from iota_cli.core.manifest import RunManifest, tiny_manifest
from iota_cli.core.protocol import RegisterRequest, RunStatus, StageStatus
from iota_cli.swarm.corpus import default_data
from iota_cli.swarm.orchestrator import OrchestratorProcess, ValidatorProcess
from iota_cli.train.api import SwarmApi


@dataclass(frozen=True)
class SwarmOptions:
    workers: int = 6
    max_steps: int = 40  # local optimizer steps per replica the run is sized for
    data: str = ""  # a directory or glob of text files; empty: the standard library's source
    backends: tuple[str, ...] = ("torch-cpu", "mlx-cpu")  # alternated across workers
    home: Path | None = None  # orchestrator data and worker homes; None: a fresh temp dir
    port: int = 0
    timeout_s: float = 1800.0
    validate: bool = True  # run a validator beside the orchestrator (docs/trust.md)


@dataclass
class WorkerProcess:
    index: int
    stage: int
    backend: str
    contributor_id: str
    token: str
    home: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Any = None
    env: dict[str, str] = field(default_factory=dict)  # extra environment (tests: NOTIFY_SOCKET)
    launcher: tuple[str, ...] = ("-m", "iota_cli")  # what runs `iota` (tests: a cheating worker's script)

    def start(self, url: str, run_id: str, extra: tuple[str, ...] = ()) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "IOTA_HOME": str(self.home),
            "IOTA_TOKEN": self.token,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",  # many workers share few cores; one thread each avoids thrashing
            "TQDM_DISABLE": "1",
            **self.env,
        }
        cmd = [
            sys.executable,
            *self.launcher,
            "join",
            "--orchestrator",
            url,
            "--run",
            run_id,
            "--backend",
            self.backend,
            "--stage",
            str(self.stage),
            "--force",
            *extra,
        ]
        self.log = open(self.home / "worker.log", "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if self.log:
            self.log.close()
        return code


@dataclass
class Swarm:
    """The processes of a local swarm; start(), then watch() or stop()."""

    options: SwarmOptions
    home: Path
    manifest: RunManifest
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    url: str = ""
    run_id: str = ""
    orchestrator: OrchestratorProcess | None = None
    validator: ValidatorProcess | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    started: float = 0.0

    @classmethod
    def create(cls, options: SwarmOptions, home: Path) -> Swarm:
        m = tiny_manifest(options.data or default_data())
        # Size the run so each replica takes about max_steps optimizer steps.
        replicas = max(1, options.workers // m.model.n_stages)
        samples = options.max_steps * m.train.backward_per_step * replicas
        manifest = replace(m, train=replace(m.train, max_samples=samples))
        return cls(options=options, home=home, manifest=manifest)

    def start_server(self) -> None:
        """Start (or restart, on the same port and data dir) the orchestrator process."""
        # Without the [orchestrator] extra the child says how to install it, and start() raises with that.
        port = int(self.url.rsplit(":", 1)[1]) if self.url else self.options.port
        self.orchestrator = OrchestratorProcess(
            self.home / "orchestrator", port=port, admin_token=self.admin_token
        ).start()
        self.url = self.orchestrator.url
        if self.options.validate and (self.validator is None or self.validator.proc is None):
            log = self.home / "validator.log"
            self.validator = ValidatorProcess(self.url, self.admin_token, log).start()

    def start(self) -> None:
        """Orchestrator, run, contributors, then the worker processes (stages covered round-robin)."""
        self.prepare()
        self.launch()

    def prepare(self) -> None:
        """Start the orchestrator, create the run and register one contributor per worker."""
        self.started = time.monotonic()
        self.start_server()
        with SwarmApi.connect(self.url, self.admin_token) as admin:
            self.run_id = admin.create_run(self.manifest).run_id
            n_stages = self.manifest.model.n_stages
            for i in range(self.options.workers):
                backend = self.options.backends[i % len(self.options.backends)]
                reply = admin.register(RegisterRequest(name=f"worker-{i}", backend=backend))
                self.workers.append(
                    WorkerProcess(
                        index=i,
                        stage=i % n_stages,
                        backend=backend,
                        contributor_id=reply.contributor_id,
                        token=reply.token,
                        home=self.home / f"worker-{i}",
                    )
                )

    def launch(self, settle_s: float = 120.0) -> None:
        """Start one worker per stage, then the rest once those hold their stages.

        The orchestrator moves a replica of a crowded stage to a stage nobody holds (assignment.py), so
        a replica that joined before any worker of another stage would be moved there and the stages
        would not end up with their replicas each."""
        n_stages = self.manifest.model.n_stages
        first, rest = self.workers[:n_stages], self.workers[n_stages:]
        for w in first:
            w.start(self.url, self.run_id)
        want = {w.contributor_id: w.stage for w in first}
        deadline = time.monotonic() + settle_s
        while rest and time.monotonic() < deadline:
            status = self.status()
            placed = {ws.contributor_id: s.stage for s in status.stages for ws in s.workers} if status else {}
            if all(placed.get(cid) == stage for cid, stage in want.items()):
                break
            if not all(w.running() for w in first):
                break  # the summary shows which one exited and why
            time.sleep(0.3)
        for w in rest:
            w.start(self.url, self.run_id)

    def status(self) -> RunStatus | None:
        """The run's status, or None when the orchestrator does not answer within a few seconds."""
        try:
            with SwarmApi.connect(self.url, retries=0, max_wait_s=2.0) as api:
                return api.run_status(self.run_id, timeout=(1.0, 5.0))
        except Exception:  # noqa: BLE001 - the display just skips a beat
            return None

    def any_running(self) -> bool:
        return any(w.running() for w in self.workers)

    def stop_workers(self, grace_s: float = 30.0) -> dict[int, int | None]:
        """SIGTERM every worker (they checkpoint and leave), SIGKILL what is left after grace_s."""
        for w in self.workers:
            w.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        codes = {}
        for w in self.workers:
            codes[w.index] = w.wait(max(0.1, deadline - time.monotonic()))
            if codes[w.index] is None:
                w.signal(signal.SIGKILL)
                w.wait(5)
        return codes

    def stop_server(self) -> None:
        if self.validator is not None:
            self.validator.stop()
            self.validator = None
        if self.orchestrator is not None:
            self.orchestrator.stop()
            (self.home / "orchestrator.log").write_text("\n".join(self.orchestrator.lines) + "\n")

    def summary(self, status: RunStatus | None, codes: dict[int, int | None]) -> dict[str, Any]:
        """What `iota swarm` prints (and --json emits): totals, loss, and one row per worker."""
        wall = time.monotonic() - self.started
        tokens = status.tokens_processed if status else 0
        by_id = {w.contributor_id: w for w in self.workers}
        rows = []
        for stage in status.stages if status else []:
            for ws in stage.workers:
                w = by_id.get(ws.contributor_id)
                rows.append(
                    {
                        "worker": w.index if w else None,
                        "contributor_id": ws.contributor_id,
                        "stage": stage.stage,
                        "backend": ws.backend,
                        "steps": ws.steps,
                        "credits": round(ws.credits, 3),
                        "exit_code": codes.get(w.index) if w else None,
                    }
                )
        return {
            "run_id": self.run_id,
            "state": status.state if status else None,
            "tokens": tokens,
            "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0.0,
            "first_loss": status.first_loss if status else None,
            "last_loss": status.last_loss if status else None,
            "samples_completed": status.samples_completed if status else None,
            "workers": sorted(rows, key=lambda r: r["worker"] or 0),
            "home": str(self.home),
        }


def stage_line(stage: StageStatus, status: RunStatus, tokens_per_item: int) -> dict[str, Any]:
    """Progress facts of one stage for the display: steps, tokens, loss (tail), credits, state text."""
    alive = sum(1 for w in stage.workers if w.alive)
    tail = stage.stage == status.n_stages - 1
    return {
        "step": stage.optimizer_steps,
        "tokens": stage.forward_done * tokens_per_item,
        "loss": status.last_loss if tail else None,
        "credits": sum(w.credits for w in stage.workers),
        "state": f"{alive}/{len(stage.workers)} workers, epoch {stage.epoch}, "
        f"queue fwd {stage.queue_forward} bwd {stage.queue_backward}",
    }


def watch(swarm: Swarm, stop: threading.Event, interactive: bool | None = None) -> RunStatus | None:
    """Show one progress line per stage until the run ends, every worker exits, or stop is set."""
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
            status = swarm.status() or status
            if status:
                for bar, stage in zip(bars, status.stages, strict=False):
                    bar.update(**stage_line(stage, status, train.batch_size * train.seq_len))
            stop.wait(1.0)
    finally:
        for bar in reversed(bars):
            bar.close()
    return status


def run_swarm(
    options: SwarmOptions, stop: threading.Event, interactive: bool | None = None
) -> dict[str, Any]:
    """Start, watch, stop; return the summary (tokens, tokens_per_s, wall_s, first/last loss, workers)."""
    import tempfile

    home = options.home or Path(tempfile.mkdtemp(prefix="iota-swarm-"))
    swarm = Swarm.create(options, home)
    codes: dict[int, int | None] = {}
    status: RunStatus | None = None
    try:
        swarm.start()
        status = watch(swarm, stop, interactive)
    finally:
        codes = swarm.stop_workers()
        status = swarm.status() or status
        swarm.stop_server()
    return swarm.summary(status, codes)
