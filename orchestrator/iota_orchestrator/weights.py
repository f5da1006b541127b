"""Stage weights on the orchestrator: epoch 0 from the model spec's init, their expected shapes, averaging.

Weights travel as safetensors (iota_cli/core/tensors.py) in float32 under modelspec's names, so what a torch
worker uploads, an MLX worker loads.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from iota_cli.core.modelspec import ModelConfig, initial_weights, stage_params, stage_spec
from iota_cli.core.tensors import RawTensor, TensorFormatError, decode, encode

HEADER_SLACK = 4096


def init_stage(cfg: ModelConfig, stage: int, seed: int) -> bytes:
    """Epoch-0 weights of a stage as safetensors bytes: the model spec's init, as every backend makes it."""
    return encode(initial_weights(cfg, stage, seed), {"stage": str(stage), "epoch": "0"})


def to_raw(a: np.ndarray) -> RawTensor:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return RawTensor("F32", tuple(a.shape), a.tobytes())


def expected(cfg: ModelConfig, stage: int) -> dict[str, tuple[int, ...]]:
    return {p.name: p.shape for p in stage_params(cfg, stage_spec(cfg, stage))}


def max_weights_size(cfg: ModelConfig, stage: int) -> int:
    params = stage_params(cfg, stage_spec(cfg, stage))
    return sum(p.numel for p in params) * 4 + 256 * len(params) + HEADER_SLACK


def average(contributions: Iterable[tuple[bytes, float]], shapes: dict[str, tuple[int, ...]]) -> bytes | None:
    """Weighted mean of stage weights; contributions that are malformed or non-finite are left out.

    Weights that sum to zero count equally. Returns None when no contribution is usable.
    """
    acc: dict[str, np.ndarray] = {}
    total, used = 0.0, 0
    for data, w in contributions:
        try:
            tensors, _ = decode(data)
        except TensorFormatError:
            continue
        arrays = _checked(tensors, shapes)
        if arrays is None:
            continue
        w = max(float(w), 0.0) or 1e-12
        for name, a in arrays.items():
            if name in acc:
                acc[name] += w * a
            else:
                acc[name] = w * a.astype(np.float64)
        total += w
        used += 1
    if not used:
        return None
    return encode({n: to_raw(a / total) for n, a in acc.items()})


def _checked(
    tensors: dict[str, RawTensor], shapes: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray] | None:
    if set(tensors) != set(shapes):
        return None
    out = {}
    for name, shape in shapes.items():
        t = tensors[name]
        if t.dtype != "F32" or t.shape != shape:
            return None
        a = np.frombuffer(t.data, dtype=np.float32).reshape(shape)
        if not np.isfinite(a).all():
            return None
        out[name] = a
    return out
