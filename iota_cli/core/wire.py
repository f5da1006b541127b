"""How a work result travels: its safetensors bytes, int8-quantized where the run says, zstd-framed.

Two independent choices, both the run manifest's:
- `model.wire_dtype = "int8"`: the stages keep float32 boundary tensors, and every 3-d float tensor a
  worker uploads (activations forward, the gradient back) leaves as int8 values with one float32 absmax
  scale per channel per sequence (`x` -> `x` I8 (B,T,b) and `x.scale` F32 (B,1,b)); the receiver reads
  it back dequantized, so the gradient passes straight through the rounding. bench/boundary_bytes.py
  measured it against bfloat16 at the same bytes per token: half the held-out loss cost.
- `train.wire_codec = "zstd"`: the blob is one zstd frame around those bytes. Boundary tensors repeat
  their exponents and small integers: 1.2-1.6x smaller at hundreds of MB/s, and lossless.
Receivers take any mix, told apart by the zstd frame's magic number (no safetensors file starts with it:
its first 8 bytes are a header length, and one that large is refused) and by the I8 dtype. Unpacking is
bounded: a frame must declare its size, which is checked before inflating and against what it inflates
to, so a small blob that would inflate past what the receiver can hold is refused as malformed.

    python -c "from iota_cli.core import wire; print(len(wire.pack(bytes(4096), 'zstd')))"
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from iota_cli.core.tensors import RawTensor, TensorDict, TensorFormatError, decode, encode, parse_header

if TYPE_CHECKING:
    from iota_cli.core.manifest import RunManifest

CODECS = ("none", "zstd")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LEVEL = 3
MAX_UNPACKED = 1 << 30  # the most a blob may inflate to when the receiver knows no tighter bound
SCALE = ".scale"  # the suffix of an int8 tensor's scales


@dataclass(frozen=True)
class WireFormat:
    """What a sender does to its results: int8 quantization (model.wire_dtype) and a codec."""

    int8: bool = False
    codec: str = "none"

    @classmethod
    def of(cls, manifest: RunManifest) -> WireFormat:
        return cls(manifest.model.wire_dtype == "int8", manifest.train.wire_codec)

    def frame(self, tensors: Mapping[str, RawTensor]) -> bytes:
        return pack(encode(quantize(tensors) if self.int8 else tensors), self.codec)


def quantize(tensors: Mapping[str, RawTensor]) -> TensorDict:
    """Every 3-d float32 tensor as int8 values and a float32 absmax scale per (batch row, channel)."""
    out: TensorDict = {}
    for name, t in tensors.items():
        if t.dtype != "F32" or len(t.shape) != 3:
            out[name] = t  # a head's proof vector, tokens: as they are
            continue
        x = np.frombuffer(t.data, dtype="<f4").reshape(t.shape)
        scale = (np.abs(x).max(axis=1, keepdims=True) / np.float32(127.0)).astype("<f4")
        safe = np.where(scale > 0, scale, np.float32(1.0))
        q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
        out[name] = RawTensor("I8", t.shape, q.tobytes())
        out[name + SCALE] = RawTensor("F32", scale.shape, scale.tobytes())
    return out


def dequantize(tensors: Mapping[str, RawTensor]) -> TensorDict:
    """quantize's inverse (up to its rounding); TensorFormatError for an int8 tensor without its scale."""
    out: TensorDict = {}
    for name, t in tensors.items():
        if name.endswith(SCALE) and name[: -len(SCALE)] in tensors:
            continue
        if t.dtype != "I8":
            out[name] = t
            continue
        s = tensors.get(name + SCALE)
        if len(t.shape) != 3 or s is None or s.dtype != "F32" or s.shape != (t.shape[0], 1, t.shape[2]):
            raise TensorFormatError(f"int8 tensor {name[:64]!r} needs F32 scales of shape (B, 1, b)")
        q = np.frombuffer(t.data, dtype=np.int8).reshape(t.shape)
        with np.errstate(invalid="ignore", over="ignore"):  # a bad scale: the finite check refuses it
            x = q.astype(np.float32) * np.frombuffer(s.data, dtype="<f4").reshape(s.shape)
        out[name] = RawTensor("F32", t.shape, x.astype("<f4").tobytes())
    return out


def pack(data: bytes, codec: str) -> bytes:
    """data framed for the wire by codec; as it is when framing would not make it smaller."""
    if codec == "none":
        return data
    if codec != "zstd":
        raise ValueError(f"unknown wire codec {codec!r} (one of {', '.join(CODECS)})")
    import zstandard  # lazily: `iota --help` imports the core

    packed = zstandard.ZstdCompressor(level=LEVEL).compress(data)
    return packed if len(packed) < len(data) else data


def packed(data: bytes | memoryview) -> bool:
    return bytes(data[:4]) == ZSTD_MAGIC


def unpack(data: bytes, limit: int = MAX_UNPACKED) -> bytes:
    """The safetensors bytes a blob stands for (unframed, int8 tensors dequantized); at most about limit
    bytes, else TensorFormatError (so is anything parse_header refuses).

    A frame must declare its size (pack's always do): that bounds it before inflating and tells a
    truncated frame, which zstd itself would silently cut short.
    """
    data = _unframe(data, limit)
    header = parse_header(data, len(data))
    if all(e.dtype != "I8" for e in header.entries.values()):
        return data
    if 4 * len(data) > limit:  # dequantized, each int8 value takes four bytes
        raise TensorFormatError(f"the int8 tensors inflate past {limit} bytes")
    tensors, meta = decode(data)
    return encode(dequantize(tensors), meta or None)


def _unframe(data: bytes, limit: int) -> bytes:
    if not packed(data):
        return data
    import zstandard

    try:
        size = zstandard.get_frame_parameters(data).content_size
        if size == zstandard.CONTENTSIZE_UNKNOWN:
            raise TensorFormatError("a zstd frame without its content size")
        if size > limit:
            raise TensorFormatError(f"the zstd frame inflates to {size} bytes, past {limit}")
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            out = reader.read(size)
    except zstandard.ZstdError as e:
        raise TensorFormatError(f"not a valid zstd frame: {e}") from None
    if len(out) != size:
        raise TensorFormatError(f"a truncated zstd frame ({len(out)} of {size} bytes)")
    return out
