"""A replica's side of a merge round: butterfly all-reduce of pseudo-gradients, then the overlap.

The Worker's loop thread owns the backend and drives a Merger with three calls:
    begin(offer, weights, step)   a heartbeat offered a round: the weights become the snapshot, and the
                                  round runs on its own thread while training goes on
    take()                        at a step boundary: the round that finished, if any; the loop loads
                                  core.outer.overlap(current, snapshot, merged) and calls rebase()
    rebase(base, epoch)           the replica now holds the published weights of epoch (merged, or a catch-up)
The round's thread never touches the backend. It uploads u = wire_round(base - snapshot), reports it,
long-polls the plan, reduces the partitions this replica owns (the other replicas' slices read with
sha256-verified HTTP Range requests, its own from memory, the outer momentum from its cache of what it
computed last round when the slice's sha256 matches), and once the round is closed assembles the
published weights, downloading only the partitions it did not compute itself. A round that is gone, or
that fails here, is dropped: the loop then syncs to the current weights.

Each round logs "merge round E: sent X, received Y" (bytes of blobs; RoundStats keeps the figures).
Try it: `pytest tests/test_replica_merge.py` merges replicas against an in-process orchestrator.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from iota_cli.core import outer
from iota_cli.core.flat import FlatLayout, WireDtype, from_wire, part_blob, to_wire, update_blob, wire_round
from iota_cli.core.manifest import RunManifest
from iota_cli.core.protocol import (
    BlobRef,
    MergeComplete,
    MergePart,
    MergePartDone,
    MergePlan,
    MergeRound,
    MergeSlice,
)
from iota_cli.core.tensors import TensorDict, decode
from iota_cli.train.api import SwarmApi
from iota_cli.train.errors import ApiError, ClientError, IntegrityError, Stopped

log = logging.getLogger("iota.merge")

PLAN_WAIT_S = 5.0  # one long-poll of the plan; also how long a stop or an abandoned round takes to be seen
_MIN_POLL_S = 0.5  # a plan answered at once with nothing new is asked again after this, not in a spin
MomentumKey = tuple[int, int, str]  # (start, stop, sha256 of the slice's wire bytes)


@dataclass(frozen=True)
class Landed:
    """A finished round of epoch E: the published weights of E + 1 (None: dropped) and the snapshot."""

    epoch: int
    step: int  # the local step of the snapshot
    snapshot: np.ndarray
    merged: np.ndarray | None


@dataclass
class RoundStats:
    """What one round cost this replica (bytes of blobs, both ways) and how it ended."""

    epoch: int
    step: int  # the local step of the snapshot
    sent: int = 0
    received: int = 0
    reduced: int = 0  # partitions this replica computed
    outcome: str = "running"  # merged, or dropped: why
    cpu_s: float = 0.0  # the round thread's CPU-seconds (encode, hashes, reduce), beside the loop's


@dataclass(frozen=True)
class _Round:
    offer: MergeRound
    base: np.ndarray  # epoch-E weights, flat f32
    snapshot: np.ndarray
    update: np.ndarray  # wire_round(base - snapshot): exactly what was uploaded, decoded
    stats: RoundStats


class Merger:
    """The merge rounds of one stage replica; begin/take/rebase from the loop thread only."""

    def __init__(
        self, api: SwarmApi, run_id: str, stage: int, manifest: RunManifest, base: TensorDict, epoch: int
    ) -> None:
        """base: the published weights of epoch, the one the replica holds (its updates count from them)."""
        self.api, self.run_id, self.stage, self.cfg = api, run_id, stage, manifest.merge
        self.layout = FlatLayout.of(manifest.model, stage)
        self.base, self.epoch = self.layout.flatten(base), epoch
        self.rounds: list[RoundStats] = []
        self._momenta: dict[MomentumKey, np.ndarray] = {}  # what this replica computed last round
        self._thread: threading.Thread | None = None
        self._round: _Round | None = None
        self._landed: Landed | None = None
        self._lock = threading.Lock()
        self._abandon = threading.Event()

    # --- the loop thread's side ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int | None:
        """The epoch of the round this replica is in (running, or finished but not yet taken)."""
        with self._lock:
            return self._round.offer.epoch if self._round is not None else None

    @property
    def cpu_s(self) -> float:
        """CPU-seconds the round threads have spent so far."""
        return sum(r.cpu_s for r in self.rounds)

    def begin(self, offer: MergeRound, weights: TensorDict, step: int) -> bool:
        """Contribute to offer's round with these weights (taken now: the snapshot), in the background;
        False when this replica is in a round already (the offer repeats until its update is in)."""
        if self.in_flight is not None or offer.upload is None or offer.epoch != self.epoch:
            return False
        snapshot = self.layout.flatten(weights)
        update = wire_round(self.base - snapshot, self.cfg.wire_dtype)
        rnd = _Round(offer, self.base, snapshot, update, RoundStats(offer.epoch, step))
        with self._lock:
            self._round, self._landed = rnd, None
        self.rounds.append(rnd.stats)
        self._abandon.clear()
        self._thread = threading.Thread(target=self._run, args=(rnd,), name="iota-merge", daemon=True)
        self._thread.start()
        return True

    def take(self) -> Landed | None:
        """The finished round, once (merged None when it was dropped)."""
        with self._lock:
            landed, self._landed = self._landed, None
            if landed is not None:
                self._round = None
            return landed

    def rebase(self, base: np.ndarray, epoch: int) -> None:
        """This replica now holds the published weights of epoch; a round for an older epoch is dropped."""
        self.base, self.epoch = base, epoch
        with self._lock:
            if self._round is not None and self._round.offer.epoch < epoch:
                self._abandon.set()
                if self._landed is not None:
                    self._round = self._landed = None

    def close(self, timeout: float = 2.0) -> None:
        """Drop a round in flight and wait briefly for its thread (a daemon: it never holds up an exit)."""
        self._abandon.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the round's thread ----------------------------------------------------------------------------

    def _run(self, rnd: _Round) -> None:
        merged: np.ndarray | None = None
        cpu = time.thread_time()
        try:
            merged = self._merge(rnd)
        except Stopped:
            rnd.stats.outcome = "dropped: stopping"
        except (ClientError, ValueError) as e:
            rnd.stats.outcome = f"dropped: {e}"
        except Exception as e:  # a bug here must not end training: the loop syncs to the current weights
            log.exception("merge round %d failed", rnd.offer.epoch)
            rnd.stats.outcome = f"dropped: {type(e).__name__}"
        s = rnd.stats
        s.cpu_s = time.thread_time() - cpu
        log.info(
            "merge round %d: sent %d, received %d (bytes; step %d, %d parts reduced, %s)",
            s.epoch, s.sent, s.received, s.step, s.reduced, s.outcome,
        )  # fmt: skip
        with self._lock:
            if self._round is rnd:
                self._landed = Landed(rnd.offer.epoch, rnd.stats.step, rnd.snapshot, merged)

    def _merge(self, rnd: _Round) -> np.ndarray | None:
        """Contribute, reduce what this replica owns, then the published weights of E + 1 (None: dropped)."""
        assert rnd.offer.upload is not None
        epoch, dtype = rnd.offer.epoch, self.cfg.wire_dtype
        blob = update_blob(rnd.update, dtype)
        sha = self.api.upload(rnd.offer.upload, blob)
        rnd.stats.sent += len(blob)
        report = MergeComplete(
            run_id=self.run_id, stage=self.stage, epoch=epoch, sha256=sha, size=len(blob), step=rnd.stats.step
        )
        try:
            self.api.contribute(report)
        except ApiError as e:
            if e.status not in (404, 409, 422):
                raise
            rnd.stats.outcome = f"dropped: not taken ({e.status}: {e.detail})"
            return None
        mine: dict[int, np.ndarray] = {}  # partitions this replica computed -> their weights
        momenta: dict[MomentumKey, np.ndarray] = {}
        while not self._abandon.is_set():
            asked = time.monotonic()
            plan = self.api.merge_plan(self.run_id, self.stage, epoch, PLAN_WAIT_S)
            if plan.state == "gone":
                rnd.stats.outcome = "dropped: the round is gone"
                return None
            if plan.state == "closed":
                self._momenta = momenta
                merged = self._assemble(rnd, plan, mine)
                rnd.stats.outcome = "merged"
                return merged
            todo = [p for p in plan.parts if p.owned and p.upload is not None and p.part not in mine]
            # Every owned partition is computed and uploaded before any is reported: reporting may
            # close the round, and this replica's reads of the others' updates come first.
            reports = []
            for part in todo if plan.state == "reducing" else []:
                weights, done = self._reduce(rnd, plan, part, momenta)
                mine[part.part] = weights
                reports += [done] if done is not None else []
            for done in reports:
                self._report(done)
            if not todo and time.monotonic() - asked < _MIN_POLL_S:
                self._abandon.wait(_MIN_POLL_S)
        rnd.stats.outcome = "dropped: superseded"
        return None

    def _reduce(
        self, rnd: _Round, plan: MergePlan, part: MergePart, momenta: dict[MomentumKey, np.ndarray]
    ) -> tuple[np.ndarray, MergePartDone | None]:
        """Compute and upload one owned partition: its weights and report (empty, None: inputs unusable)."""
        start, stop, dtype = part.start, part.stop, self.cfg.wire_dtype
        try:
            updates = [
                rnd.update[start:stop]
                if i == part.mine
                else self._vector(rnd, src_slice, stop - start, dtype)
                for i, src_slice in enumerate(part.sources)
            ]
            momentum = self._momentum(rnd, part)
        except (IntegrityError, ValueError) as e:
            # Someone else's bytes are bad: leave this partition to the other owner or the orchestrator.
            log.warning("merge round %d: leaving partition %d: %s", plan.epoch, part.part, e)
            return np.empty(0, np.float32), None
        except ApiError as e:  # gone meanwhile: the round closed (the other owner was quicker) or moved on
            log.info("merge round %d: leaving partition %d: %s", plan.epoch, part.part, e)
            return np.empty(0, np.float32), None
        base = rnd.base[start:stop]
        weights, new_momentum = outer.reduce_partition(
            self.cfg, base, updates, part.weights, momentum, plan.round_index, part.scales
        )
        blob = part_blob(weights, new_momentum, dtype)
        assert part.upload is not None
        sha = self.api.upload(part.upload, blob)
        rnd.stats.sent += len(blob)
        rnd.stats.reduced += 1
        if new_momentum is not None:
            momenta[(start, stop, _sha(to_wire(new_momentum, dtype)))] = new_momentum
        done = MergePartDone(
            run_id=self.run_id, stage=self.stage, epoch=plan.epoch, part=part.part, sha256=sha, size=len(blob)
        )
        return weights, done

    def _report(self, done: MergePartDone) -> None:
        try:
            reply = self.api.merge_part(done)
        except ApiError as e:
            if e.status not in (403, 404, 409, 422):
                raise
            log.info("merge round %d: partition %d not taken: %s", done.epoch, done.part, e)
        else:
            if not reply.accepted:
                log.info("merge round %d: partition %d: another owner's result won", done.epoch, done.part)

    def _momentum(self, rnd: _Round, part: MergePart) -> np.ndarray | None:
        if part.momentum is None:
            return None
        key = (part.start, part.stop, part.momentum.sha256)
        if key in self._momenta:
            return self._momenta[key]
        return self._vector(rnd, part.momentum, part.stop - part.start, self.cfg.wire_dtype)

    def _vector(self, rnd: _Round, piece: MergeSlice, n: int, dtype: WireDtype) -> np.ndarray:
        """A verified slice decoded from dtype; ValueError unless it is n finite values."""
        data = self.api.read_slice(piece)
        rnd.stats.received += len(data)
        vec = from_wire(data, dtype)
        if vec.size != n:
            raise ValueError(f"a slice of {vec.size} values where the partition has {n}")
        if not np.isfinite(vec).all():
            raise ValueError("a slice holds NaN or infinity")
        return vec

    def _assemble(self, rnd: _Round, plan: MergePlan, mine: dict[int, np.ndarray]) -> np.ndarray:
        """The published weights of E + 1: partitions computed here when they match, the rest by Range."""
        merged = np.empty(self.layout.size, dtype=np.float32)
        covered = 0
        for part in plan.parts:
            res, own = part.result, mine.get(part.part)
            if res is None:
                return self._whole(rnd, plan.weights)
            n = part.stop - part.start
            if own is not None and own.size == n and _sha(to_wire(own, "F32")) == res.sha256:
                merged[part.start : part.stop] = own
            else:
                try:
                    merged[part.start : part.stop] = self._vector(rnd, res, n, "F32")
                except (IntegrityError, ValueError) as e:
                    log.warning(
                        "merge round %d: partition %d unreadable (%s); fetching all", plan.epoch, part.part, e
                    )
                    return self._whole(rnd, plan.weights)
            covered += n
        if covered != self.layout.size:
            return self._whole(rnd, plan.weights)
        return merged

    def _whole(self, rnd: _Round, ref: BlobRef | None) -> np.ndarray:
        """The published weights as one verified download (when the parts do not add up)."""
        if ref is None:
            raise ValueError("the closed round names neither part results nor weights")
        data = self.api.client.read_range(ref.url, 0, ref.size, ref.sha256)
        rnd.stats.received += len(data)
        return self.layout.flatten(decode(data)[0])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
