"""Local secrets and start-up errors of `iota orchestrator serve`, as real processes.

The data dir is 0700 and everything in it 0600 (folders 0700) once the server is up and after it has
served a run; the admin token it makes goes to <data-dir>/admin-token (0600) and appears in no line
of its output. A data dir it cannot use is one error line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from simworker import SimWorker
from test_orchestrator_tokenizer import train_bpe

from iota_cli import output
from iota_cli.core.manifest import tiny_manifest
from iota_cli.swarm.corpus import write_corpus
from iota_cli.swarm.orchestrator import OrchestratorProcess
from iota_cli.train.api import SwarmApi
from iota_cli.train.errors import ApiError


def env_without_token() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "IOTA_ADMIN_TOKEN"}


def not_private(data_dir: Path) -> list[str]:
    """Everything under data_dir (itself included) that another user could read or enter."""
    found = []
    for p in [data_dir, *data_dir.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        want = 0o700 if p.is_dir() else 0o600
        if not p.is_symlink() and mode != want:
            found.append(f"{p.relative_to(data_dir.parent)} {oct(mode)}")
    return found


def iota(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iota_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_without_token(),
    )


def test_the_data_dir_is_private_and_the_admin_token_is_only_in_its_file(tmp_path):
    data = tmp_path / "orch"
    data.mkdir(mode=0o755)
    (data / "notes.txt").write_text("left by an older version")
    os.chmod(data / "notes.txt", 0o644)
    corpus = write_corpus(tmp_path / "text", files=1, words=2000)
    orch = OrchestratorProcess(data, tick_s=0.2).start()  # no IOTA_ADMIN_TOKEN: it makes one
    try:
        token = orch.admin_token_file.read_text().strip()
        assert stat.S_IMODE(orch.admin_token_file.stat().st_mode) == 0o600
        said = [ln for ln in orch.lines if "admin token" in ln]
        assert said == [f"admin token written to {orch.admin_token_file} (readable by this user only)"]
        assert not_private(data) == [], "private from the start, an older open data dir closed up"
        m = tiny_manifest(str(corpus), max_samples=4)
        bpe = train_bpe(tmp_path / "tokenizer.json", corpus)
        with SwarmApi.connect(orch.url, token, retries=0) as admin:
            run_id = admin.create_run(m).run_id
            # A run with a tokenizer.json keeps its encoded corpus under runs/<id>/ in the data dir.
            admin.create_run(replace(m, model=replace(m.model, tokenizer=str(bpe), vocab_size=320)))
        workers = [SimWorker(orch.url, f"w{s}").register() for s in range(3)]
        for s, w in enumerate(workers):
            w.assign(run_id, stage=s)
        for _ in range(6):  # forward through every stage and back: tokens, activations, gradients
            for w in workers:
                if item := w.claim():
                    w.do(item)
        on_sqlite = not os.environ.get("IOTA_DATABASE")  # else the state is in the test's PostgreSQL
        assert (data / "orchestrator.sqlite3-wal").exists() or not on_sqlite
        assert list((data / "blobs").rglob("act"))
        assert list((data / "runs").rglob("*.i32"))
        assert not_private(data) == [], "everything made while serving is private too"
        stopped = iota("orchestrator", "run", "stop", run_id, "--data-dir", str(data))
        assert stopped.returncode == 0, "the local operator's commands read the token file"
        assert token not in stopped.stdout + stopped.stderr
    finally:
        assert orch.stop() == 0
    assert not any(token in line for line in orch.lines), "the token is never printed or logged"


def test_a_new_admin_token_replaces_the_file_and_one_from_the_environment_removes_it(tmp_path):
    data = tmp_path / "orch"
    with OrchestratorProcess(data) as o:
        first = o.admin_token_file.read_text().strip()
    with OrchestratorProcess(data, extra_args=["--new-admin-token"]) as o:
        second = o.admin_token_file.read_text().strip()
        assert second != first and not any(second in ln for ln in o.lines)
        assert refused(o.url, first) == 401 and refused(o.url, second) == 404
    with OrchestratorProcess(data, admin_token="ignored") as o:
        assert o.admin_token_file.exists(), "a token from the environment at a later start changes nothing"
        assert refused(o.url, "ignored") == 401 and refused(o.url, second) == 404
    with OrchestratorProcess(data, admin_token="from-the-env", extra_args=["--new-admin-token"]) as o:
        assert not o.admin_token_file.exists(), "no stale token left beside the real one"
        assert refused(o.url, second) == 401 and refused(o.url, "from-the-env") == 404


def refused(url: str, token: str) -> int:
    """The status an admin call on no run gets: 401 for a wrong token, 404 (no such run) for the admin."""
    with SwarmApi.connect(url, token, retries=0) as api, pytest.raises(ApiError) as e:
        api.abort_run("no-such-run", wait=False)
    return e.value.status


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder on a file system mounted read-only (chmod alone does not stop root)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        if os.geteuid() == 0:
            pytest.skip(f"cannot mount a tmpfs to make read-only: {made.stderr.decode().strip()}")
        os.chmod(mnt, 0o500)  # not root: permissions do it
        yield mnt
        os.chmod(mnt, 0o700)
        return
    try:
        (mnt / "orch").mkdir(mode=0o700)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def serve(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return iota("orchestrator", "serve", "--port", "0", "--data-dir", str(data_dir), timeout=60)


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr and "admin token" not in r.stdout
    return lines[0]


@pytest.mark.parametrize("where", ["missing", "existing"])
def test_a_read_only_data_dir_is_one_clear_line(read_only_dir, where):
    data = read_only_dir / ("new" if where == "missing" else "orch")
    r = serve(data)
    assert r.returncode == output.EXIT_CONFIG, r.stderr
    line = one_error_line(r)
    assert str(data) in line and ("Read-only" in line or "Permission denied" in line), line


def test_a_data_dir_that_is_a_file_is_one_clear_line(tmp_path):
    (tmp_path / "orch").write_text("not a folder")
    r = serve(tmp_path / "orch")
    assert r.returncode == output.EXIT_CONFIG
    assert "is not a directory" in one_error_line(r)
    r = serve(tmp_path / "orch" / "below")
    assert r.returncode == output.EXIT_CONFIG
    assert "Not a directory" in one_error_line(r)
