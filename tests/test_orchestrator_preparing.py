"""Runs with a tokenizer.json are prepared in the background (preparing.py): the create returns at once,
the run's status shows the encoding's progress, no work is issued before the stream is ready, a failure
or an abort is said so, and an orchestrator killed mid-encode finishes the job when it starts again.

Real orchestrators (in this process, and a child process for the kill), a real tokenizers BPE trained
here, real multi-megabyte corpora; the in-process tests encode in small batches, so progress is seen.

    timeout 300 .venv/bin/python -m pytest -q tests/test_orchestrator_preparing.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
from inprocess_orchestrator import InProcessOrchestrator, until
from iota_orchestrator import preparing, tokenizer
from simworker import SimWorker
from test_orchestrator_tokenizer import expected_stream, train_bpe

from iota_cli.core.manifest import RunManifest, tiny_manifest
from iota_cli.swarm.corpus import write_corpus
from iota_cli.swarm.orchestrator import OrchestratorProcess

ADMIN = "admin-token-for-preparing-tests"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def big_corpus(root: Path, seed: Path, files: int, mb: float) -> Path:
    """files text files of about mb megabytes each (the seed's text, repeated: quick to write)."""
    text = (seed / "doc0.txt").read_text()
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        with open(root / f"part{i}.txt", "w") as f:
            while f.tell() < mb * 1e6:
                f.write(text)
    return root


def manifest(corpus: Path, tok: Path) -> RunManifest:
    m = tiny_manifest(str(corpus))
    vocab = max(m.model.vocab_size, 512)
    return replace(m, model=replace(m.model, tokenizer=str(tok), vocab_size=vocab))


def create(url: str, m: RunManifest) -> requests.Response:
    return requests.post(url + "/v1/runs", json={"manifest": m.to_dict()}, headers=AUTH, timeout=60)


def status(url: str, run_id: str) -> dict:
    r = requests.get(f"{url}/v1/runs/{run_id}/status", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    base = tmp_path_factory.mktemp("prep")
    seed = write_corpus(base / "seed", files=1, words=20000, seed=3)
    return seed, big_corpus(base / "big", seed, files=4, mb=0.75), train_bpe(base / "tok.json", seed)


@pytest.fixture
def orch(tmp_path, monkeypatch):
    # Small batches and a report after each: the progress of a 3 MB encode is seen many times.
    monkeypatch.setattr(tokenizer, "READ_BYTES", 1 << 17)
    monkeypatch.setattr(tokenizer, "BATCH", 2)
    monkeypatch.setattr(preparing, "PROGRESS_S", 0.0)
    with InProcessOrchestrator(tmp_path / "data", admin_token=ADMIN) as o:
        yield o


def test_create_returns_at_once_status_shows_progress_and_work_waits(orch, texts):
    _, corpus, tok = texts
    m = manifest(corpus, tok)
    t0 = time.monotonic()
    r = create(orch.url, m)
    took = time.monotonic() - t0
    assert r.status_code == 201 and r.json()["state"] == "preparing", r.text
    run_id = r.json()["run_id"]
    second = create(orch.url, replace(m, name="second")).json()["run_id"]
    head = SimWorker(orch.url, "head").register()

    seen, queued = [], False
    while (st := status(orch.url, run_id))["state"] == "preparing":
        seen.append(st["encoding"])
        queued |= status(orch.url, second)["encoding"]["phase"] == "queued"  # one encode at a time
        # No work for a run being prepared: an assignment is told to come back (503, Retry-After).
        a = head.request("POST", "/v1/assignment", json={"run_id": run_id, "stage": 0, **head.caps()})
        if a.status_code == 200:  # the encode ended between the status and this request: then it must show
            assert status(orch.url, run_id)["state"] == "running", a.text
            break
        assert a.status_code == 503 and a.headers["Retry-After"] and "prepared" in a.json()["detail"]
        time.sleep(0.02)
    st = status(orch.url, run_id)
    assert st["state"] == "running", st
    done = [e["bytes_done"] for e in seen if e["phase"] == "encoding"]
    total = seen[0]["bytes_total"]
    assert total == sum(p.stat().st_size for p in corpus.iterdir()) > 2_000_000
    assert any(0 < b < total for b in done), f"no progress seen between the ends: {done}"
    assert done == sorted(done) and queued
    assert took < 5.0, f"the create took {took:.1f} s"
    enc = st["encoding"]
    assert (
        enc["phase"] == "ready"
        and enc["bytes_done"] == total
        and enc["files_done"] == enc["files_total"] == 4
    )
    assert st["stages"] and st["samples_issued"] == 0

    # Ready: work flows, and its tokens are the corpus's encoded stream.
    head.assign(run_id, stage=0)
    item = head.claim()
    assert item is not None and item["kind"] == "forward"
    cache = orch.config.data_dir / "runs" / run_id / tokenizer.CACHE_NAME
    eos = tokenizer.load(str(tok)).eos_id
    np.testing.assert_array_equal(np.fromfile(cache, "<i4"), expected_stream(tok, corpus, eos))
    until(lambda: status(orch.url, second)["state"] == "running", timeout=120, what="the second run ready")


def test_a_failure_and_an_abort_say_so_and_leave_nothing(orch, texts, tmp_path):
    _, corpus, tok = texts
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "a.txt").write_text("too little text for one sample")
    r = create(orch.url, manifest(tiny, tok))
    assert r.status_code == 201, r.text
    run_id = r.json()["run_id"]
    st = until(lambda: (s := status(orch.url, run_id))["state"] != "preparing" and s, what="the run failed")
    assert st["state"] == "failed" and st["encoding"]["phase"] == "failed"
    assert "yields no sample" in st["encoding"]["error"]
    assert not (orch.config.data_dir / "runs" / run_id).exists()
    head = SimWorker(orch.url, "h").register()
    a = head.request("POST", "/v1/assignment", json={"run_id": run_id, **head.caps()})
    assert a.status_code == 409 and "could not be prepared" in a.json()["detail"]
    listed = {x["run_id"]: x["state"] for x in requests.get(orch.url + "/v1/runs", timeout=10).json()}
    assert listed[run_id] == "failed"

    # The operator's command waits, and says why it failed (exit 1).
    (tmp_path / "run.json").write_text(json.dumps(manifest(tiny, tok).to_dict()))
    env = {**os.environ, "IOTA_ADMIN_TOKEN": ADMIN}
    cli = [sys.executable, "-m", "iota_cli", "orchestrator", "run", "create", str(tmp_path / "run.json")]
    made = subprocess.run(cli + ["--url", orch.url], capture_output=True, text=True, timeout=120, env=env)
    assert made.returncode == 1 and "yields no sample" in made.stderr, made.stderr

    # An abort while the corpus is encoded: the run finishes unprepared and its files go.
    run_id = create(orch.url, manifest(corpus, tok)).json()["run_id"]
    until(lambda: status(orch.url, run_id)["encoding"]["phase"] == "encoding", what="encoding")
    assert requests.post(f"{orch.url}/v1/runs/{run_id}/abort", headers=AUTH, timeout=30).status_code == 200
    until(lambda: not (orch.config.data_dir / "runs" / run_id).exists(), what="its files deleted")
    st = status(orch.url, run_id)
    assert st["state"] == "finished" and st["stages"] == [] and st["encoding"]["phase"] != "ready"


@pytest.mark.slow
def test_an_orchestrator_killed_mid_encode_finishes_it_when_it_starts_again(tmp_path, texts):
    seed, _, tok = texts
    corpus = big_corpus(tmp_path / "corpus", seed, files=2, mb=4.0)  # one batch of 8 MB: seconds to encode
    (tmp_path / "run.json").write_text(json.dumps(manifest(corpus, tok).to_dict()))
    env = {**os.environ, "IOTA_ADMIN_TOKEN": ADMIN}
    with OrchestratorProcess(tmp_path / "data", admin_token=ADMIN, tick_s=0.2) as o:
        cli = [sys.executable, "-m", "iota_cli", "orchestrator", "run", "create", str(tmp_path / "run.json")]
        made = subprocess.run(
            cli + ["--url", o.url, "--no-wait", "--json"], capture_output=True, text=True, timeout=60, env=env
        )
        assert made.returncode == 0, made.stderr
        reply = json.loads(made.stdout)
        run_id = reply["run_id"]
        assert reply["state"] == "preparing"
        folder = tmp_path / "data" / "runs" / run_id
        until(lambda: list(folder.glob(".tokens.i32.*.tmp")), timeout=60, what="the encode under way")
        assert status(o.url, run_id)["state"] == "preparing"
        o.kill()
        assert not (folder / tokenizer.CACHE_NAME).exists(), "killed before the encode ended"
        o.start()
        st = until(
            lambda: (s := status(o.url, run_id))["state"] == "running" and s, timeout=120, what="ready"
        )
        assert st["encoding"]["phase"] == "ready"
        assert [p.name for p in folder.iterdir()] == [tokenizer.CACHE_NAME], "the cut-short encode is swept"
        eos = tokenizer.load(str(tok)).eos_id
        np.testing.assert_array_equal(
            np.fromfile(folder / tokenizer.CACHE_NAME, "<i4"), expected_stream(tok, corpus, eos)
        )
        head = SimWorker(o.url, "head").register()
        head.assign(run_id, stage=0)
        assert head.claim() is not None
