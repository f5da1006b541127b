"""Probe this machine once into a HardwareReport: plain data that requirements.py checks.

Run `python -m iota_cli.machine.hardware` to print the report as JSON. Every probe copes with a missing tool
(no nvidia-smi, no NVML, no sysfs battery): the field is None and `unknown[field]` says why.
No probe imports torch or mlx; probe_power() is cheap and never raises (power.py polls it).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from iota_cli.machine.readiness import BackendStatus, NetworkStatus, probe_backend, probe_network

GIB = 1024**3
SYSFS_POWER = Path("/sys/class/power_supply")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as a huge page-aligned number; anything this large is no limit.
CGROUP_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    vram_bytes: int | None
    driver: str | None = None


@dataclass(frozen=True)
class PowerStatus:
    on_ac: bool | None  # None: cannot tell (treat as AC: never pause on a guess)
    battery_percent: float | None
    has_battery: bool | None
    source: str  # where the facts came from, or why there are none


@dataclass(frozen=True)
class SleepStatus:
    sleep_after_min: int | None  # idle minutes before system sleep; 0 = never; None = unknown
    inhibit_tool: str | None  # a command that can hold the machine awake (caffeinate, systemd-inhibit)
    source: str


@dataclass(frozen=True)
class HardwareReport:
    os: str | None  # platform.system(): Linux, Darwin, Windows
    os_release: str | None
    arch: str | None  # this process's view: x86_64 under Rosetta even on an M-series Mac
    rosetta: bool | None  # this Python is translated by Rosetta 2 (macOS only; False elsewhere)
    python: str
    cpu_model: str | None
    cpu_count: int | None  # usable by this process (affinity)
    ram_bytes: int | None  # min(physical, cgroup limit): what this process can really use
    ram_physical_bytes: int | None
    ram_cgroup_limit_bytes: int | None  # None: no limit (or not in a cgroup)
    gpus: tuple[GPU, ...] | None  # () = none found; None = could not tell
    gpu_source: str  # nvml, nvidia-smi, none, or the error
    nvidia_pci_devices: int | None  # NVIDIA display devices on the PCI bus (driver or not)
    data_dir: str
    disk_path: str | None  # nearest existing parent of data_dir (where the free space is measured)
    disk_free_bytes: int | None
    power: PowerStatus | None
    sleep: SleepStatus | None
    network: NetworkStatus | None = None  # None: no orchestrator configured (or not probed)
    backend: BackendStatus | None = None
    unknown: dict[str, str] = field(default_factory=dict)  # field name -> why it is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HardwareReport:
        """Inverse of to_dict; unknown keys are ignored so old readers survive newer reports."""
        from iota_cli.core import schema  # pydantic: only readers of a saved report pay for it

        return schema.parse(cls, d)


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    """stdout of a command, or None when it is missing, fails or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


# --- os, cpu, memory -----------------------------------------------------------------------------


def macos_translated() -> bool | None:
    """True under Rosetta 2. The sysctl key is missing on Intel Macs, which counts as native."""
    out = _run(["sysctl", "-n", "sysctl.proc_translated"], timeout=2)
    if out is None:
        return False if shutil.which("sysctl") else None
    return out.strip() == "1"


def cpu_model(system: str) -> str | None:
    if system == "Darwin":
        out = _run(["sysctl", "-n", "machdep.cpu.brand_string"], timeout=2)
        return out.strip() if out else None
    text = _read(Path("/proc/cpuinfo")) or ""
    for key in ("model name", "Hardware", "Processor"):
        if m := re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE):
            return m.group(1).strip()
    return platform.processor() or None


def cpu_count() -> int | None:
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def physical_memory(system: str) -> int | None:
    if system == "Darwin":
        out = _run(["sysctl", "-n", "hw.memsize"], timeout=2)
        if out and out.strip().isdigit():
            return int(out)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def cgroup_memory_limit(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """The tightest cgroup memory limit on this process (v2 memory.max, else v1), None when unlimited."""
    candidates = [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]
    for line in (_read(proc_cgroup) or "").splitlines():
        hier, _, rel = line.partition(":")[2].partition(":")
        rel = rel.lstrip("/")
        if not rel:
            continue
        if hier == "":  # v2 unified: the own group and its ancestors
            p = Path(rel)
            for part in [p, *p.parents]:
                if str(part) != ".":
                    candidates.append(root / part / "memory.max")
        elif "memory" in hier.split(","):
            candidates.append(root / "memory" / rel / "memory.limit_in_bytes")
    limits = [int(v) for c in candidates if (v := _read(c)) and v.isdigit()]
    limits = [v for v in limits if v < CGROUP_UNLIMITED]
    return min(limits) if limits else None


# --- GPUs ----------------------------------------------------------------------------------------


def parse_nvidia_smi(text: str) -> tuple[GPU, ...]:
    """Parse `nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        mib = parts[2]
        vram = int(float(mib) * 1024**2) if re.fullmatch(r"\d+(\.\d+)?", mib) else None
        gpus.append(GPU(int(parts[0]), parts[1], vram, parts[3] if len(parts) > 3 else None))
    return tuple(gpus)


def _nvml_gpus() -> tuple[tuple[GPU, ...] | None, str]:
    try:
        import pynvml  # nvidia-ml-py, the optional [nvidia] extra
    except ImportError:
        return None, "nvml: nvidia-ml-py not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"nvml: {e}"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else str(name)
            gpus.append(GPU(i, name, int(pynvml.nvmlDeviceGetMemoryInfo(h).total), driver))
        return tuple(gpus), "nvml"
    except Exception as e:  # noqa: BLE001
        return None, f"nvml: {e}"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def probe_gpus() -> tuple[tuple[GPU, ...] | None, str]:
    """NVIDIA GPUs via NVML, else nvidia-smi; () when neither finds a driver, None when one fails oddly."""
    gpus, why = _nvml_gpus()
    if gpus is not None:
        return gpus, why
    if shutil.which("nvidia-smi") is None:
        return (), f"none ({why}; nvidia-smi not found)"
    query = "--query-gpu=index,name,memory.total,driver_version"
    try:
        r = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"nvidia-smi: {e}"
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        return None, f"nvidia-smi failed: {msg[0] if msg else f'exit {r.returncode}'}"
    return parse_nvidia_smi(r.stdout), "nvidia-smi"


def nvidia_pci_devices(root: Path = Path("/sys/bus/pci/devices")) -> int | None:
    """NVIDIA display controllers on the PCI bus: present even when no driver is installed."""
    if not root.is_dir():
        return None
    n = 0
    for dev in root.iterdir():
        if _read(dev / "vendor") == "0x10de" and (_read(dev / "class") or "").startswith("0x03"):
            n += 1
    return n


# --- disk, power, sleep --------------------------------------------------------------------------


def nearest_existing(path: Path) -> Path | None:
    path = path.expanduser().absolute()
    return next((p for p in [path, *path.parents] if p.exists()), None)


def parse_pmset_batt(text: str) -> PowerStatus:
    """Parse `pmset -g batt`: "Now drawing from 'AC Power'" and " -InternalBattery-0 (id=..) 85%; ..."."""
    src = re.search(r"drawing from '([^']+)'", text)
    pct = re.search(r"InternalBattery[^\n]*?(\d+(?:\.\d+)?)%", text)
    return PowerStatus(
        on_ac=None if src is None else src.group(1) == "AC Power",
        battery_percent=float(pct.group(1)) if pct else None,
        has_battery="InternalBattery" in text,
        source="pmset",
    )


def _sysfs_power(root: Path) -> PowerStatus:
    if not root.is_dir():
        return PowerStatus(None, None, None, f"{root} not found")
    batteries, mains_online = [], []
    for dev in sorted(root.iterdir()):
        kind = _read(dev / "type")
        if kind == "Battery":
            # scope=Device marks a mouse or headset battery, not the one powering this machine.
            if _read(dev / "scope") != "Device":
                batteries.append(dev)
        elif kind is not None and (online := _read(dev / "online")) in ("0", "1"):
            mains_online.append(online == "1")  # Mains, USB, USB_C, ...: the adapter is plugged in
    if not batteries:
        # A machine with no battery runs on external power by definition (a desktop, a server).
        return PowerStatus(True, None, False, "sysfs")
    caps = [float(c) for b in batteries if (c := _read(b / "capacity")) and c.isdigit()]
    percent = sum(caps) / len(caps) if caps else None
    if mains_online:
        on_ac: bool | None = any(mains_online)
    else:
        states = [_read(b / "status") for b in batteries]
        on_ac = None if all(s in (None, "Unknown") for s in states) else "Discharging" not in states
    return PowerStatus(on_ac, percent, True, "sysfs")


def probe_power(root: Path | None = None, system: str | None = None) -> PowerStatus:
    """AC or battery, cheaply, never raising: sysfs on Linux, `pmset -g batt` on macOS.

    IOTA_POWER_SUPPLY_DIR replaces /sys/class/power_supply (containers that mount the host's, and tests
    that give a real `iota join` a battery this machine lacks).
    """
    if root is None:
        root = Path(os.environ.get("IOTA_POWER_SUPPLY_DIR") or SYSFS_POWER)
    try:
        system = system or platform.system()
        if system == "Darwin":
            out = _run(["pmset", "-g", "batt"], timeout=2)
            return (
                PowerStatus(None, None, None, "pmset unavailable") if out is None else parse_pmset_batt(out)
            )
        return _sysfs_power(root)
    except Exception as e:  # noqa: BLE001 - a power probe must never stop training
        return PowerStatus(None, None, None, f"error: {e}")


def parse_pmset_sleep(text: str) -> int | None:
    """Idle minutes before system sleep from `pmset -g` (the " sleep  N" line; 0 = never)."""
    m = re.search(r"^\s*sleep\s+(\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def probe_sleep(system: str) -> SleepStatus:
    if system == "Darwin":
        out = _run(["pmset", "-g"], timeout=2)
        return SleepStatus(parse_pmset_sleep(out) if out else None, "caffeinate", "pmset")
    # Linux has no one place that says whether the desktop will suspend; say what can hold it awake.
    tool = "systemd-inhibit" if shutil.which("systemd-inhibit") else None
    return SleepStatus(None, tool, "not knowable on Linux")


# --- the whole report ----------------------------------------------------------------------------


def probe(
    data_dir: Path | None = None, orchestrator: str | None = None, backend: str | None = None
) -> HardwareReport:
    """Probe everything once. Network only when an orchestrator URL is given; backend only when named."""
    unknown: dict[str, str] = {}
    system = platform.system() or None
    rosetta = macos_translated() if system == "Darwin" else False
    if rosetta is None:
        unknown["rosetta"] = "sysctl not found"
    ram_phys = physical_memory(system or "")
    limit = cgroup_memory_limit() if system == "Linux" else None
    ram = min(v for v in (ram_phys, limit) if v is not None) if (ram_phys or limit) else None
    if ram is None:
        unknown["ram_bytes"] = "neither sysconf nor sysctl reported memory"
    gpus, gpu_source = ((), "not probed on macOS (unified memory)") if system == "Darwin" else probe_gpus()
    if gpus is None:
        unknown["gpus"] = gpu_source
    if data_dir is None:
        from iota_cli.config.settings import paths

        data_dir = paths().data_dir
    disk = nearest_existing(Path(data_dir))
    free = None
    try:
        free = shutil.disk_usage(disk).free if disk else None
    except OSError as e:
        unknown["disk_free_bytes"] = str(e)
    network = None
    if orchestrator:
        network = probe_network(orchestrator)
    else:
        unknown["network"] = "no orchestrator configured"
    has_nvidia = bool(gpus)
    be = probe_backend(backend, system, platform.machine(), has_nvidia) if backend else None
    report = HardwareReport(
        os=system,
        os_release=platform.release() or None,
        arch=platform.machine() or None,
        rosetta=rosetta,
        python=f"{platform.python_version()} ({sys.executable})",
        cpu_model=cpu_model(system or ""),
        cpu_count=cpu_count(),
        ram_bytes=ram,
        ram_physical_bytes=ram_phys,
        ram_cgroup_limit_bytes=limit,
        gpus=gpus,
        gpu_source=gpu_source,
        nvidia_pci_devices=nvidia_pci_devices() if system == "Linux" else None,
        data_dir=str(data_dir),
        disk_path=str(disk) if disk else None,
        disk_free_bytes=free,
        power=probe_power(system=system),
        sleep=probe_sleep(system or ""),
        network=network,
        backend=be,
        unknown=unknown,
    )
    for f in fields(report):
        if getattr(report, f.name) is None and f.name not in unknown and f.name != "ram_cgroup_limit_bytes":
            unknown[f.name] = "not reported on this platform"
    return report


if __name__ == "__main__":
    import json

    print(json.dumps(probe(backend="auto").to_dict(), indent=2))
