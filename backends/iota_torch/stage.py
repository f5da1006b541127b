"""One pipeline stage trained with torch: the StageBackend of iota_cli.core.backend.

Each forward keeps its autograd graph and the weight tensors it used under its work id. step() and
load() never change those tensors in place once a forward holds them; they move on to fresh ones, so
a backward always differentiates the weights its forward saw. Try it: `pytest tests/test_backend_torch.py`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from iota_cli.core import backend as bk
from iota_cli.core.backend import BackwardResult, StageInputError, UnknownWorkId
from iota_cli.core.manifest import OptimConfig
from iota_cli.core.modelspec import ModelConfig, estimate_memory, initial_weights, stage_params, stage_spec
from iota_cli.core.tensors import DTYPE_CODES, RawTensor, TensorDict
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
CUDA_OVERHEAD = 600 << 20  # CUDA context and cuBLAS workspace, measured order of magnitude


def to_torch(t: RawTensor, device: torch.device | str = "cpu") -> Tensor:
    if not t.data:
        return torch.empty(t.shape, dtype=TORCH_DTYPES[t.dtype], device=device)
    x = torch.frombuffer(bytearray(t.data), dtype=TORCH_DTYPES[t.dtype]).reshape(t.shape)
    return x.to(device)


def from_torch(x: Tensor) -> RawTensor:
    x = x.detach().to("cpu").contiguous()
    return RawTensor(CODES[x.dtype], tuple(x.shape), x.reshape(-1).view(torch.uint8).numpy().tobytes())


@dataclass
class _Work:
    shape: tuple[int, int]  # (batch, seq)
    weights: model.Weights  # the tensors this forward used
    inputs: Tensor  # tokens, or the boundary tensor (requires grad)
    outputs: Tensor | None  # head/body: the graph's output; tail: None (forward deferred to backward)


class TorchStage:
    """A stage on one torch device (cuda, mps or cpu)."""

    def __init__(
        self,
        name: str,
        cfg: ModelConfig,
        stage: int,
        optim: OptimConfig,
        device: str,
        seed: int = 0,
        compile: bool = False,
    ) -> None:
        self.name, self.cfg, self.optim_cfg = name, cfg, optim
        self.spec = stage_spec(cfg, stage)
        self.device = torch.device(device)
        self.compute_dtype = TORCH_DTYPES[DTYPE_CODES[cfg.dtype]]
        self._specs = stage_params(cfg, self.spec)
        self._forward = torch.compile(model.stage_forward, dynamic=False) if compile else model.stage_forward
        self._rope: dict[int, tuple[Tensor, Tensor]] = {}
        self._work: dict[str, _Work] = {}
        self.params: model.Weights = {}
        self._grads: dict[str, Tensor] = {}
        self._n_backward = 0
        self._opt: torch.optim.Optimizer | None = None
        self.load(initial_weights(cfg, self.spec, seed))

    # --- forward and backward ---

    def forward(self, work_id: str, inputs: TensorDict) -> TensorDict:
        if work_id in self._work:
            raise StageInputError(f"work id {work_id!r} is already in flight on this stage")
        shape = bk.check_forward_inputs(self.cfg, self.spec.index, inputs)
        if self.spec.kind == "head":
            x = to_torch(inputs["tokens"], self.device).long()
        else:
            x = to_torch(inputs["activations"], self.device).float()
        if self.spec.kind == "tail":  # loss needs the targets: run it all in backward
            self._work[work_id] = _Work(shape, self.params, x, None)
            return {}
        if self.spec.kind != "head":
            x.requires_grad_(True)
        with torch.enable_grad(), self._autocast():
            z = self._run(self.params, x)
        self._work[work_id] = _Work(shape, self.params, x, z)
        return {"activations": from_torch(z.detach().to(self._wire_dtype()))}

    def backward(self, work_id: str, grads: TensorDict) -> BackwardResult:
        work = self._work.get(work_id)
        if work is None:
            raise UnknownWorkId(f"no forward of work id {work_id!r} is held by this stage")
        bk.check_backward_grads(self.cfg, self.spec.index, grads, work.shape)
        del self._work[work_id]
        names = list(work.weights)
        wrt = [work.weights[n] for n in names]
        if self.spec.kind != "head":
            wrt.append(work.inputs)
        loss = None
        if self.spec.kind == "tail":
            targets = to_torch(grads["targets"], self.device)
            x = work.inputs.requires_grad_(True)
            with torch.enable_grad(), self._autocast():
                out = model.loss_fn(self._run(work.weights, x), targets)
            loss, cotangent = float(out.detach()), None
        else:
            assert work.outputs is not None
            out, cotangent = work.outputs, to_torch(grads["grad"], self.device).float()
        got = torch.autograd.grad(out, wrt, cotangent)
        for n, g in zip(names, got, strict=False):
            self._grads[n].add_(g)
        self._n_backward += 1
        if self.spec.kind == "head":
            return BackwardResult(None, loss)
        return BackwardResult({"grad": from_torch(got[-1].to(self._wire_dtype()))}, loss)

    def free(self, work_id: str) -> None:
        self._work.pop(work_id, None)

    def in_flight(self) -> list[str]:
        return list(self._work)

    # --- optimizer ---

    def step(self) -> float:
        if self._n_backward == 0:
            return 0.0
        assert self._opt is not None
        grads = [self._grads[n].div_(self._n_backward) for n in self.params]
        norm = torch.nn.utils.get_total_norm(grads)
        coef = torch.clamp(self.optim_cfg.grad_clip / (norm + 1e-6), max=1.0)  # clip_grad_norm_'s rule
        for g in grads:
            g.mul_(coef)
        if any(w.weights is self.params for w in self._work.values()):
            self._rebind({n: p.detach().clone() for n, p in self.params.items()})
        for n, p in self.params.items():
            p.grad = self._grads[n]
        self._opt.step()
        for p in self.params.values():
            p.grad = None
        self._zero_grads()
        return float(norm)

    def _rebind(self, new: dict[str, Tensor]) -> None:
        """Use fresh leaf tensors as the weights, carrying the optimizer state over; old ones stay intact."""
        old = self.params
        self.params = {n: t.to(self.device, torch.float32).requires_grad_(True) for n, t in new.items()}
        if self._opt is None:
            return
        for group in self._opt.param_groups:
            group["params"] = [self.params[n] for n in group["names"]]
        for n, p in old.items():
            if p in self._opt.state:
                self._opt.state[self.params[n]] = self._opt.state.pop(p)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.optim_cfg
        decay = [p.name for p in self._specs if len(p.shape) >= 2]
        rest = [p.name for p in self._specs if len(p.shape) < 2]
        groups = [
            {"params": [self.params[n] for n in decay], "names": decay, "weight_decay": o.weight_decay},
            {"params": [self.params[n] for n in rest], "names": rest, "weight_decay": 0.0},
        ]
        try:
            return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
        except (RuntimeError, ValueError):  # no fused kernel for this device
            return torch.optim.AdamW(
                groups, lr=o.lr, betas=o.betas, eps=o.eps, foreach=self.device.type != "cpu"
            )

    def _zero_grads(self) -> None:
        self._grads = {
            n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in self.params.items()
        }
        self._n_backward = 0

    # --- state in and out ---

    def weights(self) -> TensorDict:
        return {n: from_torch(p) for n, p in self.params.items()}

    def gradients(self) -> TensorDict:
        return {n: from_torch(g) for n, g in self._grads.items()}

    def optimizer_state(self) -> TensorDict:
        out: TensorDict = {}
        step = 0
        for n, p in self.params.items():
            st = self._opt.state.get(p, {}) if self._opt else {}
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{n}.{key}"] = from_torch(st[key].float() if key in st else torch.zeros_like(p))
            if "step" in st:
                step = int(st["step"])
        out["step"] = from_torch(torch.tensor(step, dtype=torch.int64))
        return out

    def load(self, weights: TensorDict, optimizer_state: TensorDict | None = None) -> None:
        bk.check_weights(self.cfg, self.spec.index, weights)
        if optimizer_state is not None:
            bk.check_optimizer_state(self.cfg, self.spec.index, optimizer_state)
        self._rebind({p.name: to_torch(weights[p.name]) for p in self._specs})
        if self._opt is None:
            self._opt = self._make_optimizer()
            self._zero_grads()
        if optimizer_state is not None:
            self._load_optimizer(optimizer_state)

    def _load_optimizer(self, state: TensorDict) -> None:
        assert self._opt is not None
        step = int(to_torch(state["step"]).reshape(-1)[0])
        fused = bool(self._opt.defaults.get("fused"))
        for n, p in self.params.items():
            if step == 0:
                self._opt.state.pop(p, None)
                continue
            self._opt.state[p] = {
                "step": torch.tensor(float(step), device=p.device if fused else "cpu"),
                "exp_avg": to_torch(state[f"{n}.exp_avg"], self.device).float(),
                "exp_avg_sq": to_torch(state[f"{n}.exp_avg_sq"], self.device).float(),
            }

    def memory_required(self, batch_size: int, seq_len: int | None = None, in_flight: int = 1) -> int:
        need = estimate_memory(self.cfg, self.spec, batch_size, seq_len or self.cfg.context, in_flight)
        return need + (CUDA_OVERHEAD if self.device.type == "cuda" else 0)

    # --- helpers ---

    def _run(self, w: model.Weights, x: Tensor) -> Tensor:
        t = x.shape[1]
        if t not in self._rope:
            self._rope[t] = model.rope(self.cfg, t, self.device)
        cos, sin = self._rope[t]
        return self._forward(w, self.cfg, self.spec, x, cos, sin)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _wire_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[DTYPE_CODES[self.cfg.wire_dtype]]
