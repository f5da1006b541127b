"""The documented minimums, as pure checks over a HardwareReport: check(report) -> [Check].

Nothing here probes; tests inject reports. Run `python -m iota_cli.machine.requirements` to check this
machine.

Memory sizes are GiB (memory is sold in binary sizes) and pass at the minimum less MEMORY_TOLERANCE_GIB
per 16 GiB: a card sold as 16 GB reports 15.0 GiB (T4 with ECC on, 15360 MiB) to 15.9 GiB (RTX 4080,
16376 MiB) because the driver and ECC reserve some, and a PC with 16 GB of RAM reports about 15.3 to
15.6 GiB after the firmware and kernel take theirs. A 12 GB card (at most 12 GiB) still fails clearly.

Battery is a warning, not a failure: doctor asks whether this machine *can* join, and being unplugged
right now is a passing state, not a property of the machine. `iota join` pauses training while on
battery (unless allow_battery is set), so a laptop on battery is safe, just idle; failing would make
scripts that gate on `iota doctor` refuse a laptop that is fine once plugged in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from iota_cli.machine.hardware import GIB, HardwareReport

Status = Literal["pass", "warn", "fail", "unknown"]
MEMORY_TOLERANCE_GIB = 1.0  # per 16 GiB of the minimum, i.e. 6.25%
CPU_ONLY_HINT = "For development only, `--backend torch-cpu` trains on the CPU."


@dataclass(frozen=True)
class Minimums:
    mac_memory_gib: float = 8.0  # unified memory, Apple Silicon
    vram_gib: float = 16.0  # one NVIDIA GPU (a stage runs on one device)
    ram_gib: float = 16.0  # Linux system RAM (or the cgroup limit, if lower)
    disk_fail_gib: float = 10.0  # free where iota keeps its data
    disk_warn_gib: float = 30.0  # larger models need up to 30 GB


@dataclass(frozen=True)
class Check:
    name: str
    found: str
    required: str
    status: Status
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def passes_memory(found_bytes: int, minimum_gib: float) -> bool:
    """True when found reaches the minimum less the reserved-memory tolerance (see module docstring)."""
    return found_bytes / GIB >= minimum_gib - MEMORY_TOLERANCE_GIB * minimum_gib / 16.0


def gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / GIB:.1f} GiB"


def check(report: HardwareReport, minimums: Minimums = Minimums()) -> list[Check]:  # noqa: B008 - frozen
    """Every check for this report's platform, in the order doctor shows them."""
    checks = [check_platform(report), check_cpu(report)]
    if report.os != "Darwin":
        checks.append(cpu_backend_waiver(report, check_gpu(report, minimums)))
    checks += [
        check_memory(report, minimums),
        check_disk(report, minimums),
        check_power(report),
        check_sleep(report),
        check_network(report),
        check_backend(report),
    ]
    return checks


def failed(checks: list[Check]) -> bool:
    return any(c.status == "fail" for c in checks)


def check_platform(r: HardwareReport) -> Check:
    found = f"{r.os or 'unknown OS'} {r.arch or 'unknown arch'}"
    if r.os == "Darwin":
        req = "Apple Silicon (arm64), native Python"
        if r.rosetta:
            return Check(
                "platform",
                f"{found} under Rosetta 2",
                req,
                "fail",
                "This Python runs under Rosetta: install an arm64 Python and reinstall iota in it.",
            )
        if r.arch == "arm64":
            return Check("platform", found, req, "pass")
        if r.rosetta is None:
            return Check("platform", found, req, "unknown", "could not ask sysctl whether this is Rosetta")
        return Check(
            "platform",
            found,
            req,
            "fail",
            "Intel Macs are not supported: MLX needs Apple Silicon.",
        )
    if r.os == "Linux":
        return Check("platform", found, "Linux or macOS", "pass")
    return Check(
        "platform", found, "Linux or macOS", "fail", "iota runs on Linux (NVIDIA) and macOS (Apple Silicon)."
    )


def check_cpu(r: HardwareReport) -> Check:
    # Informational: the accelerator does the work, any CPU can feed it.
    cores = "unknown cores" if r.cpu_count is None else f"{r.cpu_count} cores"
    return Check("cpu", f"{r.cpu_model or 'unknown model'}, {cores}", "any", "pass")


def check_gpu(r: HardwareReport, m: Minimums) -> Check:
    req = f"NVIDIA GPU, {m.vram_gib:g} GB VRAM"
    if r.gpus is None:
        return Check(
            "gpu", f"unknown ({r.gpu_source})", req, "unknown", "Check that `nvidia-smi` lists the GPU."
        )
    if not r.gpus:
        hint = CPU_ONLY_HINT
        if r.nvidia_pci_devices:
            hint = "An NVIDIA card is present but no driver answers: install the NVIDIA driver."
        return Check("gpu", "none", req, "fail", hint)
    best = max(r.gpus, key=lambda g: g.vram_bytes or 0)
    more = f" (+{len(r.gpus) - 1} more)" if len(r.gpus) > 1 else ""
    found = f"{best.name}, {gib(best.vram_bytes)}{more}"
    if best.vram_bytes is None:
        return Check("gpu", found, req, "unknown", "nvidia-smi did not report the memory size.")
    if not passes_memory(best.vram_bytes, m.vram_gib):
        return Check(
            "gpu",
            found,
            req,
            "fail",
            f"A stage needs {m.vram_gib:g} GB on one GPU. " + CPU_ONLY_HINT,
        )
    return Check("gpu", found, req, "pass")


def cpu_backend_waiver(r: HardwareReport, gpu: Check) -> Check:
    """A CPU backend chosen on purpose (development, tests, `iota swarm`) needs no GPU: warn, don't fail."""
    name = r.backend.name if r.backend else None
    if gpu.status != "fail" or not name or not name.endswith("-cpu"):
        return gpu
    return Check("gpu", gpu.found, gpu.required, "warn", f"{name} trains on the CPU: for development only.")


def check_memory(r: HardwareReport, m: Minimums) -> Check:
    mac = r.os == "Darwin"
    minimum = m.mac_memory_gib if mac else m.ram_gib
    req = f"{minimum:g} GB {'unified memory' if mac else 'RAM'}"
    found = gib(r.ram_bytes)
    if r.ram_cgroup_limit_bytes is not None and r.ram_cgroup_limit_bytes == r.ram_bytes:
        found += " (cgroup limit)"
    if r.ram_bytes is None:
        return Check("memory", found, req, "unknown", r.unknown.get("ram_bytes", ""))
    if passes_memory(r.ram_bytes, minimum):
        return Check("memory", found, req, "pass")
    hint = "Too little memory to hold a stage."
    if r.ram_cgroup_limit_bytes is not None and r.ram_cgroup_limit_bytes == r.ram_bytes:
        hint = "The cgroup memory limit is too low: raise it (e.g. `docker run --memory 16g`)."
    return Check("memory", found, req, "fail", hint)


def check_disk(r: HardwareReport, m: Minimums) -> Check:
    req = f"{m.disk_fail_gib:g} GB free ({m.disk_warn_gib:g} GB for larger models)"
    where = f" at {r.disk_path}" if r.disk_path else ""
    found = f"{gib(r.disk_free_bytes)} free{where}"
    if r.disk_free_bytes is None:
        return Check("disk", found, req, "unknown", r.unknown.get("disk_free_bytes", ""))
    free = r.disk_free_bytes / GIB
    move = "Free space, or move iota's data with IOTA_HOME (`iota config path`)."
    if free < m.disk_fail_gib:
        return Check("disk", found, req, "fail", move)
    if free < m.disk_warn_gib:
        return Check("disk", found, req, "warn", f"Larger models need more. {move}")
    return Check("disk", found, req, "pass")


def check_power(r: HardwareReport) -> Check:
    req = "on AC power"
    p = r.power
    if p is None or (p.on_ac is None and p.has_battery is not False):
        return Check("power", f"unknown ({p.source if p else 'not probed'})", req, "unknown")
    if p.has_battery is False:
        return Check("power", "AC (no battery)", req, "pass")
    pct = "" if p.battery_percent is None else f", battery {p.battery_percent:.0f}%"
    if p.on_ac:
        return Check("power", f"AC{pct}", req, "pass")
    return Check(
        "power",
        f"battery{pct}",
        req,
        "warn",
        "Plug in: `iota join` pauses on battery (allow_battery=true trains anyway).",
    )


def check_sleep(r: HardwareReport) -> Check:
    req = "does not sleep while training"
    s = r.sleep
    if s is None or s.sleep_after_min is None:
        hint = ""
        if s and s.inhibit_tool == "systemd-inhibit":
            hint = "To stay awake: `systemd-inhibit --what=sleep:idle iota join`."
        return Check("sleep", "unknown", req, "unknown", hint)
    if s.sleep_after_min == 0:
        return Check("sleep", "never sleeps", req, "pass")
    return Check(
        "sleep",
        f"sleeps after {s.sleep_after_min} min idle",
        req,
        "warn",
        "Run `caffeinate -s iota join`, or never sleep on AC: `sudo pmset -c sleep 0`.",
    )


def check_network(r: HardwareReport) -> Check:
    req = "orchestrator answers"
    n = r.network
    if n is None:
        return Check(
            "network",
            "no orchestrator configured",
            req,
            "warn",
            "`iota config set orchestrator URL`, or `iota join --orchestrator URL`.",
        )
    if n.reachable:
        return Check("network", f"{n.url} in {n.latency_ms:.0f} ms", req, "pass")
    return Check(
        "network",
        f"{n.url}: {n.detail}",
        req,
        "fail",
        "Check the URL (`iota config get orchestrator`) and this machine's network.",
    )


def check_backend(r: HardwareReport) -> Check:
    b = r.backend
    if b is None:
        return Check("backend", "not checked", "importable", "unknown")
    if b.name is None:
        hint = "See the gpu check; `iota doctor --backend torch-cpu` checks the CPU backend."
        return Check("backend", "none for this hardware", "importable", "unknown", hint)
    req = f"{b.name} importable"
    ver = f" {b.framework} {b.version}" if b.version else ""
    if b.available:
        same = not b.detail or (
            b.version is not None and b.version in b.detail
        )  # detail is often the version
        return Check("backend", f"{b.name}{ver}" + ("" if same else f" ({b.detail})"), req, "pass")
    if b.framework and b.version is None:
        extra = "mlx" if b.framework == "mlx" else "torch"
        hint = f"Install it: pip install 'iota-cli[{extra}]'"
    elif b.registered is False:
        hint = "No installed package provides it; see `iota backends`."
    else:
        hint = "Reinstall its framework, or `iota config set backend NAME`."
    status: Status = "unknown" if b.available is None else "fail"
    return Check("backend", f"{b.name}{ver}: {b.detail}", req, status, hint)


if __name__ == "__main__":
    from iota_cli.machine.hardware import probe

    for c in check(probe(backend="auto")):
        print(f"{c.status:8} {c.name:9} {c.found}")
