"""The validator: takes sampled checks from an orchestrator, recomputes them, and posts the verdicts.

It is a client of the orchestrator's HTTP API with the operator's token (routes under /v1/audits), so it
runs beside the server, on another machine, or as several processes; `iota swarm` starts one. Its
arithmetic is recompute.py on any installed backend (torch-cpu by default: float32, the reference).

    iota orchestrator validate --url http://127.0.0.1:8700 --admin-token T --backend torch-cpu
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from iota_cli.core.backend import StageBackend, StageInputError, get_factory
from iota_cli.core.protocol import BlobRef
from iota_cli.core.tensors import TensorDict
from iota_cli.core.validation import AuditTask, AuditVerdict
from iota_cli.train import fetch
from iota_cli.train.api import SwarmApi
from iota_cli.train.errors import ClientError, IntegrityError, Stopped
from iota_cli.validate import recompute

log = logging.getLogger("iota.validator")
WAIT_S = 10.0


@dataclass
class Tally:
    """What this validator did, for its log and its exit line."""

    judged: int = 0
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    compute_s: float = 0.0  # recomputing only (not downloads)
    by_contributor: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        return (
            f"validator: {self.judged} checks judged ({self.passed} passed, {self.failed} failed, "
            f"{self.skipped} skipped); {self.compute_s:.1f} s recomputing, "
            f"{cpu.ru_utime + cpu.ru_stime:.1f} CPU-s in all"
        )


class Validator:
    def __init__(self, api: SwarmApi, backend: str, work_dir: Path, wait_s: float = WAIT_S) -> None:
        self.api, self.backend, self.work_dir, self.wait_s = api, backend, work_dir, wait_s
        self.factory = get_factory(backend)  # BackendError (the CLI's table reports it) if unusable
        self.tally = Tally()
        self._stages: dict[tuple[str, int], StageBackend] = {}

    def run(self, stop: threading.Event) -> Tally:
        """Judge checks until stop is set."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        while not stop.is_set():
            try:
                task = self.api.next_audit(self.wait_s)
                if task is not None:
                    self.api.judge(task.audit_id, self.check(task))
            except Stopped:
                break
            except ClientError as e:  # the orchestrator restarts, or a verdict came too late: go on
                log.warning("validator: %s", e)
                stop.wait(1.0)
        return self.tally

    def check(self, task: AuditTask) -> AuditVerdict:
        """Recompute one check; a check that cannot be judged (its blobs gone) is left to time out."""

        def read(ref: BlobRef) -> TensorDict:
            return fetch.tensors(self.api, ref, self.work_dir)

        t0 = time.perf_counter()
        try:
            if task.kind == "merge":
                stages = [self._stage(task, s) for s in range(task.manifest.model.n_stages)]
                verdict = recompute.judge_merge(task, stages, read)
            else:
                verdict = recompute.judge(task, self._stage(task, task.stage), read)
        except (recompute.Unjudgeable, IntegrityError, StageInputError) as e:
            # Blobs the orchestrator accepted and no longer serves intact: nobody's fault, no verdict.
            self.tally.skipped += 1
            raise ClientError(f"check {task.audit_id} cannot be judged: {e}") from None
        self.tally.compute_s += time.perf_counter() - t0
        self.tally.judged += 1
        if verdict.passed:
            self.tally.passed += 1
        else:
            self.tally.failed += 1
            what = "merge update" if task.kind == "merge" else "check"
            log.warning("%s %d of stage %d failed: %s", what, task.audit_id, task.stage, verdict.detail)
        return verdict

    def _stage(self, task: AuditTask, stage: int) -> StageBackend:
        key = (task.run_id, stage)
        if key not in self._stages:
            m = task.manifest
            self._stages[key] = self.factory.create(m.model, stage, m.optim, m.seed)
        return self._stages[key]
