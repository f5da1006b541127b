"""core.wire: zstd-framed work results, read back exactly, bounded, and refused when damaged."""

from __future__ import annotations

import os

import numpy as np
import pytest
from iota_orchestrator import integrity

from iota_cli.core import wire
from iota_cli.core.tensors import RawTensor, TensorFormatError, decode, encode


def activations(b: int = 4, t: int = 64, d: int = 8) -> bytes:
    """A bfloat16 boundary blob like a stage sends: the top halves of float32 normals."""
    x = np.random.default_rng(0).standard_normal((b, t, d)).astype(np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    return encode({"activations": RawTensor("BF16", (b, t, d), bf16.tobytes())})


def test_round_trip_is_exact_and_smaller() -> None:
    blob = activations()
    framed = wire.pack(blob, "zstd")
    assert wire.packed(framed) and len(framed) < len(blob)
    assert wire.unpack(framed) == blob
    assert decode(wire.unpack(framed))[0]["activations"].shape == (4, 64, 8)


def test_plain_bytes_pass_through() -> None:
    blob = activations()
    assert wire.pack(blob, "none") == blob
    assert wire.unpack(blob) == blob
    noise = os.urandom(4096)  # incompressible: framing would only add bytes
    assert wire.pack(noise, "zstd") == noise


def test_unknown_codec_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown wire codec"):
        wire.pack(b"x", "lz4")


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: f[: len(f) // 2],  # truncated in transit
        lambda f: wire.ZSTD_MAGIC + b"\x00" * 12,  # the magic, then junk
    ],
)
def test_damaged_frames_are_malformed(damage) -> None:
    with pytest.raises(TensorFormatError):
        wire.unpack(damage(wire.pack(activations(), "zstd")))


def test_a_bomb_is_refused_before_it_inflates() -> None:
    bomb = wire.pack(bytes(64 << 20), "zstd")  # 64 MiB of zeros in a few KiB
    assert len(bomb) < 1 << 16
    with pytest.raises(TensorFormatError, match="past"):
        wire.unpack(bomb, limit=1 << 20)


def test_the_orchestrator_checks_what_is_inside_a_frame() -> None:
    want = {"activations": ("BF16", (4, 64, 8))}
    assert integrity.problem_in(wire.pack(activations(), "zstd"), want) is None
    wrong = {"activations": ("BF16", (4, 64, 16))}
    assert integrity.problem_in(wire.pack(activations(), "zstd"), wrong) is not None
    assert "zstd" in (integrity.problem_in(wire.pack(bytes(128 << 20), "zstd"), want) or "")
