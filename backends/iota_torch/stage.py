"""The torch part of a pipeline stage: a StageKernel (iota_cli.core.stage) that a StageRunner drives.

Each forward keeps its autograd graph, and the runner keeps the weight dict it used. step() and
load_weights() never change those tensors in place once a forward holds them; they move on to fresh
ones and carry the optimizer state over, so a backward always differentiates the weights its forward
saw. Try it: `pytest tests/test_backend_torch.py`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from iota_cli.core.manifest import OptimConfig
from iota_cli.core.modelspec import ModelConfig, stage_params, stage_spec
from iota_cli.core.tensors import DTYPE_CODES, RawTensor
from iota_torch import model

TORCH_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I32": torch.int32,
    "I64": torch.int64,
    "U8": torch.uint8,
}
CODES = {v: k for k, v in TORCH_DTYPES.items()}


def to_torch(t: RawTensor, device: torch.device | str = "cpu") -> Tensor:
    if not t.data:
        return torch.empty(t.shape, dtype=TORCH_DTYPES[t.dtype], device=device)
    x = torch.frombuffer(bytearray(t.data), dtype=TORCH_DTYPES[t.dtype]).reshape(t.shape)
    return x.to(device)


def from_torch(x: Tensor) -> RawTensor:
    x = x.detach().to("cpu").contiguous()
    return RawTensor(CODES[x.dtype], tuple(x.shape), x.reshape(-1).view(torch.uint8).numpy().tobytes())


class TorchKernel:
    """A stage's torch part on one device (cuda, mps or cpu): StageKernel[Tensor]."""

    def __init__(
        self, cfg: ModelConfig, stage: int, optim: OptimConfig, device: str, compile: bool = False
    ) -> None:
        self.cfg, self.optim_cfg = cfg, optim
        self.spec = stage_spec(cfg, stage)
        self.device = torch.device(device)
        self.compute_dtype = TORCH_DTYPES[DTYPE_CODES[cfg.dtype]]
        self.wire_dtype = TORCH_DTYPES[DTYPE_CODES[cfg.boundary_dtype]]
        self._specs = stage_params(cfg, self.spec)
        self._forward = torch.compile(model.stage_forward, dynamic=False) if compile else model.stage_forward
        self.weights: model.Weights = {}
        self._grads: dict[str, Tensor] = {}
        self._opt: torch.optim.Optimizer | None = None

    # --- tensors in and out ---

    def tensor_in(self, t: RawTensor) -> Tensor:
        x = to_torch(t, self.device)
        return x.float() if x.is_floating_point() else x.long()

    def tensor_out(self, x: Tensor) -> RawTensor:
        return from_torch(x)

    def rope(self, seq_len: int) -> tuple[Tensor, Tensor]:
        return model.rope(self.cfg, seq_len, self.device)

    # --- forward and vector-Jacobian product ---

    def forward(
        self, weights: model.Weights, x: Tensor, rope: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        if self.spec.kind != "head":
            x.requires_grad_(True)
        with torch.enable_grad(), self._autocast():
            z = self._forward(weights, self.cfg, self.spec, x, *rope)
        return z.detach().to(self.wire_dtype), z  # the graph's output is what backward starts from

    def vjp(
        self,
        weights: model.Weights,
        x: Tensor,
        saved: Tensor | None,
        cotangent: Tensor,
        rope: tuple[Tensor, Tensor],
    ) -> tuple[Tensor | None, float | None]:
        names = list(weights)
        head = self.spec.kind == "head"
        wrt = [weights[n] for n in names] + ([] if head else [x])
        if self.spec.kind == "tail":  # forward and loss now, where the targets are
            x.requires_grad_(True)
            with torch.enable_grad(), self._autocast():
                out = model.loss_fn(self._forward(weights, self.cfg, self.spec, x, *rope), cotangent)
            loss, cot = float(out.detach()), None
        else:
            assert saved is not None
            out, loss, cot = saved, None, cotangent
        got = torch.autograd.grad(out, wrt, cot)
        for n, g in zip(names, got, strict=False):
            self._grads[n].add_(g)
        return (None if head else got[-1].to(self.wire_dtype)), loss

    def gradients(self) -> dict[str, Tensor]:
        return self._grads

    # --- optimizer: torch's AdamW (fused where the device has it) ---

    def discard_gradients(self) -> None:
        self._zero_grads()

    def step(self, n_backward: int, step: int, keep: bool) -> float:
        del step  # torch.optim counts the same steps itself (load_moments sets its count)
        assert self._opt is not None
        grads = [self._grads[n].div_(n_backward) for n in self.weights]
        norm = torch.nn.utils.get_total_norm(grads)
        coef = torch.clamp(self.optim_cfg.grad_clip / (norm + 1e-6), max=1.0)  # clip_grad_norm_'s rule
        for g in grads:
            g.mul_(coef)
        if keep:
            self._rebind({n: p.detach().clone() for n, p in self.weights.items()})
        for n, p in self.weights.items():
            p.grad = self._grads[n]
        self._opt.step()
        for p in self.weights.values():
            p.grad = None
        self._zero_grads()
        return float(norm)

    def load_weights(self, weights: model.Weights) -> None:
        self._rebind(weights)
        if self._opt is None:
            self._opt = self._make_optimizer()
            self._zero_grads()

    def moments(self) -> dict[str, tuple[Tensor, Tensor]]:
        out = {}
        for n, p in self.weights.items():
            st = self._opt.state.get(p, {}) if self._opt else {}
            m, v = (st[k].float() if k in st else torch.zeros_like(p) for k in ("exp_avg", "exp_avg_sq"))
            out[n] = (m, v)
        return out

    def load_moments(self, moments: dict[str, tuple[Tensor, Tensor]] | None, step: int) -> None:
        assert self._opt is not None
        fused = bool(self._opt.defaults.get("fused"))
        for n, p in self.weights.items():
            if moments is None:
                self._opt.state.pop(p, None)
                continue
            m, v = moments[n]
            self._opt.state[p] = {
                "step": torch.tensor(float(step), device=p.device if fused else "cpu"),
                "exp_avg": m,
                "exp_avg_sq": v,
            }

    def _rebind(self, new: dict[str, Tensor]) -> None:
        """Use fresh leaf tensors as the weights, carrying the optimizer state over; old ones stay intact."""
        old = self.weights
        self.weights = {n: t.to(self.device, torch.float32).requires_grad_(True) for n, t in new.items()}
        if self._opt is None:
            return
        for group in self._opt.param_groups:
            group["params"] = [self.weights[n] for n in group["names"]]
        for n, p in old.items():
            if p in self._opt.state:
                self._opt.state[self.weights[n]] = self._opt.state.pop(p)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.optim_cfg
        decay = [p.name for p in self._specs if len(p.shape) >= 2]
        rest = [p.name for p in self._specs if len(p.shape) < 2]
        groups = [
            {"params": [self.weights[n] for n in decay], "names": decay, "weight_decay": o.weight_decay},
            {"params": [self.weights[n] for n in rest], "names": rest, "weight_decay": 0.0},
        ]
        try:
            return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
        except (RuntimeError, ValueError):  # no fused kernel for this device
            return torch.optim.AdamW(
                groups, lr=o.lr, betas=o.betas, eps=o.eps, foreach=self.device.type != "cpu"
            )

    def _zero_grads(self) -> None:
        self._grads = {
            n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in self.weights.items()
        }

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)
