"""How far an honest replica's merge update can reach: a per-coordinate bound derived from AdamW.

A replica's update is base_E - local after n local AdamW steps (torch's AdamW, as every backend runs it):

    w <- w * (1 - lr * wd) - lr * m_hat / (sqrt(v_hat) + eps)

so one step moves a coordinate by at most lr * (c + wd * |w|), where c bounds the Adam ratio
|m_hat / sqrt(v_hat)| whatever the gradients were (see adam_ratio_bound), and n steps by at most

    bound(n) = n * lr * (c + wd * (max|w_E| + n * lr * c))     (|w| can grow by n * lr * c on the way)

plus what rounding adds (the wire dtype's half ulp, f32 steps). Gradient clipping and scale do not enter:
Adam divides them out. n must come from work the orchestrator counted (see steps_from_items), never from
a step count a replica reports. This module is numpy and pure, so the orchestrator and tests agree on it.

    python -c "from iota_cli.core.bounds import adam_ratio_bound; print(adam_ratio_bound(0.9, 0.95))"
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from iota_cli.core.manifest import OptimConfig

# The half ulp of each wire dtype, relative: an update rounded for the wire grows by at most this much.
WIRE_REL_ERROR = {"F32": 0.0, "BF16": 2.0**-8}
F32_REL_ERROR = 2.0**-23  # an f32 weight update rounds by at most this, relative to |w|, per step
CHUNK = 1 << 15  # float64 values per chunk of UpdateStats.of's sum of squares: 256 KiB
SLACK_STEPS = 1  # a step whose backward passes straddle the window's edge (see steps_from_items)


@functools.lru_cache(maxsize=64)  # a pure function of the betas, and 2^17 terms each time: every check asks
def adam_ratio_bound(beta1: float, beta2: float) -> float:
    """The largest |m_hat / sqrt(v_hat)| Adam can produce at any step t, for any gradients (inf: none).

    m_t = (1-b1) sum_i b1^(t-i) g_i and v_t = (1-b2) sum_i b2^(t-i) g_i^2, so by Cauchy-Schwarz, writing
    b1^k = (b1 / sqrt(b2))^k * sqrt(b2)^k,
        |m_t| <= (1-b1) sqrt(sum_k r^k) sqrt(sum_k b2^k g^2) = (1-b1) / sqrt(1-b2) sqrt(sum_k r^k) sqrt(v_t)
    with r = b1^2 / b2 and k < t. With the bias corrections 1/(1-b1^t) and 1/(1-b2^t):
        c_t = (1-b1) / sqrt(1-b2) * sqrt((1 - r^t) / (1 - r)) * sqrt(1 - b2^t) / (1 - b1^t)
    which is 1 at t = 1 (a first step is sign(g)) and, for r < 1, tends to (1-b1) / sqrt((1-b2)(1-r)):
    1.165 for this project's default betas (0.9, 0.95), 7.27 for (0.9, 0.999). The maximum over t is
    taken numerically (c_t need not be monotonic). For r >= 1 the ratio grows without limit in t, so
    there is no step-count-free bound: inf (the bound check is then off; say so where it is used).
    """
    b1, b2 = float(beta1), float(beta2)
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        return math.inf
    r = b1 * b1 / b2 if b2 > 0 else (0.0 if b1 == 0 else math.inf)
    if r >= 1.0:
        return math.inf
    t = np.arange(1, 1 << 17, dtype=np.float64)  # far past where c_t settles for any r < 1 that trains
    with np.errstate(over="ignore", under="ignore"):
        partial = (1.0 - r**t) / (1.0 - r)
        c_t = (1.0 - b1) / math.sqrt(1.0 - b2) * np.sqrt(partial) * np.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    limit = (1.0 - b1) / math.sqrt((1.0 - b2) * (1.0 - r))
    return float(max(1.0, float(c_t.max()), limit))


def steps_from_items(items: float, backward_per_step: int) -> int:
    """The most optimizer steps `items` counted backward passes can have made: ceil(items / k), plus
    SLACK_STEPS for a step whose first passes were counted before the window began; at least 1."""
    return max(1, math.ceil(max(items, 0.0) / max(backward_per_step, 1)) + SLACK_STEPS)


def update_bound(optim: OptimConfig, steps: int, max_abs_base: float, wire_dtype: str = "F32") -> float:
    """The largest |base - local| any coordinate reaches after `steps` honest AdamW steps from base."""
    c = adam_ratio_bound(*optim.betas)
    if not math.isfinite(c):
        return math.inf
    n, lr, wd = max(int(steps), 1), float(optim.lr), float(optim.weight_decay)
    w = float(max_abs_base) + n * lr * c  # |w| along the way
    moved = n * lr * (c + wd * w) + n * w * F32_REL_ERROR
    return moved * (1.0 + WIRE_REL_ERROR.get(wire_dtype, 2.0**-8)) + float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class UpdateStats:
    """What the bound check needs of an update: its largest |value|, its L2 norm, and that it is finite."""

    max_abs: float
    l2: float
    finite: bool

    @classmethod
    def of(cls, update: np.ndarray) -> UpdateStats:
        u = np.asarray(update, dtype=np.float32).ravel()
        if u.size == 0:
            return cls(0.0, 0.0, True)
        # max and min propagate NaN and carry inf, so they answer "finite" too, with no temporary array.
        hi, lo = float(u.max()), float(u.min())
        if not (math.isfinite(hi) and math.isfinite(lo)):
            return cls(math.inf, math.inf, False)
        # The sum of squares in float64 (float32 would lose digits over millions of terms), a
        # cache-sized chunk at a time rather than one float64 copy of the whole update.
        sq = sum(
            float(np.dot(c, c))
            for c in (u[i : i + CHUNK].astype(np.float64) for i in range(0, u.size, CHUNK))
        )
        return cls(max(hi, -lo), math.sqrt(sq), True)


def violation(stats: UpdateStats, bound: float) -> str | None:
    """Why an update is not one an honest replica could send (None when it could)."""
    if not stats.finite:
        return "the update holds NaN or infinity"
    if stats.max_abs > bound:
        return f"max |update| = {stats.max_abs:.3g} exceeds the optimizer's bound {bound:.3g}"
    return None
