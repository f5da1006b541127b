"""The forwards a worker keeps for a backward still to come, and when to let them go.

A non-tail stage's backend saves what a forward needs for its backward, under the item's key. The
backward may never come: the chain broke downstream (the orchestrator reports the sample dropped) or
it simply never arrives (expired after twice the item timeout). This owns that bookkeeping; the backend
owns the tensors and frees them when told.

    python -c "from iota_cli.train.saved import *; s = SavedForwards(print, 60.0); s.add('k', 1); \
s.drop({1}); print(len(s))"
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable


class SavedForwards:
    """Keys the backend holds forward state under, with when each forward ran and its sample."""

    def __init__(self, free: Callable[[str], None], horizon_s: float) -> None:
        self._free, self.horizon_s = free, horizon_s
        self._saved: dict[str, tuple[float, int]] = {}

    def __len__(self) -> int:
        return len(self._saved)

    def add(self, key: str, sample_id: int) -> None:
        self.expire()  # before the backend saves another: the ones never coming back go first
        self._saved[key] = (time.monotonic(), sample_id)

    def used(self, key: str) -> None:
        """Its backward ran (the backend dropped the state itself)."""
        self._saved.pop(key, None)

    def forget(self, key: str) -> None:
        self._free(key)
        self._saved.pop(key, None)

    def drop(self, samples: Iterable[int]) -> None:
        """Free the forwards of samples whose chains were dropped."""
        dropped = set(samples)
        self._forget_all([k for k, (_, sample) in self._saved.items() if sample in dropped])

    def expire(self) -> None:
        horizon = time.monotonic() - self.horizon_s
        self._forget_all([k for k, (t, _) in self._saved.items() if t < horizon])

    def clear(self) -> None:
        self._forget_all(list(self._saved))

    def _forget_all(self, keys: list[str]) -> None:
        for key in keys:
            self.forget(key)
