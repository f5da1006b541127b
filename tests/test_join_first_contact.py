"""`iota join` on first contact, as a newcomer meets it: a bad URL, nothing listening, a host that does not
exist, a web server that is no orchestrator, an unknown backend; and an orchestrator behind a sub-path.

Every row runs the real entry point (`python -m iota_cli`) in a subprocess and checks the exit code, the
key words and that no traceback reaches stderr. IOTA_FIRST_CONTACT_S makes the first-contact bound small.
Run: .venv/bin/python -m pytest tests/test_join_first_contact.py -q
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fake_http import free_port

from iota_cli import output
from iota_cli.core import urls
from iota_cli.core.backend import detect_auto_choice
from iota_cli.train.checkpoint import CheckpointStore, LoopState

BOUND_S = 2  # IOTA_FIRST_CONTACT_S in these tests


def iota(*args: str, home: Path, timeout: float = 90, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iota_cli", *args],
        env=environment(home, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def environment(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTA_")}
    return env | {
        "IOTA_HOME": str(home),
        "IOTA_FIRST_CONTACT_S": str(BOUND_S),
        "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def join(url: str, home: Path, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
    return iota("join", "--orchestrator", url, "--backend", "torch-cpu", "--force", *extra, home=home, **env)


def assert_clean(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr[-2000:])


# --- the URL ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"), [("not-a-url", "needs http:// or https://"), ("http://", "has no host")]
)
def test_a_url_that_is_no_url_exits_78_before_anything_else(tmp_path, url, why):
    r = join(url, tmp_path / "home")
    assert_clean(r, output.EXIT_CONFIG, "is not an orchestrator URL", why, "hint:", "https://")
    assert not (tmp_path / "home" / "data").exists(), "nothing was registered or kept"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("swarm.example.org:8700", "needs http:// or https://"),
        ("ftp://swarm.example.org", "scheme must be http or https"),
        ("http://127.0.0.1:99999", "port is not a number"),
        ("http://h:", "port is not a number"),
        ("http://a..b", "not a host name"),
        ("http://[::1/x", "not a host name"),
        ("http://swarm example", "space"),
        ("https://h/x?token=1", "?query"),
        ("https://alice:pw@h", "user name or password"),
    ],
)
def test_what_the_parser_refuses_and_why(url, why):
    with pytest.raises(urls.UrlError, match=re.escape(why)) as e:
        urls.check(url)
    assert "pw" not in str(e.value)


def test_what_the_parser_keeps():
    assert urls.check(" https://h.example:8443/swarm/ ") == "https://h.example:8443/swarm"
    assert urls.check("http://[::1]:8700") == "http://[::1]:8700"
    base = urls.check("http://h:8/a/b/")
    assert urls.resolve(base, "/v1/blobs/k?sig=1") == "http://h:8/a/b/v1/blobs/k?sig=1"
    assert urls.resolve(base, "https://store.example/k") == "https://store.example/k"


def test_doctor_and_login_use_the_same_parser(tmp_path):
    r = iota("doctor", "--orchestrator", "not-a-url", "--backend", "nosuch", home=tmp_path)
    assert "needs http:// or https://" in r.stdout and "Traceback" not in r.stderr
    r = iota("login", "--orchestrator", "not-a-url", "--token", "t", home=tmp_path)
    assert_clean(r, output.EXIT_CONFIG, "is not an orchestrator URL")


# --- nobody there, or somebody else ----------------------------------------------------------------------


def test_nothing_listening_exits_69_within_the_bound_with_the_doctors_hint(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    r = join(url, tmp_path / "home")
    assert_clean(r, output.EXIT_UNAVAILABLE, url, "connection refused", f"tried for {BOUND_S} s")
    assert "Check the URL" in r.stderr  # the doctor's network check, word for word
    assert time.monotonic() - start < 60  # import and preflight included; the wait itself is BOUND_S
    assert not list((tmp_path / "home").rglob("*.token")), "nobody registered"


def test_an_unknown_host_exits_69(tmp_path):
    r = join("http://no-such-host.invalid:8700", tmp_path / "home")
    assert_clean(r, output.EXIT_UNAVAILABLE, "no-such-host.invalid", "unreachable", "Check the URL")


class NotIota(BaseHTTPRequestHandler):
    """A web server that is not an orchestrator: HTML everywhere, 404 or 200."""

    status = 404

    def do_GET(self) -> None:
        body = b"<html><body>It works!</body></html>"
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


class NotIotaOk(NotIota):
    status = 200


@pytest.fixture(params=[NotIota, NotIotaOk], ids=["html-404", "html-200"])
def web_server(request) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), request.param)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_web_server_that_is_no_orchestrator_exits_69_at_once(tmp_path, web_server):
    r = join(web_server, tmp_path / "home")
    assert_clean(r, output.EXIT_UNAVAILABLE, web_server, "not an iota orchestrator", "Check the URL")
    assert "<html>" not in r.stderr


def test_once_joined_an_orchestrator_that_is_away_is_waited_for(tmp_path):
    home = tmp_path / "home"
    CheckpointStore(home / "data" / "checkpoints" / "r1" / "stage-0").save(LoopState("r1", "c1", 0), {}, {})
    url = f"http://127.0.0.1:{free_port()}"
    args = [sys.executable, "-m", "iota_cli", "join", "--orchestrator", url, "--backend", "torch-cpu"]
    proc = subprocess.Popen(
        [*args, "--force", "--token", "t"],
        env=environment(home),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while not any("retrying in" in x for x in lines) and time.monotonic() < deadline:
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.2)
        time.sleep(3 * BOUND_S)
        assert proc.poll() is None, "a machine that has joined before gave up on its orchestrator"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert any("unreachable (connection refused)" in x for x in lines), "".join(lines)
    assert not any("Traceback" in x for x in lines)


# --- the backend -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_an_unknown_backend_is_a_configuration_error_that_lists_the_known_ones(tmp_path, force):
    url = f"http://127.0.0.1:{free_port()}"
    r = iota("join", "--orchestrator", url, "--backend", "nosuch", *force, home=tmp_path)
    assert_clean(r, output.EXIT_CONFIG, "unknown backend 'nosuch'", "torch-cpu", "iota backends")
    assert "--force" not in r.stderr and "gpu" not in r.stderr


def test_a_backend_that_cannot_run_here_names_the_ones_that_can(tmp_path):
    if detect_auto_choice() == "torch-cuda":  # the hardware fact, without importing torch here
        pytest.skip("this machine has an NVIDIA GPU")
    url = f"http://127.0.0.1:{free_port()}"
    r = iota("join", "--orchestrator", url, "--backend", "torch-cuda", home=tmp_path)
    assert_clean(r, output.EXIT_CONFIG, "backend 'torch-cuda' is not available here", "available: ")
    assert "torch-cpu" in r.stderr.split("available: ", 1)[1] and "--force" not in r.stderr


# --- behind a reverse proxy's sub-path -------------------------------------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


class StripPrefix(BaseHTTPRequestHandler):
    """A loopback reverse proxy: serves its upstream under /swarm (and nothing else), recording paths."""

    protocol_version = "HTTP/1.1"
    server: Proxy

    def forward(self) -> None:
        import requests

        self.server.seen.append((self.command, self.path.split("?")[0]))
        if not self.path.startswith(PREFIX + "/"):
            return self.answer(404, {"Content-Type": "text/html"}, b"<html>no such site</html>")
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        url = self.server.upstream + self.path[len(PREFIX) :]
        r = requests.request(self.command, url, headers=headers, data=body, timeout=(5, 120))
        kept = {k: v for k, v in r.headers.items() if k.lower() not in HOP_BY_HOP}
        self.answer(r.status_code, kept, r.content)

    do_GET = do_POST = do_PUT = forward

    def answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


PREFIX = "/swarm"


class Proxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), StripPrefix)
        self.upstream, self.seen = upstream, []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{PREFIX}"


@pytest.mark.slow
def test_join_behind_a_reverse_proxy_sub_path_keeps_the_path(tmp_path):
    from iota_cli.core.manifest import tiny_manifest
    from iota_cli.swarm.corpus import write_corpus
    from iota_cli.swarm.orchestrator import OrchestratorProcess, wait_until
    from iota_cli.train.api import SwarmApi

    manifest = tiny_manifest(str(write_corpus(tmp_path / "text", files=2, words=3000)))
    with OrchestratorProcess(tmp_path / "orch", admin_token="admin-proxy") as orch:
        with SwarmApi.connect(orch.url, "admin-proxy") as admin:
            run_id = admin.create_run(manifest).run_id
        proxy = Proxy(orch.url)
        args = ["join", "--orchestrator", proxy.url, "--run", run_id, "--stage", "0"]
        cmd = [sys.executable, "-m", "iota_cli", *args, "--backend", "torch-cpu", "--force"]
        log = open(tmp_path / "join.log", "w+")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(cmd, env=environment(tmp_path / "home"), stdout=log, stderr=log)
        try:
            # A head's forward pass: its tokens downloaded from a handed-out URL, its output uploaded to one.
            def used(method: str) -> bool:
                return any(m == method and p.startswith(f"{PREFIX}/v1/blobs/") for m, p in proxy.seen)

            assert wait_until(lambda: used("PUT") or proc.poll() is not None, timeout=120)
            assert proc.poll() is None, (tmp_path / "join.log").read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            proxy.shutdown()
            proxy.server_close()
    paths = [p for _, p in proxy.seen]
    assert all(p.startswith(f"{PREFIX}/v1/") for p in paths), sorted(set(paths) - {PREFIX})
    assert used("GET") and f"{PREFIX}/v1/assignment" in paths and f"{PREFIX}/v1/health" in paths
