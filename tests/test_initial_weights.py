"""One init: a run's epoch-0 weights on the orchestrator are the model spec's, and the one-process reference
(bench/chain_reference.py) starts from the same bytes, so swarm and reference train the same model."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.modelspec import initial_weights
from iota_cli.core.tensors import decode, encode
from iota_cli.swarm.orchestrator import OrchestratorProcess
from iota_cli.train.client import Client

ADMIN = "admin-token-for-tests"
BENCH = Path(__file__).resolve().parent.parent / "bench" / "chain_reference.py"


def _chain_reference():
    spec = importlib.util.spec_from_file_location("chain_reference", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("the swarm trains one model together. " * 4000)
    return tmp_path / "corpus"


def test_epoch0_weights_are_the_model_specs_and_the_reference_starts_there(tmp_path, corpus):
    m = tiny_manifest(str(corpus))
    m = dataclasses.replace(m, seed=7)
    with OrchestratorProcess(tmp_path / "orch", admin_token=ADMIN) as orch:
        with Client(orch.url, ADMIN, max_wait_s=10) as admin:
            run_id = admin.post("/v1/runs", {"manifest": m.to_dict()})["run_id"]
        served = {}
        for stage in range(m.model.n_stages):
            with Client(orch.url, max_wait_s=10) as c:
                c.token = c.post("/v1/contributors", {"name": f"w{stage}", "backend": "none"})["token"]
                a = c.post("/v1/assignment", {"run_id": run_id, "stage": stage})
                assert (a["stage"], a["epoch"]) == (stage, 0)
                ref = a["weights"]
                path = c.download(ref["url"], tmp_path / f"s{stage}.safetensors", ref["sha256"], ref["size"])
                served[stage] = path.read_bytes()
    reference = _chain_reference().start(m, "torch-cpu")
    for stage, blob in served.items():
        spec = initial_weights(m.model, stage, m.seed)
        assert blob == encode(spec, {"stage": str(stage), "epoch": "0"}), "byte for byte the spec's init"
        tensors, _ = decode(blob)
        assert {n: t.data for n, t in tensors.items()} == {n: t.data for n, t in spec.items()}
        assert {n: t.data for n, t in reference[stage].weights().items()} == {
            n: t.data for n, t in spec.items()
        }
    other = initial_weights(m.model, 1, seed=8)
    assert any(other[n].data != t.data for n, t in initial_weights(m.model, 1, m.seed).items()), (
        "seed matters"
    )
