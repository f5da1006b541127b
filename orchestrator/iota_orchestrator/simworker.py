"""A simulated worker: speaks protocol v1 over HTTP with stand-in tensors of the right names and shapes.

It does no training; the tests and bench/orchestrator_load.py use it to drive a real orchestrator the way
`iota join` does (register, assignment, claim, upload, complete, heartbeat, merge) without a backend.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests

from iota_cli.core.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION, SHA256_HEADER
from iota_cli.core.tensors import DTYPE_CODES, DTYPE_SIZES, RawTensor, decode, encode

TIMEOUT = (5, 60)
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "stage",
    "merge",
    "swarm",
    "token",
    "loss",
    "head",
    "tail",
    "body",
    "epoch",
    "credit",
]


def write_corpus(root: Path, files: int = 4, words: int = 6000, seed: int = 0) -> Path:
    """Deterministic text files to train on (the orchestrator shards any directory of text)."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(words)) + "\n")
    return root


class ProtocolError(RuntimeError):
    pass


class SimWorker:
    def __init__(
        self,
        url: str,
        name: str = "sim",
        memory_bytes: int = 0,
        throughput: float = 1.0,
        session: requests.Session | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.name, self.memory_bytes, self.throughput = name, memory_bytes, throughput
        self.http = session or requests.Session()
        self.http.headers[PROTOCOL_HEADER] = str(PROTOCOL_VERSION)
        self.token = ""
        self.contributor_id = ""
        self.assignment: dict[str, Any] = {}
        self.step = 0
        self.epoch = 0
        self.backward = 0
        self.timings: dict[str, list[float]] = {}

    # --- plumbing --------------------------------------------------------------------------------------

    def request(self, method: str, path: str, timed: str = "", **kw: Any) -> requests.Response:
        headers = kw.pop("headers", {})
        if self.token:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        t0 = time.perf_counter()
        r = self.http.request(
            method, urljoin(self.url + "/", path.lstrip("/")), headers=headers, timeout=TIMEOUT, **kw
        )
        if timed:
            self.timings.setdefault(timed, []).append(time.perf_counter() - t0)
        return r

    def call(self, method: str, path: str, timed: str = "", **kw: Any) -> Any:
        r = self.request(method, path, timed, **kw)
        if r.status_code >= 400:
            raise ProtocolError(f"{method} {path} -> {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    # --- protocol --------------------------------------------------------------------------------------

    def caps(self) -> dict[str, Any]:
        return {"backend": "sim", "memory_bytes": self.memory_bytes, "throughput": self.throughput}

    def register(self) -> SimWorker:
        out = self.call("POST", "/v1/contributors", json={"name": self.name, **self.caps()})
        self.token, self.contributor_id = out["token"], out["contributor_id"]
        return self

    def assign(self, run_id: str | None = None) -> dict[str, Any]:
        self.assignment = self.call(
            "POST", "/v1/assignment", "assignment", json={"run_id": run_id, **self.caps()}
        )
        self.epoch = self.assignment["epoch"]
        return self.assignment

    @property
    def run_id(self) -> str:
        return self.assignment["run_id"]

    @property
    def stage(self) -> int:
        return self.assignment["stage"]

    def heartbeat(self) -> dict[str, Any]:
        body = {
            "run_id": self.run_id,
            "stage": self.stage,
            "step": self.step,
            "epoch": self.epoch,
            "tokens_per_s": 1.0,
        }
        return self.call("POST", "/v1/heartbeat", "heartbeat", json=body)

    def claim(self, wait_s: float = 0.0, claim_id: str | None = None) -> dict[str, Any] | None:
        body = {"run_id": self.run_id, "wait_s": wait_s, "claim_id": claim_id}
        r = self.request("POST", "/v1/work/claim", "claim", json=body)
        if r.status_code == 204:
            return None
        if r.status_code >= 400:
            raise ProtocolError(f"claim -> {r.status_code} {r.text[:300]}")
        return r.json()

    def download(self, ref: dict[str, Any]) -> bytes:
        r = self.request("GET", ref["url"], "blob_get")
        if r.status_code != 200:
            raise ProtocolError(f"download -> {r.status_code} {r.text[:200]}")
        if hashlib.sha256(r.content).hexdigest() != ref["sha256"]:
            raise ProtocolError("downloaded bytes do not match their sha256")
        return r.content

    def upload(self, ref: dict[str, Any], data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        r = self.request("PUT", ref["url"], "blob_put", data=data, headers={SHA256_HEADER: sha})
        if r.status_code not in (200, 201):
            raise ProtocolError(f"upload -> {r.status_code} {r.text[:200]}")
        return sha

    def complete(self, item: dict[str, Any], sha: str | None, size: int, loss: float | None = None) -> dict:
        body = {"sha256": sha, "size": size, "loss": loss}
        return self.call("POST", f"/v1/work/{item['work_id']}/complete", "complete", json=body)

    # --- stand-in compute ------------------------------------------------------------------------------

    def boundary_tensor(self, name: str) -> bytes:
        m = self.assignment["manifest"]
        t, cfg = m["train"], m["model"]
        shape = (t["batch_size"], t["seq_len"], cfg["bottleneck_dim"])
        dtype = DTYPE_CODES[cfg["wire_dtype"]]
        n = shape[0] * shape[1] * shape[2] * DTYPE_SIZES[dtype]
        return encode({name: RawTensor(dtype, shape, bytes(n))})

    def loss_for(self, item: dict[str, Any]) -> float:
        return 5.0 / (1.0 + 0.01 * item["sample_id"])  # falls as training goes on, like a real run

    def do(self, item: dict[str, Any]) -> dict[str, Any]:
        """Fetch inputs, 'compute', upload the result and complete the item."""
        for ref in (item.get("tokens"), item.get("input")):
            if ref:
                data = self.download(ref)
                decode(data)
        last = self.assignment["n_stages"] - 1
        tail = item["kind"] == "forward" and item["stage"] == last
        loss = self.loss_for(item) if tail else None
        if item["kind"] == "backward" or tail:
            self.backward += 1
            if self.backward % self.assignment["manifest"]["train"]["backward_per_step"] == 0:
                self.step += 1
        if item["upload"] is None:
            return self.complete(item, None, 0)
        name = "activations" if item["kind"] == "forward" and not tail else "grad"
        data = self.boundary_tensor(name)
        sha = self.upload(item["upload"], data)
        return self.complete(item, sha, len(data), loss)

    def weights(self) -> dict[str, RawTensor]:
        hb = self.heartbeat()
        tensors, _ = decode(self.download(hb["weights"]))
        self.epoch = hb["epoch"]
        return tensors

    def contribute(
        self, merge: dict[str, Any], tensors: dict[str, RawTensor], weight: float
    ) -> dict[str, Any]:
        data = encode(tensors)
        sha = self.upload(merge["upload"], data)
        body = {
            "run_id": self.run_id,
            "stage": merge["stage"],
            "epoch": merge["epoch"],
            "sha256": sha,
            "size": len(data),
            "weight": weight,
        }
        return self.call("POST", "/v1/merge/complete", "merge", json=body)
