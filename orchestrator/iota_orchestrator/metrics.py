"""Prometheus metrics of the HTTP layer: requests and latencies by route, blob bytes in and out.

`Metrics` holds one app's registry (an app of its own each, so several orchestrators in one process, as
tests run them, never share counts); `RequestMetrics` is the pure ASGI middleware that fills it. Routes
are labelled by their template (`/v1/work/{work_id}/complete`), never the raw path, so the number of
series stays bounded whatever clients send; a path no route matched is `other`. On the way it tells
activity.py what each claim was answered. What the database knows (queues, workers, tokens, loss,
merge rounds, checks) is read at scrape time instead: gauges.py. GET /metrics serves both
(api/dashboard.py):

    curl -s http://127.0.0.1:8700/metrics | grep iota_http_requests_total
"""

from __future__ import annotations

import time
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram

from iota_cli.core.protocol import WAIT_HEADER
from iota_orchestrator import auth
from iota_orchestrator.activity import Activity
from iota_orchestrator.guard import BLOB_PREFIX

CLAIM_PATH = "/v1/work/claim"
OTHER = "other"
# Claims long-poll for up to a few seconds, everything else answers in milliseconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_WAIT = WAIT_HEADER.lower().encode()
# No `_created` sample beside every series: it doubles a scrape and Prometheus does not need it.
prometheus_client.disable_created_metrics()


class Metrics:
    """The counters and histograms the middleware fills, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "iota_http_requests",
            "HTTP requests answered, by method, route template and status code",
            ["method", "route", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "iota_http_request_duration_seconds",
            "Time to answer a request (a claim's long-poll included), by method and route template",
            ["method", "route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        blob = Counter(
            "iota_blob_bytes",
            "Blob bytes through the orchestrator's own blob routes (in: uploaded, out: downloaded)",
            ["direction"],
            registry=self.registry,
        )
        self.blob_in, self.blob_out = blob.labels("in"), blob.labels("out")
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, code: int, seconds: float) -> None:
        key = (method, route, code)
        pair = self._children.get(key)
        if pair is None:  # labels() costs a lock and a dict walk: once per series, not per request
            pair = self._children[key] = (
                self.requests.labels(method, route, str(code)),
                self.latency.labels(method, route),
            )
        pair[0].inc()
        pair[1].observe(seconds)


class RequestMetrics:
    """Pure ASGI middleware (outside the guard, so refused requests count too): times each request."""

    def __init__(self, app: Any, metrics: Metrics, activity: Activity) -> None:
        self.app, self.metrics, self.activity = app, metrics, activity

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path: str = scope["path"]
        blob = path.startswith(BLOB_PREFIX)
        code = 500  # an exception before the response started is answered 500 by the server

        async def counting_receive() -> dict:
            message = await receive()
            self.metrics.blob_in.inc(len(message.get("body", b"")))
            return message

        async def watching_send(message: dict) -> None:
            nonlocal code
            kind = message["type"]
            if kind == "http.response.start":
                code = message["status"]
                if path == CLAIM_PATH:
                    self._note_claim(scope, code, message.get("headers") or ())
            elif blob and kind == "http.response.body" and scope["method"] == "GET":
                self.metrics.blob_out.inc(len(message.get("body", b"")))
            await send(message)

        try:
            await self.app(scope, counting_receive if blob else receive, watching_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or OTHER
            self.metrics.observe(scope["method"], route, code, time.perf_counter() - t0)

    def _note_claim(self, scope: dict, code: int, headers: Any) -> None:
        if code not in (200, 204):
            return
        token = None
        for k, v in scope.get("headers") or ():
            if k == b"authorization":
                token = auth.bearer(v.decode("latin-1"))
                break
        if token is None:
            return
        why = None
        if code == 204:
            why = "no work"  # an older reason-less answer, or the run finished
            for k, v in headers:
                if k.lower() == _WAIT:
                    why = v.decode("latin-1")
                    break
        self.activity.claimed(auth.hash_token(token), why, time.time())
