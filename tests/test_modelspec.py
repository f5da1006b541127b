"""The framework-agnostic model spec: config checks, stage split, parameter names, init, memory estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iota_cli.core import backend as bk
from iota_cli.core.backend import BackendError
from iota_cli.core.modelspec import (
    ModelConfig,
    estimate_memory,
    initial_weights,
    param_count,
    rope_tables,
    split_layers,
    stage_params,
    stage_spec,
    stage_specs,
)

SMALL = ModelConfig(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, context=16, bottleneck_dim=4)


def test_default_config_sends_128x_fewer_bytes_than_the_residual_stream():
    cfg = ModelConfig()
    assert cfg.compression == 32 and cfg.wire_dtype == "int8"
    assert cfg.wire_bytes_ratio == 128  # IOTA's 64x in width at bfloat16 is 128x too
    assert [s.kind for s in stage_specs(cfg)] == ["head", "body", "tail"]
    assert cfg.stages == (2, 4, 2)  # end stages one layer lighter than the middle (they carry vocab matrices)


@settings(max_examples=200, deadline=None)
@given(n_layers=st.integers(0, 200), n_stages=st.integers(2, 40))
def test_split_layers_covers_every_layer_once(n_layers, n_stages):
    sizes = split_layers(n_layers, n_stages)
    assert len(sizes) == n_stages and sum(sizes) == n_layers and min(sizes) >= 0
    if n_stages > 2 and n_layers >= n_stages:
        assert max(sizes[0], sizes[-1]) <= min(sizes[1:-1])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_heads": 7}, "not divisible by n_heads"),
        ({"n_kv_heads": 3}, "not divisible by n_kv_heads"),
        ({"bottleneck_dim": 0}, "bottleneck_dim"),
        ({"stages": (4,)}, "at least two stages"),
        ({"stages": (1, 1)}, "sum to n_layers"),
        ({"dtype": "float64"}, "dtype must be"),
    ],
)
def test_invalid_configs_say_why(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**SMALL.to_dict(), **change})


def test_config_round_trips_and_ignores_unknown_keys():
    d = {**SMALL.to_dict(), "from_a_newer_server": 1}
    assert ModelConfig.from_dict(d) == SMALL


def test_every_parameter_has_one_owner_and_boundaries_pair_up():
    cfg = ModelConfig(n_layers=6, stages=(1, 2, 2, 1))
    names = [p.name for s in stage_specs(cfg) for p in stage_params(cfg, s)]
    assert len(names) == len(set(names))
    for i in range(cfg.n_stages - 1):  # stage i's down-projection feeds stage i+1's up-projection
        down = next(
            p for p in stage_params(cfg, stage_spec(cfg, i)) if p.name == f"bottleneck.{i}.down_proj.weight"
        )
        up = next(
            p for p in stage_params(cfg, stage_spec(cfg, i + 1)) if p.name == f"bottleneck.{i}.up_proj.weight"
        )
        assert down.shape == (cfg.bottleneck_dim, cfg.d_model) and up.shape == (
            cfg.d_model,
            cfg.bottleneck_dim,
        )
    assert param_count(cfg) == sum(param_count(cfg, s) for s in stage_specs(cfg))


def test_rope_tables_are_rotations_starting_at_zero():
    cos, sin = rope_tables(SMALL, 5)
    half = SMALL.head_dim // 2
    assert cos[:half] == [1.0] * half and sin[:half] == [0.0] * half
    assert all(abs(c * c + s * s - 1) < 1e-12 for c, s in zip(cos, sin, strict=True))
    assert sin[half] == pytest.approx(math.sin(1.0))  # frequency 0 turns one radian per position


def test_initial_weights_follow_the_spec_and_the_seed():
    w = initial_weights(SMALL, 1, seed=3)
    specs = {p.name: p for p in stage_params(SMALL, stage_spec(SMALL, 1))}
    assert set(w) == set(specs)
    for name, t in w.items():
        a = np.frombuffer(t.data, "<f4").reshape(t.shape)
        assert t.dtype == "F32" and t.shape == specs[name].shape
        if specs[name].init == "ones":
            assert (a == 1).all()
        elif a.size >= 1000:
            assert a.std() == pytest.approx(specs[name].std, rel=0.1)
    assert initial_weights(SMALL, 1, seed=3) == w
    assert initial_weights(SMALL, 1, seed=4) != w


@settings(max_examples=100, deadline=None)
@given(
    stage=st.integers(0, 2),
    batch=st.integers(1, 64),
    seq=st.integers(1, 16),
    in_flight=st.integers(0, 8),
    dtype=st.sampled_from(["float32", "bfloat16"]),
)
def test_memory_estimate_is_monotonic(stage, batch, seq, in_flight, dtype):
    cfg = ModelConfig(**{**SMALL.to_dict(), "dtype": dtype})
    m = estimate_memory(cfg, stage, batch, seq, in_flight)
    assert m >= 16 * param_count(cfg, stage_spec(cfg, stage))  # weights, grads, two Adam moments
    assert estimate_memory(cfg, stage, batch + 1, seq, in_flight) > m
    assert estimate_memory(cfg, stage, batch, seq + 1, in_flight) > m
    assert estimate_memory(cfg, stage, batch, seq, in_flight + 1) > m
    assert estimate_memory(cfg, stage_spec(cfg, stage), batch, seq, in_flight) == m


def test_memory_of_the_default_config_is_plausible():
    cfg = ModelConfig()
    body = estimate_memory(cfg, 1, 8, 256)
    assert 16 * param_count(cfg, stage_spec(cfg, 1)) < body < 2**30


@pytest.mark.parametrize(
    "system, machine, nvidia, want",
    [
        ("Darwin", "arm64", False, "mlx"),
        ("Darwin", "x86_64", False, None),  # Intel Mac, or a Python under Rosetta
        ("Linux", "x86_64", True, "torch-cuda"),
        ("Linux", "x86_64", False, None),
    ],
)
def test_auto_choice(system, machine, nvidia, want):
    assert bk.auto_choice(system, machine, nvidia) == want


def test_no_accelerator_points_to_the_cpu_backend(monkeypatch):
    monkeypatch.setattr(bk, "detect_auto_choice", lambda: None)
    with pytest.raises(BackendError, match="--backend torch-cpu"):
        bk.select_backend()
    with pytest.raises(BackendError, match="unknown backend"):
        bk.select_backend("rocm-someday")
