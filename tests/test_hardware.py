"""The probes: real on this machine, and with injected facts (sysfs trees, tool output) for the
hardware it lacks (GPUs, batteries, cgroup limits, Macs)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path

import pytest

from iota_cli.machine import hardware
from iota_cli.machine.hardware import GIB, GPU, HardwareReport, PowerStatus
from iota_cli.machine.readiness import probe_backend

SMI_OUTPUT = "0, NVIDIA GeForce RTX 4090, 24564, 550.54.14\n1, Tesla T4, 15360, 550.54.14\n"


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n")
    return root


# --- this machine, really probed -----------------------------------------------------------------


def test_probe_reports_this_machine(tmp_path):
    r = hardware.probe(data_dir=tmp_path / "not" / "yet" / "there")
    assert r.os == "Linux" and r.rosetta is False and r.cpu_count and r.cpu_count >= 1
    assert r.ram_physical_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert r.ram_bytes is not None and r.ram_bytes <= r.ram_physical_bytes
    assert r.disk_path == str(tmp_path)  # the nearest existing parent
    assert r.disk_free_bytes == pytest.approx(shutil.disk_usage(tmp_path).free, rel=0.05)
    assert r.network is None and "orchestrator" in r.unknown["network"]
    assert r.backend is None  # not asked
    if shutil.which("nvidia-smi") is None:
        assert r.gpus == () and "nvidia-smi not found" in r.gpu_source


def test_report_round_trips_through_json(tmp_path):
    r = hardware.probe(data_dir=tmp_path, backend="auto")
    d = json.loads(json.dumps(r.to_dict()))
    d["from_a_newer_version"] = 1
    assert HardwareReport.from_dict(d) == r
    with_gpu = HardwareReport.from_dict({**d, "gpus": [{"index": 0, "name": "x", "vram_bytes": 1, "new": 2}]})
    assert with_gpu.gpus == (GPU(0, "x", 1),)


# --- GPUs ----------------------------------------------------------------------------------------


def test_parse_nvidia_smi():
    gpus = hardware.parse_nvidia_smi(SMI_OUTPUT + "garbage line\n2, Odd, [N/A], 1\n")
    assert gpus[0] == GPU(0, "NVIDIA GeForce RTX 4090", 24564 * 1024**2, "550.54.14")
    assert gpus[1].vram_bytes == 15 * GIB
    assert gpus[2] == GPU(2, "Odd", None, "1")
    assert len(gpus) == 3


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
    """A PATH holding only the tools a test writes, and no NVML (nvidia-ml-py may be installed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setitem(sys.modules, "pynvml", None)

    def tool(name: str, script: str) -> None:
        p = bin_dir / name
        p.write_text(f"#!/bin/sh\n{script}\n")
        p.chmod(0o755)

    return tool


def test_gpus_from_nvidia_smi(fake_tools):
    fake_tools("nvidia-smi", f"printf '{SMI_OUTPUT}'")
    gpus, source = hardware.probe_gpus()
    assert source == "nvidia-smi" and [g.name for g in gpus] == ["NVIDIA GeForce RTX 4090", "Tesla T4"]


def test_nvidia_smi_without_driver_is_unknown_not_a_crash(fake_tools):
    fake_tools(
        "nvidia-smi", "echo 'NVIDIA-SMI has failed because it could not communicate with the driver'; exit 9"
    )
    gpus, source = hardware.probe_gpus()
    assert gpus is None and "could not communicate" in source


def test_no_nvml_no_nvidia_smi_means_no_gpu(fake_tools):
    gpus, source = hardware.probe_gpus()
    assert gpus == () and "nvidia-smi not found" in source and "nvml" in source


def test_gpus_from_nvml(monkeypatch):
    class Mem:
        total = 24 * GIB

    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: b"550.54.14",
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: "NVIDIA RTX A5000",
        nvmlDeviceGetMemoryInfo=lambda h: Mem(),
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert hardware.probe_gpus() == ((GPU(0, "NVIDIA RTX A5000", 24 * GIB, "550.54.14"),), "nvml")


def test_nvml_without_driver_falls_back_to_nvidia_smi(fake_tools, monkeypatch):
    def init():
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=init))
    fake_tools("nvidia-smi", f"printf '{SMI_OUTPUT}'")
    gpus, source = hardware.probe_gpus()
    assert source == "nvidia-smi" and len(gpus) == 2


def test_nvidia_card_on_pci_bus_without_driver(tmp_path):
    write_tree(tmp_path, {"0000:01:00.0/vendor": "0x10de", "0000:01:00.0/class": "0x030000"})
    write_tree(tmp_path, {"0000:01:00.1/vendor": "0x10de", "0000:01:00.1/class": "0x040300"})  # its audio
    write_tree(tmp_path, {"0000:00:02.0/vendor": "0x8086", "0000:00:02.0/class": "0x030000"})
    assert hardware.nvidia_pci_devices(tmp_path) == 1
    assert hardware.nvidia_pci_devices(tmp_path / "missing") is None


# --- memory limits -------------------------------------------------------------------------------


def test_cgroup_v2_limit_of_own_group(tmp_path):
    root = write_tree(tmp_path / "cg", {"memory.max": "max", "user.slice/job/memory.max": str(8 * GIB)})
    proc = write_tree(tmp_path, {"proc": "0::/user.slice/job"}) / "proc"
    assert hardware.cgroup_memory_limit(root, proc) == 8 * GIB


def test_cgroup_v2_ancestor_limit_counts(tmp_path):
    files = {"a/memory.max": str(4 * GIB), "a/b/memory.max": "max"}
    root = write_tree(tmp_path / "cg", files)
    proc = write_tree(tmp_path, {"proc": "0::/a/b"}) / "proc"
    assert hardware.cgroup_memory_limit(root, proc) == 4 * GIB


def test_cgroup_v1_unlimited_is_none(tmp_path):
    root = write_tree(tmp_path / "cg", {"memory/memory.limit_in_bytes": "9223372036854771712"})
    proc = write_tree(tmp_path, {"proc": "5:memory:/\n0::/"}) / "proc"
    assert hardware.cgroup_memory_limit(root, proc) is None
    assert hardware.cgroup_memory_limit(tmp_path / "none", tmp_path / "none") is None


# --- power and sleep -----------------------------------------------------------------------------

LAPTOP = {
    "AC/type": "Mains",
    "BAT0/type": "Battery",
    "BAT0/capacity": "81",
    "hidpp_battery_0/type": "Battery",  # a wireless mouse
    "hidpp_battery_0/scope": "Device",
    "hidpp_battery_0/capacity": "5",
    "ucsi-source-psy-USBC000:001/type": "USB",
    "ucsi-source-psy-USBC000:001/online": "0",
}


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({**LAPTOP, "AC/online": "1", "BAT0/status": "Charging"}, PowerStatus(True, 81.0, True, "sysfs")),
        ({**LAPTOP, "AC/online": "0", "BAT0/status": "Discharging"}, PowerStatus(False, 81.0, True, "sysfs")),
        ({"BAT1/type": "Battery", "BAT1/status": "Discharging"}, PowerStatus(False, None, True, "sysfs")),
        ({"BAT1/type": "Battery", "BAT1/status": "Full"}, PowerStatus(True, None, True, "sysfs")),
        ({"BAT1/type": "Battery", "BAT1/status": "Unknown"}, PowerStatus(None, None, True, "sysfs")),
        ({"hid/type": "Battery", "hid/scope": "Device"}, PowerStatus(True, None, False, "sysfs")),
        ({}, PowerStatus(True, None, False, "sysfs")),  # a desktop: no supplies at all
    ],
    ids=["laptop on AC", "laptop on battery", "no mains entry", "full", "unknown", "mouse only", "desktop"],
)
def test_sysfs_power(tmp_path, files, expected):
    root = tmp_path / "power_supply"
    root.mkdir()
    assert hardware.probe_power(write_tree(root, files), system="Linux") == expected


def test_power_probe_never_raises(tmp_path):
    assert hardware.probe_power(tmp_path / "missing", system="Linux").on_ac is None
    root = write_tree(tmp_path / "ps", {"BAT0/type": "Battery", "BAT0/capacity": "lots"})
    (root / "BAT0" / "status").mkdir()  # unreadable as a file
    assert hardware.probe_power(root, system="Linux") == PowerStatus(None, None, True, "sysfs")
    assert hardware.probe_power(system="Darwin").source == "pmset unavailable"  # no pmset here


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Now drawing from 'AC Power'\n"
            " -InternalBattery-0 (id=4653155)\t100%; charged; 0:00 remaining present: true\n",
            PowerStatus(True, 100.0, True, "pmset"),
        ),
        (
            "Now drawing from 'Battery Power'\n"
            " -InternalBattery-0 (id=4653155)\t57%; discharging; 3:21 remaining present: true\n",
            PowerStatus(False, 57.0, True, "pmset"),
        ),
        ("Now drawing from 'AC Power'\n", PowerStatus(True, None, False, "pmset")),  # a Mac mini
        ("Now drawing from 'UPS Power'\n", PowerStatus(False, None, False, "pmset")),
        ("", PowerStatus(None, None, False, "pmset")),
    ],
    ids=["macbook on AC", "macbook on battery", "mac mini", "ups", "empty"],
)
def test_parse_pmset_batt(text, expected):
    assert hardware.parse_pmset_batt(text) == expected


def test_parse_pmset_sleep():
    text = (
        "System-wide power settings:\nCurrently in use:\n standby              1\n"
        " sleep                10 (sleep prevented by coreaudiod)\n displaysleep         10\n"
    )
    assert hardware.parse_pmset_sleep(text) == 10
    assert hardware.parse_pmset_sleep(text.replace("sleep                10", "sleep 0")) == 0
    assert hardware.parse_pmset_sleep(" displaysleep 10\n") is None


# --- backend -------------------------------------------------------------------------------------


def test_backend_auto_on_cpu_only_linux_is_none():
    b = probe_backend("auto", "Linux", "x86_64", has_nvidia=False)
    assert b.name is None and b.available is None


def test_backend_auto_picks_mlx_on_apple_silicon_and_asks_its_factory():
    from importlib.metadata import version

    b = probe_backend("auto", "Darwin", "arm64", has_nvidia=False)
    assert b.name == "mlx" and b.framework == "mlx" and b.version == version("mlx")
    if not b.registered:
        pytest.skip("the mlx backend is not installed")
    assert b.available is False and b.detail  # no Metal on this Linux machine, and the factory says so


def test_unknown_backend_is_reported_not_raised():
    b = probe_backend("rocm-someday", "Linux", "x86_64", has_nvidia=False)
    assert b.registered is False and b.available is False and "rocm-someday" in b.detail
