"""A stage's parameters as one flat float32 vector, and the merge blobs cut from it.

The merge (docs: the lead's issue-12 design) works on one vector per stage: its parameters in the order of
the stage's weights file (names sorted, as core.tensors.encode writes them), so a weights blob is a header
followed by exactly the vector's f32 bytes. Replicas send pseudo-gradients as an "update" blob, owners of
contiguous partitions of that vector reduce them and send a "part" blob back. Everything here is numpy and
deterministic, so torch and MLX replicas, partition owners and the orchestrator produce identical bytes.

Try it:
    python -c "from iota_cli.core.flat import FlatLayout; from iota_cli.core.manifest import TINY_MODEL; \
print(FlatLayout.of(TINY_MODEL, 0).size)"
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, cast

import numpy as np

from iota_cli.core import tensors
from iota_cli.core.modelspec import ModelConfig, stage_params, stage_spec
from iota_cli.core.tensors import RawTensor

WireDtype = Literal["BF16", "F32"]
WIRE_SIZES: dict[str, int] = {"BF16": 2, "F32": 4}
UPDATE = "update"
_BF16_NAN = np.uint16(0x7FC0)  # the quiet NaN torch writes for every NaN


@dataclass(frozen=True)
class FlatLayout:
    """Where each parameter of a stage sits in its flat vector (names sorted, as safetensors stores them)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes):
            raise ValueError(f"{len(self.names)} names but {len(self.shapes)} shapes")
        # The vector must be the weights file's data section, so the order is encode's: sorted, unique.
        if list(self.names) != sorted(set(self.names)):
            raise ValueError("layout names must be unique and sorted")

    @classmethod
    def of(cls, cfg: ModelConfig, stage: int) -> FlatLayout:
        specs = sorted(stage_params(cfg, stage_spec(cfg, stage)), key=lambda p: p.name)
        return cls(tuple(p.name for p in specs), tuple(p.shape for p in specs))

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Element boundaries: names[i] occupies [offsets[i], offsets[i + 1]); offsets[-1] == size."""
        out = [0]
        for shape in self.shapes:
            out.append(out[-1] + math.prod(shape))
        return tuple(out)

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def flatten(self, weights: Mapping[str, RawTensor]) -> np.ndarray:
        """A new 1-D float32 vector from F32 or BF16 tensors with exactly this layout's names and shapes."""
        missing, extra = set(self.names) - set(weights), set(weights) - set(self.names)
        if missing or extra:
            raise ValueError(
                f"weights do not match the layout: missing {sorted(missing)[:4]}, extra {sorted(extra)[:4]}"
            )
        out = np.empty(self.size, dtype=np.float32)
        for i, name in enumerate(self.names):
            t = weights[name]
            if t.shape != self.shapes[i]:
                raise ValueError(f"{name}: shape {list(t.shape)}, the layout has {list(self.shapes[i])}")
            if t.dtype not in WIRE_SIZES:
                raise ValueError(f"{name}: dtype {t.dtype} (only F32 and BF16 weights flatten)")
            out[self.offsets[i] : self.offsets[i + 1]] = from_wire(t.data, cast(WireDtype, t.dtype))
        return out

    def unflatten(self, vec: np.ndarray) -> dict[str, RawTensor]:
        """F32 tensors by name from a vector of this layout's size (encoded: a header, then vec's bytes)."""
        flat = _vector(vec, self.size, "vector")
        return {
            name: RawTensor("F32", shape, flat[self.offsets[i] : self.offsets[i + 1]].astype("<f4").tobytes())
            for i, (name, shape) in enumerate(zip(self.names, self.shapes, strict=True))
        }


def partitions(size: int, count: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges covering [0, size), lengths differing by at most one.

    count is clamped to [1, size] so no partition is empty (an empty size gives one empty range).
    """
    count = max(1, min(count, size))
    base, extra = divmod(size, count)
    out, start = [], 0
    for p in range(count):
        stop = start + base + (1 if p < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def owners(part: int, replicas: int) -> tuple[int, ...]:
    """Indices (into the contributors sorted by id) of the two replicas that reduce a partition."""
    if replicas < 1:
        raise ValueError("a round needs at least one contributor")
    if replicas == 1:
        return (0,)
    return (part % replicas, (part + 1) % replicas)


def _bf16_bits(vec: np.ndarray) -> np.ndarray:
    """bf16 bit patterns of f32 values, rounded to nearest even exactly as torch's c10::BFloat16 does."""
    bits = np.ascontiguousarray(vec, dtype="<f4").view("<u4")
    # Adding 0x7FFF plus the lowest kept bit rounds ties to even; carries into the exponent are correct
    # (the largest finite values round to inf). NaN, whose bits may wrap here, becomes torch's quiet NaN.
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype("<u2")
    return np.where(np.isnan(vec), _BF16_NAN, rounded).astype("<u2")


def wire_round(vec: np.ndarray, dtype: WireDtype) -> np.ndarray:
    """The f32 values vec becomes after travelling in dtype (a copy; the identity for F32)."""
    if dtype == "F32":
        return np.array(vec, dtype=np.float32)
    return from_wire(to_wire(vec, dtype), dtype)


def to_wire(vec: np.ndarray, dtype: WireDtype) -> bytes:
    """Little-endian raw bytes of vec in dtype."""
    if dtype == "F32":
        return np.ascontiguousarray(vec, dtype="<f4").tobytes()
    if dtype == "BF16":
        return _bf16_bits(np.asarray(vec, dtype=np.float32)).tobytes()
    raise ValueError(f"unsupported wire dtype {dtype!r}")


def from_wire(buf: bytes | memoryview, dtype: WireDtype) -> np.ndarray:
    """A new writable float32 vector from little-endian raw bytes in dtype."""
    if dtype not in WIRE_SIZES:
        raise ValueError(f"unsupported wire dtype {dtype!r}")
    if len(buf) % WIRE_SIZES[dtype]:
        raise ValueError(f"{len(buf)} bytes is not a whole number of {dtype} values")
    if dtype == "F32":
        return np.frombuffer(buf, dtype="<f4").astype(np.float32)
    return (np.frombuffer(buf, dtype="<u2").astype("<u4") << 16).view("<f4").astype(np.float32, copy=False)


def update_blob(vec: np.ndarray, dtype: WireDtype) -> bytes:
    """A replica's pseudo-gradient as safetensors: one tensor "update" [N] in the wire dtype."""
    flat = _vector(vec, None, UPDATE)
    return tensors.encode({UPDATE: RawTensor(dtype, (flat.size,), to_wire(flat, dtype))})


def update_span(header: tensors.Header, start: int, stop: int) -> tuple[int, int]:
    """(byte offset in the blob, byte length) of elements [start, stop) of "update": an HTTP Range."""
    entry = header.entries.get(UPDATE)
    if entry is None or len(entry.shape) != 1:
        raise ValueError('the blob has no 1-D "update" tensor')
    if not 0 <= start <= stop <= entry.shape[0]:
        raise ValueError(f"elements [{start}, {stop}) are outside update[{entry.shape[0]}]")
    width = tensors.DTYPE_SIZES[entry.dtype]
    return header.data_start + entry.start + start * width, (stop - start) * width


def check_update(header: tensors.Header, size: int, dtype: WireDtype) -> str | None:
    """Why an uploaded update blob is not exactly {"update": dtype [size]}; None when it is."""
    return tensors.mismatch(header, {UPDATE: (dtype, (size,))})


def part_blob(weights: np.ndarray, momentum: np.ndarray | None, dtype: WireDtype) -> bytes:
    """An owner's result for one partition: "weights" F32 [n] and (diloco) "momentum" in the wire dtype."""
    w = _vector(weights, None, "weights")
    out = {"weights": RawTensor("F32", (w.size,), to_wire(w, "F32"))}
    if momentum is not None:
        m = _vector(momentum, w.size, "momentum")
        out["momentum"] = RawTensor(dtype, (m.size,), to_wire(m, dtype))
    return tensors.encode(out)


def read_part(
    buf: bytes | memoryview, n: int, dtype: WireDtype, with_momentum: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """The (weights, momentum) of a part blob from anyone; ValueError unless it is as part_blob writes it."""
    got, _ = tensors.decode(buf)  # TensorFormatError is a ValueError
    want: dict[str, tuple[str, tuple[int, ...]]] = {"weights": ("F32", (n,))}
    if with_momentum:
        want["momentum"] = (dtype, (n,))
    spec = {name: (t.dtype, t.shape) for name, t in got.items()}
    if spec != want:
        raise ValueError(f"part result holds {_describe(spec)}, expected {_describe(want)}")
    for name, t in got.items():
        if not tensors.all_finite(t):
            raise ValueError(f"part result: {name} holds NaN or infinity")
    weights = from_wire(got["weights"].data, "F32")
    return weights, from_wire(got["momentum"].data, dtype) if with_momentum else None


def _describe(spec: Mapping[str, tuple[str, tuple[int, ...]]]) -> str:
    return ", ".join(f"{name} {dtype}{list(shape)}" for name, (dtype, shape) in sorted(spec.items())[:4])


def _vector(vec: np.ndarray, size: int | None, what: str) -> np.ndarray:
    flat = np.asarray(vec)
    if flat.ndim != 1 or (size is not None and flat.size != size):
        want = "1-D" if size is None else f"1-D of {size}"
        raise ValueError(f"{what} must be {want}, got shape {list(flat.shape)}")
    return flat
