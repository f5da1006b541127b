"""The outer optimizer of a merge round: the mean pseudo-gradient of a partition, then one outer step.

Every party that reduces a partition (its two owners, the orchestrator when they fail) calls this code on
the same decoded inputs in the same order, and numpy's element-wise float64/float32 arithmetic is exact
IEEE with no fusing, so they all produce identical bytes whatever framework trained the replicas.

    mean = sum(w_i * u_i) / sum(w_i)                       (float64, contributors sorted by id)
    average: new = base - mean
    diloco:  mu = momentum_at(cfg, E); m' = wire_round(mu * m + mean); new = base - lr * (mean + mu * m')

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


def weighted_mean(updates: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum(w_i * u_i) / sum(w_i) as float32, accumulated in float64 in the order given."""
    if not updates:
        raise ValueError("no updates to average")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and non-negative, got {list(weights)[:8]}")
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError("the weights sum to zero")
    size = np.asarray(updates[0]).shape
    acc = np.zeros(size, dtype=np.float64)
    for u, w in zip(updates, weights, strict=True):
        u = np.asarray(u)
        if u.ndim != 1 or u.shape != size:
            raise ValueError(f"updates must be 1-D of one length, got {list(u.shape)} and {list(size)}")
        acc += np.float64(w) * u.astype(np.float64)
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
) -> tuple[np.ndarray, np.ndarray | None]:
    """One owner's whole job for a partition: the weighted mean of the updates, then the outer step."""
    return outer_step(cfg, base, weighted_mean(updates, weights), momentum, round_index)


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
