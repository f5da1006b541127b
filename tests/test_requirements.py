"""The documented minimums over injected hardware reports (the machines this one is not)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iota_cli.machine.hardware import GIB, GPU, HardwareReport, PowerStatus, SleepStatus
from iota_cli.machine.readiness import BackendStatus, NetworkStatus
from iota_cli.machine.requirements import Check, check, failed

MIB = 1024**2
AC_DESKTOP = PowerStatus(on_ac=True, battery_percent=None, has_battery=False, source="test")
ON_BATTERY = PowerStatus(on_ac=False, battery_percent=42.0, has_battery=True, source="test")
ON_AC_LAPTOP = PowerStatus(on_ac=True, battery_percent=90.0, has_battery=True, source="test")


def linux(vram_gib: float | None = 24, ram_gib: float = 32, **kw) -> HardwareReport:
    gpus = () if vram_gib is None else (GPU(0, "NVIDIA Test", int(vram_gib * GIB), "550.1"),)
    base = HardwareReport(
        os="Linux",
        os_release="6.1",
        arch="x86_64",
        rosetta=False,
        python="3.11.7",
        cpu_model="Test CPU",
        cpu_count=8,
        ram_bytes=int(ram_gib * GIB),
        ram_physical_bytes=int(ram_gib * GIB),
        ram_cgroup_limit_bytes=None,
        gpus=gpus,
        gpu_source="nvml",
        nvidia_pci_devices=len(gpus),
        data_dir="/home/u/.local/share/iota/state",
        disk_path="/home/u",
        disk_free_bytes=100 * GIB,
        power=AC_DESKTOP,
        sleep=SleepStatus(None, "systemd-inhibit", "test"),
        network=NetworkStatus("http://orch", True, 12.0, "ok"),
        backend=BackendStatus("torch-cuda", "auto", True, "torch", "2.13.0", True, "CUDA 12.8"),
    )
    return replace(base, **kw)


def mac(arch: str = "arm64", rosetta: bool = False, ram_gib: float = 8, **kw) -> HardwareReport:
    facts = dict(
        os="Darwin",
        arch=arch,
        rosetta=rosetta,
        gpus=(),
        gpu_source="not probed on macOS",
        nvidia_pci_devices=None,
        sleep=SleepStatus(0, "caffeinate", "pmset"),
        backend=BackendStatus("mlx", "auto", True, "mlx", "0.32.4", True, "metal"),
    )
    return linux(vram_gib=None, ram_gib=ram_gib, **{**facts, **kw})


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


# (case, report, check name, expected status, text the found+hint must contain)
CASES = [
    ("M1 8 GB", mac(), "memory", "pass", "8.0 GiB"),
    ("M1 8 GB platform", mac(), "platform", "pass", "arm64"),
    ("Intel Mac", mac(arch="x86_64"), "platform", "fail", "Intel"),
    ("Mac under Rosetta", mac(arch="x86_64", rosetta=True), "platform", "fail", "Rosetta"),
    ("Mac 4 GB", mac(ram_gib=4), "memory", "fail", "4.0 GiB"),
    ("24 GB GPU", linux(24), "gpu", "pass", "24.0 GiB"),
    ("32 GB RAM", linux(ram_gib=32), "memory", "pass", "32.0 GiB"),
    ("12 GB VRAM", linux(12), "gpu", "fail", "torch-cpu"),
    ("T4: 16 GB card, 15360 MiB with ECC", linux(15360 * MIB / GIB), "gpu", "pass", "15.0 GiB"),
    ("RTX 4080: 16376 MiB", linux(16376 * MIB / GIB), "gpu", "pass", ""),
    ("14.5 GiB is not a 16 GB card", linux(14.5), "gpu", "fail", ""),
    ("16 GB RAM PC reports 15.4 GiB", linux(ram_gib=15.4), "memory", "pass", ""),
    ("8 GB RAM", linux(ram_gib=8), "memory", "fail", "8.0 GiB"),
    ("CPU only", linux(None), "gpu", "fail", "--backend torch-cpu"),
    ("card without driver", linux(None, nvidia_pci_devices=1), "gpu", "fail", "driver"),
    ("GPU probe failed", linux(gpus=None, gpu_source="nvidia-smi failed: x"), "gpu", "unknown", "nvidia-smi"),
    ("5 GB free disk", linux(disk_free_bytes=5 * GIB), "disk", "fail", "IOTA_HOME"),
    ("20 GB free disk", linux(disk_free_bytes=20 * GIB), "disk", "warn", "20.0 GiB"),
    ("50 GB free disk", linux(disk_free_bytes=50 * GIB), "disk", "pass", ""),
    ("on battery", linux(power=ON_BATTERY), "power", "warn", "42%"),
    ("laptop on AC", linux(power=ON_AC_LAPTOP), "power", "pass", "90%"),
    ("desktop", linux(power=AC_DESKTOP), "power", "pass", "no battery"),
    ("no power facts", linux(power=PowerStatus(None, None, None, "x")), "power", "unknown", ""),
    (
        "Mac sleeps after 10 min",
        mac(sleep=SleepStatus(10, "caffeinate", "pmset")),
        "sleep",
        "warn",
        "caffeinate",
    ),
    ("Mac never sleeps", mac(), "sleep", "pass", ""),
    ("Linux sleep unknown", linux(), "sleep", "unknown", "systemd-inhibit"),
    ("no orchestrator", linux(network=None), "network", "warn", "iota config set orchestrator"),
    (
        "orchestrator down",
        linux(network=NetworkStatus("http://o", False, None, "refused")),
        "network",
        "fail",
        "",
    ),
    ("orchestrator up", linux(), "network", "pass", "12 ms"),
    (
        "torch missing",
        linux(
            backend=BackendStatus("torch-cuda", "auto", None, "torch", None, False, "torch is not installed")
        ),
        "backend",
        "fail",
        "iota-cli[torch]",
    ),
    (
        "torch without CUDA",
        linux(backend=BackendStatus("torch-cuda", "auto", True, "torch", "2.13.0", False, "no CUDA")),
        "backend",
        "fail",
        "no CUDA",
    ),
    ("backend ok", linux(), "backend", "pass", "torch 2.13.0"),
    ("Windows", linux(os="Windows", arch="AMD64"), "platform", "fail", "Linux"),
]


@pytest.mark.parametrize(("case", "report", "name", "status", "text"), CASES, ids=[c[0] for c in CASES])
def test_check_table(case, report, name, status, text):
    c = by_name(check(report))[name]
    assert c.status == status, c
    assert text in f"{c.found} {c.hint}"
    if status in ("fail", "warn"):
        assert c.hint, f"{case}: a failing or warning check must say what to do"


@pytest.mark.parametrize(
    ("report", "fails"),
    [
        (mac(), False),
        (mac(arch="x86_64"), True),
        (mac(arch="x86_64", rosetta=True), True),
        (linux(24, 32), False),
        (linux(12), True),
        (linux(ram_gib=8), True),
        (linux(disk_free_bytes=5 * GIB), True),
        (linux(disk_free_bytes=20 * GIB), False),  # a warning does not fail
        (linux(power=ON_BATTERY), False),  # battery warns: see requirements' docstring
        (linux(network=None), False),
    ],
)
def test_overall_verdict(report, fails):
    assert failed(check(report)) is fails


def test_rosetta_message_differs_from_intel():
    rosetta = by_name(check(mac(arch="x86_64", rosetta=True)))["platform"]
    intel = by_name(check(mac(arch="x86_64")))["platform"]
    assert "arm64 Python" in rosetta.hint and "Intel" in intel.hint and rosetta.hint != intel.hint


def test_cgroup_limit_is_the_ram_that_counts():
    r = linux(ram_gib=8, ram_physical_bytes=64 * GIB, ram_cgroup_limit_bytes=8 * GIB)
    c = by_name(check(r))["memory"]
    assert c.status == "fail" and "cgroup" in c.found and "cgroup" in c.hint


def test_mac_has_no_gpu_row_and_linux_does():
    assert "gpu" not in by_name(check(mac()))
    assert "gpu" in by_name(check(linux()))


def test_best_gpu_is_judged():
    gpus = (GPU(0, "small", 8 * GIB), GPU(1, "big", 24 * GIB))
    c = by_name(check(linux(gpus=gpus)))["gpu"]
    assert c.status == "pass" and "big" in c.found and "+1 more" in c.found


RANK = {"fail": 0, "unknown": 1, "warn": 2, "pass": 3}


@given(
    a=st.floats(0, 64, allow_nan=False),
    b=st.floats(0, 64, allow_nan=False),
    field=st.sampled_from(["vram", "ram", "disk"]),
)
def test_more_resource_never_makes_a_check_worse(a, b, field):
    lo, hi = sorted((a, b))

    def status(x: float) -> str:
        if field == "vram":
            return by_name(check(linux(vram_gib=x)))["gpu"].status
        if field == "ram":
            return by_name(check(linux(ram_gib=x)))["memory"].status
        return by_name(check(linux(disk_free_bytes=int(x * GIB))))["disk"].status

    assert RANK[status(lo)] <= RANK[status(hi)]


def test_cpu_backend_chosen_on_purpose_turns_missing_gpu_into_a_warning():
    cpu = BackendStatus("torch-cpu", "torch-cpu", True, "torch", "2.13.0", True, "2.13.0+cpu")
    c = by_name(check(linux(vram_gib=None, backend=cpu)))["gpu"]
    assert c.status == "warn" and "development" in c.hint
    # auto on a GPU-less machine still fails with the hint that names the CPU backend
    auto = BackendStatus(None, "auto", None, None, None, None, "no backend suits this hardware")
    c = by_name(check(linux(vram_gib=None, backend=auto)))["gpu"]
    assert c.status == "fail" and "--backend torch-cpu" in c.hint


def test_memory_budget_is_the_device_less_the_frameworks_own_share():
    from iota_cli.train.join import memory_budget

    cuda = linux(vram_gib=16, ram_gib=64)
    assert memory_budget(cuda, "torch-cuda", 0) == 16 * GIB
    assert memory_budget(cuda, "torch-cuda", 0, overhead=600 << 20) == 16 * GIB - (600 << 20)
    assert memory_budget(cuda, "torch-cuda", 8, overhead=600 << 20) == 8 * GIB - (600 << 20), "cap first"
    assert memory_budget(cuda, "torch-cpu", 0) == 64 * GIB, "CPU backends get RAM"
    assert memory_budget(mac(ram_gib=16), "mlx", 0) == 12 * GIB, "unified memory leaves the OS a quarter"
    assert memory_budget(linux(vram_gib=None, ram_bytes=None), "torch-cpu", 0, overhead=1) == 0, "unknown"
