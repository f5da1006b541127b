"""The live dashboard and Prometheus metrics: `/` (a static page), `/v1/dashboard` (what it polls) and
`/metrics`. None of them needs a token: they show what `GET /v1/runs/{id}/status` already shows.

`install(app)` adds the routes and the request-metrics middleware (create_app calls it). The page is
package data (iota_orchestrator/static: HTML, JS that draws its charts as SVG, CSS) served with a strict
Content-Security-Policy; it fetches /v1/dashboard every few seconds. They stay out of the OpenAPI
document: they are for people and for Prometheus, not part of the protocol.

    iota orchestrator serve, then open http://127.0.0.1:8700/ ; curl -s http://127.0.0.1:8700/metrics
"""

from __future__ import annotations

import importlib.resources
import json
import time
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import Connection

from iota_orchestrator import dashboard, gauges, runs
from iota_orchestrator.activity import Activity
from iota_orchestrator.api.deps import StateDep
from iota_orchestrator.errors import NotFound
from iota_orchestrator.metrics import Metrics, RequestMetrics
from iota_orchestrator.series import Series

router = APIRouter(include_in_schema=False)
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
PAGE_HEADERS = {
    # Everything comes from this origin, nothing runs inline: a contributor's name can never become markup.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
CACHE_S = 2.0  # the page's poll interval: however many pages poll, one build per interval
_files: dict[str, bytes] = {}


def install(app: FastAPI) -> None:
    """Add the dashboard's routes and the request-metrics middleware to an app (outside the guard)."""
    app.state.metrics = Metrics()
    app.state.activity = Activity()
    app.state.series = {}  # run id -> Series
    app.state.views = {}  # run id asked for (None: the default) -> (monotonic time built, JSON bytes)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics, activity=app.state.activity)
    app.include_router(router)


def static(name: str) -> bytes:
    """A file of the page, read once from the package."""
    if name not in _files:
        _files[name] = importlib.resources.files("iota_orchestrator").joinpath("static", name).read_bytes()
    return _files[name]


@router.get("/")
async def page() -> Response:
    return Response(static("index.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound(f"no file {name[:64]!r}")
    return Response(static(name), media_type=f"{ASSETS[name]}; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/v1/dashboard")
async def dashboard_view(
    request: Request, state: StateDep, run_id: Annotated[str | None, Query(max_length=64)] = None
) -> Response:
    """The dashboard's document for run_id (default: the newest running run, else the newest)."""
    app = request.app
    cached = app.state.views.get(run_id)
    if cached is None or time.monotonic() - cached[0] >= CACHE_S:

        def look(conn: Connection) -> dict:
            rid = run_id or dashboard.default_run(conn)
            if rid is None:
                return {"run": None, "runs": []}
            run = runs.get_run(conn, rid)  # 404 for an unknown run
            ctx = runs.context(conn, rid)
            series = app.state.series.get(rid)
            if series is None:
                series = app.state.series[rid] = Series(ctx.tokens_per_sample, float(run.created))
            now = time.time()
            # token_cache maps a token's sha256 to its contributor, as each claim was authorised.
            waiting = app.state.activity.waiting(state.token_cache, now)
            return {**dashboard.view(conn, ctx, series, waiting, now), "runs": dashboard.run_list(conn)}

        cached = app.state.views[run_id] = (time.monotonic(), json.dumps(await state.in_read(look)).encode())
    return Response(cached[1], media_type="application/json", headers={"Cache-Control": "no-store"})


class _Collected:
    """A collector of metric families read already (from the database, at this scrape)."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self) -> list:
        return self.families


@router.get("/metrics")
async def metrics(request: Request, state: StateDep) -> Response:
    """Prometheus text format: the request metrics, then the swarm's state read from the database now."""
    families = await state.in_read(gauges.collect)
    scraped = CollectorRegistry(auto_describe=False)
    scraped.register(_Collected(families))
    body = generate_latest(request.app.state.metrics.registry) + generate_latest(scraped)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
