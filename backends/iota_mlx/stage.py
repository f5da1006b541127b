"""The MLX part of a pipeline stage: a StageKernel (iota_cli.core.stage) that a StageRunner drives.

MLX has no tape: forward evaluates the output and the runner keeps only its input and the (immutable)
weight arrays it used; vjp recomputes the forward through mx.vjp. So an in-flight item costs one input
tensor, and a step or load in between cannot disturb it. Try it: `pytest tests/test_backend_mlx.py`.
"""

from __future__ import annotations

from typing import cast

import mlx.core as mx
import numpy as np

from iota_cli.core.manifest import OptimConfig
from iota_cli.core.modelspec import ModelConfig, stage_params, stage_spec
from iota_cli.core.tensors import DTYPE_CODES, RawTensor
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


class MlxKernel:
    """A stage's MLX part on one device (the GPU through Metal, or the CPU): StageKernel[mx.array]."""

    def __init__(self, cfg: ModelConfig, stage: int, optim: OptimConfig, device: str) -> None:
        self.cfg, self.optim_cfg = cfg, optim
        self.spec = stage_spec(cfg, stage)
        self.device = mx.gpu if device == "gpu" else mx.cpu
        self.dt = MX_DTYPES[DTYPE_CODES[cfg.dtype]]
        self.wire = MX_DTYPES[DTYPE_CODES[cfg.boundary_dtype]]
        self._specs = stage_params(cfg, self.spec)
        self._decay = {p.name for p in self._specs if len(p.shape) >= 2}
        self.weights: model.Weights = {}
        self.load_moments(None, 0)
        self._zero_grads()

    # --- tensors in and out ---

    def tensor_in(self, t: RawTensor) -> mx.array:
        with mx.stream(self.device):
            a = to_mx(t)
            return a.astype(mx.float32 if mx.issubdtype(a.dtype, mx.floating) else mx.int32)

    def tensor_out(self, x: mx.array) -> RawTensor:
        return from_mx(x)

    def rope(self, seq_len: int) -> tuple[mx.array, mx.array]:
        with mx.stream(self.device):
            return model.rope(self.cfg, seq_len)

    # --- forward and vector-Jacobian product ---

    def forward(
        self, weights: model.Weights, x: mx.array, rope: tuple[mx.array, mx.array]
    ) -> tuple[mx.array, None]:
        with mx.stream(self.device):
            z = model.stage_forward(weights, self.cfg, self.spec, x, *rope, self.dt).astype(self.wire)
            mx.eval(z, x)
        return z, None  # vjp recomputes from x

    def vjp(
        self,
        weights: model.Weights,
        x: mx.array,
        saved: mx.array | None,
        cotangent: mx.array,
        rope: tuple[mx.array, mx.array],
    ) -> tuple[mx.array | None, float | None]:
        names = list(weights)
        head, tail = self.spec.kind == "head", self.spec.kind == "tail"
        with mx.stream(self.device):
            cot = mx.array(1.0, dtype=mx.float32) if tail else cotangent

            def fn(*arrays: mx.array) -> list[mx.array]:
                w = dict(zip(names, arrays[: len(names)], strict=True))
                out = model.stage_forward(w, self.cfg, self.spec, x if head else arrays[-1], *rope, self.dt)
                return [model.loss_fn(out, cotangent) if tail else out]

            primals = [weights[n] for n in names] + ([] if head else [x])
            (out,), got = mx.vjp(fn, primals, [cot])
            for n, g in zip(names, got, strict=False):
                self._grads[n] = self._grads[n] + g
            dx = None if head else got[-1].astype(self.wire)
            mx.eval(self._grads, out, *([dx] if dx is not None else []))
        return dx, (cast(float, out.item()) if tail else None)

    def gradients(self) -> dict[str, mx.array]:
        return self._grads

    # --- optimizer: AdamW written out, so its maths (torch's) and state names are ours ---

    def discard_gradients(self) -> None:
        self._zero_grads()

    def step(self, n_backward: int, step: int, keep: bool) -> float:
        del keep  # arrays are immutable: every step makes new ones
        o = self.optim_cfg
        b1, b2 = o.betas
        with mx.stream(self.device):
            grads = {n: g / n_backward for n, g in self._grads.items()}
            norm = mx.sqrt(mx.stack([(g * g).sum() for g in grads.values()]).sum())
            scale = mx.minimum(o.grad_clip / (norm + 1e-6), 1.0)
            bc1, bc2_sqrt = 1 - b1**step, (1 - b2**step) ** 0.5
            new = {}
            for n, p in self.weights.items():
                g = grads[n] * scale
                if n in self._decay:
                    p = p * (1 - o.lr * o.weight_decay)
                self._m[n] = self._m[n] + (g - self._m[n]) * (1 - b1)
                self._v[n] = self._v[n] * b2 + (g * g) * (1 - b2)
                new[n] = p - (o.lr / bc1) * self._m[n] / (mx.sqrt(self._v[n]) / bc2_sqrt + o.eps)
            self.weights = new  # in-flight work keeps the dict it used
            mx.eval(self.weights, self._m, self._v, norm)
        self._zero_grads()
        return cast(float, norm.item())

    def load_weights(self, weights: model.Weights) -> None:
        self.weights = weights
        mx.eval(self.weights)

    def moments(self) -> dict[str, tuple[mx.array, mx.array]]:
        return {n: (self._m[n], self._v[n]) for n in self._m}

    def load_moments(self, moments: dict[str, tuple[mx.array, mx.array]] | None, step: int) -> None:
        del step  # the runner passes the count to step()
        with mx.stream(self.device):
            zero = {p.name: mx.zeros(p.shape, dtype=mx.float32) for p in self._specs}
            self._m = {n: moments[n][0] if moments else z for n, z in zero.items()}
            self._v = {n: moments[n][1] if moments else z for n, z in zero.items()}
            mx.eval(self._m, self._v)

    def _zero_grads(self) -> None:
        with mx.stream(self.device):
            self._grads = {p.name: mx.zeros(p.shape, dtype=mx.float32) for p in self._specs}
