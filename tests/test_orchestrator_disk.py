"""A full disk: the orchestrator answers 503 with Retry-After while it is full, leaves nothing half-done,
and a swarm of workers that wait out 503 (the worker's own client) carries on by itself once space
returns, with every acknowledged completion still in the ledger.

The data dir sits on a 32 MiB tmpfs (we mount it; the test is skipped, saying why, where mounting is
not permitted), filled to the last byte by a file the test then deletes. A disk already full when
`iota orchestrator serve` starts is one error line and exit code 69 (restarting later may work).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import requests
from simworker import SimWorker

from iota_cli import output
from iota_cli.core.manifest import tiny_manifest
from iota_cli.swarm.corpus import write_corpus
from iota_cli.swarm.orchestrator import OrchestratorProcess, wait_until
from iota_cli.train.api import SwarmApi
from iota_cli.train.client import Client
from iota_cli.train.errors import ApiError, Stopped

ADMIN = "admin-token-for-the-full-disk"
SAMPLES = 24


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path: Path) -> None:
    """Write path until the file system has not one byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = 1 << 20
        while chunk:
            try:
                os.write(fd, bytes(chunk))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                chunk //= 4
    finally:
        os.close(fd)


class PatientWorker(SimWorker):
    """A simulated worker on the real worker's client settings: every call waits out a 503."""

    def __init__(self, url: str, name: str, waits: list[str], stop: threading.Event) -> None:
        super().__init__(url, name)
        self.api = SwarmApi(
            Client(
                self.url, backoff=(0.05, 0.5), retries=0, stop=stop, on_wait=lambda msg, _s: waits.append(msg)
            )
        )


def work(w: PatientWorker, stop: threading.Event, acked: list[float]) -> None:
    while not stop.is_set():
        try:
            item = w.claim(claim_id=uuid.uuid4().hex)
            if item is None:
                time.sleep(0.02)
                continue
            acked.append(w.do(item)["credits"])
        except Stopped:
            return
        except ApiError as e:
            if e.status != 409:  # 409: the item was re-issued meanwhile; anything else is a failure
                raise


def test_a_full_disk_is_503_and_the_swarm_resumes_when_space_returns(small_disk, tmp_path):
    corpus = write_corpus(tmp_path / "text", files=1, words=3000)
    with OrchestratorProcess(small_disk / "orch", admin_token=ADMIN, tick_s=0.2) as orch:
        admin = SwarmApi.connect(orch.url, ADMIN, retries=0)
        m = tiny_manifest(str(corpus), max_samples=SAMPLES)
        # Leases and deadlines outlast the outage: nobody is dropped for the server's trouble.
        m = replace(
            m,
            train=replace(m.train, lease_s=60.0, work_timeout_s=60.0),
            merge=replace(m.merge, timeout_s=1.0),
        )
        run_id = admin.create_run(m).run_id
        stop, waits = threading.Event(), []
        stages = (0, 0, 1, 2)
        workers = [PatientWorker(orch.url, f"w{i}", waits, stop).register() for i in range(len(stages))]
        for w, stage in zip(workers, stages, strict=True):
            w.assign(run_id, stage=stage)
        acked: dict[str, list[float]] = {w.name: [] for w in workers}
        threads = [threading.Thread(target=work, args=(w, stop, acked[w.name]), daemon=True) for w in workers]
        for th in threads:
            th.start()
        try:
            assert wait_until(lambda: sum(map(len, acked.values())) >= 6, timeout=30)
            fill(small_disk / "filler")
            r = requests.post(
                orch.url + "/v1/runs",
                json={"manifest": m.to_dict()},
                headers={"Authorization": f"Bearer {ADMIN}"},
                timeout=30,
            )
            assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
            assert "full" in r.json()["detail"]
            assert len(admin.runs()) == 1, "the refused run left no record"
            assert run_dirs(small_disk / "orch") == {run_id}, "nor any of its files"
            assert wait_until(lambda: any("HTTP 503" in w for w in waits), timeout=20), "workers met the 503s"
            time.sleep(1.0)  # a while full: workers keep waiting, none gives up
            assert all(th.is_alive() for th in threads), "no worker gave up on the full disk"
            (small_disk / "filler").unlink()
            done = wait_until(lambda: admin.run_status(run_id).samples_completed == SAMPLES, timeout=90)
            assert done, admin.run_status(run_id)
        finally:
            stop.set()
            for th in threads:
                th.join(30)
        st = admin.run_status(run_id)
        assert st.samples_completed == SAMPLES and st.samples_dropped == 0, (
            "nothing was lost to the full disk"
        )
        for w in workers:
            got, sent = admin.credits(w.contributor_id), acked[w.name]
            assert abs(got.total - sum(sent)) < 1e-6 and got.entries == len(sent), f"{w.name}: credits kept"
        assert not list((small_disk / "orch" / "blobs" / ".tmp").iterdir()), "no upload was left half-written"
        assert not [ln for ln in orch.lines if "Exception in ASGI" in ln], "\n".join(orch.lines[-40:])


def run_dirs(data_dir: Path) -> set[str]:
    """The runs that have files in the data dir (blobs or token caches)."""
    return {
        p.name
        for top in (data_dir / "blobs" / "runs", data_dir / "runs")
        if top.is_dir()
        for p in top.iterdir()
    }


def test_a_full_disk_at_start_is_one_line_and_exit_69(small_disk):
    fill(small_disk / "filler")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "iota_cli",
            "orchestrator",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(small_disk / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == output.EXIT_UNAVAILABLE, r.stderr  # unlike a read-only one (78): space may return
    assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in r.stderr
