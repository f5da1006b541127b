"""Wire models of protocol version 1, shared by the worker client and the orchestrator.

docs/protocol.md is the prose; these pydantic models are the letter. Importing this module pulls in
pydantic only (never fastapi), so the contributor side can validate replies with the same types.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from iota_cli.core.manifest import RunManifest

PROTOCOL_VERSION = 1
PROTOCOL_HEADER = "X-Iota-Protocol"
SHA256_HEADER = "X-Iota-Sha256"  # on blob uploads (checked) and downloads (what the bytes hash to)
# Every blob upload's Content-Type; an object store's presigned PUT URL signs it (s3blobs.py).
BLOB_CONTENT_TYPE = "application/octet-stream"
RUN_STATE_HEADER = "X-Iota-Run-State"  # on 204 "no work now": running | finished
# On 204 "no work now", optional: why, in a few words for people ("stage 1 has no worker"). Clients
# show it and never parse it; an older orchestrator does not send it.
WAIT_HEADER = "X-Iota-Wait"
# The line `iota orchestrator serve` prints once it accepts requests; whoever starts one waits for it.
LISTENING = "iota orchestrator listening on"

# Bounds keep every number inside SQLite's int64 and every string small.
MAX_INT = 2**62
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
Stage = Annotated[int, Field(ge=0, le=1024)]
Real = Annotated[float, Field(ge=0, le=1e18, allow_inf_nan=False)]
Id = Annotated[str, Field(min_length=1, max_length=64)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Label = Annotated[str, Field(max_length=64)]
RunState = Literal["running", "finished"]  # what a worker is told: it only ever holds a prepared run
# Every state a run can be in (RunInfo, RunStatus): a run with a tokenizer.json is `preparing` while its
# corpus is encoded in the background, and `failed` when that could not be done (RunStatus.encoding).
RunLifecycle = Literal["preparing", "running", "finished", "failed"]
WorkKind = Literal["forward", "backward"]


class Model(BaseModel):
    # Unknown fields are ignored, so an old client survives a newer server (and the other way round).
    model_config = ConfigDict(extra="ignore")


class Problem(Model):
    detail: str


class Health(Model):
    status: str = "ok"
    protocol: int = PROTOCOL_VERSION
    version: str = ""


# The most bytes a blob may carry inline in a claim's reply or a complete's body (base64 in JSON, under
# the orchestrator's 1 MiB JSON limit): a stage's activations or a token batch, never weights.
INLINE_MAX = 256 << 10
_INLINE_CHARS = 4 * (INLINE_MAX // 3 + 1)  # base64 of INLINE_MAX bytes


class BlobRef(Model):
    """Bytes to download: resolve url against the orchestrator URL (it may be relative), verify sha256;
    `data`, the bytes themselves (base64) when the claim asked for inputs inline, is verified the same."""

    url: str
    sha256: str
    size: int
    data: Annotated[str, Field(max_length=_INLINE_CHARS)] | None = None


class UploadRef(Model):
    """Where to PUT bytes (with the X-Iota-Sha256 header); at most max_size bytes are accepted. A result
    of at most inline_max bytes may come in the complete instead (WorkComplete.data); 0: always PUT."""

    url: str
    max_size: int
    inline_max: int = 0


# --- runs -----------------------------------------------------------------------------------------------


class RunCreate(Model):
    manifest: RunManifest


class RunCreated(Model):
    run_id: str
    state: RunLifecycle = "running"  # preparing: wait for the run's status to leave it (its encoding)


class RunInfo(Model):
    run_id: str
    name: str
    manifest: RunManifest
    state: RunLifecycle
    created: float


class Encoding(Model):
    """How far the background encoding of a run's corpus is (a run with a tokenizer.json)."""

    phase: Literal["queued", "encoding", "weights", "ready", "failed"]  # weights: writing epoch 0's
    files_done: int
    files_total: int
    bytes_done: int  # of the corpus's text read and encoded
    bytes_total: int
    started: float | None = None  # when the encoder took it up (queued: another run is encoded first)
    finished: float | None = None
    error: str | None = None  # failed: why

    def line(self) -> str:
        """One line for people: 'encoding the corpus: 12.0 of 40.0 MB (3 of 10 files)'."""
        if self.phase == "failed":
            return f"preparing the run failed: {self.error}"
        mb = f"{self.bytes_done / 1e6:.1f} of {self.bytes_total / 1e6:.1f} MB"
        files = f"{self.files_done} of {self.files_total} file{'s' * (self.files_total != 1)}"
        what = {
            "queued": "waiting for another run's encoding to end",
            "encoding": f"encoding the corpus: {mb} ({files})",
            "weights": "writing the epoch-0 weights",
            "ready": f"corpus encoded ({mb}, {files})",
        }
        return what[self.phase]


class WorkerStatus(Model):
    contributor_id: str
    name: str
    backend: str
    alive: bool
    steps: int
    epoch: int
    tokens_per_s: float
    throughput: float
    credits: float
    faults: dict[str, int] = {}  # what the orchestrator counted against it: rejected, bad_output, expired
    standing: int = 0  # checks passed x pass_reward - failed x fail_penalty (docs/trust.md)
    checks: dict[str, int] = {}  # passed, failed
    banned: bool = False


class StageStatus(Model):
    stage: int
    kind: str
    workers: list[WorkerStatus]
    queue_forward: int
    queue_backward: int
    epoch: int
    optimizer_steps: int  # sum over the stage's replicas, as they report in heartbeats
    forward_done: int
    backward_done: int
    weights_ok: bool = True  # false: the current weights were damaged on disk and could not be rebuilt


class CreditLine(Model):
    contributor_id: str
    name: str
    total: float


class RunStatus(Model):
    run_id: str
    name: str
    state: RunLifecycle
    created: float
    n_stages: int
    max_samples: int
    samples_issued: int
    samples_completed: int  # chains whose head backward finished
    samples_dropped: int
    tokens_processed: int  # tokens through the tail (batch_size * seq_len per sample)
    losses_reported: int
    first_loss: float | None  # mean of the first few tail losses (of vetted tails only: docs/trust.md)
    last_loss: float | None  # mean of the last few
    recent_losses: list[float]
    loss_vetted: bool = False  # the losses are from tails a validator checked (else: from every tail)
    stages: list[StageStatus]
    credits: list[CreditLine]
    # Sampled checks by state: weights, backward, ready, taken, passed, failed, void (docs/trust.md).
    checks: dict[str, int] = {}
    encoding: Encoding | None = None  # a run with a tokenizer.json: its corpus's background encoding


# --- contributors and assignment -----------------------------------------------------------------------


class Capabilities(Model):
    backend: Label = ""
    memory_bytes: Count = 0  # 0: unknown, every stage is taken to fit
    # The device's own measure of its speed (e.g. GFLOP/s), kept for display only: placement uses the
    # throughput the orchestrator measures from the worker's completed work.
    throughput: Real = 0.0


class RegisterRequest(Capabilities):
    name: Label = ""
    invite: Annotated[str, Field(max_length=256)] = ""  # the operator's invite, where one is required


class RegisterReply(Model):
    contributor_id: str
    token: str


class AssignmentRequest(Capabilities):
    run_id: Id | None = None  # None: the newest running run
    stage: Stage | None = (
        None  # ask for this stage (an operator pinning a device); None: let the orchestrator pick
    )


class Assignment(Model):
    run_id: str
    stage: int
    n_stages: int
    manifest: RunManifest
    epoch: int
    weights: BlobRef
    lease_s: float
    heartbeat_s: float


class ContributorInfo(Model):
    contributor_id: str
    name: str
    assignment: Assignment | None
    credits: float
    standing: int | None = None  # in the run of the assignment (docs/trust.md)
    checks: dict[str, int] = {}  # passed, failed


class Credits(Model):
    contributor_id: str
    total: float
    forward: float
    backward: float
    clawed_back: float = 0.0  # taken back by failed checks, with their penalties
    entries: int


# --- heartbeat and merging -----------------------------------------------------------------------------


class Heartbeat(Model):
    run_id: Id
    stage: Stage
    step: Count = 0  # local optimizer steps taken so far
    epoch: Count = 0  # the weights epoch the worker holds
    tokens_per_s: Real = 0.0


class MergeRound(Model):
    """A merge round this replica has a part in (see MergePlan for the whole of it)."""

    stage: int
    epoch: int
    phase: Literal["contribute", "reduce"]
    upload: UploadRef | None = None  # contribute: where this replica's update blob goes
    deadline_s: float


class HeartbeatReply(Model):
    lease_s: float
    epoch: int
    weights: BlobRef
    run_state: RunState
    merge: MergeRound | None = None
    reassign: bool = False  # ask POST /v1/assignment again: the orchestrator moves this worker
    drop: list[int] = []  # sample ids whose chain was dropped: free anything saved for them


class MergeComplete(Model):
    """A replica's update (pseudo-gradient) for the round, uploaded to MergeRound.upload."""

    run_id: Id
    stage: Stage
    epoch: Count
    sha256: Sha256
    size: Count
    step: Count = 0  # the replica's local optimizer step when it took the update (paces the next round)


class MergeCompleteReply(Model):
    accepted: bool
    epoch: int  # the stage's current weights epoch


class MergeSlice(Model):
    """Bytes [offset, offset + length) of the blob at url (an HTTP Range), hashing to sha256."""

    url: str
    offset: int
    length: int
    sha256: str


class MergePart(Model):
    """One partition [start, stop) of a stage's flat parameter vector, in a round."""

    part: int
    start: int
    stop: int
    owned: bool = False  # the caller is one of its two owners
    # Reducing, for an owner: every contribution's slice (contributors in a fixed order, the same for
    # every owner), the work the orchestrator counted for each, and where the epoch-E momentum is.
    sources: list[MergeSlice] = []
    weights: list[float] = []
    scales: list[float] = []  # the norm clip of each source (core.outer.clip_scales); empty: all 1
    mine: int | None = None  # which of sources is the caller's own upload (it may use its local copy)
    momentum: MergeSlice | None = None  # None: zeros (first round) or a strategy without momentum
    upload: UploadRef | None = None  # where the owner puts its part blob
    # Closed: where this partition's merged weights lie inside the published weights blob.
    result: MergeSlice | None = None


class MergePlan(Model):
    """GET /v1/merge/plan: the round of (stage, epoch) as the caller should see it."""

    stage: int
    epoch: int
    state: Literal["open", "reducing", "closed", "gone"]  # gone: no such round (superseded or forgotten)
    size: int  # elements in the stage's flat parameter vector
    round_index: int  # what the outer momentum warm-up counts (the epoch being merged)
    parts: list[MergePart] = []
    weights: BlobRef | None = None  # closed: the published weights of epoch + 1


class MergePartDone(Model):
    """An owner's result for one partition, uploaded to MergePart.upload."""

    run_id: Id
    stage: Stage
    epoch: Count
    part: Count
    sha256: Sha256
    size: Count


class MergePartReply(Model):
    accepted: bool  # this result is (or equals) the partition's result
    state: Literal["open", "reducing", "closed", "gone"]


# --- work ----------------------------------------------------------------------------------------------


class ClaimRequest(Model):
    run_id: Id
    wait_s: float = Field(0.0, ge=0, le=30)  # long-poll: wait up to this long for work before 204
    claim_id: Id | None = None  # idempotency key: a retry with the same id gets the same item back
    # Inputs of at most this many bytes come inline in the reply (BlobRef.data), when the store allows.
    inline_max: int = Field(0, ge=0, le=INLINE_MAX)


class WorkItem(Model):
    work_id: str
    kind: WorkKind
    stage: int
    sample_id: int
    tokens: BlobRef | None = None
    input: BlobRef | None = None
    upload: UploadRef | None = None
    deadline_s: float
    forward_id: str | None = None  # backward only: the work_id of this sample's forward on this stage


class WorkComplete(Model):
    sha256: Sha256 | None = None
    size: Count = 0
    loss: float | None = Field(None, allow_inf_nan=False, ge=-1e9, le=1e9)
    # The weights epoch the item ran on: a result sent behind the loop may arrive after a merge landed
    # (its heartbeat already says epoch + 1), and a check must start from the epoch the item used.
    epoch: Count | None = None
    # The result's bytes (base64) when its upload allows them inline; sha256 and size describe them.
    data: Annotated[str, Field(max_length=_INLINE_CHARS)] | None = None


# Why a worker gives an item back: the orchestrator counts bad_input and unverified against the item
# (and the contributor that produced its input); stopping and lost_state are nobody's fault.
AbandonReason = Literal["stopping", "bad_input", "unverified", "lost_state"]


class Abandon(Model):
    reason: AbandonReason = "stopping"
    detail: Annotated[str, Field(max_length=500)] = ""


class WorkCompleteReply(Model):
    credits: float
    total_credits: float
    # The item is sampled for recomputation: PUT the stage's weights as this item used them here, then
    # POST /v1/work/{id}/weights (core.validation.WeightsReport). No upload, no credit.
    audit: UploadRef | None = None


class Ok(Model):
    ok: bool = True
