"""How a work result travels: its safetensors bytes as they are, or in one zstd frame.

A stage boundary carries bfloat16 activations and gradients, whose exponent bytes repeat: zstd at level 3
makes them about 1.4x smaller at hundreds of MB/s (bench/boundary_bytes.py), which a home uplink feels and
the loss never does (it is lossless). The run's manifest says what senders use (`train.wire_codec`);
receivers take either, told apart by the zstd frame's magic number (no safetensors file starts with it:
its first 8 bytes are a header length, and one that large is refused). Unpacking is bounded, so a small
blob that would inflate past what the receiver can hold is refused as malformed, never inflated.

    python -c "from iota_cli.core import wire; print(len(wire.pack(bytes(4096), 'zstd')))"
"""

from __future__ import annotations

from iota_cli.core.tensors import TensorFormatError

CODECS = ("none", "zstd")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LEVEL = 3
MAX_UNPACKED = 1 << 30  # the most a blob may inflate to when the receiver knows no tighter bound


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
    """The safetensors bytes inside a blob; at most limit bytes, else TensorFormatError.

    A frame must declare its size (pack's always do): that bounds it before inflating and tells a
    truncated frame, which zstd itself would silently cut short.
    """
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
