"""The merge's framework-free math (core.flat, core.outer): layout, partitions, the wire, the outer step."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from iota_cli.core import tensors
from iota_cli.core.flat import (
    FlatLayout,
    check_update,
    from_wire,
    owners,
    part_blob,
    partitions,
    read_part,
    to_wire,
    update_blob,
    update_span,
    wire_round,
)
from iota_cli.core.manifest import TINY_MODEL, MergeConfig
from iota_cli.core.modelspec import initial_weights
from iota_cli.core.outer import momentum_at, outer_step, overlap, reduce_partition, weighted_mean

RNG = np.random.default_rng(12)


def header_of(blob: bytes) -> tensors.Header:
    return tensors.parse_header(blob, len(blob))


# --- layout ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", range(TINY_MODEL.n_stages))
def test_flatten_round_trips_a_real_stage_and_is_the_weights_files_data(stage):
    weights = initial_weights(TINY_MODEL, stage, seed=3)
    layout = FlatLayout.of(TINY_MODEL, stage)
    assert set(layout.names) == set(weights) and layout.size == sum(t.nbytes for t in weights.values()) // 4
    vec = layout.flatten(weights)
    assert vec.dtype == np.float32 and vec.shape == (layout.size,)
    assert layout.unflatten(vec) == weights
    blob = tensors.encode(layout.unflatten(vec))
    assert blob[header_of(blob).data_start :] == vec.astype("<f4").tobytes()
    assert tensors.encode(weights)[header_of(blob).data_start :] == vec.tobytes()
    name = layout.names[-1]
    a, b = layout.offsets[-2], layout.offsets[-1]
    assert vec[a:b].tobytes() == weights[name].data and layout.offsets[0] == 0


def test_flatten_reads_bf16_and_refuses_what_is_not_the_layout():
    weights = initial_weights(TINY_MODEL, 1)
    layout = FlatLayout.of(TINY_MODEL, 1)
    name = layout.names[0]
    vec = layout.flatten(weights)
    a, b = layout.offsets[0], layout.offsets[1]
    halved = {**weights, name: tensors.RawTensor("BF16", weights[name].shape, to_wire(vec[a:b], "BF16"))}
    assert np.array_equal(layout.flatten(halved)[a:b], wire_round(vec[a:b], "BF16"))
    with pytest.raises(ValueError, match="missing"):
        layout.flatten({k: v for k, v in weights.items() if k != name})
    with pytest.raises(ValueError, match="extra"):
        layout.flatten({**weights, "zz.weight": weights[name]})
    wrong = tensors.RawTensor("F32", (1, weights[name].nbytes // 4), weights[name].data)
    with pytest.raises(ValueError, match="shape"):
        layout.flatten({**weights, name: wrong})
    with pytest.raises(ValueError, match="1-D of"):
        layout.unflatten(vec[:-1])
    with pytest.raises(ValueError, match="sorted"):
        FlatLayout(("b", "a"), ((1,), (1,)))


# --- partitions and owners ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000, 12_345])
@pytest.mark.parametrize("count", [-1, 0, 1, 2, 3, 5, 8, 13, 5000])
def test_partitions_tile_the_vector_near_equally(size, count):
    parts = partitions(size, count)
    assert len(parts) == max(1, min(count, size))
    assert parts[0][0] == 0 and parts[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
    lengths = [stop - start for start, stop in parts]
    assert min(lengths) >= 1 and max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 5, 8, 16])
def test_every_contributor_owns_two_partitions_with_distinct_owners(replicas):
    owned = [owners(p, replicas) for p in range(replicas)]
    if replicas == 1:
        assert owned == [(0,)]
        return
    assert all(len(set(o)) == 2 and all(0 <= i < replicas for i in o) for o in owned)
    for i in range(replicas):
        assert sum(i in o for o in owned) == 2


# --- the wire -------------------------------------------------------------------------------------------


def bf16_cases() -> np.ndarray:
    f32 = np.finfo(np.float32)
    specials = [0.0, -0.0, 1.0, -1.0, f32.max, -f32.max, f32.tiny, f32.smallest_subnormal, np.inf, -np.inf]
    # Exact halfway points between bf16 neighbours (ties to even both ways), and just either side of them.
    halves = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x7F7F8000, 0x00008000, 0x80018000])
    near = np.concatenate([halves, halves + 1, halves - 1]).astype("<u4").view("<f4")
    random = np.concatenate(
        [
            RNG.standard_normal(4000).astype(np.float32),
            (RNG.standard_normal(1000) * 1e36).astype(np.float32),
            (RNG.standard_normal(1000) * 1e-38).astype(np.float32),  # subnormals
            RNG.integers(0, 2**32, 4000, dtype=np.uint64).astype("<u4").view("<f4"),  # any bits, NaN too
        ]
    )
    return np.concatenate([np.array(specials, dtype=np.float32), near, random])


def test_bf16_matches_torch_bit_for_bit():
    torch = pytest.importorskip("torch")
    x = bf16_cases()
    ours = np.frombuffer(to_wire(x, "BF16"), dtype="<u2")
    theirs = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view("<u2")
    finite = ~np.isnan(x)
    assert np.array_equal(ours[finite], theirs[finite])
    assert np.all((ours[~finite] & 0x7F80) == 0x7F80) and np.all(ours[~finite] & 0x7F)  # NaN stays NaN
    back = torch.from_numpy(theirs.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    assert np.array_equal(wire_round(x, "BF16")[finite], back[finite])


def test_wire_round_trips_and_agrees_with_the_tensors_bf16_checks():
    x = bf16_cases()
    for dtype in ("F32", "BF16"):
        again = from_wire(to_wire(x, dtype), dtype)  # type: ignore[arg-type]
        assert again.dtype == np.float32 and again.flags.writeable
        assert np.array_equal(again, wire_round(x, dtype), equal_nan=True)  # type: ignore[arg-type]
        assert to_wire(again, dtype) == to_wire(x, dtype)  # type: ignore[arg-type]
    # f32's largest value is past bf16's (3.39e38): it rounds to inf, which the tensors check must see.
    y = np.array([1.0, 2.0**-133, 3.0e38, -5.5, np.finfo(np.float32).max], dtype=np.float32)
    assert np.isfinite(wire_round(y, "BF16")).tolist() == [True, True, True, True, False]
    assert not tensors.all_finite(tensors.RawTensor("BF16", (5,), to_wire(y, "BF16")))
    assert tensors.all_finite(tensors.RawTensor("BF16", (4,), to_wire(y[:4], "BF16")))
    with pytest.raises(ValueError, match="whole number"):
        from_wire(b"\x00\x00\x80", "BF16")


def test_an_update_blob_is_sliced_by_its_ranges():
    vec = RNG.standard_normal(1001).astype(np.float32)
    for dtype in ("BF16", "F32"):
        blob = update_blob(vec, dtype)  # type: ignore[arg-type]
        header = header_of(blob)
        assert check_update(header, vec.size, dtype) is None  # type: ignore[arg-type]
        for start, stop in partitions(vec.size, 7) + [(0, 0), (1000, 1001)]:
            offset, length = update_span(header, start, stop)
            got = from_wire(blob[offset : offset + length], dtype)  # type: ignore[arg-type]
            assert np.array_equal(got, wire_round(vec[start:stop], dtype))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="outside"):
            update_span(header, 5, 1002)
    header = header_of(update_blob(vec, "BF16"))
    assert "expected F32" in (check_update(header, vec.size, "F32") or "")
    assert "1000" in (check_update(header, 1000, "BF16") or "")
    other = header_of(tensors.encode({"weights": tensors.RawTensor("BF16", (2,), bytes(4))}))
    assert "update" in (check_update(other, 2, "BF16") or "")


def test_a_part_blob_reads_back_and_anything_else_is_refused():
    w, m = RNG.standard_normal(50).astype(np.float32), RNG.standard_normal(50).astype(np.float32)
    got_w, got_m = read_part(part_blob(w, m, "BF16"), 50, "BF16", with_momentum=True)
    assert np.array_equal(got_w, w) and got_m is not None and np.array_equal(got_m, wire_round(m, "BF16"))
    assert read_part(part_blob(w, None, "BF16"), 50, "BF16", with_momentum=False)[1] is None
    bad_w = w.copy()
    bad_w[7] = np.nan
    refused = {
        "NaN": (part_blob(bad_w, m, "BF16"), "NaN"),
        "inf momentum": (part_blob(w, np.full(50, np.inf, np.float32), "BF16"), "NaN or inf"),
        "short": (part_blob(w[:49], m[:49], "BF16"), "expected"),
        "no momentum": (part_blob(w, None, "BF16"), "expected"),
        "momentum F32": (part_blob(w, m, "F32"), "expected"),
        "renamed": (tensors.encode({"weight": tensors.RawTensor("F32", (50,), w.tobytes())}), "expected"),
        "not safetensors": (b"\x08" + bytes(20), "header"),
    }
    for case, (blob, message) in refused.items():
        with pytest.raises(ValueError, match=message):
            read_part(blob, 50, "BF16", with_momentum=True)
            pytest.fail(case)
    with pytest.raises(ValueError, match="expected"):  # momentum that nobody asked for
        read_part(part_blob(w, m, "BF16"), 50, "BF16", with_momentum=False)
    # The blob is plain safetensors: the F32 weights are the raw bytes right after the header.
    blob = part_blob(w, m, "BF16")
    (n,) = struct.unpack("<Q", blob[:8])
    assert json.loads(blob[8 : 8 + n])["weights"]["dtype"] == "F32"


# --- the outer step -------------------------------------------------------------------------------------


def test_weighted_mean_is_the_float64_weighted_average():
    u = [np.array([1.0, 2.0, -3.0], np.float32), np.array([4.0, 0.5, 3.0], np.float32)]
    # (1*1 + 3*4)/4, (1*2 + 3*0.5)/4, (1*-3 + 3*3)/4
    assert weighted_mean(u, [1.0, 3.0]).tolist() == [3.25, 0.875, 1.5]
    tiny = [np.array([1e-30], np.float32), np.array([3e-30], np.float32)]
    assert weighted_mean(tiny, [1e30, 1e30]).dtype == np.float32
    assert weighted_mean(tiny, [1e30, 1e30])[0] == np.float32(2e-30)
    assert weighted_mean(u, [0.0, 2.0]).tolist() == u[1].tolist()
    for updates, weights, message in [
        ([], [], "no updates"),
        (u, [1.0], "2 updates but 1"),
        (u, [0.0, 0.0], "zero"),
        (u, [-1.0, 2.0], "non-negative"),
        (u, [float("nan"), 1.0], "finite"),
        ([u[0], u[1][:2]], [1.0, 1.0], "one length"),
    ]:
        with pytest.raises(ValueError, match=message):
            weighted_mean(updates, weights)


def test_average_is_the_weighted_average_of_the_replicas_weights():
    cfg = MergeConfig(strategy="average", wire_dtype="F32")
    base = RNG.standard_normal(300).astype(np.float32)
    local = [base + RNG.standard_normal(300).astype(np.float32) * 0.01 for _ in range(3)]
    work = [2.0, 1.0, 5.0]
    new, momentum = reduce_partition(cfg, base, [base - x for x in local], work, None, 4)
    want = sum(w * x.astype(np.float64) for w, x in zip(work, local, strict=True)) / sum(work)
    assert momentum is None and new.dtype == np.float32
    np.testing.assert_allclose(new, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("wire", ["F32", "BF16"])
def test_diloco_first_round_is_nesterov_from_zero_momentum(wire):
    cfg = MergeConfig(
        strategy="diloco", wire_dtype=wire, outer_lr=0.7, momentum_start=0.5, outer_momentum=0.9
    )
    base = RNG.standard_normal(200).astype(np.float32)
    mean = (RNG.standard_normal(200) * 0.01).astype(np.float32)
    new, m = outer_step(cfg, base, mean, None, 0)
    assert m is not None and np.array_equal(m, wire_round(mean, wire))  # type: ignore[arg-type]
    want = base - 0.7 * (1 + 0.5) * mean.astype(np.float64)
    # One f32 rounding of the exact value, plus (BF16) the momentum's rounding: at most 2**-8 of mean.
    slack = 0.7 * 0.5 * np.abs(mean) * 2.0**-8 if wire == "BF16" else 0.0
    assert np.all(np.abs(new - want) <= slack + np.spacing(np.abs(new)))
    # The second round carries the (rounded) momentum: m2 = mu * m + g, new = base - lr * (g + mu * m2).
    mu = momentum_at(cfg, 1)
    new2, m2 = outer_step(cfg, new, mean, m, 1)
    m2_want = wire_round((mu * m.astype(np.float64) + mean).astype(np.float32), wire)  # type: ignore[arg-type]
    assert m2 is not None and np.array_equal(m2, m2_want)
    want2 = new - 0.7 * (mean + mu * m2_want.astype(np.float64))
    np.testing.assert_allclose(new2, want2, rtol=1.2e-7, atol=1e-9)
    assert not np.array_equal(m2, m)


def test_momentum_warms_up_linearly_then_holds():
    cfg = MergeConfig(momentum_start=0.5, outer_momentum=0.9, momentum_warmup=4)
    assert [momentum_at(cfg, e) for e in range(7)] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9])
    assert momentum_at(MergeConfig(momentum_start=0.1, outer_momentum=0.8, momentum_warmup=0), 0) == 0.8


def test_reduction_is_deterministic_bytes():
    cfg = MergeConfig(strategy="diloco", wire_dtype="BF16")
    base = RNG.standard_normal(4096).astype(np.float32)
    updates = [from_wire(to_wire(RNG.standard_normal(4096) * 1e-3, "BF16"), "BF16") for _ in range(5)]
    work = [3.0, 1.0, 4.0, 1.0, 5.0]
    momentum = wire_round(RNG.standard_normal(4096) * 1e-3, "BF16")
    results = [
        reduce_partition(cfg, base.copy(), [u.copy() for u in updates], work, momentum, 7) for _ in range(3)
    ]
    blobs = {part_blob(w, m, "BF16") for w, m in results}
    assert len(blobs) == 1
    # Reducing a partition on its slice gives the slice of reducing the whole vector.
    a, b = partitions(4096, 3)[1]
    w_part, m_part = reduce_partition(cfg, base[a:b], [u[a:b] for u in updates], work, momentum[a:b], 7)
    assert w_part.tobytes() == results[0][0][a:b].tobytes() and m_part is not None
    assert m_part.tobytes() == results[0][1][a:b].tobytes()  # type: ignore[index]


def test_overlap_keeps_the_local_progress_since_the_snapshot():
    snapshot = RNG.standard_normal(100).astype(np.float32)
    current = snapshot + np.float32(0.25)
    merged = RNG.standard_normal(100).astype(np.float32)
    out = overlap(current, snapshot, merged)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, merged + 0.25, rtol=0, atol=1e-6)
    assert np.array_equal(overlap(snapshot, snapshot, merged), merged)
    with pytest.raises(ValueError, match="shapes differ"):
        overlap(current[:-1], snapshot, merged)
