"""The outer optimizer of a merge round: the mean pseudo-gradient of a partition, then one outer step.

Every party that reduces a partition (its two owners, the orchestrator when they fail) calls this code on
the same decoded inputs in the same order, and numpy's element-wise float64/float32 arithmetic is exact
IEEE with no fusing, so they all produce identical bytes whatever framework trained the replicas.

    mean = sum(w_i * s_i * u_i) / sum(w_i)                 (float64, contributors sorted by id)
    average: new = base - mean
    diloco:  mu = momentum_at(cfg, E); m' = wire_round(mu * m + mean); new = base - lr * (mean + mu * m')

w_i is the work the orchestrator counted for contribution i, s_i <= 1 the norm clip it fixed for it in
the plan (clip_scales: with three or more contributions none may exceed CLIP times the median norm per
counted step; 1 otherwise), so no single contributor steers the mean.

Try it:
    python -c "import numpy as np; from iota_cli.core.manifest import MergeConfig; \
from iota_cli.core.outer import reduce_partition; \
print(reduce_partition(MergeConfig(), np.ones(4, 'f4'), [np.full(4, .1, 'f4')], [1.0], None, 0))"
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from iota_cli.core.flat import wire_round
from iota_cli.core.manifest import MergeConfig


def momentum_at(cfg: MergeConfig, round_index: int) -> float:
    """The outer momentum of round E: linear from momentum_start to outer_momentum over momentum_warmup."""
    if cfg.momentum_warmup <= 0:
        return cfg.outer_momentum
    frac = min(1.0, max(round_index, 0) / cfg.momentum_warmup)
    return cfg.momentum_start + (cfg.outer_momentum - cfg.momentum_start) * frac


CLIP = 3.0  # how far past the median norm per counted step a contribution may reach (clip_scales)
MIN_FOR_CLIP = 3  # a median of two is their mean: it cannot tell which of two contributions is wrong


def clip_scales(norms: Sequence[float], steps: Sequence[int]) -> list[float]:
    """Per contribution, the factor s_i <= 1 that keeps its L2 norm within CLIP x the median of the
    round's norms per counted step x its own counted steps (all 1 below MIN_FOR_CLIP contributions).

    Computed once by the orchestrator from the whole uploads and handed to every owner in the plan, so
    each partition is clipped by the same factor everywhere and the reduction stays partition-local."""
    if len(norms) != len(steps):
        raise ValueError(f"{len(norms)} norms but {len(steps)} step counts")
    if len(norms) < MIN_FOR_CLIP:
        return [1.0] * len(norms)
    per_step = sorted(n / max(k, 1) for n, k in zip(norms, steps, strict=True))
    mid = len(per_step) // 2
    median = per_step[mid] if len(per_step) % 2 else (per_step[mid - 1] + per_step[mid]) / 2
    out = []
    for n, k in zip(norms, steps, strict=True):
        tau = CLIP * median * max(k, 1)
        out.append(1.0 if n <= tau or n <= 0 else tau / n)
    return out


def weighted_mean(
    updates: Sequence[np.ndarray], weights: Sequence[float], scales: Sequence[float] = ()
) -> np.ndarray:
    """sum(w_i * s_i * u_i) / sum(w_i) as float32, accumulated in float64 in the order given (scales
    empty: all 1)."""
    if not updates:
        raise ValueError("no updates to average")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and non-negative, got {list(weights)[:8]}")
    scales = list(scales) or [1.0] * len(updates)
    if len(scales) != len(updates) or any(not 0 <= s <= 1 for s in scales):
        raise ValueError(f"scales must be one in [0, 1] per update, got {scales[:8]}")
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError("the weights sum to zero")
    size = np.asarray(updates[0]).shape
    acc = np.zeros(size, dtype=np.float64)
    for u, w, c in zip(updates, weights, scales, strict=True):
        u = np.asarray(u)
        if u.ndim != 1 or u.shape != size:
            raise ValueError(f"updates must be 1-D of one length, got {list(u.shape)} and {list(size)}")
        acc += (np.float64(w) * np.float64(c)) * u.astype(np.float64)
    return (acc / np.float64(total)).astype(np.float32)


def outer_step(
    cfg: MergeConfig, base: np.ndarray, mean: np.ndarray, momentum: np.ndarray | None, round_index: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(new weights, new momentum) of a partition from its epoch-E weights, mean update and momentum.

    momentum is None on the first round (taken as zeros); "average" keeps no momentum.
    """
    b, g = _f32(base, "base"), _f32(mean, "mean")
    if g.shape != b.shape:
        raise ValueError(f"mean has {g.size} elements, base {b.size}")
    if cfg.strategy == "average":
        return b - g, None
    if cfg.strategy != "diloco":
        raise ValueError(f"unknown merge strategy {cfg.strategy!r}")
    mu = np.float64(momentum_at(cfg, round_index))
    m = (
        np.zeros(b.shape, dtype=np.float64)
        if momentum is None
        else _f32(momentum, "momentum").astype(np.float64)
    )
    if m.shape != b.shape:
        raise ValueError(f"momentum has {m.size} elements, base {b.size}")
    # The momentum rests and travels in the wire dtype, so every party continues from the rounded value.
    m_new = wire_round((mu * m + g).astype(np.float32), cfg.wire_dtype)
    step = np.float64(cfg.outer_lr) * (g.astype(np.float64) + mu * m_new.astype(np.float64))
    return (b.astype(np.float64) - step).astype(np.float32), m_new


def reduce_partition(
    cfg: MergeConfig,
    base: np.ndarray,
    updates: Sequence[np.ndarray],
    weights: Sequence[float],
    momentum: np.ndarray | None,
    round_index: int,
    scales: Sequence[float] = (),
) -> tuple[np.ndarray, np.ndarray | None]:
    """One owner's whole job for a partition: the weighted (clipped) mean of the updates, then the outer
    step."""
    return outer_step(cfg, base, weighted_mean(updates, weights, scales), momentum, round_index)


def overlap(current: np.ndarray, snapshot: np.ndarray, merged: np.ndarray) -> np.ndarray:
    """What a replica loads when the merge lands: merged + the local progress it made since contributing."""
    c, s, m = _f32(current, "current"), _f32(snapshot, "snapshot"), _f32(merged, "merged")
    if not c.shape == s.shape == m.shape:
        raise ValueError(f"shapes differ: current {c.shape}, snapshot {s.shape}, merged {m.shape}")
    return m + (c - s)


def _f32(vec: np.ndarray, what: str) -> np.ndarray:
    out = np.asarray(vec, dtype=np.float32)
    if out.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {list(out.shape)}")
    return out
