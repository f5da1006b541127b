"""iota's MLX backend: the factories behind the entry points mlx (Metal) and mlx-cpu.

Importing this package does not import mlx; a factory does when it checks availability or builds a
stage. On a Mac `pip install 'iota-cli[mlx]'`; on Linux the same extra installs mlx[cpu] (CPU only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from iota_cli.core.backend import BackendError
from iota_cli.core.manifest import OptimConfig
from iota_cli.core.modelspec import ModelConfig
from iota_cli.core.stage import StageRunner

if TYPE_CHECKING:
    import mlx.core as mx


@dataclass(frozen=True)
class MlxFactory:
    name: str
    device: str  # "gpu" (Metal) or "cpu"
    description: str
    memory_overhead: int = 0  # MLX allocates lazily; nothing worth counting beyond the model

    def available(self) -> tuple[bool, str]:
        try:
            import mlx.core as mx
        except ImportError as e:  # bare `pip install mlx` on Linux fails here: libmlx.so has no backend
            return False, f"mlx is not usable ({e}); install 'iota-cli[mlx]'"
        v = f"mlx {getattr(mx, '__version__', '?')}"
        if self.device == "gpu" and not mx.metal.is_available():
            return False, f"{v} has no Metal device (needs a Mac with Apple Silicon)"
        return True, v

    def create(
        self, cfg: ModelConfig, stage: int, optim: OptimConfig, seed: int = 0
    ) -> StageRunner[mx.array]:
        ok, why = self.available()
        if not ok:
            raise BackendError(f"backend {self.name} is not available here: {why}")
        import mlx.core as mx

        from iota_mlx.stage import MlxKernel

        if self.device == "gpu":  # keep the working set resident, as mlx-lm does before training
            mx.set_wired_limit(int(mx.device_info()["max_recommended_working_set_size"]))
        return StageRunner(self.name, cfg, stage, MlxKernel(cfg, stage, optim, self.device), seed)


metal_backend = MlxFactory("mlx", "gpu", "MLX on Apple Silicon's GPU (Metal)")
cpu_backend = MlxFactory("mlx-cpu", "cpu", "MLX on the CPU (Linux CI, testing)")
