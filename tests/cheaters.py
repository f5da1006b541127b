"""Misbehaving contributors for the adversarial end-to-end tests: one bad habit each, at one stage.

A cheater registers as its own contributor, pins itself to a stage with AssignmentRequest(stage=...),
keeps its lease with heartbeats like an honest worker, and plays its trick in threads of the test
process. It talks through the typed SwarmApi; raw HTTP only where the facade refuses to send the bad
thing (a NaN literal in JSON). It never waits for a server that is down, and it writes down every
answer it gets, so a test can say what the server did (`replies`, `events`).

    c = Poisoner(url, run_id, stage=1, payloads=malformed_headers).join()
    c.start(); ...; c.close()
    print(c.replies, c.accepted)

Try one against a running swarm (the URL and run id as `iota orchestrator status` shows them):
    cd tests && python -c "import cheaters as c; c.Hoarder(URL, RUN_ID, stage=1).join().start(); input()"
"""

from __future__ import annotations

import json
import math
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import requests

from iota_cli.core.manifest import RunManifest
from iota_cli.core.protocol import (
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    Abandon,
    Assignment,
    AssignmentRequest,
    ClaimRequest,
    Heartbeat,
    RegisterRequest,
    WorkComplete,
    WorkItem,
)
from iota_cli.core.tensors import RawTensor, encode
from iota_cli.train.api import SwarmApi
from iota_cli.train.client import Client
from iota_cli.train.errors import ApiError, ClientError

Shape = tuple[int, ...]


# --- bad bytes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """One bad result: a label for the report and the bytes uploaded (their sha256 is always right)."""

    label: str
    data: bytes


PayloadMaker = Callable[[str, Shape, int], Payload]  # (tensor name, shape, n-th item) -> payload


def container(header: dict[str, object] | str, data: bytes) -> bytes:
    """A safetensors container around any header (a dict, or JSON text written by hand)."""
    raw = (header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _entry(shape: Shape, start: int = 0) -> dict[str, object]:
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [start, start + math.prod(shape) * 4]}


# Deep enough to exhaust a recursive JSON parser (CPython's stops near 1,000), small enough that the
# header still fits the upload's size limit (the activations plus 4 KiB of header slack).
NESTING = 1800


def _malformed(name: str, shape: Shape) -> list[tuple[str, dict[str, object] | str, bytes]]:
    size = math.prod(shape) * 4
    zeros = bytes(size)
    valid = json.dumps({name: _entry(shape)}, separators=(",", ":"))[1:-1]
    dims = "".join(f",{d}" for d in shape[1:])
    return [
        ("float data_offsets", {name: {**_entry(shape), "data_offsets": [0.0, float(size)]}}, zeros),
        ("non-object __metadata__", {"__metadata__": ["not", "a", "map"], name: _entry(shape)}, zeros),
        ("deep nesting", "{" + valid + ',"deep":' + "[" * NESTING + "]" * NESTING + "}", zeros),
        # 1e999 is a valid JSON number that overflows a float to infinity.
        (
            "shape 1e999",
            f'{{"{name}":{{"dtype":"F32","shape":[1e999{dims}],"data_offsets":[0,{size}]}}}}',
            zeros,
        ),
        ("gap before the data", {name: _entry(shape, start=8)}, bytes(size + 8)),
    ]


MALFORMED = tuple(label for label, _, _ in _malformed("x", (1,)))


def malformed_headers(name: str, shape: Shape, n: int) -> Payload:
    """Zeros of the right size behind a header that breaks one rule of the format (MALFORMED, cycling)."""
    label, header, data = _malformed(name, shape)[n % len(MALFORMED)]
    return Payload(label, container(header, data))


def non_finite(name: str, shape: Shape, n: int) -> Payload:
    """A well-formed container whose values are NaN, +Inf, -Inf, or one NaN among zeros (cycling by n)."""
    fills = [("NaN", math.nan), ("+Inf", math.inf), ("-Inf", -math.inf), ("one NaN", 0.0)]
    label, fill = fills[n % len(fills)]
    a = np.full(shape, fill, dtype="<f4")
    if label == "one NaN":
        a.flat[a.size // 2] = math.nan
    return Payload(label, encode({name: RawTensor("F32", shape, a.tobytes())}))


def zeros(name: str, shape: Shape, n: int) -> Payload:
    """A valid, finite result (the non-finite-loss cheater's blob: only its loss is bad)."""
    return Payload("zeros", encode({name: RawTensor("F32", shape, bytes(math.prod(shape) * 4))}))


# Loss literals that Python's json reads but JSON forbids (1e999 is allowed syntax that overflows).
LOSS_LITERALS = ("NaN", "Infinity", "-Infinity", "1e999")


# --- the contributor ---------------------------------------------------------------------------------------


class Cheater:
    """A contributor with one bad habit: play() runs it in `threads` threads until close()."""

    threads = 1

    def __init__(self, url: str, run_id: str, stage: int, name: str = "cheater") -> None:
        self.url, self.run_id, self.want_stage, self.name = url.rstrip("/"), run_id, stage, name
        # No waiting and no quick retries: every answer the server gives is seen and written down.
        self.api = SwarmApi(Client(self.url, max_wait_s=0.0, retries=0))
        self.contributor_id = ""
        self.assignment: Assignment | None = None
        self.stop = threading.Event()
        self.replies: Counter[tuple[str, int]] = Counter()  # (operation, HTTP status; 0: no answer)
        self.events: Counter[str] = Counter()  # what the cheater did, by label
        self.accepted: list[tuple[str, str]] = []  # (work_id, payload label) of bad results taken
        self.errors: list[str] = []  # unexpected exceptions in the cheater itself
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # --- setting up and tearing down -----------------------------------------------------------------

    def join(self) -> Cheater:
        reply = self.api.register(RegisterRequest(name=self.name, backend="cheat"))
        self.api.client.token, self.contributor_id = reply.token, reply.contributor_id
        self.assignment = self.api.assignment(
            AssignmentRequest(run_id=self.run_id, stage=self.want_stage, backend="cheat")
        )
        assert self.assignment.stage == self.want_stage, self.assignment
        return self

    def start(self) -> Cheater:
        targets = [self._heartbeats] + [self._play] * self.threads
        self._threads = [
            threading.Thread(target=t, daemon=True, name=f"{self.name}-{i}") for i, t in enumerate(targets)
        ]
        for t in self._threads:
            t.start()
        return self

    def close(self, timeout: float = 20.0) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        self.api.close()

    @property
    def manifest(self) -> RunManifest:
        assert self.assignment is not None, "join() first"
        return self.assignment.manifest

    # --- what every cheater does ---------------------------------------------------------------------

    def play(self) -> None:
        """One thread's habit, looping until stop is set."""
        raise NotImplementedError

    def _play(self) -> None:
        try:
            self.play()
        except Exception as e:  # noqa: BLE001 - a broken cheater must show in the test, not vanish
            self.note_error(f"{type(e).__name__}: {e}")

    def _heartbeats(self) -> None:
        # A hoarder that stopped heartbeating would lose its lease and its claims; a real one keeps both.
        assert self.assignment is not None
        beat = Heartbeat(run_id=self.run_id, stage=self.assignment.stage)
        while not self.stop.wait(self.assignment.heartbeat_s):
            self.call("heartbeat", lambda: self.api.heartbeat(beat))

    def call(self, op: str, fn: Callable[[], object]) -> object | None:
        """Run one request; record its status; None when the server refused it or did not answer."""
        try:
            result = fn()
        except ApiError as e:
            self.record(op, e.status)
            return None
        except ClientError:
            self.record(op, 0)
            return None
        self.record(op, 200)
        return result

    def claim(self, wait_s: float) -> WorkItem | None:
        """The next item (long-polling wait_s); None when there is none or the claim was refused."""
        request = ClaimRequest(run_id=self.run_id, wait_s=wait_s)
        try:
            got = self.api.claim(request)
        except ApiError as e:
            self.record("claim", e.status)
            self.stop.wait(0.5)
            return None
        except ClientError:
            self.record("claim", 0)
            self.stop.wait(0.5)
            return None
        self.record("claim", 204 if got.item is None else 200)
        if got.item is not None:
            self.count("items claimed")
        elif got.run_state == "finished":
            self.stop.set()
        else:  # as the worker does: a server that answers at once is not asked again at once
            self.stop.wait(min(got.retry_after or 0.0, 1.0))
        return got.item

    def give_back(self, item: WorkItem) -> None:
        # The liar's reason: "stopping" is nobody's fault.
        self.call("abandon", lambda: self.api.abandon(item.work_id, Abandon(reason="stopping")))
        self.count("items abandoned")

    def result_name(self, item: WorkItem) -> str:
        return "activations" if item.kind == "forward" and not self.is_tail(item) else "grad"

    def result_shape(self) -> Shape:
        t, m = self.manifest.train, self.manifest.model
        return (t.batch_size, t.seq_len, m.bottleneck_dim)

    def is_tail(self, item: WorkItem) -> bool:
        return item.kind == "forward" and item.stage == self.manifest.model.n_stages - 1

    def record(self, op: str, status: int) -> None:
        with self._lock:
            self.replies[(op, status)] += 1

    def count(self, what: str) -> None:
        with self._lock:
            self.events[what] += 1

    def note_error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    def server_errors(self) -> dict[tuple[str, int], int]:
        return {k: n for k, n in self.replies.items() if k[1] >= 500}

    def raw_post(self, path: str, body: bytes) -> requests.Response:
        """POST bytes as JSON, as they are: what a client that is not ours would send."""
        headers = {
            PROTOCOL_HEADER: str(PROTOCOL_VERSION),
            "Authorization": f"Bearer {self.api.client.token}",
            "Content-Type": "application/json",
        }
        return requests.post(self.url + path, data=body, headers=headers, timeout=(5, 30))


class Poisoner(Cheater):
    """Claims items at its stage and completes each with a bad result (right sha256, bad content).

    A result the server refuses is given back at once (reason "stopping"), so the item is free again;
    holding it would be hoarding, which Hoarder plays. `loss_literal` makes a tail report a loss that is
    no JSON number (sent as raw JSON, since the typed model refuses to build it).
    """

    def __init__(
        self,
        url: str,
        run_id: str,
        stage: int,
        payloads: PayloadMaker,
        *,
        loss_literal: bool = False,
        name: str = "poisoner",
    ) -> None:
        super().__init__(url, run_id, stage, name)
        self.payloads, self.loss_literal = payloads, loss_literal
        self.n = 0
        self.tried: Counter[str] = Counter()  # payload label -> completes sent with it

    def play(self) -> None:
        while not self.stop.is_set():
            item = self.claim(wait_s=2.0)
            if item is not None:
                self.poison(item)

    def poison(self, item: WorkItem) -> None:
        sha, size, label = None, 0, "no upload"
        if item.upload is not None:
            payload = self.payloads(self.result_name(item), self.result_shape(), self.n)
            self.n += 1
            upload = item.upload
            sha = self.call("upload", lambda: self.api.upload(upload, payload.data))
            if sha is None:
                self.count(f"upload refused: {payload.label}")
                self.give_back(item)
                return
            size, label = len(payload.data), payload.label
        if self.loss_literal and self.is_tail(item):
            label = LOSS_LITERALS[self.n % len(LOSS_LITERALS)]
            ok = self._complete_raw(item, str(sha), size, label)
        else:
            loss = 3.0 if self.is_tail(item) else None  # a plausible loss: the bad part is the blob
            result = WorkComplete(sha256=str(sha) if sha else None, size=size, loss=loss)
            ok = self.call("complete", lambda: self.api.complete(item.work_id, result)) is not None
        with self._lock:
            self.tried[label] += 1
        if ok:
            with self._lock:
                self.accepted.append((item.work_id, label))
        else:
            self.give_back(item)

    def _complete_raw(self, item: WorkItem, sha: str, size: int, literal: str) -> bool:
        body = f'{{"sha256": "{sha}", "size": {size}, "loss": {literal}}}'.encode()
        try:
            r = self.raw_post(f"/v1/work/{item.work_id}/complete", body)
        except requests.RequestException:
            self.record("complete", 0)
            return False
        self.record("complete", r.status_code)
        return r.status_code < 400


class Hoarder(Cheater):
    """Holds every body item it can get with several long-polling claims and never completes one.

    What times out is re-issued, and the hoarder, still polling, claims it again; its heartbeats keep
    its lease, so only the items' deadlines (and the server's limits) free them.
    """

    threads = 4

    def __init__(self, url: str, run_id: str, stage: int, name: str = "hoarder") -> None:
        super().__init__(url, run_id, stage, name)
        self.held: list[str] = []

    def play(self) -> None:
        while not self.stop.is_set():
            item = self.claim(wait_s=5.0)
            if item is not None:
                with self._lock:
                    self.held.append(item.work_id)


class Abandoner(Cheater):
    """Claims and at once gives back, in a loop (paced, so it tests the queues rather than the CPU)."""

    def __init__(
        self, url: str, run_id: str, stage: int, pace_s: float = 0.05, name: str = "abandoner"
    ) -> None:
        super().__init__(url, run_id, stage, name)
        self.pace_s = pace_s

    def play(self) -> None:
        while not self.stop.is_set():
            item = self.claim(wait_s=2.0)
            if item is not None:
                self.give_back(item)
                self.stop.wait(self.pace_s)


if __name__ == "__main__":
    # A cheater as its own process: `python tests/cheaters.py merge-<kind> URL RUN_ID --stage S`
    # (tests/merge_cheaters.py holds the merge poisoner; this module keeps the in-process cheaters).
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import merge_cheaters

    sys.exit(merge_cheaters.main(sys.argv[1:]))
