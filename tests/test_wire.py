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


# --- the int8 wire (model.wire_dtype = "int8") ------------------------------------------------------------


def boundary(b: int = 2, t: int = 16, d: int = 4, seed: int = 1) -> RawTensor:
    x = np.random.default_rng(seed).standard_normal((b, t, d)).astype(np.float32)
    x[0, :, 1] *= 1e-6  # a channel of gradient-sized values keeps its own scale
    return RawTensor("F32", (b, t, d), x.tobytes())


def values(t: RawTensor) -> np.ndarray:
    return np.frombuffer(t.data, dtype=np.float32).reshape(t.shape)


def test_int8_rounds_each_value_within_half_a_step_of_its_row() -> None:
    t = boundary()
    q = wire.quantize({"activations": t, "proof": RawTensor("F32", (3,), bytes(12))})
    assert q["activations"].dtype == "I8" and q["activations.scale"].shape == (2, 1, 4)
    assert q["proof"].dtype == "F32"  # not a boundary tensor: untouched
    back = wire.dequantize(q)
    assert set(back) == {"activations", "proof"}
    x, y = values(t), values(back["activations"])
    step = np.abs(x).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(x - y) <= step / 2 + 1e-12)
    assert np.abs(y[0, :, 1]).max() > 0  # the tiny channel survived its neighbours' large scale


def test_an_int8_frame_reads_back_as_float32_and_is_smaller() -> None:
    t = boundary(8, 128, 8)
    fmt = wire.WireFormat(int8=True, codec="zstd")
    blob = fmt.frame({"activations": t})
    assert len(blob) < len(encode({"activations": t})) / 3.5
    got = decode(wire.unpack(blob))[0]
    assert set(got) == {"activations"} and got["activations"].dtype == "F32"
    assert got["activations"].shape == t.shape


def test_int8_without_its_scales_is_malformed() -> None:
    q = wire.quantize({"activations": boundary()})
    del q["activations.scale"]
    with pytest.raises(TensorFormatError, match="scales"):
        wire.unpack(encode(q))


def test_the_orchestrator_reads_an_int8_upload_dequantized() -> None:
    t = boundary(4, 64, 8)
    blob = wire.WireFormat(int8=True, codec="zstd").frame({"activations": t})
    assert integrity.problem_in(blob, {"activations": ("F32", (4, 64, 8))}) is None
    bad = wire.quantize({"activations": t})
    bad["activations.scale"] = RawTensor("F32", (4, 1, 8), np.full((4, 1, 8), np.inf, "<f4").tobytes())
    want = {"activations": ("F32", (4, 64, 8))}
    assert "NaN or infinite" in (integrity.problem_in(encode(bad), want) or "")


@pytest.mark.parametrize("backend", ["torch-cpu", "mlx-cpu"])
def test_an_int8_run_keeps_float32_boundaries_in_every_backend(backend: str) -> None:
    import dataclasses

    import stage_contract

    from iota_cli.core.backend import get_factory

    pytest.importorskip("torch" if backend.startswith("torch") else "mlx.core")
    cfg = dataclasses.replace(stage_contract.CFG, wire_dtype="int8")
    assert cfg.boundary_dtype == "float32"
    head = get_factory(backend).create(cfg, 0, stage_contract.OPTIM, seed=0)
    out = head.forward("w", stage_contract.stage_input(0, seed=3))
    assert out["activations"].dtype == "F32"
    body = get_factory(backend).create(cfg, 1, stage_contract.OPTIM, seed=0)
    sent = decode(wire.unpack(wire.WireFormat(int8=True, codec="zstd").frame(out)))[0]
    assert body.forward("w", sent)["activations"].dtype == "F32"  # it takes the dequantized tensor
