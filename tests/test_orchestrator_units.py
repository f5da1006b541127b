"""The orchestrator's pure parts, without a server: data sharding, weights, blob keys and URLs,
migrations, credits, and the import boundary between the core and the orchestrator."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from iota_orchestrator import data, db, integrity, ledger, runs, weights
from iota_orchestrator.blobs import check_key
from iota_orchestrator.dirblobs import DirStore, UploadSink
from iota_orchestrator.errors import ApiError, BadRequest, Forbidden, TooLarge, Unauthorized
from sqlalchemy import inspect, text

from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.modelspec import EOS_ID, ModelConfig, stage_params, stage_spec
from iota_cli.core.tensors import RawTensor, decode, encode


def test_every_sample_once_per_epoch_and_never_across_a_shard(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"abc" * 3000)
    (tmp_path / "b.txt").write_bytes(b"xyz" * 1000)
    (tmp_path / "bin.dat").write_bytes(b"\0\1\2" * 100)  # binary: skipped
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.txt").write_text("hidden")
    files = data.index_files(data.list_files(str(tmp_path)))
    assert [f.path.rsplit("/", 1)[1] for f in files] == ["a.txt", "b.txt"]
    layout = data.Layout(files[-1].start + files[-1].size + 1, shard_tokens=1000, sample_tokens=3 * 33)
    n = layout.n_samples
    assert n == 12 * 10 + 0  # 12,002 tokens: 12 full shards of 10 samples, a 2-token rest
    drawn = [data.data_index(k, n, seed=7) for k in range(2 * n)]
    assert sorted(drawn[:n]) == list(range(n)) and sorted(drawn[n:]) == list(range(n))
    assert drawn[:n] != drawn[n:], "each epoch has its own order"
    for i in range(n):
        shard, offset = layout.locate(i)
        assert offset + layout.sample_tokens <= layout.shard_tokens
    stream = np.frombuffer(b"abc" * 3000 + b"\0" + b"xyz" * 1000 + b"\0", np.uint8).astype(np.int32)
    stream[9000] = stream[-1] = EOS_ID
    for i in (0, 90, n - 1):
        got = data.sample_tokens(files, layout, i, batch=3, seq=32)
        start = layout.stream_offset(i)
        assert got.shape == (3, 33)
        np.testing.assert_array_equal(got.ravel(), stream[start : start + 99])


def test_glob_sources_and_empty_sources(tmp_path):
    (tmp_path / "x.py").write_text("print(1)\n")
    (tmp_path / "y.txt").write_text("hello\n")
    assert [p.name for p in data.list_files(str(tmp_path / "*.py"))] == ["x.py"]
    assert data.list_files(str(tmp_path / "missing")) == [] and data.list_files("") == []


def test_init_is_deterministic_per_name_whatever_the_split():
    cfg = ModelConfig(
        d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, context=64, bottleneck_dim=4
    )
    other = ModelConfig(**{**cfg.to_dict(), "stages": [2, 2]})
    a, _ = decode(weights.init_stage(cfg, 1, seed=3))
    b, _ = decode(weights.init_stage(other, 0, seed=3))
    specs = {p.name: p for p in stage_params(cfg, stage_spec(cfg, 1))}
    assert set(a) == set(specs)
    for name, p in specs.items():
        assert a[name].shape == p.shape and a[name].dtype == "F32"
    shared = "layers.1.mlp.up_proj.weight"
    assert a[shared].data == b[shared].data
    w = np.frombuffer(a[shared].data, np.float32)
    assert abs(w.std() - specs[shared].std) < 0.1 * specs[shared].std
    assert np.all(np.frombuffer(a["layers.1.input_layernorm.weight"].data, np.float32) == 1)
    c, _ = decode(weights.init_stage(cfg, 1, seed=4))
    assert c[shared].data != a[shared].data


def test_uploads_are_checked_by_name_shape_dtype_and_value(tmp_path):
    p = tmp_path / "t.safetensors"
    p.write_bytes(encode({"grad": RawTensor("BF16", (2, 4, 3), bytes(48))}))

    def problem(want):
        return integrity.check_file(p, want).problem

    assert problem({"grad": ("BF16", (2, 4, 3))}) is None
    assert integrity.check_file(p, {}).sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert "expected F32" in problem({"grad": ("F32", (2, 4, 3))})
    assert "expected" in problem({"activations": ("BF16", (2, 4, 3))})
    nan = bytes(46) + b"\xc0\x7f"  # a bf16 NaN, little-endian
    p.write_bytes(encode({"grad": RawTensor("BF16", (2, 4, 3), nan)}))
    assert "NaN or infinite" in problem({"grad": ("BF16", (2, 4, 3))})
    assert "NaN or infinite" in integrity.problem_in(p.read_bytes(), {"grad": ("BF16", (2, 4, 3))})
    p.write_bytes(p.read_bytes()[:-1])
    assert "not a valid" in problem({"grad": ("BF16", (2, 4, 3))})


@pytest.mark.parametrize(
    "key", ["../x", "a/../b", "/abs", "a//b", ".", "a/./b", "", "a b", "a\\b", "x" * 500]
)
def test_blob_keys_reject_traversal(key):
    with pytest.raises(BadRequest):
        check_key(key)


def test_blob_urls_are_signed_and_expire(tmp_path):
    store = DirStore(tmp_path, b"k" * 32)
    assert check_key("runs/r-1/act/3/s0-w7.safetensors")
    url = store.upload_url("a/b.bin", 1000)
    q = dict(part.split("=") for part in url.split("?")[1].split("&"))
    assert store.verify("put", "a/b.bin", q["exp"], q["sig"], q["max"]) == 1000
    for args in [
        ("put", "a/c.bin", q["exp"], q["sig"], q["max"]),
        ("put", "a/b.bin", q["exp"], q["sig"], "9999"),
        ("get", "a/b.bin", q["exp"], q["sig"], q["max"]),
    ]:
        with pytest.raises(Forbidden):
            store.verify(*args)
    with pytest.raises(Unauthorized):
        store.verify("get", "a/b.bin", None, None)
    old = DirStore(tmp_path, b"k" * 32, ttl_s=-10)
    q = dict(part.split("=") for part in old.download_url("a/b.bin").split("?")[1].split("&"))
    with pytest.raises(Forbidden, match="expired"):
        store.verify("get", "a/b.bin", q["exp"], q["sig"])


def test_upload_sink_enforces_limit_and_sha(tmp_path):
    store = DirStore(tmp_path, b"k" * 32)
    sink = UploadSink(store, 10)
    sink.write(b"12345")
    with pytest.raises(TooLarge):
        sink.write(b"678901")
    sink.discard()
    sink = UploadSink(store, 10)
    sink.write(b"hello")
    with pytest.raises(BadRequest, match="mismatch"):
        sink.finish("x/y", "0" * 64)
    sink.discard()
    assert not store.exists("x/y") and list((tmp_path / ".tmp").iterdir()) == []


def test_migrations_are_versioned(tmp_path):
    engine = db.open_engine(tmp_path / "a.sqlite3")
    assert db.migrate(engine) == db.SCHEMA_VERSION
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"

    def add_column(conn):
        conn.execute(text("ALTER TABLE runs ADD COLUMN note INTEGER"))

    later = [(db.SCHEMA_VERSION + 1, "runs.note", add_column)]
    assert db.migrate(engine, later) == db.SCHEMA_VERSION + 1
    assert "note" in {c["name"] for c in inspect(engine).get_columns("runs")}
    assert db.migrate(engine, later) == db.SCHEMA_VERSION + 1, "a migration runs once"
    with pytest.raises(db.SchemaError, match="newer"):
        db.migrate(engine, [])
    engine.dispose()


def test_manifest_checks_name_each_problem(tmp_path):
    (tmp_path / "t.txt").write_text("x" * 5000)
    good = tiny_manifest(str(tmp_path)).to_dict()
    assert runs.parse_manifest(good, 10**9).name == "tiny"
    for patch, words in [
        ({"train": {"seq_len": 64, "lease_s": 0}}, "lease_s"),
        ({"model": {**good["model"], "tokenizer": str(tmp_path / "tok.json")}}, "tok.json. is not a file"),
        ({"data": {"source": str(tmp_path), "shard_bytes": 10}}, "shard_bytes"),
        ({"model": {**good["model"], "d_model": "wide"}}, "invalid manifest"),
        ({"model": 7}, "invalid manifest"),
    ]:
        with pytest.raises(ApiError, match=words):
            runs.parse_manifest({**good, **patch}, 10**9)
    with pytest.raises(ApiError, match="limit"):
        runs.parse_manifest(good, 1000)


def test_credits_weigh_stage_compute():
    assert ledger.work_credits(2.0, 100, "forward", False) == 200.0
    assert ledger.work_credits(2.0, 100, "backward", False) == 400.0
    assert ledger.work_credits(2.0, 100, "forward", True) == 600.0


def test_core_never_imports_the_server_stack():
    # `iota` loads the orchestrator's command group through its entry point, and nothing else of the server.
    code = (
        "import sys, iota_cli.core.protocol\n"
        "assert 'iota_orchestrator' not in sys.modules\n"
        "import iota_cli.app, iota_orchestrator.cli\n"
        "heavy = ('fastapi', 'sqlalchemy', 'uvicorn', 'numpy')\n"
        "bad = [m for m in heavy if m in sys.modules]\n"
        "server = {m for m in sys.modules if m.split('.')[0] == 'iota_orchestrator'}\n"
        "commands = {'iota_orchestrator', 'iota_orchestrator.cli', 'iota_orchestrator.cli_runs',"
        " 'iota_orchestrator.cli_shared'}\n"
        "bad += sorted(server - commands)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
