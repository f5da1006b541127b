"""Checkpoints: round trips, keep-last-two, corruption detected, and no crash mid-write ever loads wrong."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.tensors import DTYPE_SIZES, RawTensor, decode
from iota_cli.train.checkpoint import (
    CheckpointError,
    CheckpointStore,
    LoopState,
    manifest_fingerprint,
    pack,
    unpack,
)


def state(step: int, **kw) -> LoopState:
    return LoopState(run_id="r1", contributor_id="c1", stage=1, step=step, **kw)


def tensors(step: int) -> tuple[dict[str, RawTensor], dict[str, RawTensor]]:
    """Weights and optimizer state whose bytes say which step they belong to."""
    w = {"layers.0.wq": RawTensor("F32", (4, 8), struct.pack("<32f", *[step + i / 64 for i in range(32)]))}
    opt = {
        "layers.0.wq.exp_avg": RawTensor("F32", (4, 8), struct.pack("<32f", *[-step] * 32)),
        "step": RawTensor("I64", (), struct.pack("<q", step)),
    }
    return w, opt


def test_round_trip(tmp_path):
    store = CheckpointStore(tmp_path)
    w, opt = tensors(7)
    s = state(
        7, backward_passes=28, epoch=2, credits_seen=12.5, tokens=4096, fingerprint="abc", backend="torch-cpu"
    )
    path = store.save(s, w, opt)
    assert path.name == "ckpt-7.safetensors"
    ck = store.load_latest()
    assert ck is not None and ck.path == path
    assert (ck.weights, ck.optimizer) == (w, opt)
    assert ck.state == s.__class__(**{**s.to_dict(), "saved_at": ck.state.saved_at})
    assert abs(ck.state.saved_at - time.time()) < 60


def test_file_is_plain_safetensors_with_loop_state_in_metadata(tmp_path):
    w, opt = tensors(3)
    path = CheckpointStore(tmp_path).save(state(3), w, opt)
    decoded, meta = decode(path.read_bytes())
    assert set(decoded) == {"weights/layers.0.wq", "optimizer/layers.0.wq.exp_avg", "optimizer/step"}
    assert json.loads(meta["state"])["step"] == 3 and meta["format_version"] == "1"
    # torch and numpy-free readers alike: the safetensors library itself accepts the file.
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert set(f.keys()) == set(decoded)


def test_keeps_the_last_two(tmp_path):
    store = CheckpointStore(tmp_path)
    for step in range(1, 6):
        store.save(state(step), *tensors(step))
    assert [p.name for p in store.paths()] == ["ckpt-5.safetensors", "ckpt-4.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "ckpt-4.safetensors", "ckpt-5.safetensors"]


def test_truncated_newest_falls_back_to_previous(tmp_path, caplog):
    store = CheckpointStore(tmp_path)
    store.save(state(1), *tensors(1))
    newest = store.save(state(2), *tensors(2))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) - 10])
    with caplog.at_level(logging.WARNING, logger="iota.checkpoint"):
        ck = store.load_latest()
    assert ck is not None and ck.state.step == 1 and ck.weights == tensors(1)[0]
    assert str(newest) in caplog.text


@pytest.mark.parametrize("cut", [0, 5, 8, 40])
def test_header_cut_short_is_rejected(tmp_path, cut):
    blob = pack(state(1), *tensors(1))
    with pytest.raises(CheckpointError):
        unpack(blob[:cut])


def test_every_bit_flip_is_detected():
    blob = pack(state(9, credits_seen=1.0), *tensors(9))
    rng = random.Random(0)
    positions = list(range(0, 200)) + rng.sample(range(len(blob)), 300)  # the whole header, then anywhere
    for pos in positions:
        for bit in (0, 7):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            with pytest.raises(CheckpointError):
                unpack(bytes(bad))


def test_bit_flip_on_disk_falls_back(tmp_path, caplog):
    store = CheckpointStore(tmp_path)
    store.save(state(1), *tensors(1))
    newest = store.save(state(2), *tensors(2))
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0x10
    newest.write_bytes(bytes(data))
    ck = store.load_latest()
    assert ck is not None and ck.state.step == 1
    assert "sha256 mismatch" in caplog.text


def test_all_corrupt_or_none_gives_none(tmp_path):
    store = CheckpointStore(tmp_path / "nothing-yet")
    assert store.load_latest() is None and store.latest_info() is None
    p = CheckpointStore(tmp_path).save(state(1), *tensors(1))
    p.write_bytes(b"garbage")
    assert CheckpointStore(tmp_path).load_latest() is None


def test_fingerprint_mismatch_is_refused(tmp_path):
    fp = manifest_fingerprint(tiny_manifest("/data"))
    assert fp == manifest_fingerprint(tiny_manifest("/data")) and fp != manifest_fingerprint(
        tiny_manifest("/x")
    )
    store = CheckpointStore(tmp_path)
    store.save(state(4, fingerprint=fp), *tensors(4))
    assert store.load_latest(fingerprint=fp) is not None
    assert store.load_latest(fingerprint=manifest_fingerprint(tiny_manifest("/x"))) is None


def test_newer_format_is_refused_with_a_clear_message(monkeypatch):
    import iota_cli.train.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 9)
    blob = pack(state(1), *tensors(1))
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 1)
    with pytest.raises(CheckpointError, match="newer iota"):
        unpack(blob)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):  # an edited version is just damage
        unpack(blob.replace(b'"format_version":"9"', b'"format_version":"1"'))


def test_latest_info_reads_only_the_header(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(state(1), *tensors(1))
    path = store.save(state(2, tokens=999), *tensors(2))
    info = store.latest_info()
    assert info is not None and info.path == path and info.state.step == 2 and info.state.tokens == 999
    assert info.size == path.stat().st_size and info.to_dict()["step"] == 2
    with open(path, "r+b") as f:  # damage the tensor data: the header still reads, so status still shows it
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff" * 4)
    assert store.latest_info().state.step == 2


def test_discard(tmp_path):
    store = CheckpointStore(tmp_path)
    for step in (1, 2):
        store.save(state(step), *tensors(step))
    assert store.discard() == 2
    assert store.load_latest() is None and store.paths() == []


def test_second_writer_is_refused(tmp_path):
    first = CheckpointStore(tmp_path)
    first.save(state(1), *tensors(1))
    with pytest.raises(CheckpointError, match="another iota worker"):
        CheckpointStore(tmp_path).save(state(2), *tensors(2))
    first.close()
    CheckpointStore(tmp_path).save(state(2), *tensors(2))


def test_loop_state_ignores_unknown_keys():
    d = {**state(3).to_dict(), "added_in_v2": [1, 2]}
    assert LoopState.from_dict(d) == state(3)


WRITER = textwrap.dedent(
    """
    import struct, sys
    from pathlib import Path
    from iota_cli.train.checkpoint import CheckpointStore, LoopState
    from iota_cli.core.tensors import RawTensor

    store, start = CheckpointStore(Path(sys.argv[1])), int(sys.argv[2])
    n = 1 << 20  # 4 MiB of float32 per tensor
    step = start
    while True:
        fill = struct.pack("<f", float(step)) * n
        w = {"w": RawTensor("F32", (n,), fill)}
        opt = {"w.exp_avg": RawTensor("F32", (n,), fill)}
        opt["step"] = RawTensor("I64", (), struct.pack("<q", step))
        store.save(LoopState("r", "c", 0, step=step, tokens=step * 10), w, opt)
        print(step, flush=True)
        step += 1
    """
)


def test_crash_mid_write_never_loads_wrong(tmp_path):
    rng = random.Random(1234)
    next_step, last_done, mid_write, rounds = 1, 0, 0, 0
    while mid_write < 2 and rounds < 20:  # until a kill has twice landed inside a write
        rounds += 1
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), str(next_step)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        last_done = int(child.stdout.readline())  # one checkpoint is surely on disk
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        for line in child.communicate()[0].split():
            last_done = int(line)
        mid_write += bool(list(tmp_path.glob(".ckpt-*.tmp")))
        ck = CheckpointStore(tmp_path).load_latest()
        assert ck is not None and ck.state.step >= last_done  # nothing that save() returned from is lost
        expect = struct.pack("<f", float(ck.state.step)) * (1 << 20)
        assert ck.weights["w"].data == expect and ck.optimizer["w.exp_avg"].data == expect
        assert ck.state.tokens == ck.state.step * 10
        next_step = ck.state.step + 1
    assert mid_write >= 1, "no kill landed mid-write; the test proved nothing"
    # leftovers of the killed writes are swept by the next writer
    CheckpointStore(tmp_path).save(LoopState("r", "c", 0, step=next_step), {}, {})
    assert not list(tmp_path.glob(".ckpt-*.tmp"))


names = st.text("abcdefghij0123456789._", min_size=1, max_size=12)


@st.composite
def raw_tensors(draw) -> RawTensor:
    dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return RawTensor(dtype, shape, draw(st.binary(min_size=n, max_size=n)))


loop_states = st.builds(
    LoopState,
    run_id=st.text(max_size=20),
    contributor_id=st.text(max_size=20),
    stage=st.integers(0, 64),
    step=st.integers(0, 2**40),
    backward_passes=st.integers(0, 2**40),
    since_merge=st.integers(0, 10**6),
    epoch=st.integers(0, 10**6),
    credits_seen=st.floats(0, 1e12, allow_nan=False),
    tokens=st.integers(0, 2**50),
    fingerprint=st.text("0123456789abcdef", max_size=16),
    backend=st.sampled_from(["torch-cpu", "mlx-cpu", ""]),
    saved_at=st.floats(0, 2e9, allow_nan=False),
)


@settings(max_examples=40, deadline=None)
@given(
    loop_states,
    st.dictionaries(names, raw_tensors(), max_size=4),
    st.dictionaries(names, raw_tensors(), max_size=4),
)
def test_pack_unpack_round_trip(s, weights, optimizer):
    assert unpack(pack(s, weights, optimizer)) == (s, weights, optimizer)
