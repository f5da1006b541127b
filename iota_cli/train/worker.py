"""The contributor's training loop: pull work, run it on the backend, upload the result, checkpoint.

`iota join` builds a Worker (see join.py) and calls run(). One thread runs the loop and owns the backend;
a heartbeat thread keeps the lease and brings news (the stage's epoch, merge offers, dropped samples, the
run's end); a merge round runs on its own thread (merging.py) and its weights land between steps, keeping
the steps taken since the contribution. Shutdown (stop event) finishes or abandons the item in flight,
checkpoints and leaves.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from iota_cli.core import outer
from iota_cli.core.backend import StageBackend, StageInputError, UnknownWorkId
from iota_cli.core.modelspec import stage_spec
from iota_cli.core.protocol import (
    Abandon,
    Assignment,
    BlobRef,
    ClaimRequest,
    Heartbeat,
    HeartbeatReply,
    UploadRef,
    WorkComplete,
    WorkItem,
)
from iota_cli.core.tensors import RawTensor, TensorDict, column_slice, encode
from iota_cli.core.validation import WeightsReport
from iota_cli.headless.notify import Notifier
from iota_cli.headless.progress import Progress
from iota_cli.machine.power import PowerGuard
from iota_cli.train import fetch
from iota_cli.train.api import SwarmApi
from iota_cli.train.checkpoint import CheckpointStore, LoopState
from iota_cli.train.errors import ApiError, ClientError, IntegrityError, Stopped
from iota_cli.train.join import epoch_base, published_weights
from iota_cli.train.merging import Merger
from iota_cli.train.states import Session, ending, waiting

log = logging.getLogger("iota.worker")


@dataclass(frozen=True)
class LoopOptions:
    max_steps: int | None = None  # stop after this many local optimizer steps (None: until the run ends)
    checkpoint_interval_s: float = 2.0  # at most this much work is lost to a kill -9
    claim_wait_s: float = 2.0  # long-poll for work this long before asking again
    pause_poll_s: float = 5.0


class Worker:
    """One stage replica's loop; construct with everything it needs, then call run()."""

    def __init__(
        self,
        api: SwarmApi,
        backend: StageBackend,
        assignment: Assignment,
        state: LoopState,
        store: CheckpointStore,
        cache_dir: Path,
        progress: Progress,
        notifier: Notifier,
        guard: PowerGuard | None = None,
        options: LoopOptions = LoopOptions(),  # noqa: B008 - frozen
    ) -> None:
        self.api, self.backend, self.assignment = api, backend, assignment
        self.manifest = assignment.manifest
        self.spec = stage_spec(self.manifest.model, assignment.stage)
        self.state, self.store, self.cache_dir = state, store, cache_dir
        self.progress, self.notifier, self.guard, self.options = progress, notifier, guard, options
        self.stop = api.stop
        self._news: HeartbeatReply | None = None
        self._news_lock = threading.Lock()
        self._display_lock = threading.Lock()
        self._since_step = 0
        self._saved: dict[str, tuple[float, int]] = {}  # backend work id -> (when its forward ran, sample)
        self._idle = False  # the last claim brought no work
        self._refused_weights: set[str] = set()  # sha256 of merged weights that failed to load
        self._last_checkpoint = time.monotonic()
        self._loss: float | None = None
        self.finished = False  # the run ended (as opposed to a stop or max_steps)
        self.reassign = False
        self.session = Session.start(state)
        self._loop_thread: int | None = None
        self._done = threading.Event()  # ends the heartbeat thread (stop is the user's)
        self._wake = threading.Event()  # beat now (the thread is done, or a merge round is due)
        self._paced_from = state.step  # the orchestrator counts merge.interval steps from here
        base = epoch_base(api, assignment, state, cache_dir) or backend.weights()
        self.merger = Merger(api, state.run_id, self.spec.index, self.manifest, base, state.epoch)

    # --- the loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        """Train until stopped, max_steps, or the run ends; always checkpoint and leave on the way out."""
        self._loop_thread = threading.get_ident()
        beat = threading.Thread(target=self._heartbeats, name="iota-heartbeat", daemon=True)
        beat.start()
        self.notifier.ready(f"stage {self.spec.index} ({self.spec.kind}): training")
        self._show(state="waiting for work")
        try:
            while not self.stop.is_set():
                self.notifier.watchdog()
                if self.guard and (reason := self.guard.should_pause()):
                    self._show(state=reason)
                    self.stop.wait(self.options.pause_poll_s)
                    continue
                self._apply_news()
                if self.finished or self.reassign or self._reached_max_steps():
                    break
                item = self._claim()
                if item is not None:
                    self._process(item)
        except Stopped:
            pass
        finally:
            self._done.set()
            self._wake.set()
            beat.join(timeout=2.0)
            self.merger.close()
            self._shutdown()

    def _reached_max_steps(self) -> bool:
        return self.options.max_steps is not None and self.state.step >= self.options.max_steps

    def _claim(self) -> WorkItem | None:
        # One claim id per claim: if an answer is lost and the client retries, the same item comes back.
        # While a round is in flight its weights may land any moment: a long-poll must not hold them up.
        cap = self.options.claim_wait_s if self.merger.in_flight is None else 0.5
        wait = min(self.options.claim_wait_s, cap)
        request = ClaimRequest(run_id=self.state.run_id, wait_s=wait, claim_id=uuid.uuid4().hex)
        claim = self.api.claim(request)
        self._idle = claim.item is None
        if claim.item is None:
            if claim.run_state == "finished":
                self.finished = True
            else:
                self._show(state=waiting(claim.wait))
                if claim.retry_after:
                    self.stop.wait(min(claim.retry_after, self.options.claim_wait_s))
        return claim.item

    def _process(self, item: WorkItem) -> None:
        """Run one item; a result the orchestrator no longer wants (409/404) is dropped, not fatal."""
        key = item.forward_id or item.work_id
        try:
            if item.kind == "forward":
                payload, loss = self._forward(item, key)
            else:
                payload, loss = self._backward(item, key)
            sha, size = None, 0
            if payload is not None and item.upload is not None:
                data = encode(payload)
                sha, size = self.api.upload(item.upload, data), len(data)
            done = self.api.complete(item.work_id, WorkComplete(sha256=sha, size=size, loss=loss))
            if done.audit is not None:  # before any step: the weights are still those the item used
                self._send_snapshot(item, done.audit)
        except Stopped:
            self._abandon(item, key, Abandon(reason="stopping"))
            raise
        except IntegrityError as e:
            log.warning("input of %s failed verification (%s); giving it back", item.work_id, e)
            self._abandon(item, key, Abandon(reason="unverified", detail=str(e)[:500]))
            return
        except StageInputError as e:
            # Whatever another contributor sent (undecodable, misshapen, non-finite) is reported, not fatal.
            log.warning("rejected the input of %s: %s", item.work_id, e)
            self._abandon(item, key, Abandon(reason="bad_input", detail=str(e)[:500]))
            return
        except UnknownWorkId:
            # Backward for a forward this process no longer holds (it restarted): the chain is lost.
            log.info("no saved forward for %s (lost in a restart); dropping its chain", item.work_id)
            self._abandon(item, key, Abandon(reason="lost_state"))
            return
        except ApiError as e:
            if e.status in (404, 409, 410):
                log.info("orchestrator dropped %s (%s): %s", item.work_id, e.status, e.detail)
                self._forget(key)
                return
            raise
        self.state = replace(self.state, credits_seen=done.total_credits)
        self.session.credited(done.credits)
        if item.kind == "backward" or self.spec.kind == "tail":
            self._count_backward()
        self._show(state="training")

    def _send_snapshot(self, item: WorkItem, upload: UploadRef) -> None:
        """The item was sampled for a check: send the weights it ran on (no snapshot, no credit)."""
        data = encode(self.backend.weights())
        sha = self.api.upload(upload, data)
        self.api.report_weights(item.work_id, WeightsReport(sha256=sha, size=len(data)))
        log.debug("sent the weights of %s for a check (%d bytes)", item.work_id, len(data))

    def _forward(self, item: WorkItem, key: str) -> tuple[TensorDict | None, float | None]:
        kind = self.spec.kind
        if kind == "head":
            tokens = self._fetch(item.tokens, "tokens")
            inputs = {"tokens": column_slice(tokens, 0, -1)}
        else:
            inputs = {"activations": self._fetch(item.input, "activations")}
        self._expire_saved_state()
        out = self.backend.forward(key, inputs)
        self._saved[key] = (time.monotonic(), item.sample_id)
        b, t = inputs["tokens" if kind == "head" else "activations"].shape[:2]
        self.state = replace(self.state, tokens=self.state.tokens + b * t)
        if kind != "tail":
            return out, None
        targets = column_slice(self._fetch(item.tokens, "tokens"), 1, None)
        result = self.backend.backward(key, {"targets": targets})
        self._saved.pop(key, None)
        self._loss = result.loss
        return result.grads, result.loss

    def _backward(self, item: WorkItem, key: str) -> tuple[TensorDict | None, None]:
        grad = self._fetch(item.input, "grad")
        result = self.backend.backward(key, {"grad": grad})
        self._saved.pop(key, None)
        return result.grads, None

    def _count_backward(self) -> None:
        self.state = replace(self.state, backward_passes=self.state.backward_passes + 1)
        self._since_step += 1
        if self._since_step < self.manifest.train.backward_per_step:
            return
        self.backend.step()
        self._since_step = 0
        self.state = replace(self.state, step=self.state.step + 1, since_merge=self.state.since_merge + 1)
        if self.state.step - self._paced_from == self.manifest.merge.interval:
            self._wake.set()  # a round is due: say so now, not up to heartbeat_s later
        if time.monotonic() - self._last_checkpoint >= self.options.checkpoint_interval_s:
            self.checkpoint()

    def _forget(self, key: str) -> None:
        self.backend.free(key)
        self._saved.pop(key, None)

    def _abandon(self, item: WorkItem, key: str, why: Abandon) -> None:
        self._forget(key)
        try:
            self.api.abandon(item.work_id, why)
        except ClientError as e:
            log.info("could not give back %s: %s", item.work_id, e)

    def _expire_saved_state(self) -> None:
        """Free forwards whose backward will never come (the chain broke downstream)."""
        horizon = time.monotonic() - 2 * self.manifest.train.work_timeout_s
        for key in [k for k, (t, _) in self._saved.items() if t < horizon]:
            self._forget(key)

    def _fetch(self, ref: BlobRef | None, name: str) -> RawTensor:
        return fetch.tensor(self.api, ref, name, self.cache_dir / "work")

    # --- heartbeats, merged weights and merge rounds ---------------------------------------------------

    def _heartbeats(self) -> None:
        interval = max(0.2, float(self.assignment.heartbeat_s))
        while not (self.stop.is_set() or self._done.is_set()):
            beat = Heartbeat(
                run_id=self.state.run_id,
                stage=self.spec.index,
                step=self.state.step,
                epoch=self.state.epoch,
                tokens_per_s=self.progress.facts.tokens_per_s or 0.0,
            )
            try:
                news = self.api.heartbeat(beat)
                with self._news_lock:
                    self._news = news
            except Stopped:
                return
            except ClientError as e:
                log.debug("heartbeat missed: %s", e)
            self._wake.wait(interval)
            self._wake.clear()

    def _apply_news(self) -> None:
        if self._since_step == 0 or self._idle:  # merged weights land between optimizer steps
            self._land()
        with self._news_lock:
            news, self._news = self._news, None
        if news is None:
            return
        dropped = set(news.drop)
        for key in [k for k, (_, sample) in self._saved.items() if sample in dropped]:
            self._forget(key)
        offer = news.merge
        # The round in flight brings exactly epoch + 1; anything newer, or no round, is a catch-up.
        if news.epoch > self.state.epoch and self.merger.in_flight != news.epoch - 1:
            self._catch_up(news)
        elif offer is not None and offer.phase == "contribute" and offer.epoch == self.state.epoch:
            self._show(state=f"merging (epoch {offer.epoch})")
            if self.merger.begin(offer, self.backend.weights(), self.state.step):
                self._paced_from = self.state.step
        if news.run_state == "finished":
            self.finished = True
        if news.reassign:
            self.reassign = True

    def _land(self) -> None:
        """Load a finished round's weights plus the steps taken since its snapshot (the overlap)."""
        landed = self.merger.take()
        if landed is None or landed.merged is None or landed.epoch != self.state.epoch:
            return  # dropped or stale: the heartbeats report the current epoch, and we catch up to it
        layout = self.merger.layout
        current = layout.flatten(self.backend.weights())
        try:
            # The optimizer state stays: the merged weights continue this replica's trajectory.
            self.backend.load(layout.unflatten(outer.overlap(current, landed.snapshot, landed.merged)))
        except StageInputError as e:
            log.warning("could not load the merged weights of epoch %d: %s", landed.epoch + 1, e)
            return
        kept = self.state.step - landed.step
        log.info(
            "epoch %d merged in at step %d, keeping %d local steps", landed.epoch + 1, self.state.step, kept
        )
        self._synced(landed.merged, landed.epoch + 1)

    def _catch_up(self, news: HeartbeatReply) -> None:
        """Take the swarm's current weights; weights that are corrupt or misfit are refused once."""
        if news.weights.sha256 in self._refused_weights:
            return
        self._show(state=f"loading merged weights (epoch {news.epoch})")
        try:
            weights = self._published(news.weights)
            base = self.merger.layout.flatten(weights)
            self.backend.load(weights)  # keeping the optimizer state, as a merge does
        except (StageInputError, IntegrityError, ValueError) as e:  # TensorFormatError is a ValueError
            log.warning("refusing the merged weights of epoch %d: %s; training on", news.epoch, e)
            self._refused_weights.add(news.weights.sha256)
            return
        log.info("caught up with epoch %d (from %d)", news.epoch, self.state.epoch)
        self._paced_from = self.state.step
        self._synced(base, news.epoch)

    def _synced(self, base: np.ndarray, epoch: int) -> None:
        self.merger.rebase(base, epoch)
        self.state = replace(self.state, epoch=epoch, since_merge=0)
        self.checkpoint()
        if self.state.step - self._paced_from >= self.manifest.merge.interval:
            self._wake.set()  # the next round came due while this one was in flight

    def _published(self, ref: BlobRef) -> TensorDict:
        return published_weights(self.api, self.cache_dir, self.state.run_id, self.spec.index, ref)

    # --- state, display and shutdown -----------------------------------------------------------------

    def checkpoint(self) -> Path:
        path = self.store.save(self.state, self.backend.weights(), self.backend.optimizer_state())
        self._last_checkpoint = time.monotonic()
        return path

    def _shutdown(self) -> None:
        if not self.reassign:  # moving to another stage is not stopping
            self.notifier.stopping("checkpointing")
        if self.stop.is_set():
            self.progress.interrupted()  # a Ctrl-C echoed '^C' after the bar
        self._show(state="checkpointing")
        for key in list(self._saved):
            self._forget(key)
        try:
            self.checkpoint()
        except Exception:  # the previous checkpoint is intact; say so and carry on leaving
            log.exception("final checkpoint failed; the previous one stays valid")
        try:
            self.api.leave()  # best effort and brief (see api.leave)
        except ClientError as e:
            log.info("could not tell the orchestrator we are leaving: %s", e)
        self.progress.close(state=(end := self.ending()), summary=self.session.summary(end, self.state))

    def ending(self) -> str:
        """Why the loop ended: 'run finished', 'stopped by you', 'reached --max-steps N', ..."""
        reached = self.options.max_steps if self._reached_max_steps() else None
        return ending(self.finished, self.reassign, reached, self.stop.is_set())

    def _show(self, state: str) -> None:
        with self._display_lock:
            self.progress.update(
                step=self.state.step,
                tokens=self.state.tokens,
                loss=self._loss,
                credits=self.state.credits_seen,
                state=state,
            )

    def show_wait(self, message: str, seconds: float) -> None:
        """The client's on_wait hook: say what we wait for, and keep the watchdog fed while waiting."""
        if threading.get_ident() == self._loop_thread:  # a hung loop must stop the pings
            self.notifier.watchdog()
        self._show(state=message)
