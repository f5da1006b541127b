"""The API against its own OpenAPI schema: schemathesis finds no 5xx, and docs/openapi.json is current."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from simworker import SimWorker

from iota_cli.core.manifest import tiny_manifest
from iota_cli.swarm.corpus import write_corpus
from iota_cli.swarm.orchestrator import OrchestratorProcess

ADMIN = "admin-token-for-fuzzing"


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    corpus = write_corpus(base / "text", files=1, words=2000)
    with OrchestratorProcess(base / "data", admin_token=ADMIN, tick_s=0.2) as orch:
        m = tiny_manifest(str(corpus))
        m = replace(m, train=replace(m.train, lease_s=5.0))
        requests.post(
            orch.url + "/v1/runs",
            json={"manifest": m.to_dict()},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        worker = SimWorker(orch.url, "fuzzer").register()
        worker.assign()
        orch.token = worker.token
        yield orch
        assert orch.proc.poll() is None, "the server survived the fuzzing"


SCHEMA = schemathesis.openapi.from_path(Path(__file__).parents[1] / "docs" / "openapi.json")
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.label for op in OPERATIONS])
def test_no_server_errors(operation, fuzz_target):
    """Generated requests (valid and not) to every operation of the live server get no 5xx."""
    headers = {"Authorization": f"Bearer {fuzz_target.token}", "X-Iota-Protocol": "1"}

    @given(case=operation.as_strategy())
    @settings(
        max_examples=15,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        response = case.call(base_url=fuzz_target.url, headers=headers, timeout=30)
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} -> {response.status_code} {response.text[:300]}"
        )

    check()


def test_openapi_json_is_current():
    result = subprocess.run(
        [sys.executable, "-m", "iota_orchestrator.openapi", "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
