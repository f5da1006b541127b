"""A simulated worker: drives a real orchestrator through the worker's own SwarmApi, without a backend.

It plays every protocol step `iota join` plays (register, assignment, heartbeat, claim, download, upload,
complete, merge: contribute an update, reduce the partitions it owns) with stand-in tensors of the right
names and shapes, so the API tests exercise the same request code as the real worker. Each reply is
parsed into its protocol model (a reply that does not fit fails the test) and handed back as the JSON
the server sent, since the tests assert on the wire.
`request()` is raw HTTP, for the tests that check how the server refuses what a correct client never
sends. The sim never waits for a server that is down: a test sees every failure as it happens.

    w = SimWorker(url, "head").register()
    w.assign(run_id, stage=0)
    w.do(w.claim())
"""

from __future__ import annotations

import base64
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

from iota_cli.core import flat, outer, wire
from iota_cli.core.protocol import (
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    Assignment,
    AssignmentRequest,
    BlobRef,
    ClaimRequest,
    Heartbeat,
    MergeComplete,
    MergePartDone,
    MergePlan,
    MergeRound,
    RegisterRequest,
    UploadRef,
    WorkComplete,
    WorkItem,
)
from iota_cli.core.stage import proof_size
from iota_cli.core.tensors import DTYPE_CODES, DTYPE_SIZES, RawTensor, decode, encode
from iota_cli.core.validation import WeightsReport
from iota_cli.train.api import SwarmApi
from iota_cli.train.client import Client

JSON = dict[str, Any]


class SimWorker:
    def __init__(self, url: str, name: str = "sim", memory_bytes: int = 0, throughput: float = 1.0) -> None:
        self.url = url.rstrip("/")
        self.name, self.memory_bytes, self.throughput = name, memory_bytes, throughput
        # No waiting (max_wait_s=0) and no quick retries: a 5xx or a dead server fails the call at once.
        self.api = SwarmApi(Client(self.url, max_wait_s=0.0, retries=0))
        self.contributor_id = ""
        self.assignment: Assignment | None = None
        self.step = 0  # what heartbeats report; tests set it to open merge rounds
        self.epoch = 0
        self.backward = 0

    @property
    def token(self) -> str:
        return self.api.client.token or ""

    @property
    def assigned(self) -> Assignment:
        assert self.assignment is not None, "call assign() first"
        return self.assignment

    @property
    def run_id(self) -> str:
        return self.assigned.run_id

    @property
    def stage(self) -> int:
        return self.assigned.stage

    # --- raw HTTP, for what the SwarmApi never sends -------------------------------------------------

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        """One raw request with this worker's token, answered as it came (tests of refusals)."""
        headers = {PROTOCOL_HEADER: str(PROTOCOL_VERSION), **kw.pop("headers", {})}
        if self.token:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        return requests.request(method, self.url + path, headers=headers, timeout=(5, 60), **kw)

    def call(self, method: str, path: str, json: Any = None) -> Any:
        """A JSON call through the worker's Client (ApiError on a refusal); the parsed JSON back."""
        return self.api.client.request(method, path, json=json).data

    # --- the protocol ----------------------------------------------------------------------------------

    def caps(self) -> JSON:
        return {"backend": "sim", "memory_bytes": self.memory_bytes, "throughput": self.throughput}

    def register(self) -> SimWorker:
        # Registering is rate-limited per address (429 with Retry-After): wait it out as `iota join`
        # does, so a module that registers many workers on one server stays correct, if slower.
        with Client(self.url, max_wait_s=60.0, retries=0) as patient:
            reply = SwarmApi(patient).register(RegisterRequest(name=self.name, **self.caps()))
        self.api.client.token, self.contributor_id = reply.token, reply.contributor_id
        return self

    def assign(self, run_id: str | None = None, stage: int | None = None) -> JSON:
        self.assignment = self.api.assignment(AssignmentRequest(run_id=run_id, stage=stage, **self.caps()))
        self.epoch = self.assignment.epoch
        return self.assignment.model_dump(mode="json")

    def heartbeat(self) -> JSON:
        beat = Heartbeat(
            run_id=self.run_id, stage=self.stage, step=self.step, epoch=self.epoch, tokens_per_s=1.0
        )
        return self.api.heartbeat(beat).model_dump(mode="json")

    def claim(self, wait_s: float = 0.0, claim_id: str | None = None, inline_max: int = 0) -> JSON | None:
        request = ClaimRequest(run_id=self.run_id, wait_s=wait_s, claim_id=claim_id, inline_max=inline_max)
        claim = self.api.claim(request)
        return claim.item.model_dump(mode="json") if claim.item else None

    def download(self, ref: JSON) -> bytes:
        """A blob's bytes, fetched and sha256-checked by the worker's own download code."""
        with tempfile.TemporaryDirectory() as tmp:
            return self.api.download(BlobRef.model_validate(ref), Path(tmp) / "blob").read_bytes()

    def upload(self, ref: JSON, data: bytes) -> str:
        return self.api.upload(UploadRef.model_validate(ref), data)

    def complete(
        self,
        item: JSON,
        sha: str | None,
        size: int,
        loss: float | None = None,
        epoch: int | None = None,
        data: bytes | None = None,  # the result inline (base64 in the body), not uploaded
    ) -> JSON:
        inline = base64.b64encode(data).decode() if data is not None else None
        result = WorkComplete(sha256=sha, size=size, loss=loss, epoch=epoch, data=inline)
        return self.api.complete(item["work_id"], result).model_dump(mode="json")

    # --- stand-in compute ------------------------------------------------------------------------------

    def boundary_tensor(self, name: str) -> bytes:
        m = self.assigned.manifest
        shape = (m.train.batch_size, m.train.seq_len, m.model.bottleneck_dim)
        dtype = DTYPE_CODES[m.model.boundary_dtype]
        return encode(
            {name: RawTensor(dtype, shape, bytes(shape[0] * shape[1] * shape[2] * DTYPE_SIZES[dtype]))}
        )

    def loss_for(self, item: WorkItem) -> float:
        return 5.0 / (1.0 + 0.01 * item.sample_id)  # falls as training goes on, like a real run

    def do(self, item_json: JSON) -> JSON:
        """Fetch the inputs, 'compute', upload the result and complete the item."""
        item = WorkItem.model_validate(item_json)
        for ref in (item.tokens, item.input):
            if ref is not None:
                decode(wire.unpack(self.download(ref.model_dump())))
        tail = item.kind == "forward" and item.stage == self.assigned.n_stages - 1
        if item.kind == "backward" or tail:
            self.backward += 1
            if self.backward % self.assigned.manifest.train.backward_per_step == 0:
                self.step += 1
        if item.upload is None:
            return self.complete(item_json, None, 0)
        if item.kind == "backward" and item.stage == 0:
            data = self.proof()
        else:
            data = self.boundary_tensor("activations" if item.kind == "forward" and not tail else "grad")
        sha = self.api.upload(item.upload, data)
        reply = self.complete(item_json, sha, len(data), self.loss_for(item) if tail else None)
        if reply.get("audit"):
            self.snapshot(item.work_id, reply["audit"])
        return reply

    def proof(self) -> bytes:
        """The head backward's proof of work (core.stage.proof_params), zeros of the right size."""
        n = proof_size(self.assigned.manifest.model, 0)
        return encode({"proof": RawTensor("F32", (n,), bytes(4 * n))})

    def snapshot(self, work_id: str, upload: JSON) -> JSON:
        """Answer a sampled check as an honest worker does: the weights it holds (here, the published
        ones), uploaded and reported."""
        data = encode(self.weights())
        sha = self.api.upload(UploadRef.model_validate(upload), data)
        return self.api.report_weights(work_id, WeightsReport(sha256=sha, size=len(data))).model_dump()

    def weights(self) -> dict[str, RawTensor]:
        """The stage's current weights (and take their epoch), as a heartbeat points to them."""
        beat = self.heartbeat()
        tensors, _ = decode(self.download(beat["weights"]))
        self.epoch = beat["epoch"]
        return tensors

    def contribute(self, merge: JSON, update: np.ndarray | bytes) -> JSON:
        """Upload an update (a flat vector in the run's wire dtype, or raw blob bytes) and report it."""
        offer = MergeRound.model_validate(merge)
        assert offer.upload is not None, "not a contribute offer"
        m = self.assigned.manifest.merge
        data = update if isinstance(update, bytes) else flat.update_blob(update, m.wire_dtype)
        sha = self.api.upload(offer.upload, data)
        contribution = MergeComplete(
            run_id=self.run_id,
            stage=offer.stage,
            epoch=offer.epoch,
            sha256=sha,
            size=len(data),
            step=self.step,
        )
        return self.api.contribute(contribution).model_dump(mode="json")

    def plan(self, epoch: int, wait_s: float = 0.0) -> MergePlan:
        q = f"run_id={self.run_id}&stage={self.stage}&epoch={epoch}&wait_s={wait_s}"
        return MergePlan.model_validate(self.call("GET", f"/v1/merge/plan?{q}"))

    def read_slice(self, url: str, offset: int, length: int) -> bytes:
        r = self.request("GET", url, headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        assert r.status_code == 206, r.status_code
        return r.content

    def reduce(self, epoch: int, base: np.ndarray, timeout: float = 20.0) -> int:
        """Reduce every partition this replica owns in the round of epoch (base: its epoch-E weights,
        flat), as an owner does; return how many it reported."""
        m = self.assigned.manifest.merge
        deadline, done = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            plan = self.plan(epoch, wait_s=2.0)
            todo = [p for p in plan.parts if p.upload is not None]
            if plan.state in ("closed", "gone") or (plan.state == "reducing" and not todo):
                return done
            for p in todo:
                ups = [
                    flat.from_wire(self.read_slice(s.url, s.offset, s.length), m.wire_dtype)
                    for s in p.sources
                ]
                mom = None
                if p.momentum is not None:
                    raw = self.read_slice(p.momentum.url, p.momentum.offset, p.momentum.length)
                    mom = flat.from_wire(raw, m.wire_dtype)
                part = base[p.start : p.stop]
                new, new_m = outer.reduce_partition(m, part, ups, p.weights, mom, epoch, p.scales)
                assert p.upload is not None
                data = flat.part_blob(new, new_m, m.wire_dtype)
                sha = self.api.upload(p.upload, data)
                body = MergePartDone(
                    run_id=self.run_id, stage=self.stage, epoch=epoch, part=p.part, sha256=sha, size=len(data)
                )
                self.call("POST", "/v1/merge/part", json=body.model_dump(mode="json"))
                done += 1
        raise AssertionError(f"round {epoch} still {plan.state} after {timeout}s")

    def merge(self, merge: JSON, update: np.ndarray) -> int:
        """A whole round as one replica plays it: contribute, then reduce what it owns."""
        base = flat.FlatLayout.of(self.assigned.manifest.model, self.stage).flatten(self.weights())
        self.contribute(merge, update)
        return self.reduce(merge["epoch"], base)
