"""What each worker was last told when it asked for work: the dashboard's "waiting, and why".

The reason a claim got nothing is worked out for its 204 (waits.py, the X-Iota-Wait header) and not
stored; the metrics middleware (metrics.py) notes it here as the answer goes out, keyed by the token's
sha256 (the key State.token_cache maps to a contributor), and forgets it when a claim brings work. Memory
only: a restarted orchestrator knows again after each worker's next claim.

    seen = Activity()
    seen.claimed(digest, "stage 1 has no worker", now)   # a 204
    seen.claimed(digest, None, now)                      # work came
    seen.waiting({digest: "c-1"}, now)                   # {"c-1": ("stage 1 has no worker", since)}
"""

from __future__ import annotations

import threading

FORGET_S = 600.0  # a reason older than this belongs to a worker that is gone anyway
MAX_KEYS = 100_000  # bounded however many tokens come and go


class Activity:
    def __init__(self) -> None:
        self._why: dict[str, tuple[str, float, float]] = {}  # token digest -> (reason, since, last told)
        self._lock = threading.Lock()

    def claimed(self, digest: str, why: str | None, now: float) -> None:
        """A claim was answered: with no work for `why` (a 204), or with an item (why None)."""
        with self._lock:
            if why is None:
                self._why.pop(digest, None)
                return
            old = self._why.get(digest)
            since = old[1] if old is not None and old[0] == why else now  # how long this cause has held
            if len(self._why) >= MAX_KEYS and digest not in self._why:
                self._forget(now)
            self._why[digest] = (why, since, now)

    def _forget(self, now: float) -> None:
        stale = [k for k, (_, _, t) in self._why.items() if now - t > FORGET_S]
        for k in stale or list(self._why)[: MAX_KEYS // 10]:
            del self._why[k]

    def waiting(self, contributors: dict[str, str], now: float) -> dict[str, tuple[str, float]]:
        """contributor id -> (reason, since) for the token digests given (digest -> contributor id)."""
        with self._lock:
            items = list(self._why.items())
        return {
            contributors[d]: (why, since)
            for d, (why, since, last) in items
            if d in contributors and now - last <= FORGET_S
        }
