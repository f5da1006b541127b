"""Protocol v1 as typed calls: one method per orchestrator operation, protocol models in and out.

The worker, `iota join`, `iota status`, the local swarm and the test double all speak to the orchestrator
through SwarmApi; `Client` underneath owns the HTTP (retries, waiting, verified downloads). Which calls
may wait for a server that is down, and how long a read may take, is decided here per operation: a
stopping worker must never hang on an orchestrator that stopped answering.

Try it against a running orchestrator:
    python -c "from iota_cli.train.api import *; print(SwarmApi.connect('http://127.0.0.1:8700').runs())"
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from pydantic import BaseModel, TypeAdapter, ValidationError

from iota_cli.core.manifest import RunManifest
from iota_cli.core.protocol import (
    PROTOCOL_VERSION,
    RUN_STATE_HEADER,
    WAIT_HEADER,
    Abandon,
    Assignment,
    AssignmentRequest,
    BlobRef,
    ClaimRequest,
    ContributorInfo,
    Credits,
    Encoding,
    Health,
    Heartbeat,
    HeartbeatReply,
    MergeComplete,
    MergeCompleteReply,
    MergePartDone,
    MergePartReply,
    MergePlan,
    MergeSlice,
    Ok,
    RegisterReply,
    RegisterRequest,
    RunCreate,
    RunCreated,
    RunInfo,
    RunState,
    RunStatus,
    UploadRef,
    WorkComplete,
    WorkCompleteReply,
    WorkItem,
)
from iota_cli.core.tensors import TensorDict, encode
from iota_cli.core.validation import AuditTask, AuditVerdict, WeightsReport
from iota_cli.train.client import Client, OnProgress, Reply
from iota_cli.train.errors import ApiError, Stopped

log = logging.getLogger("iota.api")
T = TypeVar("T")
Timeout = tuple[float, float]  # (connect, read) seconds

HEALTH_TIMEOUT: Timeout = (2.0, 5.0)
# A heartbeat is never waited for: the next one comes within heartbeat_s, and a heartbeat thread stuck
# in a backoff would hold up a stop.
HEARTBEAT_TIMEOUT: Timeout = (5.0, 15.0)
# Giving an item back and saying goodbye are best effort on the way out; the lease and the item's
# deadline expire anyway if the orchestrator does not hear them.
PARTING_TIMEOUT: Timeout = (3.0, 5.0)
CLAIM_SLACK_S = 15.0  # a claim's read timeout is its long-poll plus this


@dataclass(frozen=True)
class Claim:
    """What a claim brought: an item, or none for now (then the run's state and the server's hint)."""

    item: WorkItem | None
    run_state: RunState = "running"
    retry_after: float | None = None  # seconds the server suggests before asking again
    wait: str | None = None  # why there is none, for people (X-Iota-Wait; an older orchestrator sends none)


class SwarmApi:
    """Typed calls to one orchestrator over a Client; safe to share between the loop and heartbeat threads."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @classmethod
    def connect(cls, url: str, token: str | None = None, **client_options: Any) -> SwarmApi:
        """A SwarmApi over a new Client(url, token, **client_options)."""
        return cls(Client(url, token, **client_options))

    @property
    def stop(self) -> threading.Event:
        """The client's stop event: set, it ends every wait at once (Stopped)."""
        return self.client.stop

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> SwarmApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- meta and runs ---------------------------------------------------------------------------------

    def health(self, timeout: Timeout = HEALTH_TIMEOUT) -> Health:
        """One try, never waiting: `iota doctor` reports a server that is down, it does not wait for it."""
        return self._call(Health, "GET", "/v1/health", timeout=timeout, wait=False)

    # An operator's command passes wait=False: it reports a server that is down rather than wait for it.

    def runs(self, wait: bool = True) -> list[RunInfo]:
        return self._call(list[RunInfo], "GET", "/v1/runs", wait=wait)

    def run(self, run_id: str) -> RunInfo:
        return self._call(RunInfo, "GET", f"/v1/runs/{_segment(run_id)}")

    def run_status(self, run_id: str, timeout: Timeout | None = None, wait: bool = True) -> RunStatus:
        path = f"/v1/runs/{_segment(run_id)}/status"
        return self._call(RunStatus, "GET", path, timeout=timeout, wait=wait)

    def create_run(self, manifest: RunManifest, wait: bool = True) -> RunCreated:
        """Admin: create a run (the orchestrator indexes, or encodes, its data and writes epoch-0 weights)."""
        return self._call(RunCreated, "POST", "/v1/runs", RunCreate(manifest=manifest), wait=wait)

    def wait_ready(
        self,
        run_id: str,
        on_progress: Callable[[Encoding], None] | None = None,
        poll_s: float = 0.5,
        wait: bool = True,
    ) -> RunStatus:
        """Poll a run created `preparing` (its corpus is encoded in the background) until it runs; its
        status then. on_progress sees each step of the encoding; a run that failed is an ApiError (409)."""
        while True:
            status = self.run_status(run_id, wait=wait)
            if status.encoding is not None and on_progress is not None:
                on_progress(status.encoding)
            if status.state != "preparing":
                break
            if self.stop.wait(poll_s):
                raise Stopped("stopped while the run was being prepared")
        if status.state == "failed":
            why = status.encoding.error if status.encoding is not None else None
            raise ApiError(409, f"run {run_id} could not be prepared: {why or 'no reason given'}")
        return status

    def stop_run(self, run_id: str, wait: bool = True) -> RunInfo:
        """Admin: issue no new samples; the run finishes once the work in flight drains."""
        return self._call(RunInfo, "POST", f"/v1/runs/{_segment(run_id)}/stop", wait=wait)

    def abort_run(self, run_id: str, wait: bool = True) -> RunInfo:
        """Admin: finish the run now; work in flight is dropped and workers see it finished."""
        return self._call(RunInfo, "POST", f"/v1/runs/{_segment(run_id)}/abort", wait=wait)

    # --- contributors ----------------------------------------------------------------------------------

    def register(self, request: RegisterRequest) -> RegisterReply:
        """A new contributor; its token is in this reply only (the orchestrator keeps a hash)."""
        return self._call(RegisterReply, "POST", "/v1/contributors", request)

    def me(self, timeout: Timeout | None = None) -> ContributorInfo:
        return self._call(ContributorInfo, "GET", "/v1/contributors/me", timeout=timeout)

    def credits(self, contributor_id: str) -> Credits:
        return self._call(Credits, "GET", f"/v1/contributors/{_segment(contributor_id)}/credits")

    def leave(self) -> Ok:
        """Shutting down: the orchestrator re-issues our forward work now. One brief try."""
        return self._call(Ok, "POST", "/v1/contributors/me/leave", timeout=PARTING_TIMEOUT, wait=False)

    # --- the worker's loop -----------------------------------------------------------------------------

    def assignment(self, request: AssignmentRequest) -> Assignment:
        """The stage to train (sticky across reconnects), its manifest and current weights."""
        return self._call(Assignment, "POST", "/v1/assignment", request)

    def heartbeat(self, beat: Heartbeat) -> HeartbeatReply:
        """Renew the lease; learn the stage's epoch, merge rounds, moves and dropped samples. Never waits."""
        return self._call(
            HeartbeatReply, "POST", "/v1/heartbeat", beat, timeout=HEARTBEAT_TIMEOUT, wait=False
        )

    def claim(self, request: ClaimRequest) -> Claim:
        """The next work item, long-polling up to request.wait_s; Claim(None, ...) when there is none."""
        # A read timeout just past the long-poll bounds how long a hung orchestrator can delay a stop.
        timeout = (5.0, request.wait_s + CLAIM_SLACK_S)
        reply = self._send("POST", "/v1/work/claim", request, timeout=timeout)
        if reply.status == 204:
            state: RunState = "finished" if reply.headers.get(RUN_STATE_HEADER) == "finished" else "running"
            return Claim(None, state, reply.retry_after, reply.headers.get(WAIT_HEADER))
        return Claim(_parse(WorkItem, reply))

    def complete(self, work_id: str, result: WorkComplete) -> WorkCompleteReply:
        """Report an item whose result is uploaded; it is credited once however often this is repeated."""
        path = f"/v1/work/{_segment(work_id)}/complete"
        return self._call(WorkCompleteReply, "POST", path, result)

    def abandon(self, work_id: str, why: Abandon | None = None) -> Ok:
        """Give an item back, saying why (forward work is re-queued, backward work dropped). One brief try."""
        path = f"/v1/work/{_segment(work_id)}/abandon"
        return self._call(Ok, "POST", path, why or Abandon(), timeout=PARTING_TIMEOUT, wait=False)

    def report_weights(self, work_id: str, report: WeightsReport) -> Ok:
        """Report the weights snapshot a sampled item asked for (WorkCompleteReply.audit), uploaded."""
        return self._call(Ok, "POST", f"/v1/work/{_segment(work_id)}/weights", report)

    def send_weights(self, work_id: str, upload: UploadRef, weights: TensorDict) -> None:
        """A sampled item's check: upload the weights it ran on, then report them (no snapshot, no credit)."""
        data = encode(weights)
        self.report_weights(work_id, WeightsReport(sha256=self.upload(upload, data), size=len(data)))
        log.debug("sent the weights of %s for a check (%d bytes)", work_id, len(data))

    # --- validation (the operator's token) -------------------------------------------------------------

    def next_audit(self, wait_s: float = 0.0) -> AuditTask | None:
        """The oldest sampled check ready to judge, long-polling up to wait_s; None when there is none."""
        timeout = (5.0, wait_s + CLAIM_SLACK_S)
        reply = self._send("GET", f"/v1/audits/next?wait_s={wait_s:g}", timeout=timeout)
        return None if reply.status == 204 else _parse(AuditTask, reply)

    def judge(self, audit_id: int, verdict: AuditVerdict) -> Ok:
        return self._call(Ok, "POST", f"/v1/audits/{int(audit_id)}", verdict)

    # --- merging ---------------------------------------------------------------------------------------

    def contribute(self, contribution: MergeComplete) -> MergeCompleteReply:
        """Report the weights uploaded for a merge round (409 when the round's epoch has moved on)."""
        return self._call(MergeCompleteReply, "POST", "/v1/merge/complete", contribution)

    def merge_plan(self, run_id: str, stage: int, epoch: int, wait_s: float = 0.0) -> MergePlan:
        """The merge round of (stage, epoch) as this replica should see it, long-polling up to wait_s
        for it to move on (parts to reduce, results published)."""
        query = urlencode({"run_id": run_id, "stage": stage, "epoch": epoch, "wait_s": f"{wait_s:g}"})
        timeout = (5.0, wait_s + CLAIM_SLACK_S)
        return self._call(MergePlan, "GET", f"/v1/merge/plan?{query}", timeout=timeout)

    def merge_part(self, done: MergePartDone) -> MergePartReply:
        """Report an owner's result for one partition, uploaded to its MergePart.upload."""
        return self._call(MergePartReply, "POST", "/v1/merge/part", done)

    # --- blobs -----------------------------------------------------------------------------------------

    def upload(self, ref: UploadRef, data: bytes) -> str:
        """PUT bytes where the orchestrator said, with their sha256 (checked there); return the digest."""
        return self.client.upload(ref.url, data)

    def download(self, ref: BlobRef, dest: Path, on_progress: OnProgress | None = None) -> Path:
        """Fetch a blob into dest, resuming and verifying its sha256 and size; a verified dest is a hit."""
        return self.client.download(ref.url, dest, ref.sha256, ref.size, on_progress=on_progress)

    def read_slice(self, piece: MergeSlice) -> bytes:
        """A merge slice's bytes (one HTTP Range), verified against its sha256 (IntegrityError if not)."""
        return self.client.read_range(piece.url, piece.offset, piece.length, piece.sha256)

    # --- plumbing --------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: BaseModel | None = None, **kw: Any) -> Reply:
        if method == "GET":
            return self.client.request(method, path, **kw)
        payload = body.model_dump(mode="json") if body is not None else {}
        return self.client.request(method, path, json=payload, **kw)

    def _call(self, kind: type[T], method: str, path: str, body: BaseModel | None = None, **kw: Any) -> T:
        return _parse(kind, self._send(method, path, body, **kw))


def _parse(kind: type[T], reply: Reply) -> T:
    """The reply as its protocol model; an answer that does not fit is the server's error, not ours."""
    try:
        return TypeAdapter(kind).validate_python(reply.data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "the body"
        raise ApiError(
            reply.status, f"the answer does not fit protocol v{PROTOCOL_VERSION} ({where}: {first['msg']})"
        ) from None


def _segment(value: str) -> str:
    """An id as one path segment: ids come from the server, but a '/' or '..' must not change the route."""
    return quote(value, safe="")
