"""A run's curves for the dashboard: training loss over tokens and tokens/s over time, kept small.

Both come from the tail's loss rows (db.losses): each row is one sample through the whole pipeline, so
the n-th row means n * tokens_per_sample tokens trained, at its time t. Nothing new is stored: a Series
reads only the rows added since its last look (at most CHUNK a time, so an orchestrator restarted on a
long run catches up over a few polls instead of holding the lock for one long scan) and folds them into
at most MAX_POINTS buckets; when the buckets run out, neighbours merge and the bucket width doubles.

    s = Series(tokens_per_sample=512, t0=run.created)
    s.read(conn, run_id)          # inside a transaction; cheap once caught up
    s.loss_points()               # [[tokens, mean loss], ...]
    s.rate_points(now)            # [[seconds since t0, tokens/s over the last SMOOTH_S], ...]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sqlalchemy import Connection, bindparam, select

from iota_orchestrator import db

MAX_POINTS = 240
SMOOTH_S = 10.0  # tokens/s is a mean over this long
CHUNK = 5000
L = db.losses
_NEW = (
    select(L.c.id, L.c.loss, L.c.t)
    .where(L.c.run_id == bindparam("run"), L.c.id > bindparam("after"))
    .order_by(L.c.id)
    .limit(CHUNK)
)


@dataclass
class Series:
    tokens_per_sample: int
    t0: float  # the run's start: the time axis counts seconds from here
    last_id: int = 0
    samples: int = 0  # loss rows folded in
    last_t: float | None = None
    loss_width: int = 1  # samples per loss bucket
    loss_sums: list[float] = field(default_factory=list)
    loss_counts: list[int] = field(default_factory=list)
    time_width: float = 1.0  # seconds per time bucket
    time_counts: list[int] = field(default_factory=list)  # samples finished in each

    def read(self, conn: Connection, run_id: str) -> bool:
        """Fold in the rows added since the last read; True when all of them are in (caught up)."""
        rows = conn.execute(_NEW, {"run": run_id, "after": self.last_id}).all()
        for row_id, loss, t in rows:
            self.add(float(loss), float(t))
            self.last_id = row_id
        return len(rows) < CHUNK

    def add(self, loss: float, t: float) -> None:
        """One sample through the tail: its loss and when it was accepted."""
        if math.isfinite(loss):
            i = self.samples // self.loss_width
            while i >= MAX_POINTS:
                self.loss_sums, self.loss_counts = _halve(self.loss_sums), _halve(self.loss_counts)
                self.loss_width *= 2
                i = self.samples // self.loss_width
            while len(self.loss_sums) <= i:
                self.loss_sums.append(0.0)
                self.loss_counts.append(0)
            self.loss_sums[i] += loss
            self.loss_counts[i] += 1
        self.samples += 1
        self.last_t = t if self.last_t is None else max(self.last_t, t)
        j = self._time_bucket(t)
        while len(self.time_counts) <= j:
            self.time_counts.append(0)
        self.time_counts[j] += 1

    def _time_bucket(self, t: float) -> int:
        j = max(0, int((t - self.t0) // self.time_width))
        while j >= MAX_POINTS:
            self.time_counts = _halve(self.time_counts)
            self.time_width *= 2
            j = max(0, int((t - self.t0) // self.time_width))
        return j

    def loss_points(self) -> list[list[float]]:
        """[tokens at the bucket's last sample, mean loss of its samples] per bucket with a loss."""
        out = []
        for i, (s, n) in enumerate(zip(self.loss_sums, self.loss_counts, strict=True)):
            if n:
                end = min(self.samples, (i + 1) * self.loss_width)
                out.append([end * self.tokens_per_sample, round(s / n, 5)])
        return out

    def rate_points(self, now: float, smooth_s: float = SMOOTH_S) -> list[list[float]]:
        """[seconds from t0 to the bucket's end, tokens/s over the smooth_s before it] per bucket.

        Samples reach the tail in bursts (a pipeline fills, drains, merges), so a bucket alone is spiky;
        the mean over the last smooth_s (at least one bucket) reads as the rate. The buckets run up to
        now, the newest counting up to now only, so a swarm that stalls shows its rate falling to 0."""
        if now < self.t0:
            return []
        w = self.time_width
        last = min(int((now - self.t0) // w), MAX_POINTS - 1)
        counts = self.time_counts[: last + 1] + [0] * max(0, last + 1 - len(self.time_counts))
        k = max(1, round(smooth_s / w))
        out, window = [], 0
        for j, n in enumerate(counts):
            window += n - (counts[j - k] if j >= k else 0)
            end = min((j + 1) * w, now - self.t0)
            span = end - max(0, j - k + 1) * w
            if span > 0:
                out.append([round(end, 2), round(window * self.tokens_per_sample / span, 2)])
        return out

    def recent_rate(self, now: float, window_s: float) -> float:
        """Tokens/s over about the last window_s seconds (whole buckets: at least one bucket's width)."""
        span = now - self.t0
        if span <= 0:
            return 0.0
        first = max(0, int((span - window_s) // self.time_width))
        n = sum(self.time_counts[first:])
        return n * self.tokens_per_sample / max(span - first * self.time_width, 1e-9)

    def tokens_at(self, t: float) -> int:
        """About how many tokens the run had trained at time t (to place a held-out loss on the curve)."""
        j = int((t - self.t0) // self.time_width)
        if j < 0:
            return 0
        done = sum(self.time_counts[: j + 1])
        return min(done, self.samples) * self.tokens_per_sample


def _halve(values: list) -> list:
    """Merge neighbouring buckets: [a, b, c, d, e] -> [a+b, c+d, e]."""
    return [sum(values[i : i + 2]) for i in range(0, len(values), 2)]
