"""Tensors as plain bytes, and the safetensors container they travel and rest in.

The core never imports an ML framework, so tensors cross between the core and a backend as RawTensor
(dtype name, shape, bytes). The encoding is the safetensors format (8-byte little-endian header length,
a JSON header, then the raw data), which torch's and MLX's own loaders read too.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# safetensors dtype names -> bytes per element. Only what every backend can load (MLX has no F64).
DTYPE_SIZES = {"F32": 4, "BF16": 2, "F16": 2, "I32": 4, "I64": 8, "U8": 1, "I8": 1}
# Model-config dtype names -> safetensors names.
DTYPE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int32": "I32", "int64": "I64"}
MAX_HEADER = 100 * 1024 * 1024


class TensorFormatError(ValueError):
    """The bytes are not a valid tensor container."""


@dataclass(frozen=True)
class RawTensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise TensorFormatError(f"unsupported dtype {self.dtype!r}")
        want = math.prod(self.shape) * DTYPE_SIZES[self.dtype]
        if len(self.data) != want:
            raise TensorFormatError(
                f"{self.dtype}{list(self.shape)} needs {want} bytes, got {len(self.data)}"
            )

    @property
    def nbytes(self) -> int:
        return len(self.data)


TensorDict = dict[str, RawTensor]


def encode(tensors: Mapping[str, RawTensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize tensors (sorted by name, 8-byte aligned header) into safetensors bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, names = 0, sorted(tensors)
    for name in names:
        t = tensors[name]
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return b"".join([struct.pack("<Q", len(raw)), raw, *(tensors[n].data for n in names)])


@dataclass(frozen=True)
class Entry:
    """One tensor as a header describes it: dtype, shape and its byte range within the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]
    metadata: dict[str, str]
    data_start: int  # offset of the data section in the container (8 + header length)

    def spec(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {name: (e.dtype, e.shape) for name, e in self.entries.items()}


def header_length(prefix: bytes | memoryview) -> int:
    """The JSON header's length from a container's first 8 bytes (TensorFormatError when out of range)."""
    if len(prefix) < 8:
        raise TensorFormatError("too short for a safetensors header")
    (n,) = struct.unpack("<Q", bytes(prefix[:8]))
    if n > MAX_HEADER:
        raise TensorFormatError("header length out of range")
    return int(n)


def parse_header(prefix: bytes | memoryview, total_size: int) -> Header:
    """The one parser of safetensors headers, for bytes from anyone: bounded and strict.

    prefix holds at least the 8-byte length and the header; total_size is the whole container's size.
    Every entry must be a known dtype with a shape of non-negative ints and data_offsets that exactly
    cover its bytes, the entries must tile the data section with no gap or overlap, and the metadata must
    map strings to strings. Anything else raises TensorFormatError; nothing raises anything else.
    """
    n = header_length(prefix)
    if 8 + n > min(len(prefix), total_size):
        raise TensorFormatError("header length out of range")
    try:
        raw = json.loads(bytes(prefix[8 : 8 + n]), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise TensorFormatError(f"header is not JSON: {str(e)[:80]}") from None
    if not isinstance(raw, dict):
        raise TensorFormatError("header is not an object")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TensorFormatError("__metadata__ must map strings to strings")
    body = total_size - 8 - n
    entries = {name: _entry(name, info, body) for name, info in raw.items()}
    end = 0
    for entry in sorted(entries.values(), key=lambda x: (x.start, x.end)):
        if entry.start != end:
            raise TensorFormatError("tensor data overlaps or leaves gaps")
        end = entry.end
    if end != body:
        raise TensorFormatError(f"data section has {body} bytes, the header describes {end}")
    return Header(entries, dict(metadata), 8 + n)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _entry(name: str, info: object, body: int) -> Entry:
    if len(name) > 1024 or not isinstance(info, dict):
        raise TensorFormatError(f"bad header entry for {name[:64]!r}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise TensorFormatError(f"{name[:64]!r}: unsupported dtype {str(dtype)[:16]!r}")
    if not _ints(shape, limit=body) or len(shape) > 16:  # type: ignore[arg-type]
        raise TensorFormatError(f"{name[:64]!r}: shape must be a list of at most 16 non-negative ints")
    if not _ints(offsets, limit=body) or len(offsets) != 2:  # type: ignore[arg-type]
        raise TensorFormatError(f"{name[:64]!r}: data_offsets must be two ints within the data section")
    start, end = offsets  # type: ignore[misc]
    dims = tuple(shape)  # type: ignore[arg-type]
    if end - start != math.prod(dims) * DTYPE_SIZES[str(dtype)]:
        raise TensorFormatError(f"{name[:64]!r}: data_offsets do not match its shape and dtype")
    return Entry(str(dtype), dims, start, end)


def _ints(value: object, limit: int) -> bool:
    # bool is an int to Python but never a size; a float (1e999, 2.0) is not a size either.
    return isinstance(value, list) and all(type(x) is int and 0 <= x <= max(limit, 1 << 32) for x in value)


def decode(buf: bytes | memoryview) -> tuple[TensorDict, dict[str, str]]:
    """Parse safetensors bytes; raise TensorFormatError on anything malformed (see parse_header)."""
    view = memoryview(buf)
    header = parse_header(view, len(view))
    body = view[header.data_start :]
    tensors = {
        name: RawTensor(e.dtype, e.shape, bytes(body[e.start : e.end])) for name, e in header.entries.items()
    }
    return tensors, header.metadata


def read_header(path: Path) -> Header:
    """The header of a safetensors file, read without its data (TensorFormatError or OSError)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        prefix += f.read(header_length(prefix))
    return parse_header(prefix, size)


def mismatch(header: Header, want: Mapping[str, tuple[str, tuple[int, ...]]]) -> str | None:
    """Why a container does not hold exactly the wanted tensors (name -> (dtype, shape)); None if it does."""
    got = header.spec()
    if set(got) != set(want):
        return f"tensors {sorted(got)[:8]} != expected {sorted(want)[:8]}"
    for name, (dtype, shape) in want.items():
        if got[name] != (dtype, tuple(shape)):
            return f"{name}: got {got[name][0]}{list(got[name][1])}, expected {dtype}{list(shape)}"
    return None


def all_finite(t: RawTensor) -> bool:
    """No NaN or infinity in a float tensor (integer tensors always pass)."""
    if t.dtype not in ("F32", "BF16", "F16") or not t.data:
        return True
    import numpy as np  # every caller (a backend's worker, the orchestrator) has numpy

    if t.dtype == "BF16":  # no numpy bf16: exponent bits all ones means inf or NaN
        bits = np.frombuffer(t.data, dtype="<u2")
        return not bool(np.any((bits & 0x7F80) == 0x7F80))
    return bool(np.isfinite(np.frombuffer(t.data, dtype="<f4" if t.dtype == "F32" else "<f2")).all())


def column_slice(t: RawTensor, start: int, stop: int | None) -> RawTensor:
    """t[:, start:stop] for a 2-D tensor (the head's inputs and the tail's targets from one token block)."""
    rows, cols = t.shape
    start, stop, _ = slice(start, stop).indices(cols)
    size = DTYPE_SIZES[t.dtype]
    width = max(stop - start, 0)
    chunks = (t.data[(r * cols + start) * size : (r * cols + start + width) * size] for r in range(rows))
    return RawTensor(t.dtype, (rows, width), b"".join(chunks))
