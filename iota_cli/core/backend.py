"""The compute backend interface, and how a backend is found and chosen.

A backend trains one pipeline stage. Implementations live in `backends/` (iota_torch, iota_mlx) and
register a BackendFactory under the entry-point group `iota.backends`, so a third party can add one
without touching the core. This module imports no ML framework.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

from iota_cli.core.manifest import OptimConfig
from iota_cli.core.modelspec import ModelConfig, stage_params, stage_spec
from iota_cli.core.tensors import RawTensor, TensorDict

ENTRY_POINT_GROUP = "iota.backends"


@dataclass(frozen=True)
class BackwardResult:
    grads: TensorDict | None  # {"grad": (B, T, bottleneck)} toward the previous stage; None for the head
    loss: float | None = None  # the tail's mean cross-entropy; None elsewhere


@runtime_checkable
class StageBackend(Protocol):
    """One stage of the model on one device.

    Tensor names on this interface:
      forward inputs:  head {"tokens": I32 (B,T)};  body/tail {"activations": (B,T,b)}
      forward outputs: head/body {"activations": (B,T,b) in cfg.wire_dtype};  tail {}
      backward grads:  head/body {"grad": (B,T,b)};  tail {"targets": I32 (B,T)}
      backward result: body/tail {"grad": (B,T,b) in cfg.wire_dtype};  head None; tail also the loss
    Integer tensors may be I32 or I64; float inputs may be F32, BF16 or F16 (converted inside).
    The tail's forward only keeps its input; its backward runs forward, loss and backward at once.
    Many work ids may be in flight: backward computes gradients at the weights its forward used (even
    after step() or load() in between) and adds them to the current accumulators.
    Bad tensors raise StageInputError, an unknown work id UnknownWorkId; check_* below say what is valid.
    Weights use the names of modelspec.stage_params; optimizer state uses "<param>.exp_avg",
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

    def gradients(self) -> TensorDict:
        """The parameter gradients summed over backward passes since the last step (float32, spec names)."""
        ...

    def optimizer_state(self) -> TensorDict:
        """AdamW moments (float32) and the step count (I64), named as above; zeros before the first step."""
        ...

    def load(self, weights: TensorDict, optimizer_state: TensorDict | None = None) -> None:
        """Replace weights (and optimizer state); in-flight work ids and accumulated gradients stay valid."""
        ...

    def memory_required(self, batch_size: int, seq_len: int | None = None, in_flight: int = 1) -> int:
        """Bytes this stage needs on its device to train at batch_size (weights, optimizer, activations).

        modelspec.estimate_memory plus the framework's own overhead; seq_len defaults to cfg.context.
        """
        ...


class BackendFactory(Protocol):
    """What the entry point names: describes a backend and builds stages with it."""

    name: str
    description: str

    def available(self) -> tuple[bool, str]:
        """(True, version) when usable here, else (False, why not)."""
        ...

    def create(self, cfg: ModelConfig, stage: int, optim: OptimConfig, seed: int = 0) -> StageBackend:
        """A stage with freshly initialised weights (call load() to use given ones)."""
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


# --- What a stage accepts: shared by every backend so they reject the same things the same way. ---

FLOAT_CODES = ("F32", "BF16", "F16")
INT_CODES = ("I32", "I64")


def optimizer_state_shapes(cfg: ModelConfig, stage: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every optimizer-state tensor of a stage."""
    out: dict[str, tuple[int, ...]] = {}
    for p in stage_params(cfg, stage_spec(cfg, stage)):
        out[p.name + ".exp_avg"] = p.shape
        out[p.name + ".exp_avg_sq"] = p.shape
    out["step"] = ()
    return out


def check_weights(cfg: ModelConfig, stage: int, weights: Mapping[str, RawTensor]) -> None:
    want = {p.name: p.shape for p in stage_params(cfg, stage_spec(cfg, stage))}
    _check_named(f"weights of stage {stage}", want, weights, FLOAT_CODES)


def check_optimizer_state(cfg: ModelConfig, stage: int, state: Mapping[str, RawTensor]) -> None:
    want = optimizer_state_shapes(cfg, stage)
    _check_named(
        f"optimizer state of stage {stage}",
        want,
        {k: v for k, v in state.items() if k != "step"},
        FLOAT_CODES,
        skip={"step"},
    )
    step = state.get("step")
    if step is None or step.dtype not in INT_CODES or step.shape not in ((), (1,)) or _int_range(step)[0] < 0:
        raise StageInputError(f"optimizer state of stage {stage}: 'step' must be a non-negative I64 scalar")


def check_forward_inputs(cfg: ModelConfig, stage: int, inputs: Mapping[str, RawTensor]) -> tuple[int, int]:
    """(batch, seq) of valid forward inputs; StageInputError otherwise."""
    if stage == 0:
        t = _one(inputs, "tokens", INT_CODES, 2)
        _check_ids(t, "tokens", cfg.vocab_size)
    else:
        t = _one(inputs, "activations", FLOAT_CODES, 3)
        if t.shape[2] != cfg.bottleneck_dim:
            raise StageInputError(
                f"activations have width {t.shape[2]}, the bottleneck is {cfg.bottleneck_dim}"
            )
    b, n = t.shape[0], t.shape[1]
    if b < 1 or not 1 <= n <= cfg.context:
        raise StageInputError(f"batch {b} x seq {n} is empty or longer than the context {cfg.context}")
    return b, n


def check_backward_grads(
    cfg: ModelConfig, stage: int, grads: Mapping[str, RawTensor], bt: tuple[int, int]
) -> None:
    """Valid backward input for a forward of (batch, seq) = bt; StageInputError otherwise."""
    if stage == cfg.n_stages - 1:
        t = _one(grads, "targets", INT_CODES, 2)
        _check_ids(t, "targets", cfg.vocab_size)
        want: tuple[int, ...] = bt
    else:
        t = _one(grads, "grad", FLOAT_CODES, 3)
        want = (*bt, cfg.bottleneck_dim)
    if t.shape != want:
        raise StageInputError(f"backward tensor has shape {list(t.shape)}, the forward needs {list(want)}")


def _one(d: Mapping[str, RawTensor], name: str, codes: tuple[str, ...], ndim: int) -> RawTensor:
    if set(d) != {name}:
        raise StageInputError(f"expected exactly {{{name!r}}}, got {sorted(d)}")
    t = d[name]
    if t.dtype not in codes or len(t.shape) != ndim:
        raise StageInputError(f"{name} must be {ndim}-d {'/'.join(codes)}, got {t.dtype}{list(t.shape)}")
    return t


def _check_named(
    what: str,
    want: Mapping[str, tuple[int, ...]],
    got: Mapping[str, RawTensor],
    codes: tuple[str, ...],
    skip: set[str] | None = None,
) -> None:
    skip = skip or set()
    problems = [f"missing {n}" for n in want if n not in got and n not in skip]
    problems += [f"unexpected {n}" for n in got if n not in want]
    for n, t in got.items():
        if n in want and (t.shape != want[n] or t.dtype not in codes):
            problems.append(f"{n} is {t.dtype}{list(t.shape)}, expected {list(want[n])} in {'/'.join(codes)}")
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise StageInputError(f"{what} do not match the model spec: {'; '.join(problems[:4])}{more}")


def _int_range(t: RawTensor) -> tuple[int, int]:
    a = array("i" if t.dtype == "I32" else "q")
    a.frombytes(t.data)
    if sys.byteorder == "big":
        a.byteswap()  # safetensors data is little-endian
    return (min(a), max(a)) if len(a) else (0, 0)


def _check_ids(t: RawTensor, name: str, vocab: int) -> None:
    lo, hi = _int_range(t)
    if lo < 0 or hi >= vocab:
        raise StageInputError(f"{name} must lie in 0..{vocab - 1}, got {lo}..{hi}")
