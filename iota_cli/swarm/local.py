"""A whole swarm on one machine: a local orchestrator, a tiny run, and N `iota join` worker processes.

`iota swarm` runs this (through launcher.py); the end-to-end tests and benchmarks use it as their harness.
The workers are the same `iota join` a remote contributor runs, started as subprocesses on loopback with
their own IOTA_HOME, each in a session of its own, as are the orchestrator and the validator: a terminal's
Ctrl-C reaches the launcher alone, which stops the workers first and the orchestrator last.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from iota_cli.core.manifest import RunManifest, tiny_manifest
from iota_cli.core.protocol import Encoding, RegisterRequest, RunStatus
from iota_cli.output import EXIT_USAGE
from iota_cli.swarm.checks import PASSED_ON, SwarmError, data_problem, log_reason, reason
from iota_cli.swarm.corpus import default_data
from iota_cli.swarm.orchestrator import OrchestratorProcess, ValidatorProcess
from iota_cli.train.api import SwarmApi

log = logging.getLogger("iota.swarm")


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
    # Also pass --max-steps to every worker, so each replica stops at max_steps rather than wherever the
    # run's end finds it (without: 25-54 steps at 40); a stage whose replicas all stopped leaves the others
    # nothing to do, so whoever watches must call end_if_stalled(), as launcher.watch() does.
    cap_steps: bool = False
    # More `iota orchestrator serve` arguments and environment, e.g. ("--blob-store", "s3://bucket") and
    # the store's credentials (given to the orchestrator alone, never to the workers).
    server_args: tuple[str, ...] = ()
    server_env: Mapping[str, str] = field(default_factory=dict)


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
    max_steps: int | None = None  # `iota join --max-steps`: stop after this many local optimizer steps

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
            *(("--max-steps", str(self.max_steps)) if self.max_steps else ()),
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

    def exit_code(self) -> int | None:
        """Its exit status once it has exited, else None."""
        return None if self.proc is None else self.proc.poll()


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
    ended: bool = False  # end_if_stalled() finished the run

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
            self.home / "orchestrator",
            port=port,
            admin_token=self.admin_token,
            extra_env=dict(self.options.server_env),
            extra_args=self.options.server_args,
        )
        try:
            self.orchestrator.start()
        except RuntimeError:
            message, hint = reason(self.orchestrator.lines)
            raise SwarmError(f"the local orchestrator did not start: {message}", hint=hint) from None
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
            self.run_id = self.create_run(admin)
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
                        max_steps=self.options.max_steps if self.options.cap_steps else None,
                    )
                )

    def create_run(self, admin: SwarmApi) -> str:
        """Create the run; a data source the orchestrator finds no sample in is the fault of --data."""
        from iota_cli.train.errors import ApiError

        try:
            reply = admin.create_run(self.manifest)
            if reply.state == "preparing":  # a tokenizer.json: the corpus is encoded in the background
                shown = [float("-inf")]

                def show(e: Encoding) -> None:
                    if time.monotonic() - shown[0] >= 5.0 or e.phase in ("ready", "failed"):
                        shown[0] = time.monotonic()
                        log.info("run %s: %s", reply.run_id, e.line())

                admin.wait_ready(reply.run_id, on_progress=show)
            return reply.run_id
        except ApiError as e:
            source = self.manifest.data.source
            if e.status != 422 or "data.source" not in e.detail or not self.options.data:
                raise
            why = data_problem(Path(source), self.manifest) or f"--data {source}: {e.detail}"
            raise SwarmError(why, code=EXIT_USAGE, hint="point --data at a directory of text files") from None

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
                return  # it failed to start: the watcher reports it, and the rest need not start
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

    def failed(self) -> SwarmError | None:
        """The first worker that exited with an error, as what `iota swarm` reports (its log's reason)."""
        for w in self.workers:
            code = w.exit_code()
            if code:
                log = w.home / "worker.log"
                message, hint = log_reason(log)
                if self.options.home is not None:  # a temp home is removed once the swarm has failed
                    hint = f"{hint}; its log: {log}" if hint else f"its log: {log}"
                return SwarmError(
                    f"worker {w.index} ({w.backend}, stage {w.stage}) exited with code {code}: {message}",
                    code=code if code in PASSED_ON else 1,
                    hint=hint,
                )
        return None

    def end_if_stalled(self, status: RunStatus | None) -> None:
        """Finish the run once every replica of some stage has exited (capped at --max-steps): the other
        stages would wait for its work forever. The rest see the run finished, give back and leave."""
        if self.ended or status is None or not self.any_running():
            return
        stage_of = {ws.contributor_id: s.stage for s in status.stages for ws in s.workers}
        running = {stage_of.get(w.contributor_id, w.stage) for w in self.workers if w.running()}
        if len(running) == self.manifest.model.n_stages:
            return
        self.ended = True
        try:
            with SwarmApi.connect(self.url, self.admin_token, retries=0, max_wait_s=5.0) as admin:
                admin.abort_run(self.run_id, wait=False)
        except Exception:  # noqa: BLE001 - then stop them: the same clean leave, the run left unfinished
            for w in self.workers:
                w.signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL every process of the swarm at once (a second Ctrl-C): checkpoints on disk stay intact."""
        procs = [w.proc for w in self.workers] + [c.proc for c in (self.validator, self.orchestrator) if c]
        alive = [p for p in procs if p is not None and p.poll() is None]
        for p in alive:
            p.kill()
        for p in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(2.0)

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

    def own_steps(self, w: WorkerProcess) -> int:
        """A worker's own step count, from its newest checkpoint of this run: the orchestrator's count
        comes with heartbeats, so it misses the steps after a worker's last one."""
        from iota_cli.train.status import local_checkpoints

        steps = [c["step"] for c in local_checkpoints(w.home / "data") if c["run_id"] == self.run_id]
        return max(steps, default=0)

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
                        "steps": max(ws.steps, self.own_steps(w)) if w else ws.steps,
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
