"""The MLX backend (mlx-cpu here; the same code runs on Metal): the stage contract on its kernel, extras."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import iota_mlx  # noqa: E402
from stage_contract import CFG, OPTIM, StageContract, arr  # noqa: E402

from iota_cli.core.backend import BackendError  # noqa: E402
from iota_cli.core.tensors import RawTensor  # noqa: E402


class TestMlxStage(StageContract):
    factory = iota_mlx.cpu_backend


def test_bfloat16_bytes_cross_into_mlx_and_back_bit_exact():
    from iota_mlx.stage import from_mx, to_mx

    bits = np.random.default_rng(0).integers(0, 1 << 16, 1000, dtype=np.uint16)
    bits = bits[(bits & 0x7F80) != 0x7F80]  # drop NaN/inf patterns, which may be canonicalised
    t = RawTensor("BF16", bits.shape, bits.astype("<u2").tobytes())
    a = to_mx(t)
    assert a.dtype == mx.bfloat16
    assert from_mx(a) == t
    np.testing.assert_array_equal(np.array(a.astype(mx.float32)), arr(t))


def test_metal_says_why_it_is_unavailable_off_apple_silicon():
    if mx.metal.is_available():
        pytest.skip("this machine has Metal")
    ok, why = iota_mlx.metal_backend.available()
    assert not ok and "Metal" in why
    with pytest.raises(BackendError, match="not available"):
        iota_mlx.metal_backend.create(CFG, 0, OPTIM)
