"""iota's torch backend: the factories behind the entry points torch-cuda, torch-mps and torch-cpu.

Importing this package does not import torch (so `iota backends` and the registry stay cheap); torch
is imported when a factory checks availability or builds a stage. Install: `pip install 'iota-cli[torch]'`.
Set IOTA_TORCH_COMPILE=1 (or pass compile=True to create) to run the stage under torch.compile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iota_cli.core.backend import BackendError
from iota_cli.core.manifest import OptimConfig
from iota_cli.core.modelspec import ModelConfig
from iota_cli.core.stage import StageRunner

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class TorchFactory:
    name: str
    device: str  # "cuda", "mps" or "cpu"
    description: str
    # Device memory a process holds beyond modelspec.estimate_memory: the CUDA context and cuBLAS
    # workspace (measured order of magnitude); nothing on the CPU or MPS.
    memory_overhead: int = 0

    def available(self) -> tuple[bool, str]:
        try:
            import torch
        except ImportError:
            return False, "torch is not installed (pip install 'iota-cli[torch]')"
        v = f"torch {torch.__version__}"
        if self.device == "cuda":
            if not torch.cuda.is_available():
                build = "a CPU-only build" if torch.version.cuda is None else "unable to see a CUDA device"
                return False, f"{v} is {build}"
            return True, f"{v}, {torch.cuda.get_device_name(0)}"
        if self.device == "mps" and not torch.backends.mps.is_available():
            return False, f"{v} has no MPS device (needs a Mac with Apple Silicon)"
        return True, v

    def create(
        self, cfg: ModelConfig, stage: int, optim: OptimConfig, seed: int = 0, *, compile: bool | None = None
    ) -> StageRunner[Tensor]:
        ok, why = self.available()
        if not ok:
            raise BackendError(f"backend {self.name} is not available here: {why}")
        from iota_torch.stage import TorchKernel

        if compile is None:
            compile = os.environ.get("IOTA_TORCH_COMPILE", "") not in ("", "0")
        kernel = TorchKernel(cfg, stage, optim, self.device, compile=compile)
        return StageRunner(self.name, cfg, stage, kernel, seed)


cuda_backend = TorchFactory(
    "torch-cuda", "cuda", "PyTorch on an NVIDIA GPU (autocast to the run dtype, fused AdamW)", 600 << 20
)
mps_backend = TorchFactory("torch-mps", "mps", "PyTorch on Apple's Metal (MPS)")
cpu_backend = TorchFactory("torch-cpu", "cpu", "PyTorch on the CPU (slow; for testing and small runs)")
