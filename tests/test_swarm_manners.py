"""`iota swarm` given what a newcomer might give it: a bad --backends name, a --data directory with too
little text, a backend this machine cannot run. Each fails at once with its reason, no traceback, and
leaves no temp directory behind (TMPDIR is the test's own, so that can be checked).

    .venv/bin/python -m pytest tests/test_swarm_manners.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from iota_cli.swarm.local import Swarm, SwarmOptions


def iota_swarm(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "iota_cli", "swarm", "--workers", "3", *args],
        env={**os.environ, "TMPDIR": str(tmp)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def left_behind(tmp_path: Path) -> list[str]:
    return [p.name for p in (tmp_path / "tmp").glob("iota-swarm-*")]


def test_an_unknown_backend_is_a_usage_error_before_anything_starts(tmp_path):
    out = iota_swarm(tmp_path, "--backends", "torch-cpu,nosuch")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert "unknown backend 'nosuch'" in out.stderr
    assert "known: " in out.stderr and "torch-cpu" in out.stderr and "mlx-cpu" in out.stderr
    assert left_behind(tmp_path) == []


def make_data(root: Path, kind: str) -> Path:
    root.mkdir()
    if kind == "binary":
        (root / "weights.bin").write_bytes(bytes(range(256)) * 40)
        (root / ".notes.txt").write_text("hidden files are not read\n" * 100)
    elif kind == "tiny":
        (root / "a.txt").write_text("hello world\n")
    return root


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("empty", "no text files"),
        ("binary", "no text files"),
        ("tiny", "too little text (12 bytes in 1 file); need at least 519 bytes"),
    ],
)
def test_data_without_a_sample_of_text_is_a_usage_error(tmp_path, kind, says):
    data = make_data(tmp_path / kind, kind)
    out = iota_swarm(tmp_path, "--data", str(data))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "HTTP 422" not in out.stderr
    assert f"--data {data}: " in out.stderr and says in out.stderr
    assert left_behind(tmp_path) == []


def test_the_orchestrators_own_refusal_of_the_data_reads_the_same(tmp_path):
    """Past the edge check (a harness skips it), the orchestrator's 422 becomes the same usage error."""
    from iota_cli.swarm.checks import SwarmError

    data = make_data(tmp_path / "tiny", "tiny")
    swarm = Swarm.create(SwarmOptions(workers=3, data=str(data), validate=False), tmp_path / "s")
    try:
        with pytest.raises(SwarmError) as e:
            swarm.prepare()
    finally:
        swarm.stop_server()
    assert e.value.code == 2 and "too little text" in str(e.value) and str(data) in str(e.value)


def cuda_runs_here() -> bool:
    from iota_cli.core.backend import factories

    factory = factories().get("torch-cuda")
    return factory is not None and factory.available()[0]


@pytest.mark.slow
def test_a_worker_that_cannot_start_ends_the_swarm_at_once_with_its_reason(tmp_path):
    """torch-cuda without a GPU: the worker exits 78 in its first seconds; the swarm says why and exits
    with that code, without a summary, and removes its temp home."""
    if cuda_runs_here():
        pytest.skip("torch-cuda runs here: its workers would not fail")
    out = iota_swarm(tmp_path, "--backends", "torch-cuda", timeout=120)
    assert out.returncode == 78, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and out.stdout == ""  # no "Trained 0 tokens", no empty table
    assert "error: worker " in out.stderr and "(torch-cuda, stage " in out.stderr
    assert "exited with code 78: backend 'torch-cuda' is not available here" in out.stderr
    assert left_behind(tmp_path) == []
