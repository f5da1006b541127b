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

# safetensors dtype names -> bytes per element. Only what every backend can load (MLX has no F64).
DTYPE_SIZES = {"F32": 4, "BF16": 2, "F16": 2, "I32": 4, "I64": 8, "U8": 1}
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


def decode(buf: bytes | memoryview) -> tuple[TensorDict, dict[str, str]]:
    """Parse safetensors bytes; raise TensorFormatError on anything malformed."""
    view = memoryview(buf)
    if len(view) < 8:
        raise TensorFormatError("too short for a safetensors header")
    (n,) = struct.unpack("<Q", view[:8])
    if n > MAX_HEADER or 8 + n > len(view):
        raise TensorFormatError("header length out of range")
    try:
        header = json.loads(bytes(view[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorFormatError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise TensorFormatError("header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    body, out = view[8 + n :], {}
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            shape = tuple(int(x) for x in info["shape"])
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise TensorFormatError(f"bad header entry for {name!r}") from None
        if not 0 <= start <= end <= len(body):
            raise TensorFormatError(f"data of {name!r} lies outside the buffer")
        out[name] = RawTensor(dtype, shape, bytes(body[start:end]))
    return out, dict(metadata)


def column_slice(t: RawTensor, start: int, stop: int | None) -> RawTensor:
    """t[:, start:stop] for a 2-D tensor (the head's inputs and the tail's targets from one token block)."""
    rows, cols = t.shape
    start, stop, _ = slice(start, stop).indices(cols)
    size = DTYPE_SIZES[t.dtype]
    width = max(stop - start, 0)
    chunks = (t.data[(r * cols + start) * size : (r * cols + start + width) * size] for r in range(rows))
    return RawTensor(t.dtype, (rows, width), b"".join(chunks))
