"""One pipeline stage: the framework-free runner, and the small kernel protocol a backend implements.

StageRunner is the StageBackend the worker drives. It owns everything that needs no ML framework: the
table of work ids in flight (each with its batch shape, the weights its forward used and its input),
the input and load checks, the rope cache, backward counting and the step count, and the names of
the weights and optimizer state. A StageKernel supplies only the framework's part: tensors in and out,
the stage forward, its vector-Jacobian product, and the AdamW step. Try it through a backend:
`pytest tests/test_backend_torch.py` (the contract is tests/stage_contract.py).
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from iota_cli.core.backend import BackwardResult, StageInputError, UnknownWorkId
from iota_cli.core.modelspec import ModelConfig, initial_weights, stage_params, stage_spec
from iota_cli.core.tensors import RawTensor, TensorDict, all_finite

T = TypeVar("T")  # the framework's tensor type

MOMENTS = ("exp_avg", "exp_avg_sq")  # optimizer state "<param>.<moment>", plus "step"


class StageKernel(Protocol[T]):
    """The framework's part of one stage, built for one (cfg, stage, optim) on one device.

    Weights are a dict of float32 master tensors named per modelspec.stage_params. The runner keeps,
    with each work id, the dict `weights` was when its forward ran, and hands it back to vjp: a kernel
    never changes a tensor of a dict it has replaced, and changes the current one in place only when
    step() is told no forward holds it. Inputs and cotangents arrive through tensor_in; forward
    outputs and input gradients leave in cfg.wire_dtype.
    """

    @property
    def weights(self) -> dict[str, T]:
        """The current weights (empty until the first load_weights)."""
        ...

    def tensor_in(self, t: RawTensor) -> T:
        """A RawTensor on the device: integers as the framework indexes with, floats as float32."""
        ...

    def tensor_out(self, x: T) -> RawTensor:
        """A tensor's bytes, in its own dtype."""
        ...

    def rope(self, seq_len: int) -> tuple[T, T]:
        """The cos and sin tables for a sequence length (the runner caches them)."""
        ...

    def forward(self, weights: dict[str, T], x: T, rope: tuple[T, T]) -> tuple[T, T | None]:
        """Head or body: (the output in the wire dtype, what vjp needs besides weights and x)."""
        ...

    def vjp(
        self, weights: dict[str, T], x: T, saved: T | None, cotangent: T, rope: tuple[T, T]
    ) -> tuple[T | None, float | None]:
        """Add the parameter gradients at `weights` to the accumulators; return (input gradient, loss).

        The head returns no input gradient. The tail never ran forward: its cotangent is the targets,
        and it runs forward, mean cross-entropy and backward at once and returns the loss.
        """
        ...

    def gradients(self) -> dict[str, T]:
        """The accumulators: parameter gradients summed since the last step (read by tests)."""
        ...

    def discard_gradients(self) -> None:
        """Zero the accumulators without stepping (a backward went non-finite: its sum is unusable)."""
        ...

    def step(self, n_backward: int, step: int, keep: bool) -> float:
        """Divide the accumulators by n_backward, clip, take AdamW step number `step`, zero them.

        Returns the pre-clip norm. keep: a forward in flight holds the current weights, so move on
        to new tensors instead of updating those in place.
        """
        ...

    def load_weights(self, weights: dict[str, T]) -> None:
        """Make these (fresh, float32) tensors the weights; the optimizer state carries over."""
        ...

    def moments(self) -> dict[str, tuple[T, T]]:
        """Per weight (exp_avg, exp_avg_sq), float32; zeros before the first step."""
        ...

    def load_moments(self, moments: dict[str, tuple[T, T]] | None, step: int) -> None:
        """Replace the AdamW state (None: zeros, step 0); step is the count of steps taken."""
        ...


@dataclass
class _Work(Generic[T]):
    shape: tuple[int, int]  # (batch, seq)
    weights: dict[str, T]  # the dict the kernel's weights were at this forward
    inputs: T  # tokens, or the boundary tensor
    saved: T | None  # what the kernel's forward kept for vjp; None for the tail (it has not run)


class StageRunner(Generic[T]):
    """A stage: the StageBackend of iota_cli.core.backend, with the framework's part in a kernel."""

    def __init__(self, name: str, cfg: ModelConfig, stage: int, kernel: StageKernel[T], seed: int = 0):
        self.name, self.cfg, self.kernel = name, cfg, kernel
        self.spec = stage_spec(cfg, stage)
        self._params = stage_params(cfg, self.spec)
        self._work: dict[str, _Work[T]] = {}
        self._rope: dict[int, tuple[T, T]] = {}
        self._n_backward = 0  # backward passes since the last step
        self._step = 0  # optimizer steps taken
        self._poisoned = False  # a backward since the last step went non-finite: discard, do not step
        self.load(initial_weights(cfg, self.spec, seed))

    def forward(self, work_id: str, inputs: TensorDict) -> TensorDict:
        if work_id in self._work:
            raise StageInputError(f"work id {work_id!r} is already in flight on this stage")
        shape = check_forward_inputs(self.cfg, self.spec.index, inputs)
        k = self.kernel
        (t,) = inputs.values()
        x, weights = k.tensor_in(t), k.weights
        if self.spec.kind == "tail":  # the loss needs the targets: the kernel runs it all in vjp
            self._work[work_id] = _Work(shape, weights, x, None)
            return {}
        out, saved = k.forward(weights, x, self._rope_for(shape[1]))
        activations = k.tensor_out(out)
        if not all_finite(activations):  # finite inputs can still overflow; never pass that on
            raise StageInputError("this input drives the stage to non-finite activations")
        self._work[work_id] = _Work(shape, weights, x, saved)
        return {"activations": activations}

    def backward(self, work_id: str, grads: TensorDict) -> BackwardResult:
        work = self._work.get(work_id)
        if work is None:
            raise UnknownWorkId(f"no forward of work id {work_id!r} is held by this stage")
        check_backward_grads(self.cfg, self.spec.index, grads, work.shape)
        del self._work[work_id]
        k = self.kernel
        (t,) = grads.values()
        rope = self._rope_for(work.shape[1])
        before = self._probe() if self.spec.kind == "head" else None
        dx, loss = k.vjp(work.weights, work.inputs, work.saved, k.tensor_in(t), rope)
        self._n_backward += 1
        grad = None if dx is None else k.tensor_out(dx)
        if before is not None:
            grad = proof_tensor(before, self._probe())
        if (loss is not None and not math.isfinite(loss)) or (grad is not None and not all_finite(grad)):
            self._poisoned = True  # the accumulators now hold it too
            raise StageInputError("this input drives the stage to a non-finite loss or gradient")
        name = "proof" if self.spec.kind == "head" else "grad"
        return BackwardResult(None if grad is None else {name: grad}, loss)

    def _probe(self) -> list[RawTensor]:
        grads = self.kernel.gradients()
        return [self.kernel.tensor_out(grads[n]) for n in proof_params(self.cfg, self.spec.index)]

    def free(self, work_id: str) -> None:
        self._work.pop(work_id, None)

    def in_flight(self) -> list[str]:
        return list(self._work)

    def step(self) -> float:
        if self._n_backward == 0:
            return 0.0
        if self._poisoned:
            self.kernel.discard_gradients()
            self._n_backward, self._poisoned = 0, False
            return 0.0
        current = self.kernel.weights
        keep = any(w.weights is current for w in self._work.values())
        self._step += 1
        norm = self.kernel.step(self._n_backward, self._step, keep)
        self._n_backward = 0
        return norm

    def weights(self) -> TensorDict:
        return {n: self.kernel.tensor_out(w) for n, w in self.kernel.weights.items()}

    def optimizer_state(self) -> TensorDict:
        k, out = self.kernel, {}
        moments = k.moments()
        for p in self._params:
            for key, m in zip(MOMENTS, moments[p.name], strict=True):
                out[f"{p.name}.{key}"] = k.tensor_out(m)
        out["step"] = RawTensor("I64", (), self._step.to_bytes(8, "little", signed=True))
        return out

    def load(self, weights: TensorDict, optimizer_state: TensorDict | None = None) -> None:
        check_weights(self.cfg, self.spec.index, weights)
        if optimizer_state is not None:
            check_optimizer_state(self.cfg, self.spec.index, optimizer_state)
        k = self.kernel
        k.load_weights({p.name: k.tensor_in(weights[p.name]) for p in self._params})
        if optimizer_state is None:
            return
        step = _ints(optimizer_state["step"])[0]
        moments = {
            p.name: (
                k.tensor_in(optimizer_state[f"{p.name}.{MOMENTS[0]}"]),
                k.tensor_in(optimizer_state[f"{p.name}.{MOMENTS[1]}"]),
            )
            for p in self._params
        }
        k.load_moments(moments if step else None, step)  # step 0 is a fresh optimizer, whatever the moments
        self._step = step

    def _rope_for(self, seq_len: int) -> tuple[T, T]:
        if seq_len not in self._rope:
            self._rope[seq_len] = self.kernel.rope(seq_len)
        return self._rope[seq_len]


# --- The head's proof of its backward ---
# The head sends nothing upstream, so its backward would be invisible. Instead it returns the gradient
# this item added to its 1-D parameters (the RMSNorm gains): the first layer's needs the backward through
# every layer above it, yet the proof is a few KiB. A validator recomputes and compares it.


def proof_params(cfg: ModelConfig, stage: int) -> list[str]:
    return [p.name for p in stage_params(cfg, stage_spec(cfg, stage)) if len(p.shape) == 1]


def proof_size(cfg: ModelConfig, stage: int) -> int:
    return sum(p.shape[0] for p in stage_params(cfg, stage_spec(cfg, stage)) if len(p.shape) == 1)


def proof_tensor(before: list[RawTensor], after: list[RawTensor]) -> RawTensor:
    """The F32 vector after - before over the proof parameters' gradient accumulators."""
    flat = array("f")
    for a, b in zip(after, before, strict=True):
        flat.extend(x - y for x, y in zip(_f32(a), _f32(b), strict=True))
    if sys.byteorder == "big":
        flat.byteswap()
    return RawTensor("F32", (len(flat),), flat.tobytes())


def _f32(t: RawTensor) -> array[float]:
    if t.dtype != "F32":
        raise StageInputError(f"gradient accumulators must be F32, got {t.dtype}")
    a = array("f")
    a.frombytes(t.data)
    if sys.byteorder == "big":
        a.byteswap()
    return a


# --- What a stage accepts: checked here, so every backend rejects the same things the same way. ---

FLOAT_CODES = ("F32", "BF16", "F16")
INT_CODES = ("I32", "I64")


def optimizer_state_shapes(cfg: ModelConfig, stage: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every optimizer-state tensor of a stage."""
    out: dict[str, tuple[int, ...]] = {}
    for p in stage_params(cfg, stage_spec(cfg, stage)):
        for key in MOMENTS:
            out[f"{p.name}.{key}"] = p.shape
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
    if not all_finite(t):
        raise StageInputError(f"{name} holds NaN or infinite values")
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


def _ints(t: RawTensor) -> array[int]:
    a = array("i" if t.dtype == "I32" else "q")
    a.frombytes(t.data)
    if sys.byteorder == "big":
        a.byteswap()  # safetensors data is little-endian
    return a


def _int_range(t: RawTensor) -> tuple[int, int]:
    a = _ints(t)
    return (min(a), max(a)) if len(a) else (0, 0)


def _check_ids(t: RawTensor, name: str, vocab: int) -> None:
    lo, hi = _int_range(t)
    if lo < 0 or hi >= vocab:
        raise StageInputError(f"{name} must lie in 0..{vocab - 1}, got {lo}..{hi}")
