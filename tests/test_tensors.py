"""The one safetensors parser: whatever bytes arrive, it returns tensors or raises TensorFormatError.

Cases are the ones a probe sent to the first landing (float offsets, a non-object __metadata__, headers
nested 6,000 deep, a shape of 1e999, NaN literals), plus gaps, overlaps and random corruption.
"""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iota_cli.core.tensors import (
    RawTensor,
    TensorFormatError,
    all_finite,
    decode,
    encode,
    mismatch,
    parse_header,
    read_header,
)

GOOD = {"a": RawTensor("F32", (2, 3), struct.pack("<6f", *range(6))), "b": RawTensor("I32", (2,), bytes(8))}


def container(header: object, data: bytes = b"", raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def test_round_trip_keeps_names_shapes_bytes_and_metadata():
    tensors, meta = decode(encode(GOOD, {"stage": "1"}))
    assert tensors == GOOD and meta == {"stage": "1"}


@pytest.mark.parametrize(
    "header, data, words",
    [
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, bytes(4), "data_offsets"),
        (
            {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": [1]},
            bytes(4),
            "metadata",
        ),
        ({"__metadata__": {"k": 1}}, b"", "metadata"),
        (b'{"a": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 4]}}', bytes(4), "shape"),
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4), "shape"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), "shape"),
        ({"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8), "dtype"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4), "match"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), "gaps"),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            bytes(4),
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(12), "data section"),
        ({"a": "F32"}, b"", "bad header entry"),
        ([1, 2], b"", "not an object"),
    ],
)
def test_malformed_headers_are_refused_with_a_reason(header, data, words):
    with pytest.raises(TensorFormatError, match=words):
        decode(container(header, data, raw=header if isinstance(header, bytes) else None))


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 6000 + b"]" * 6000,
        b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}',
        b'{"a": Infinity}',
        b'{"a": "\\ud800"}  ',
        b"\xff\xfe not utf-8",
        b"",
    ],
)
def test_hostile_json_is_a_format_error(raw):
    with pytest.raises(TensorFormatError):
        decode(container(None, raw=raw))


def test_lengths_out_of_range():
    with pytest.raises(TensorFormatError):
        decode(b"\x00" * 7)
    with pytest.raises(TensorFormatError):
        decode(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(TensorFormatError):
        decode(struct.pack("<Q", 100) + b"{}")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_corruption_is_a_format_error_or_a_valid_decode(data):
    blob = bytearray(encode(GOOD, {"k": "v"}))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        tensors, _ = decode(bytes(blob[:cut]))
    except TensorFormatError:
        return
    for t in tensors.values():
        assert len(t.data) == math.prod(t.shape) * {"F32": 4, "I32": 4}.get(t.dtype, len(t.data))


def test_read_header_reads_a_file_without_its_data(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(encode(GOOD))
    h = read_header(p)
    assert h.spec() == {"a": ("F32", (2, 3)), "b": ("I32", (2,))}
    assert mismatch(h, {"a": ("F32", (2, 3)), "b": ("I32", (2,))}) is None
    assert "expected F16" in (mismatch(h, {"a": ("F16", (2, 3)), "b": ("I32", (2,))}) or "")
    assert "expected" in (mismatch(h, {"a": ("F32", (2, 3))}) or "")
    p.write_bytes(encode(GOOD)[:-1])
    with pytest.raises(TensorFormatError):
        read_header(p)
    assert parse_header(encode(GOOD), len(encode(GOOD))).data_start > 8


@pytest.mark.parametrize(
    "dtype, bad",
    [
        ("F32", struct.pack("<f", float("nan"))),
        ("F32", struct.pack("<f", float("inf"))),
        ("F16", struct.pack("<e", float("-inf"))),
        ("BF16", struct.pack("<H", 0x7FC0)),  # bf16 NaN
        ("BF16", struct.pack("<H", 0xFF80)),  # bf16 -inf
    ],
)
def test_non_finite_values_are_found_in_every_float_dtype(dtype, bad):
    size = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    fine = RawTensor(dtype, (3,), bytes(3 * size))
    assert all_finite(fine)
    assert not all_finite(RawTensor(dtype, (3,), bytes(size) + bad + bytes(size)))
    assert all_finite(RawTensor("I32", (1,), b"\xff\xff\xff\xff"))
