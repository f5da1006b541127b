"""Probes beyond the hardware that decide whether this machine can join: the orchestrator answers,
and the backend for this platform can run. Both are slow-ish, so hardware.probe() runs them only when asked.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class NetworkStatus:
    url: str
    reachable: bool
    latency_ms: float | None
    detail: str  # the error, or the health reply's status


@dataclass(frozen=True)
class BackendStatus:
    name: str | None  # the backend that would be used; None: none suits this hardware
    requested: str  # the setting: "auto" or an explicit name
    registered: bool | None  # an `iota.backends` entry point of that name is installed
    framework: str | None  # torch, mlx (None for a third-party backend)
    version: str | None  # the framework's installed version
    available: bool | None  # the factory's own verdict (None when not asked)
    detail: str


def probe_network(url: str, timeout: tuple[float, float] = (3.0, 5.0)) -> NetworkStatus:
    """GET {url}/v1/health once (no retries: doctor reports, it does not wait) and time it."""
    from iota_cli.core.urls import UrlError, check

    try:
        url = check(url)  # the one parser `iota join` uses too, so both accept the same URLs
    except UrlError as e:
        return NetworkStatus(url, False, None, e.why)
    try:
        from iota_cli.train.api import SwarmApi

        with SwarmApi.connect(url, retries=0) as api:
            start = time.perf_counter()
            api.health(timeout=timeout)
            latency_s = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - Unreachable, ApiError, or anything requests raises
        return NetworkStatus(url, False, None, str(e)[:160] or type(e).__name__)
    return NetworkStatus(url, True, round(latency_s * 1000, 1), "ok")


def framework_of(backend: str) -> str | None:
    return "torch" if backend.startswith("torch") else "mlx" if backend.startswith("mlx") else None


def probe_backend(requested: str, system: str | None, arch: str | None, has_nvidia: bool) -> BackendStatus:
    """Which backend would run here and whether it can: metadata first, the factory's verdict last."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    from iota_cli.core import backend as be

    name = be.auto_choice(system or "", arch or "", has_nvidia) if requested == "auto" else requested
    if name is None:
        return BackendStatus(None, requested, None, None, None, None, "no backend suits this hardware")
    fw = framework_of(name)
    ver = None
    if fw is not None:
        with contextlib.suppress(PackageNotFoundError):
            ver = version(fw)
        if ver is None or find_spec(fw) is None:
            return BackendStatus(name, requested, None, fw, None, False, f"{fw} is not installed")
    try:
        factory = be.factories().get(name)
    except Exception as e:  # noqa: BLE001 - a broken registry must not break doctor
        return BackendStatus(name, requested, None, fw, ver, None, f"backend registry failed: {e}")
    if factory is None:
        return BackendStatus(name, requested, False, fw, ver, False, f"no {name!r} backend is installed")
    try:
        # Only the chosen backend is asked: its verdict (e.g. torch built without CUDA) needs the framework.
        ok, detail = factory.available()
    except Exception as e:  # noqa: BLE001
        ok, detail = False, f"{type(e).__name__}: {e}"
    return BackendStatus(name, requested, True, fw, ver, bool(ok), str(detail))
