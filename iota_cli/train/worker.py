"""The contributor's training loop: pull work, run it on the backend, upload the result, checkpoint.

`iota join` builds a Worker (see join.py) and calls run(). One thread runs the loop and owns the backend;
a heartbeat thread keeps the lease and brings news (the stage's epoch, merge offers, dropped samples, the
run's end); a merge round runs on its own thread (merging.py) and its weights land between steps, keeping
the steps taken since the contribution. The next item is claimed and fetched, and the last one sent, on
threads of their own (pipeline.py), so round trips overlap compute. Shutdown (stop event) finishes or
abandons the items in flight, checkpoints and leaves.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from iota_cli.core import outer, wire
from iota_cli.core.backend import StageBackend, StageInputError, UnknownWorkId
from iota_cli.core.modelspec import stage_spec
from iota_cli.core.protocol import (
    Abandon,
    Assignment,
    BlobRef,
    Heartbeat,
    HeartbeatReply,
    WorkItem,
)
from iota_cli.core.tensors import RawTensor, TensorDict, column_slice
from iota_cli.headless.notify import Notifier
from iota_cli.headless.progress import Progress
from iota_cli.machine.power import PowerGuard
from iota_cli.train.api import SwarmApi
from iota_cli.train.checkpoint import CheckpointStore, LoopState
from iota_cli.train.checkpointer import Checkpointer
from iota_cli.train.errors import ApiError, ClientError, IntegrityError, Stopped
from iota_cli.train.heartbeats import Heartbeats
from iota_cli.train.join import epoch_base, published_weights
from iota_cli.train.merging import Merger
from iota_cli.train.pipeline import Liveness, Prefetcher, Profile, Ready, Sender, Sent, dropped, give_back
from iota_cli.train.saved import SavedForwards
from iota_cli.train.states import Session, ending, waiting

log = logging.getLogger("iota.worker")


@dataclass(frozen=True)
class LoopOptions:
    max_steps: int | None = None  # stop after this many local optimizer steps (None: until the run ends)
    # The least time between background checkpoints; longer when writes are slow (checkpointer.py). A
    # kill -9 loses at most about one interval plus one write of work.
    checkpoint_interval_s: float = 2.0
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
        self._display_lock = threading.Lock()
        self._since_step = 0
        self.saved = SavedForwards(backend.free, 2 * self.manifest.train.work_timeout_s)
        self._idle = False  # the last claim brought no work
        self._refused_weights: set[str] = set()  # sha256 of merged weights that failed to load
        self.checkpointer = Checkpointer(store, options.checkpoint_interval_s)
        self._loss: float | None = None
        self.profile, self.liveness = Profile(), Liveness()
        self.prefetch: Prefetcher | None = None  # made in run(): its threads claim from the start
        self.sender = Sender(api, self.profile, self.liveness, wire.WireFormat.of(self.manifest))
        self.finished = False  # the run ended (as opposed to a stop or max_steps)
        self.reassign = False
        self.session = Session.start(state)
        self._loop_thread: int | None = None
        self.beats = Heartbeats(api, float(assignment.heartbeat_s), self._beat)
        self._paced_from = state.step  # the orchestrator counts merge.interval steps from here
        base = epoch_base(api, assignment, state, cache_dir) or backend.weights()
        self.merger = Merger(api, state.run_id, self.spec.index, self.manifest, base, state.epoch)

    # --- the loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        """Train until stopped, max_steps, or the run ends; always checkpoint and leave on the way out."""
        self._loop_thread = threading.get_ident()
        self.beats.start()
        self.notifier.ready(f"stage {self.spec.index} ({self.spec.kind}): training")
        self._show(state="waiting for work")
        work_dir = self.cache_dir / "work"
        self.prefetch = Prefetcher(
            self.api, self.state.run_id, self.spec.kind, work_dir, self.profile, self.liveness
        )
        self.prefetch.start(self._claim_wait)
        try:
            while not self.stop.is_set():
                self._ping()
                if self.guard and (reason := self.guard.should_pause()):
                    self._show(state=reason)
                    self.stop.wait(self.options.pause_poll_s)
                    continue
                self._apply_news()
                if self.finished or self.reassign or self._reached_max_steps():
                    break
                self._collect(self.sender.results())
                self._step()
                ready = self._take(self.prefetch)
                if ready is not None:
                    self._process(ready)
        except Stopped:
            pass
        finally:
            self._wind_down(self.prefetch)
            self.beats.close()
            self.merger.close()
            self._shutdown()

    def _ping(self) -> None:
        """Feed systemd's watchdog, unless a pipeline thread has hung in a call for a whole interval."""
        limit = 2 * (self.notifier.watchdog_s or 0.0)  # watchdog_s is half systemd's interval
        if self.liveness.stalled_for() < limit:
            self.notifier.watchdog()

    def _reached_max_steps(self) -> bool:
        return self.options.max_steps is not None and self.state.step >= self.options.max_steps

    def _claim_wait(self) -> float:
        # While a round is in flight its weights may land any moment: a long-poll must not hold them up.
        wait = self.options.claim_wait_s
        return wait if self.merger.in_flight is None else min(0.5, wait)

    def _take(self, prefetch: Prefetcher) -> Ready | None:
        with self.profile.timed("wait_s"):
            ready = prefetch.take(timeout=self._claim_wait())
        self._idle = ready is None
        if ready is None:
            claim = prefetch.last
            if claim.run_state == "finished":
                self.finished = True
            elif claim.item is None:
                self._show(state=waiting(claim.wait))
        return ready

    def _process(self, ready: Ready) -> None:
        """Run one item and queue its result; what another contributor sent is reported, never fatal."""
        item = ready.item
        key = item.forward_id or item.work_id
        try:
            if ready.error is not None:
                raise ready.error
            with self.profile.timed("compute_s"):
                if item.kind == "forward":
                    payload, loss = self._forward(item, key, ready.inputs)
                else:
                    payload, loss = self._backward(key, ready.inputs)
            self.sender.send(item, key, payload, loss, self.state.epoch)
        except Stopped:
            self._abandon(item, key, Abandon(reason="stopping"))
            raise
        except (IntegrityError, StageInputError, UnknownWorkId) as e:
            self._abandon(item, key, give_back(item.work_id, e))
            return
        except ApiError as e:  # its input went: the item was dropped while it was claimed ahead
            if not dropped(item, e):
                raise
            self._forget(key)
        self._show(state="training")

    def _collect(self, sent: list[Sent]) -> None:
        """Credit what the orchestrator accepted; a result it no longer wants (409/404) is dropped."""
        for s in sent:
            if isinstance(s.error, Stopped):
                self._abandon(s.item, s.key, Abandon(reason="stopping"))
                continue
            if dropped(s.item, s.error):
                self._forget(s.key)
                continue
            if s.error is not None:
                raise s.error
            assert s.reply is not None
            if s.reply.audit is not None:  # the weights the item ran on: held if a step came since
                self.api.send_weights(s.item.work_id, s.reply.audit, s.held or self.backend.weights())
            self.state = replace(self.state, credits_seen=s.reply.total_credits)
            self.session.credited(s.reply.credits)
            if s.item.kind == "backward" or self.spec.kind == "tail":
                bp = self.state.backward_passes + 1
                self.state, self._since_step = replace(self.state, backward_passes=bp), self._since_step + 1

    def _before_weights_change(self) -> None:
        self._collect(self.sender.hold(self.backend.weights, self.merger.layout.size * 4))

    def _forward(
        self, item: WorkItem, key: str, fetched: dict[str, RawTensor]
    ) -> tuple[TensorDict | None, float | None]:
        kind = self.spec.kind
        if kind == "head":
            inputs = {"tokens": column_slice(fetched["tokens"], 0, -1)}
        else:
            inputs = {"activations": fetched["activations"]}
        out = self.backend.forward(key, inputs)
        self.saved.add(key, item.sample_id)
        b, t = inputs["tokens" if kind == "head" else "activations"].shape[:2]
        self.state = replace(self.state, tokens=self.state.tokens + b * t)
        if kind != "tail":
            return out, None
        targets = column_slice(fetched["tokens"], 1, None)
        result = self.backend.backward(key, {"targets": targets})
        self.saved.used(key)
        self._loss = result.loss
        return result.grads, result.loss

    def _backward(self, key: str, fetched: dict[str, RawTensor]) -> tuple[TensorDict | None, None]:
        result = self.backend.backward(key, {"grad": fetched["grad"]})
        self.saved.used(key)
        return result.grads, None

    def _step(self) -> None:
        """An optimizer step once the orchestrator accepted backward_per_step backward passes: steps
        follow counted work (a validator bounds a snapshot by it), not work merely computed."""
        k = self.manifest.train.backward_per_step
        if self._since_step < k:
            return
        with self.profile.timed("step_s"):  # the weights held for results in flight, a checkpoint's copy
            self._before_weights_change()
            self.backend.step()
            self._since_step -= k
            self.state = replace(self.state, step=self.state.step + 1, since_merge=self.state.since_merge + 1)
            if self.state.step - self._paced_from == self.manifest.merge.interval:
                self.beats.wake()  # a round is due: say so now, not up to heartbeat_s later
            if self.checkpointer.due():
                self.checkpointer.submit(self.state, self.backend.weights(), self.backend.optimizer_state())

    def _forget(self, key: str) -> None:
        self.saved.forget(key)

    def _abandon(self, item: WorkItem, key: str, why: Abandon) -> None:
        self._forget(key)
        try:
            self.api.abandon(item.work_id, why)
        except ClientError as e:
            log.info("could not give back %s: %s", item.work_id, e)

    # --- heartbeats, merged weights and merge rounds ---------------------------------------------------

    def _beat(self) -> Heartbeat:
        return Heartbeat(
            run_id=self.state.run_id,
            stage=self.spec.index,
            step=self.state.step,
            epoch=self.state.epoch,
            tokens_per_s=self.progress.facts.tokens_per_s or 0.0,
        )

    def _apply_news(self) -> None:
        if self._since_step == 0 or self._idle:  # merged weights land between optimizer steps
            self._land()
        news = self.beats.take()
        if news is None:
            return
        self.saved.drop(news.drop)
        offer = news.merge
        # The round in flight brings exactly epoch + 1; anything newer, or no round, is a catch-up.
        if news.epoch > self.state.epoch and self.merger.in_flight != news.epoch - 1:
            self._catch_up(news)
        elif offer is not None and offer.phase == "contribute" and offer.epoch == self.state.epoch:
            self._show(state=f"merging (epoch {offer.epoch})")
            self._collect(self.sender.drain())  # contribute every step of the work accepted so far
            self._step()
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
        self._before_weights_change()
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
            self._before_weights_change()
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
        self.checkpointer.submit(self.state, self.backend.weights(), self.backend.optimizer_state())
        if self.state.step - self._paced_from >= self.manifest.merge.interval:
            self.beats.wake()  # the next round came due while this one was in flight

    def _published(self, ref: BlobRef) -> TensorDict:
        return published_weights(self.api, self.cache_dir, self.state.run_id, self.spec.index, ref)

    # --- state, display and shutdown -----------------------------------------------------------------

    def checkpoint(self) -> Path:
        """Write a checkpoint now and wait for it (every write goes through the one checkpointer)."""
        return self.checkpointer.save_now(self.state, self.backend.weights(), self.backend.optimizer_state())

    def _wind_down(self, prefetch: Prefetcher | None) -> None:
        """Give back what was claimed ahead; collect what is being sent (a stop abandons the rest)."""
        if prefetch is not None:
            for item in prefetch.close():
                self._abandon(item, item.forward_id or item.work_id, Abandon(reason="stopping"))
        try:
            self._collect(self.sender.drain())
        except ClientError as e:
            log.info("could not send the last results: %s", e)
        self.sender.close()
        cpu = {"merge_cpu_s": self.merger.cpu_s, "checkpoint_cpu_s": self.checkpointer.total_write_cpu_s}
        log.info("profile: %s", json.dumps(self.profile.final(self.state.tokens, **cpu)))

    def _shutdown(self) -> None:
        if not self.reassign:  # moving to another stage is not stopping
            self.notifier.stopping("checkpointing")
        if self.stop.is_set():
            self.progress.interrupted()  # a Ctrl-C echoed '^C' after the bar
        self._show(state="checkpointing")
        self.saved.clear()
        try:
            self.checkpoint()
        except Exception:  # the previous checkpoint is intact; say so and carry on leaving
            log.exception("final checkpoint failed; the previous one stays valid")
        self.checkpointer.close()
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
        self.liveness.touch()  # a pipeline thread between retries is waiting, not hung
        if threading.get_ident() == self._loop_thread:  # a hung loop must stop the pings
            self._ping()
        self._show(state=message)
