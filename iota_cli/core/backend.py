"""The compute backend interface, and how a backend is found and chosen.

A backend trains one pipeline stage. Implementations live in `backends/` (iota_torch, iota_mlx) and
register a BackendFactory under the entry-point group `iota.backends`, so a third party can add one
without touching the core; its stages are core.stage.StageRunner over the backend's StageKernel.
This module imports no ML framework. `iota backends` lists what is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

from iota_cli.core.manifest import OptimConfig
from iota_cli.core.modelspec import ModelConfig
from iota_cli.core.tensors import TensorDict

ENTRY_POINT_GROUP = "iota.backends"


@dataclass(frozen=True)
class BackwardResult:
    # {"grad": (B, T, bottleneck)} toward the previous stage; the head's {"proof": F32 (P,)}, the gradient
    # the item added to its 1-D parameters (core.stage.proof_params), which a validator recomputes
    grads: TensorDict | None
    loss: float | None = None  # the tail's mean cross-entropy; None elsewhere


@runtime_checkable
class StageBackend(Protocol):
    """One stage of the model on one device: what the worker drives (core.stage.StageRunner is one).

    Tensor names on this interface:
      forward inputs:  head {"tokens": I32 (B,T)};  body/tail {"activations": (B,T,b)}
      forward outputs: head/body {"activations": (B,T,b) in cfg.wire_dtype};  tail {}
      backward grads:  head/body {"grad": (B,T,b)};  tail {"targets": I32 (B,T)}
      backward result: body/tail {"grad": (B,T,b) in cfg.wire_dtype};  head {"proof": F32 (P,)};
                       tail also the loss
    Integer tensors may be I32 or I64; float inputs may be F32, BF16 or F16 (converted inside).
    The tail's forward only keeps its input; its backward runs forward, loss and backward at once.
    Many work ids may be in flight: backward computes gradients at the weights its forward used (even
    after step() or load() in between) and adds them to the current accumulators.
    Bad tensors raise StageInputError, an unknown work id UnknownWorkId; core.stage's check_* say what
    is valid. Weights use the names of modelspec.stage_params; optimizer state uses "<param>.exp_avg",
    "<param>.exp_avg_sq" (float32) and "step" (I64 scalar shape ()), the same for every backend.
    """

    name: str

    def forward(self, work_id: str, inputs: TensorDict) -> TensorDict:
        """Run the stage forward and keep what backward needs under work_id."""
        ...

    def backward(self, work_id: str, grads: TensorDict) -> BackwardResult:
        """Accumulate parameter gradients for work_id, free its saved state, return input gradients."""
        ...

    def free(self, work_id: str) -> None:
        """Drop a work id's saved state (abandoned work). Unknown ids are ignored."""
        ...

    def in_flight(self) -> list[str]:
        """The work ids whose saved state this stage holds."""
        ...

    def step(self) -> float:
        """Average the gradients accumulated since the last step, clip, take an AdamW step; return grad norm.

        The norm is that of the averaged gradients before clipping; with nothing accumulated, a no-op (0.0).
        """
        ...

    def weights(self) -> TensorDict:
        """The stage's weights as float32, named per the spec."""
        ...

    def optimizer_state(self) -> TensorDict:
        """AdamW moments (float32) and the step count (I64), named as above; zeros before the first step."""
        ...

    def load(self, weights: TensorDict, optimizer_state: TensorDict | None = None) -> None:
        """Replace weights (and optimizer state); in-flight work ids and accumulated gradients stay valid."""
        ...


class BackendFactory(Protocol):
    """What the entry point names: describes a backend and builds stages with it."""

    name: str
    description: str
    memory_overhead: int  # bytes the framework itself holds on the device (a CUDA context), beyond the model

    def available(self) -> tuple[bool, str]:
        """(True, version) when usable here, else (False, why not)."""
        ...

    def create(self, cfg: ModelConfig, stage: int, optim: OptimConfig, seed: int = 0) -> StageBackend:
        """A stage with freshly initialised weights (call load() to use given ones).

        A backend returns core.stage.StageRunner(name, cfg, stage, its_kernel, seed).
        """
        ...


class BackendError(RuntimeError):
    """No usable backend, or the one asked for cannot run here."""


class StageInputError(ValueError):
    """Tensors handed to a stage do not fit it (names, dtypes, shapes, token ids)."""


class UnknownWorkId(LookupError):
    """backward() for a work id this stage holds nothing for (never run, freed, or lost in a restart)."""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    description: str
    available: bool
    detail: str  # version when available, otherwise the reason


def factories() -> dict[str, BackendFactory]:
    """Every registered backend factory by name (loading a factory must not import its framework)."""
    out = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            out[ep.name] = ep.load()
        except Exception:  # noqa: BLE001 - a broken plug-in must not break the CLI
            continue
    return out


def known_names() -> list[str]:
    """The registered backend names, without loading any factory (cheap enough for argument checks)."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def list_backends() -> list[BackendInfo]:
    infos = []
    for name, f in sorted(factories().items()):
        ok, detail = f.available()
        infos.append(BackendInfo(name, f.description, ok, detail))
    return infos


def auto_choice(system: str, machine: str, has_nvidia: bool) -> str | None:
    """The backend this platform should use, or None when it has no supported accelerator."""
    if system == "Darwin" and machine == "arm64":
        return "mlx"
    if system == "Linux" and has_nvidia:
        return "torch-cuda"
    return None


def get_factory(name: str) -> BackendFactory:
    fs = factories()
    if name not in fs:
        known = ", ".join(sorted(fs)) or "none installed"
        raise BackendError(f"unknown backend {name!r} (known: {known})")
    ok, why = fs[name].available()
    if not ok:
        raise BackendError(f"backend {name!r} is not available here: {why}")
    return fs[name]


def detect_auto_choice() -> str | None:
    """auto_choice for this machine, probing for an NVIDIA driver without importing any framework."""
    import os
    import platform
    import shutil

    nvidia = os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None
    return auto_choice(platform.system(), platform.machine(), nvidia)


def select_backend(name: str | None = None) -> tuple[str, BackendFactory]:
    """The named backend, or (name None or "auto") the one this machine should use."""
    if name in (None, "", "auto"):
        name = detect_auto_choice()
        if name is None:
            raise BackendError(
                "no supported accelerator here (mlx needs Apple Silicon, torch-cuda an NVIDIA GPU); "
                "to train on the CPU anyway, pass --backend torch-cpu (or mlx-cpu)"
            )
    return name, get_factory(name)
