"""Latency hiding for the worker's loop: claims and inputs fetched ahead, results sent behind.

Over a home link each round trip costs tens of milliseconds, and an item needs four of them (claim,
download, upload, complete), or two where the orchestrator carries small blobs inline in the claim's
reply and the complete (the directory store; protocol: INLINE_MAX). The loop thread only computes: a
`Prefetcher` thread claims the next item and downloads its inputs while the current one runs, and a
`Sender` thread uploads a result and completes it while the next one runs. Over a long round trip one
thread of each is not enough (an upload and a complete are 200 ms at 100 ms RTT, more than an item's
compute), so each runs DEPTH threads: at most DEPTH items claimed ahead, one computing, DEPTH being sent
and one queued for them, which is `train.max_claims_per_worker` (6). Neither ever touches the backend
(the loop thread owns it). What kill -9 loses is unchanged: claimed items lapse at their deadline and
are re-issued, as an item in flight always was.

    python -c "from iota_cli.train.pipeline import *; p = Profile(); p.add('x_s', 1); print(p.snapshot())"
"""

from __future__ import annotations

import base64
import hashlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from iota_cli.core import wire
from iota_cli.core.backend import StageInputError, UnknownWorkId
from iota_cli.core.protocol import (
    INLINE_MAX,
    Abandon,
    BlobRef,
    ClaimRequest,
    WorkComplete,
    WorkCompleteReply,
    WorkItem,
)
from iota_cli.core.tensors import RawTensor, TensorDict
from iota_cli.train import fetch
from iota_cli.train.api import Claim, SwarmApi
from iota_cli.train.errors import ApiError, IntegrityError, Stopped

log = logging.getLogger("iota.worker")

# Weights at most this large are copied before an optimizer step for the results still in flight (a
# sampled item is answered with the weights it ran on); larger stages wait for those results instead.
HOLD_LIMIT_BYTES = 256 << 20
DEPTH = 2  # claiming threads, and sending threads: round trips in flight each way


class Profile:
    """Where a worker's time and bytes go: seconds and counts by name, safe to add to from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}

    def add(self, name: str, amount: float) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0.0) + amount

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Wall seconds under name, and this thread's CPU-seconds under name with _s made _cpu_s: on
        shared cores the two part (a thread waiting for a core counts wall time, not CPU)."""
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)
            self.add(name.removesuffix("_s") + "_cpu_s", time.thread_time() - cpu)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 4) for k, v in sorted(self._values.items())}

    def final(self, tokens: int, **threads_cpu_s: float) -> dict[str, float]:
        """The snapshot the worker logs at exit, called on the loop thread: with that thread's CPU-seconds,
        the whole process's (less compute_cpu_s, they are the worker's overhead) and other threads'."""
        cpu = {"loop_cpu_s": time.thread_time(), "process_cpu_s": time.process_time(), **threads_cpu_s}
        return {**self.snapshot(), **{k: round(v, 3) for k, v in cpu.items()}, "tokens": tokens}


class Liveness:
    """When each pipeline thread last showed life inside a call to the orchestrator.

    The loop thread no longer blocks in HTTP itself, so its watchdog pings (headless/notify.py) must
    vouch for the threads that do: a call that neither returns nor reports a retry (`touch`, from the
    client's on_wait hook) for too long is a hang, and the pings stop as they did when the loop hung.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: dict[int, float] = {}

    @contextmanager
    def call(self) -> Iterator[None]:
        tid = threading.get_ident()
        with self._lock:
            self._since[tid] = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._since.pop(tid, None)

    def touch(self) -> None:
        """The calling thread is alive (waiting between retries, say): its call is not hung."""
        tid = threading.get_ident()
        with self._lock:
            if tid in self._since:
                self._since[tid] = time.monotonic()

    def stalled_for(self) -> float:
        """Seconds since the quietest call in progress last showed life (0: none in progress)."""
        now = time.monotonic()
        with self._lock:
            return max((now - t for t in self._since.values()), default=0.0)


@dataclass(frozen=True)
class Ready:
    """A claimed item with its inputs downloaded, or the error that fetching them raised."""

    item: WorkItem
    inputs: dict[str, RawTensor] = field(default_factory=dict)  # by the name the stage reads: tokens, ...
    error: Exception | None = None


def input_names(item: WorkItem, kind: str) -> list[tuple[str, BlobRef | None]]:
    """The blobs an item needs, by the name its stage reads them (protocol: "Work")."""
    if item.kind == "backward":
        return [("grad", item.input)]
    if kind == "head":
        return [("tokens", item.tokens)]
    if kind == "tail":
        return [("activations", item.input), ("tokens", item.tokens)]
    return [("activations", item.input)]


def give_back(work_id: str, e: Exception) -> Abandon:
    """Why an item whose input failed is given back; what another contributor sent is never fatal."""
    if isinstance(e, IntegrityError):
        log.warning("input of %s failed verification (%s); giving it back", work_id, e)
        return Abandon(reason="unverified", detail=str(e)[:500])
    if isinstance(e, UnknownWorkId):
        # Backward for a forward this process no longer holds (it restarted): the chain is lost.
        log.info("no saved forward for %s (lost in a restart); dropping its chain", work_id)
        return Abandon(reason="lost_state")
    assert isinstance(e, StageInputError)
    log.warning("rejected the input of %s: %s", work_id, e)
    return Abandon(reason="bad_input", detail=str(e)[:500])


def dropped(item: WorkItem, e: Exception | None) -> bool:
    """Whether e says the orchestrator no longer wants the item (404/409/410): forgotten, never fatal."""
    if not (isinstance(e, ApiError) and e.status in (404, 409, 410)):
        return False
    log.info("orchestrator dropped %s (%s): %s", item.work_id, e.status, e.detail)
    return True


class Prefetcher:
    """Claims the next items and downloads their inputs on `depth` threads, that many ahead of the loop."""

    def __init__(
        self,
        api: SwarmApi,
        run_id: str,
        stage_kind: str,
        work_dir: Path,
        profile: Profile,
        liveness: Liveness,
        depth: int = DEPTH,
    ) -> None:
        self.api, self.run_id, self.kind, self.work_dir = api, run_id, stage_kind, work_dir
        self.profile, self.liveness = profile, liveness
        self.wait_s: Callable[[], float] = lambda: 2.0
        self.last = Claim(None)  # the latest claim's answer: the run's state and why there was no work
        self._ready: queue.Queue[Ready] = queue.Queue()
        self._slots = threading.Semaphore(depth)  # one per item claimed and not yet taken by the loop
        self._failure: BaseException | None = None
        self._closed = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"iota-prefetch-{i}", daemon=True) for i in range(depth)
        ]

    def start(self, wait_s: Callable[[], float]) -> None:
        """Claim from now on, long-polling wait_s() seconds a claim (asked afresh for each one)."""
        self.wait_s = wait_s
        for t in self._threads:
            t.start()

    def take(self, timeout: float) -> Ready | None:
        """The next ready item, waiting up to timeout; a failure of the thread is raised here."""
        if self._failure is not None:
            raise self._failure
        try:
            ready = self._ready.get(timeout=timeout)
        except queue.Empty:
            if self._failure is not None:
                raise self._failure from None
            return None
        self._slots.release()
        return ready

    def close(self) -> list[WorkItem]:
        """Stop claiming; return the items claimed but never taken (the caller gives them back)."""
        self._closed.set()
        deadline = time.monotonic() + self.api.client.timeout[0] + 1.0  # one wait for all, not each
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        left = []
        while True:
            try:
                left.append(self._ready.get_nowait().item)
            except queue.Empty:
                return left

    def _run(self) -> None:
        try:
            while not (self._closed.is_set() or self.api.stop.is_set()):
                if not self._slots.acquire(timeout=0.2):
                    continue  # `depth` items wait for the loop already
                with self.liveness.call():
                    ready = self._next()
                if ready is None:
                    self._slots.release()
                else:
                    self._ready.put(ready)  # close() hands back whatever the loop did not take
        except Stopped:
            return
        except BaseException as e:  # noqa: BLE001 - the loop thread raises it as its own
            self._failure = e

    def _next(self) -> Ready | None:
        # One claim id per claim: if an answer is lost and the client retries, the same item comes back.
        request = ClaimRequest(
            run_id=self.run_id, wait_s=self.wait_s(), claim_id=uuid.uuid4().hex, inline_max=INLINE_MAX
        )
        with self.profile.timed("claim_s"):
            claim = self.api.claim(request)
        self.last = claim
        if claim.item is None:
            if claim.run_state != "finished" and claim.retry_after:
                self.api.stop.wait(min(claim.retry_after, request.wait_s or 1.0))
            elif claim.run_state == "finished":
                self._closed.wait(1.0)
            return None
        return self._fetch(claim.item)

    def _fetch(self, item: WorkItem) -> Ready:
        inputs: dict[str, RawTensor] = {}
        try:
            for name, ref in input_names(item, self.kind):
                with self.profile.timed("download_s"):  # bytes inline in the claim: a decode only
                    inputs[name] = fetch.tensor(self.api, ref, name, self.work_dir)
                self.profile.add("bytes_down", ref.size if ref else 0)
        except Stopped:
            raise
        except Exception as e:  # noqa: BLE001 - handled by the loop as if it had fetched them itself
            return Ready(item, error=e)
        return Ready(item, inputs)


@dataclass(frozen=True)
class Sent:
    """A result sent and completed (reply), or what went wrong sending it (error)."""

    item: WorkItem
    key: str
    reply: WorkCompleteReply | None = None
    error: Exception | None = None
    held: TensorDict | None = None  # the weights it ran on, kept when they changed before it came back


class Sender:
    """Uploads results and completes their items on `depth` threads, behind the loop.

    The loop collects what was sent with `results()`, and `drain()` waits until nothing is in flight:
    before its weights change (an optimizer step, merged weights), since a sampled item must be
    answered with the weights it ran on.
    """

    def __init__(
        self,
        api: SwarmApi,
        profile: Profile,
        liveness: Liveness,
        fmt: wire.WireFormat = wire.WireFormat(),  # noqa: B008 - frozen
        depth: int = DEPTH,
    ) -> None:
        self.api, self.profile, self.liveness, self.fmt = api, profile, liveness, fmt
        self._jobs: queue.Queue[tuple[WorkItem, str, TensorDict | None, float | None, int] | None]
        self._jobs = queue.Queue(maxsize=1)
        self._done: queue.Queue[Sent] = queue.Queue()
        self._pending: list[str] = []  # work ids queued or being sent, oldest first
        self._held: dict[str, TensorDict] = {}
        self._lock = threading.Condition()
        self._threads = [
            threading.Thread(target=self._run, name=f"iota-send-{i}", daemon=True) for i in range(depth)
        ]
        for t in self._threads:
            t.start()

    def _alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def send(
        self, item: WorkItem, key: str, payload: TensorDict | None, loss: float | None, epoch: int
    ) -> None:
        """Queue a result computed on weights of `epoch`; blocks while the one before it waits to be sent."""
        with self._lock:
            self._pending.append(item.work_id)
        while True:
            try:
                self._jobs.put((item, key, payload, loss, epoch), timeout=0.2)
                return
            except queue.Full:
                if not self._alive():
                    raise Stopped from None

    def in_flight(self) -> list[str]:
        """Work ids queued or being sent (their results not yet collected)."""
        with self._lock:
            return list(self._pending)

    def results(self) -> list[Sent]:
        out: list[Sent] = []
        while True:
            try:
                s = self._done.get_nowait()
            except queue.Empty:
                return out
            out.append(replace(s, held=self._held.pop(s.item.work_id, None)))

    def hold(self, weights: Callable[[], TensorDict], nbytes: int) -> list[Sent]:
        """The weights are about to change: keep them for the results in flight (or, when they are
        large, wait for those results); return what was sent meanwhile."""
        with self._lock:  # a result is never both out of _pending and not yet in _done
            out = self.results()
            pending = [i for i in self._pending if i not in self._held]
            if pending and nbytes <= HOLD_LIMIT_BYTES:
                self._held.update(dict.fromkeys(pending, weights()))
        if pending and nbytes > HOLD_LIMIT_BYTES:
            return out + self.drain()
        return out

    def drain(self) -> list[Sent]:
        """Wait until every queued result is sent (or failed); return everything sent since last asked."""
        with self._lock:
            while self._pending and self._alive():
                self._lock.wait(0.2)
        return self.results()

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + 5.0
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            item, key, payload, loss, epoch = job
            try:
                with self.liveness.call():
                    sent = Sent(item, key, reply=self._send(item, payload, loss, epoch))
            except Exception as e:  # noqa: BLE001 - the loop decides (Stopped included)
                sent = Sent(item, key, error=e)
            with self._lock:
                self._done.put(sent)
                self._pending.remove(item.work_id)
                self._lock.notify_all()

    def _send(
        self, item: WorkItem, payload: TensorDict | None, loss: float | None, epoch: int
    ) -> WorkCompleteReply:
        sha, size, inline = None, 0, None
        if payload is not None and item.upload is not None:
            with self.profile.timed("serialize_s"):
                data = self.fmt.frame(payload)
            size = len(data)
            if size <= item.upload.inline_max:  # in the complete itself: one round trip, not two
                sha, inline = hashlib.sha256(data).hexdigest(), base64.b64encode(data).decode("ascii")
            else:
                with self.profile.timed("upload_s"):
                    sha = self.api.upload(item.upload, data)
            self.profile.add("bytes_up", size)
        with self.profile.timed("complete_s"):
            report = WorkComplete(sha256=sha, size=size, loss=loss, epoch=epoch, data=inline)
            return self.api.complete(item.work_id, report)
