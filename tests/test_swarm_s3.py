"""End to end with the blobs on SeaweedFS: `iota swarm`'s orchestrator process with `--blob-store
s3://...` (on SQLite, and on PostgreSQL with 3 API replicas), real `iota join` workers that move every
tensor to and from the store through presigned URLs.

    .venv/bin/python -m pytest -q tests/test_swarm_s3.py
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from iota_cli.swarm.launcher import run_swarm
from iota_cli.swarm.local import SwarmOptions

pytestmark = pytest.mark.slow


def swarm_on(seaweed, home: Path, *server_args: str) -> None:
    """A 3-worker swarm with its blobs under a fresh prefix: it finishes, merges, keeps no blob file."""
    spec = seaweed.spec()
    options = SwarmOptions(
        workers=3,
        max_steps=8,
        cap_steps=True,
        home=home,
        server_args=("--blob-store", spec, *server_args),
        server_env=seaweed.env(),  # the store's keys go to the orchestrator alone
    )
    summary = run_swarm(options, threading.Event(), interactive=False)
    assert summary["state"] == "finished", summary
    assert [w["exit_code"] for w in summary["workers"]] == [0, 0, 0], summary["workers"]
    assert summary["tokens"] > 0 and summary["last_loss"] is not None
    prefix = spec.removeprefix(f"s3://{seaweed.bucket}/") + "/"
    listed = seaweed.client().list_objects_v2(Bucket=seaweed.bucket, Prefix=prefix)
    names = [o["Key"].removeprefix(prefix) for o in listed.get("Contents", [])]
    epochs: dict[int, int] = {}  # stage -> the newest weights epoch on the store
    for n in names:
        if m := re.search(r"/weights/s(\d+)/e(\d+)\.safetensors$", n):
            epochs[int(m[1])] = max(epochs.get(int(m[1]), 0), int(m[2]))
    assert sorted(epochs) == [0, 1, 2] and min(epochs.values()) >= 1, f"every stage merged: {names}"
    assert not (home / "orchestrator" / "blobs").exists(), "the orchestrator kept no blob of its own"
    log = (home / "orchestrator.log").read_text()
    assert seaweed.secret_key not in log and "Traceback" not in log, log[-2000:]


def test_a_swarm_trains_with_its_blobs_on_an_object_store(seaweed, tmp_path):
    swarm_on(seaweed, tmp_path / "swarm")


def test_a_swarm_trains_on_postgresql_with_three_replicas_and_an_object_store(seaweed, pg_url, tmp_path):
    swarm_on(seaweed, tmp_path / "swarm", "--database", pg_url, "--workers", "3")
