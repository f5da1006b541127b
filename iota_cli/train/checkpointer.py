"""Checkpoints that do not stall training: snapshot on the training thread, write on a background one.

The training thread hands over what the backend returned (`backend.weights()`, `optimizer_state()`);
one writer thread packs and writes it with CheckpointStore.save (temp, fsync, rename, keep two), so a
kill -9 at any moment leaves the previous complete checkpoint, never a half one. While a write runs, a
newer snapshot waits in a single slot and replaces any older one waiting there (newest wins, never a
queue). The interval between checkpoints is sized by the measured write time: at least
`last_write_s / budget`, so writing takes at most `budget` (3%) of wall time, and never under
`min_interval_s`, so at most about one interval (plus one write) of work is lost to a kill -9.

    checkpointer = Checkpointer(store, min_interval_s=2.0)
    if checkpointer.due():                        # on the training thread, after an optimizer step
        checkpointer.submit(state, backend.weights(), backend.optimizer_state())
    checkpointer.save_now(state, weights, opt)    # at shutdown: waits for the write in flight, then writes
    checkpointer.close()

Try it:
    python -c "from pathlib import Path; from iota_cli.train.checkpointer import *; \
from iota_cli.train.checkpoint import *; c = Checkpointer(CheckpointStore(Path('/tmp/ck'))); \
c.submit(LoopState('r', 'c', 0, step=1), {}, {}); print(c.flush(), c.last_write_s)"
Tests: .venv/bin/python -m pytest tests/test_checkpointer.py
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from iota_cli.core.tensors import RawTensor, TensorDict
from iota_cli.train.checkpoint import CheckpointStore, LoopState

log = logging.getLogger("iota.checkpoint")


@dataclass(frozen=True)
class _Snapshot:
    seq: int  # submission order: flush() knows whether the newest submission is on disk
    state: LoopState
    weights: TensorDict
    optimizer: TensorDict


def freeze(tensors: Mapping[str, RawTensor]) -> TensorDict:
    """A copy of the dict whose tensors hold immutable bytes, safe to write while training goes on.

    The backends' weights() and optimizer_state() already return fresh `bytes` (torch: .numpy().tobytes(),
    MLX: np.asarray().tobytes()), so this normally copies no tensor data; only a tensor over a mutable
    buffer (a bytearray or memoryview some other backend might hand out) is copied here.
    """
    out: TensorDict = {}
    for name, t in tensors.items():
        out[name] = t if type(t.data) is bytes else RawTensor(t.dtype, t.shape, bytes(t.data))
    return out


class Checkpointer:
    """Background checkpoint writes into a CheckpointStore; one write at a time, the newest snapshot wins.

    Not a queue: submit() never blocks on the disk, and at most one snapshot waits while a write runs.
    Every store write (background or save_now) goes through here, so two never run at once; nothing else
    should call store.save() while a Checkpointer is in use. The store itself is not closed by close().
    """

    def __init__(self, store: CheckpointStore, min_interval_s: float = 2.0, budget: float = 0.03) -> None:
        if not 0.0 < budget <= 1.0:
            raise ValueError("budget is a fraction of wall time, in (0, 1]")
        if min_interval_s < 0:
            raise ValueError("min_interval_s must not be negative")
        self.store, self.min_interval_s, self.budget = store, float(min_interval_s), float(budget)
        self._cond = threading.Condition()
        self._pending: _Snapshot | None = None
        self._writing_since: float | None = None  # monotonic start of the write in progress, if any
        self._closed = False
        self._thread: threading.Thread | None = None
        # The clock starts now, as the loop's did: the first checkpoint is one interval into the work.
        self._requested = time.monotonic()
        self._submitted = 0  # seq of the newest snapshot handed over (submit or save_now)
        self._finished = 0  # seq of the newest snapshot whose write ended (well or not)
        self._finished_ok = False
        self.last_write_s = 0.0  # duration of the last write (pack, sha256, write, fsync, rename)
        self.total_write_s = 0.0  # all writes together: over wall time, what checkpoints cost
        self.total_write_cpu_s = 0.0  # their CPU-seconds (on shared cores, wall time includes waiting)
        self.writes = 0  # writes that succeeded
        self.failures = 0  # writes that raised (logged; the previous checkpoint stays valid)
        self.dropped = 0  # snapshots replaced by a newer one before they were written
        self.last_path: Path | None = None  # the newest checkpoint written through here

    # --- the training thread's side ------------------------------------------------------------------

    @property
    def interval_s(self) -> float:
        """The current checkpoint interval: the write-time budget, never under min_interval_s."""
        slowest = self.last_write_s
        with self._cond:
            if self._writing_since is not None:  # a write taking long already counts, before it ends
                slowest = max(slowest, time.monotonic() - self._writing_since)
        return max(self.min_interval_s, slowest / self.budget)

    def due(self) -> bool:
        """Whether a checkpoint should be taken now (an interval since the last one was requested)."""
        return time.monotonic() - self._requested >= self.interval_s

    @property
    def writing(self) -> bool:
        """A write is running now (in the background, or save_now's)."""
        with self._cond:
            return self._writing_since is not None

    @property
    def busy(self) -> bool:
        """A write is running or a snapshot waits for one."""
        with self._cond:
            return self._writing_since is not None or self._pending is not None

    def submit(
        self, state: LoopState, weights: Mapping[str, RawTensor], optimizer_state: Mapping[str, RawTensor]
    ) -> None:
        """Hand a snapshot to the writer thread and return at once; it replaces any snapshot still waiting."""
        snap = self._snapshot(state, weights, optimizer_state)  # outside the lock: it may copy
        with self._cond:
            if self._closed:
                raise RuntimeError("the checkpointer is closed")
            if self._pending is not None:
                self.dropped += 1
            self._pending = snap
            self._start_thread()
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> Path | None:
        """Wait for the waiting snapshot and the write in flight to end.

        Returns the newest submission's checkpoint path once it is on disk; None if the timeout passed
        first, or if that write failed (it was logged, and the previous checkpoint is still there).
        """
        with self._cond:
            if not self._cond.wait_for(self._idle, timeout):
                return None
            ok = self._finished == self._submitted and self._finished_ok
            return self.last_path if ok else None

    def save_now(
        self, state: LoopState, weights: Mapping[str, RawTensor], optimizer_state: Mapping[str, RawTensor]
    ) -> Path:
        """Write synchronously (shutdown, a rebase): wait for the write in flight, then write this one.

        A snapshot still waiting is dropped, as this one is newer. Raises what the store raises.
        """
        snap = self._snapshot(state, weights, optimizer_state)
        with self._cond:
            if self._pending is not None:
                self._pending = None
                self.dropped += 1
            self._cond.wait_for(lambda: self._writing_since is None)
            self._writing_since = time.monotonic()  # holds the writer thread off until this one is done
        return self._write(snap)

    def close(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then stop the writer thread. The store stays open (its owner's)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # --- the writer ----------------------------------------------------------------------------------

    def _snapshot(
        self, state: LoopState, weights: Mapping[str, RawTensor], optimizer_state: Mapping[str, RawTensor]
    ) -> _Snapshot:
        frozen_w, frozen_opt = freeze(weights), freeze(optimizer_state)
        with self._cond:
            self._requested = time.monotonic()
            self._submitted += 1
            return _Snapshot(self._submitted, state, frozen_w, frozen_opt)

    def _idle(self) -> bool:
        return self._pending is None and self._writing_since is None

    def _start_thread(self) -> None:
        # Started on the first submit, not in __init__: a worker that never checkpoints runs no thread.
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="iota-checkpoint", daemon=True)
            self._thread.start()
        # A daemon: an exit that skips close() must not hang on a write. Killing one mid-write is safe,
        # the store's rename is atomic and the next writer sweeps the temp file.

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._writing_since is None and (self._pending is not None or self._closed)
                )
                snap, self._pending = self._pending, None
                if snap is None:  # closed, and everything submitted is written
                    return
                self._writing_since = time.monotonic()
            with contextlib.suppress(Exception):  # logged in _write; the thread lives on
                self._write(snap, background=True)

    def _write(self, snap: _Snapshot, background: bool = False) -> Path:
        """One store write, timed; the caller has set _writing_since, so it is the only one running."""
        start, cpu = time.monotonic(), time.thread_time()
        path: Path | None = None
        try:
            path = self.store.save(snap.state, snap.weights, snap.optimizer)
            return path
        except Exception:
            if background:  # logged before flush() wakes; the next snapshot may succeed (disk freed, say)
                log.exception("checkpoint of step %d failed; the previous one stays valid", snap.state.step)
            raise  # save_now's caller decides (the worker logs it and leaves)
        finally:
            elapsed = time.monotonic() - start
            with self._cond:
                self.last_write_s = elapsed
                self.total_write_s += elapsed
                self.total_write_cpu_s += time.thread_time() - cpu
                self._writing_since = None
                if snap.seq > self._finished:
                    self._finished, self._finished_ok = snap.seq, path is not None
                if path is not None:
                    self.writes += 1
                    self.last_path = path
                else:
                    self.failures += 1
                self._cond.notify_all()
            log.debug(
                "checkpoint of step %d: %.3f s, interval now %.1f s",
                snap.state.step,
                elapsed,
                self.interval_s,
            )
