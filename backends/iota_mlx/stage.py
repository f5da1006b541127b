"""One pipeline stage trained with MLX: the StageBackend of iota_cli.core.backend.

MLX has no tape: forward evaluates the output and keeps only its input and the (immutable) weight
arrays it used; backward recomputes through mx.vjp. So an in-flight item costs one input tensor, and
step() or load() in between cannot disturb it. Try it: `pytest tests/test_backend_mlx.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import mlx.core as mx
import numpy as np

from iota_cli.core import backend as bk
from iota_cli.core.backend import BackwardResult, StageInputError, UnknownWorkId
from iota_cli.core.manifest import OptimConfig
from iota_cli.core.modelspec import ModelConfig, estimate_memory, initial_weights, stage_params, stage_spec
from iota_cli.core.tensors import DTYPE_CODES, RawTensor, TensorDict
from iota_mlx import model

MX_DTYPES = {
    "F32": mx.float32,
    "BF16": mx.bfloat16,
    "F16": mx.float16,
    "I32": mx.int32,
    "I64": mx.int64,
    "U8": mx.uint8,
}
CODES = {v: k for k, v in MX_DTYPES.items()}
# bf16 has no numpy dtype: its bytes travel as uint16 and are reinterpreted.
NP_DTYPES = {"F32": "<f4", "BF16": "<u2", "F16": "<f2", "I32": "<i4", "I64": "<i8", "U8": "u1"}


def to_mx(t: RawTensor) -> mx.array:
    a = mx.array(np.frombuffer(t.data, dtype=NP_DTYPES[t.dtype]).reshape(t.shape))
    return a.view(mx.bfloat16) if t.dtype == "BF16" else a


def from_mx(a: mx.array) -> RawTensor:
    code = CODES[a.dtype]
    raw = a.view(mx.uint16) if code == "BF16" else a
    return RawTensor(code, tuple(a.shape), np.asarray(raw).tobytes())


@dataclass
class _Work:
    shape: tuple[int, int]  # (batch, seq)
    weights: model.Weights  # the arrays this forward used
    inputs: mx.array  # tokens, or the boundary tensor


class MlxStage:
    """A stage on one MLX device (the GPU through Metal, or the CPU)."""

    def __init__(
        self, name: str, cfg: ModelConfig, stage: int, optim: OptimConfig, device: str, seed: int = 0
    ):
        self.name, self.cfg, self.optim_cfg = name, cfg, optim
        self.spec = stage_spec(cfg, stage)
        self.device = mx.gpu if device == "gpu" else mx.cpu
        self.dt = MX_DTYPES[DTYPE_CODES[cfg.dtype]]
        self._specs = stage_params(cfg, self.spec)
        self._decay = {p.name for p in self._specs if len(p.shape) >= 2}
        self._rope: dict[int, tuple[mx.array, mx.array]] = {}
        self._work: dict[str, _Work] = {}
        self.params: model.Weights = {}
        self._m: model.Weights = {}
        self._v: model.Weights = {}
        self._step = 0
        self._zero_grads()
        self.load(initial_weights(cfg, self.spec, seed))

    # --- forward and backward ---

    def forward(self, work_id: str, inputs: TensorDict) -> TensorDict:
        if work_id in self._work:
            raise StageInputError(f"work id {work_id!r} is already in flight on this stage")
        shape = bk.check_forward_inputs(self.cfg, self.spec.index, inputs)
        with mx.stream(self.device):
            if self.spec.kind == "head":
                x = to_mx(inputs["tokens"]).astype(mx.int32)
            else:
                x = to_mx(inputs["activations"]).astype(mx.float32)
            work = _Work(shape, self.params, x)
            if self.spec.kind == "tail":  # loss needs the targets: run it all in backward
                mx.eval(x)
                self._work[work_id] = work
                return {}
            z = self._run(self.params, x).astype(self._wire())
            mx.eval(z, x)
        self._work[work_id] = work
        return {"activations": from_mx(z)}

    def backward(self, work_id: str, grads: TensorDict) -> BackwardResult:
        work = self._work.get(work_id)
        if work is None:
            raise UnknownWorkId(f"no forward of work id {work_id!r} is held by this stage")
        bk.check_backward_grads(self.cfg, self.spec.index, grads, work.shape)
        del self._work[work_id]
        names = list(work.weights)
        head, tail = self.spec.kind == "head", self.spec.kind == "tail"
        with mx.stream(self.device):
            if tail:
                targets = to_mx(grads["targets"]).astype(mx.int32)
                cotangent = mx.array(1.0, dtype=mx.float32)
            else:
                cotangent = to_mx(grads["grad"]).astype(mx.float32)

            def fn(*arrays: mx.array) -> list[mx.array]:
                w = dict(zip(names, arrays[: len(names)], strict=True))
                out = self._run(w, work.inputs if head else arrays[-1])
                return [model.loss_fn(out, targets) if tail else out]

            primals = [work.weights[n] for n in names] + ([] if head else [work.inputs])
            (out,), got = mx.vjp(fn, primals, [cotangent])
            for n, g in zip(names, got, strict=False):
                self._grads[n] = self._grads[n] + g
            dx = None if head else got[-1].astype(self._wire())
            mx.eval(self._grads, out, *([dx] if dx is not None else []))
        self._n_backward += 1
        loss = cast(float, out.item()) if tail else None
        return BackwardResult(None if dx is None else {"grad": from_mx(dx)}, loss)

    def free(self, work_id: str) -> None:
        self._work.pop(work_id, None)

    def in_flight(self) -> list[str]:
        return list(self._work)

    # --- optimizer: AdamW written out, so its maths (torch's) and state names are ours ---

    def step(self) -> float:
        if self._n_backward == 0:
            return 0.0
        o = self.optim_cfg
        b1, b2 = o.betas
        with mx.stream(self.device):
            grads = {n: g / self._n_backward for n, g in self._grads.items()}
            norm = mx.sqrt(mx.stack([(g * g).sum() for g in grads.values()]).sum())
            scale = mx.minimum(o.grad_clip / (norm + 1e-6), 1.0)
            self._step += 1
            bc1, bc2_sqrt = 1 - b1**self._step, (1 - b2**self._step) ** 0.5
            new = {}
            for n, p in self.params.items():
                g = grads[n] * scale
                if n in self._decay:
                    p = p * (1 - o.lr * o.weight_decay)
                self._m[n] = self._m[n] + (g - self._m[n]) * (1 - b1)
                self._v[n] = self._v[n] * b2 + (g * g) * (1 - b2)
                new[n] = p - (o.lr / bc1) * self._m[n] / (mx.sqrt(self._v[n]) / bc2_sqrt + o.eps)
            self.params = new  # in-flight work keeps the dict it used
            mx.eval(self.params, self._m, self._v, norm)
        self._zero_grads()
        return cast(float, norm.item())

    def _zero_grads(self) -> None:
        self._grads = {p.name: mx.zeros(p.shape, dtype=mx.float32) for p in self._specs}
        self._n_backward = 0

    # --- state in and out ---

    def weights(self) -> TensorDict:
        return {n: from_mx(p) for n, p in self.params.items()}

    def gradients(self) -> TensorDict:
        return {n: from_mx(g) for n, g in self._grads.items()}

    def optimizer_state(self) -> TensorDict:
        out: TensorDict = {}
        for p in self._specs:
            out[p.name + ".exp_avg"] = from_mx(self._m[p.name])
            out[p.name + ".exp_avg_sq"] = from_mx(self._v[p.name])
        out["step"] = RawTensor("I64", (), np.int64(self._step).astype("<i8").tobytes())
        return out

    def load(self, weights: TensorDict, optimizer_state: TensorDict | None = None) -> None:
        bk.check_weights(self.cfg, self.spec.index, weights)
        if optimizer_state is not None:
            bk.check_optimizer_state(self.cfg, self.spec.index, optimizer_state)
        with mx.stream(self.device):
            self.params = {p.name: to_mx(weights[p.name]).astype(mx.float32) for p in self._specs}
            if optimizer_state is not None or not self._m:
                state = optimizer_state or {}
                zero = {p.name: mx.zeros(p.shape, dtype=mx.float32) for p in self._specs}
                self._m = {
                    n: to_mx(state[n + ".exp_avg"]).astype(mx.float32) if state else z
                    for n, z in zero.items()
                }
                self._v = {
                    n: to_mx(state[n + ".exp_avg_sq"]).astype(mx.float32) if state else z
                    for n, z in zero.items()
                }
                step = state.get("step")
                self._step = int(np.frombuffer(step.data, NP_DTYPES[step.dtype])[0]) if step else 0
            mx.eval(self.params, self._m, self._v)

    def memory_required(self, batch_size: int, seq_len: int | None = None, in_flight: int = 1) -> int:
        return estimate_memory(self.cfg, self.spec, batch_size, seq_len or self.cfg.context, in_flight)

    # --- helpers ---

    def _run(self, w: model.Weights, x: mx.array) -> mx.array:
        t = x.shape[1]
        if t not in self._rope:
            self._rope[t] = model.rope(self.cfg, t)
        cos, sin = self._rope[t]
        return model.stage_forward(w, self.cfg, self.spec, x, cos, sin, self.dt)

    def _wire(self) -> mx.Dtype:
        return MX_DTYPES[DTYPE_CODES[self.cfg.wire_dtype]]
