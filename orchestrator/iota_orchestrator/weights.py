"""Stage weights on the orchestrator: epoch 0 from the model spec's init, checks of uploads, averaging.

Weights travel as safetensors (iota_cli/tensors.py) in float32 under modelspec's names, so what a torch
worker uploads, an MLX worker loads.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from iota_cli.core.modelspec import ModelConfig, initial_weights, stage_params, stage_spec
from iota_cli.core.tensors import DTYPE_SIZES, RawTensor, TensorFormatError, decode, encode

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


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Names -> (dtype, shape) from a safetensors file, checking that the data section adds up."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise TensorFormatError("too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size or n > 64 << 20:
            raise TensorFormatError("header length out of range")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise TensorFormatError("header is not JSON") from None
    if not isinstance(header, dict):
        raise TensorFormatError("header is not an object")
    header.pop("__metadata__", None)
    out, body = {}, size - 8 - n
    for name, info in header.items():
        try:
            dtype, shape = str(info["dtype"]), tuple(int(x) for x in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise TensorFormatError(f"bad header entry for {name!r}") from None
        if dtype not in DTYPE_SIZES or not 0 <= start <= end <= body:
            raise TensorFormatError(f"bad dtype or offsets for {name!r}")
        if end - start != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise TensorFormatError(f"{name!r}: data size does not match its shape")
        out[name] = (dtype, shape)
    return out


def check_tensors(path: Path, want: dict[str, tuple[str, tuple[int, ...]]]) -> str | None:
    """Why the file does not hold exactly the wanted tensors (None when it does)."""
    try:
        got = read_header(path)
    except (TensorFormatError, OSError) as e:
        return f"not a valid safetensors file: {e}"
    if set(got) != set(want):
        return f"tensors {sorted(got)[:8]} != expected {sorted(want)[:8]}"
    for name, (dtype, shape) in want.items():
        if got[name] != (dtype, shape):
            return f"{name}: got {got[name][0]}{list(got[name][1])}, expected {dtype}{list(shape)}"
    return None


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
