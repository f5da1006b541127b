"""The dashboard and /metrics of a real local swarm (an orchestrator and three `iota join` processes), the
page loaded in headless Chromium (Debian's `chromium`, driven by Playwright; .ci/run installs both).

One swarm serves the module: /metrics is scraped as it starts and again once tokens flow, then the page is
loaded and waited on until its loss curve has points and its contributors table a row per worker. The
screenshot is saved under the test's tmp dir (its path is printed: `pytest -s` shows it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from iota_cli.swarm.local import Swarm, SwarmOptions, default_data

pytestmark = pytest.mark.slow
WORKERS = 3
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm.create(
        SwarmOptions(workers=WORKERS, max_steps=12, data=default_data()),
        tmp_path_factory.mktemp("dash") / "s",
    )
    try:
        s.start()
        yield s
    finally:
        s.stop_workers(grace_s=10)
        s.stop_server()


def scrape(url: str) -> dict[str, float]:
    """/metrics, parsed by prometheus-client's own parser: {sample name{labels}: value}."""
    r = requests.get(url + "/metrics", timeout=10)
    assert r.status_code == 200, r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
    return out


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    return sum(
        v
        for k, v in samples.items()
        if k.split("{", 1)[0] == name and all(f'"{a}": "{b}"' in k for a, b in labels.items())
    )


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_metrics_counters_rise_during_the_run(swarm):
    first = scrape(swarm.url)
    assert total(first, "iota_workers", run=swarm.run_id) <= WORKERS

    def tokens_flowing() -> dict[str, float] | None:
        m = scrape(swarm.url)
        return m if total(m, "iota_run_tokens_total", run=swarm.run_id) > 0 else None

    later = wait_for(tokens_flowing, timeout=180, what="tokens in /metrics")
    assert total(later, "iota_run_tokens_total") > total(first, "iota_run_tokens_total")
    complete = {"route": "/v1/work/{work_id}/complete"}
    assert total(later, "iota_http_requests_total", **complete) > total(
        first, "iota_http_requests_total", **complete
    )
    assert total(later, "iota_http_requests_total") > total(first, "iota_http_requests_total")
    assert total(later, "iota_blob_bytes_total", direction="in") > 0
    assert total(later, "iota_blob_bytes_total", direction="out") > 0
    assert total(later, "iota_workers", run=swarm.run_id, state="active") == WORKERS
    assert total(later, "iota_http_request_duration_seconds_count", route="/v1/work/claim") > 0


def test_dashboard_draws_the_swarm_in_chromium(swarm, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (.ci/run installs Debian's)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    shot = tmp_path / "dashboard.png"
    problems: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.goto(swarm.url + "/")
            page.wait_for_function(
                """n => Number(document.querySelector('#loss-chart').dataset.points) > 0
                     && document.querySelectorAll('#contributors tbody tr:not(.empty-row)').length >= n""",
                arg=WORKERS,
                timeout=180_000,
            )
            names = page.locator("#contributors tbody tr td:first-child").all_text_contents()
            states = page.locator("#contributors .badge").all_text_contents()
            path_d = page.locator("#loss-chart path.train").get_attribute("d")
            page.wait_for_timeout(2500)  # one more poll: the page redraws live, not once
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"\ndashboard screenshot: {shot}")
    assert sorted(names) == [f"worker-{i}" for i in range(WORKERS)]
    assert set(states) <= {"computing", "waiting", "gone"} and len(states) == WORKERS
    assert path_d and path_d.startswith("M")
    assert not problems, problems  # no script error, nothing the Content-Security-Policy refused
    assert shot.stat().st_size > 10_000


def test_status_watch_json_follows_a_real_worker(swarm):
    """`iota status --watch --json` in a worker's IOTA_HOME reads what its `iota join` writes."""
    w = swarm.workers[1]
    out = subprocess.run(
        [sys.executable, "-m", "iota_cli", "status", "--watch", "--json"],
        env={**os.environ, "IOTA_HOME": str(w.home), "IOTA_TOKEN": w.token, "IOTA_ORCHESTRATOR": swarm.url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    v = json.loads(out.stdout)
    assert v["stage"] == w.stage and v["run_id"] == swarm.run_id and v["worker"]["pid"] == w.proc.pid
    assert v["step"] is not None and v["state"]
    assert v["orchestrator"]["contributor_id"] == w.contributor_id
