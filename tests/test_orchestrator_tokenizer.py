"""Runs with a tokenizers tokenizer.json: validation (422s), the encoded int32 stream and its cache, and a
real orchestrator serving head work whose tokens decode back to the corpus, across restarts.

Every tokenizer here is a tiny byte-level BPE trained in the test on generated text: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
import tokenizers
from iota_orchestrator import data, db, tokenizer
from iota_orchestrator.errors import ApiError, Conflict
from simworker import SimWorker
from sqlalchemy import inspect

from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.tensors import decode
from iota_cli.swarm.corpus import write_corpus
from iota_cli.swarm.orchestrator import OrchestratorProcess

ADMIN = "admin-token-for-tokenizers"


def train_bpe(path: Path, corpus: Path, vocab: int = 300, eos: str | None = "</s>") -> Path:
    """A byte-level BPE (lossless: decode(encode(text)) == text) trained on the corpus's files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[eos] if eos else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(p) for p in sorted(corpus.iterdir())], trainer)
    tok.save(str(path))
    return path


def expected_stream(tok_path: Path, corpus: Path, eos: int) -> np.ndarray:
    """The stream as the docs define it, built independently: each file's ids, then EOS."""
    tok = tokenizers.Tokenizer.from_file(str(tok_path))
    ids: list[int] = []
    for p in sorted(corpus.iterdir()):
        ids += tok.encode(p.read_text(), add_special_tokens=False).ids + [eos]
    return np.array(ids, dtype=np.int32)


def test_encoded_stream_cache_and_samples(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "text", files=3, words=1500, seed=1)
    (corpus / "accents.txt").write_text("caf\u00e9 na\u00efve\n" * 200 + "no newline at the end")
    t = tokenizer.load(str(train_bpe(tmp_path / "tok.json", corpus)))
    assert t.eos_id == t.tokenizer.token_to_id("</s>") and t.vocab_needed == t.n_ids
    monkeypatch.setattr(tokenizer, "READ_BYTES", 512)  # many pieces per file, each cut before a space
    paths = data.list_files(str(corpus))
    files, sha = tokenizer.encode_files(t, paths, tmp_path / "run" / "tokens.i32")
    cache = tmp_path / "run" / "tokens.i32"
    stream = np.fromfile(cache, dtype="<i4")
    np.testing.assert_array_equal(stream, expected_stream(tmp_path / "tok.json", corpus, t.eos_id))
    assert tokenizer.file_sha256(cache) == sha and list(cache.parent.iterdir()) == [cache]
    assert [f.start for f in files] == [0, *np.cumsum([f.size + 1 for f in files])[:-1]]
    assert all(stream[f.start + f.size] == t.eos_id for f in files)
    acc = next(f for f in files if f.path.endswith("accents.txt"))
    assert t.tokenizer.decode(stream[acc.start : acc.start + acc.size].tolist()) == (
        (corpus / "accents.txt").read_text()
    )

    tc = data.TokenCache(str(cache), len(stream), t.eos_id)
    layout = data.Layout(len(stream), shard_tokens=1000, sample_tokens=2 * 33)
    n = layout.n_samples
    seen = set()
    for k in range(n):
        i = data.data_index(k, n, seed=3)
        got = data.sample_tokens([], layout, i, batch=2, seq=32, cache=tc)
        start = layout.stream_offset(i)
        np.testing.assert_array_equal(got.ravel(), stream[start : start + 66])
        seen.add(start)
    assert len(seen) == n, "every sample once per epoch"
    np.testing.assert_array_equal(tc.read(len(stream) - 2, 4)[2:], [t.eos_id] * 2)

    # Re-encoding to a different stream is refused and leaves the good cache alone.
    with pytest.raises(Conflict, match="different token stream"):
        tokenizer.encode_files(t, paths[:1], cache, expect_sha=sha)
    assert tokenizer.file_sha256(cache) == sha and len(list(cache.parent.iterdir())) == 1


def test_eos_rule_vocab_check_and_bad_files(tmp_path):
    assert tokenizer.choose_eos({"a": 0, "<|endoftext|>": 7, "</s>": 5}) == 5
    assert tokenizer.choose_eos({"a": 0, "b": 9}) == 10, "no EOS of its own: the first id past the vocab"
    corpus = write_corpus(tmp_path / "text", files=1, words=500)
    t = tokenizer.load(str(train_bpe(tmp_path / "plain.json", corpus, eos=None)))
    assert t.eos_id == t.n_ids and t.vocab_needed == t.n_ids + 1
    assert tokenizer.vocab_problem(t, t.n_ids + 1) is None
    problem = tokenizer.vocab_problem(t, t.n_ids)
    assert f"at least {t.n_ids + 1}" in problem and "no EOS token of its own" in problem
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\0garbage")
    for path, words in [
        (tmp_path / "bad.json", "not a tokenizers tokenizer.json"),
        (tmp_path / "binary.json", "not a tokenizers tokenizer.json"),
        (tmp_path / "missing.json", "is not a file"),
        (tmp_path, "is not a file"),
    ]:
        with pytest.raises(ApiError, match=words) as e:
            tokenizer.load(str(path))
        assert e.value.status == 422


def test_a_v1_database_gains_the_tokenizer_table(tmp_path):
    engine = db.open_engine(tmp_path / "v1.sqlite3")
    with engine.begin() as conn:
        tables = [t for t in db.metadata.sorted_tables if t.name != "run_tokenizers"]
        db.metadata.create_all(conn, tables=tables)
        db.set_meta(conn, "schema_version", "1")
    assert db.migrate(engine) == db.SCHEMA_VERSION and "run_tokenizers" in inspect(engine).get_table_names()
    engine.dispose()


def test_byte_runs_never_import_tokenizers():
    code = (
        "import sys, iota_orchestrator.app, iota_orchestrator.runs, iota_orchestrator.scheduler\n"
        "assert 'tokenizers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- against a real orchestrator -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def orch(tmp_path_factory):
    base = tmp_path_factory.mktemp("tok")
    corpus = write_corpus(base / "text", files=3, words=3000, seed=5)
    tok_path = train_bpe(base / "tok.json", corpus)
    with OrchestratorProcess(base / "data", admin_token=ADMIN, tick_s=0.2) as o:
        o.base, o.corpus, o.tok_path = base, corpus, tok_path
        o.tok = tokenizers.Tokenizer.from_file(str(tok_path))
        yield o


def manifest(orch, tok: str, vocab_size: int) -> dict:
    m = tiny_manifest(str(orch.corpus))
    return replace(m, model=replace(m.model, tokenizer=tok, vocab_size=vocab_size)).to_dict()


def create(orch, m: dict) -> requests.Response:
    return requests.post(
        orch.url + "/v1/runs", json={"manifest": m}, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60
    )


def head_sample(orch, run_id: str) -> np.ndarray:
    w = SimWorker(orch.url, "head").register()
    w.assign(run_id, stage=0)
    item = w.claim()
    assert item is not None and item["kind"] == "forward" and item["stage"] == 0
    t = decode(w.download(item["tokens"]))[0]["tokens"]
    assert t.dtype == "I32" and t.shape == (8, 65)
    return np.frombuffer(t.data, np.int32)


def check_decodes_to_corpus(orch, flat: np.ndarray) -> None:
    text = "".join(p.read_text() for p in sorted(orch.corpus.iterdir()))
    eos = orch.tok.token_to_id("</s>")
    assert (flat >= 0).all() and (flat < orch.tok.get_vocab_size()).all()
    cuts = [-1, *np.flatnonzero(flat == eos), len(flat)]
    pieces = [orch.tok.decode(flat[a + 1 : b].tolist()) for a, b in zip(cuts, cuts[1:], strict=False)]
    assert sum(map(len, pieces)) > 400
    for piece in pieces:
        assert piece in text, piece[:80]


def test_bad_tokenizers_get_422_with_the_reason(orch):
    n = orch.tok.get_vocab_size()
    (orch.base / "broken.json").write_text("{ this is not json")
    for tok, vocab, words in [
        (str(orch.tok_path), n - 1, f"model.vocab_size {n - 1} is too small"),
        (str(orch.base / "missing.json"), n, "is not a file on the orchestrator's machine"),
        (str(orch.base / "broken.json"), n, "is not a tokenizers tokenizer.json"),
    ]:
        r = create(orch, manifest(orch, tok, vocab))
        assert r.status_code == 422 and words in r.json()["detail"], r.text
    assert not (orch.base / "data" / "runs").exists() or not list((orch.base / "data" / "runs").iterdir())
    assert requests.get(orch.url + "/v1/runs", timeout=30).json() == []


@pytest.mark.slow
def test_served_tokens_decode_to_the_corpus_and_restarts_reuse_the_cache(orch):
    # Created the operator's way, with paths relative to the manifest's folder.
    m = manifest(orch, "tok.json", orch.tok.get_vocab_size())
    m["data"]["source"] = "text"
    (orch.base / "run.json").write_text(json.dumps(m))
    env = {**os.environ, "IOTA_ADMIN_TOKEN": ADMIN}
    made = subprocess.run(
        [sys.executable, "-m", "iota_cli", "orchestrator", "run", "create", str(orch.base / "run.json")]
        + ["--url", orch.url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert made.returncode == 0, made.stderr
    run_id = json.loads(made.stdout)["run_id"]
    cache = orch.base / "data" / "runs" / run_id / tokenizer.CACHE_NAME
    stream = expected_stream(orch.tok_path, orch.corpus, orch.tok.token_to_id("</s>"))
    np.testing.assert_array_equal(np.fromfile(cache, "<i4"), stream)
    flat = head_sample(orch, run_id)
    check_decodes_to_corpus(orch, flat)
    assert any(np.array_equal(flat, stream[s : s + len(flat)]) for s in range(0, len(stream), 65))

    mtime = cache.stat().st_mtime_ns
    orch.stop()
    orch.start()
    check_decodes_to_corpus(orch, head_sample(orch, run_id))
    assert cache.stat().st_mtime_ns == mtime, "a restart serves the cache, it does not encode again"

    # A lost cache is rebuilt, identical, from the same tokenizer and data.
    cache.unlink()
    orch.stop()
    orch.start()
    check_decodes_to_corpus(orch, head_sample(orch, run_id))
    np.testing.assert_array_equal(np.fromfile(cache, "<i4"), stream)

    # A changed tokenizer.json is a warning while the cache is intact, and refused once it must be used.
    original = orch.tok_path.read_bytes()
    orch.tok_path.write_bytes(original.replace(b'"</s>"', b'"<eos>"'))
    try:
        orch.stop()
        orch.start()
        check_decodes_to_corpus(orch, head_sample(orch, run_id))
        assert any("tokenizer" in ln and "changed" in ln and run_id in ln for ln in orch.lines), orch.lines
        cache.unlink()
        orch.stop()
        orch.start()
        r = requests.get(f"{orch.url}/v1/runs/{run_id}/status", timeout=30)
        assert r.status_code == 409 and "cannot be rebuilt" in r.json()["detail"], r.text
    finally:
        orch.tok_path.write_bytes(original)
