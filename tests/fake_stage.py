"""A framework-free StageBackend double: the right tensor names, shapes and dtypes, zeros for values.

It checks what the worker hands it as strictly as a real stage (names, shapes, a backward only for a
forward it holds), remembers every call so tests can check the loop's bookkeeping, and has two knobs:
`reject` (the next forwards raise StageInputError) and `hold` (a forward waits until the test lets it
go, so a test can act while an item is in flight).

    stage = FakeStage(manifest.model, 1)
    stage.forward("w1", {"activations": RawTensor("F32", (8, 64, 4), bytes(8 * 64 * 4 * 4))})
"""

from __future__ import annotations

import math
import threading

from iota_cli.core.backend import BackwardResult, StageInputError, UnknownWorkId
from iota_cli.core.modelspec import ModelConfig, stage_params, stage_spec
from iota_cli.core.stage import proof_size
from iota_cli.core.tensors import DTYPE_CODES, DTYPE_SIZES, RawTensor, TensorDict


def zeros(dtype: str, shape: tuple[int, ...]) -> RawTensor:
    return RawTensor(dtype, shape, bytes(math.prod(shape) * DTYPE_SIZES[dtype]))


class FakeStage:
    name = "fake"

    def __init__(self, cfg: ModelConfig, stage: int) -> None:
        self.cfg, self.spec = cfg, stage_spec(cfg, stage)
        self.wire = DTYPE_CODES[cfg.wire_dtype]
        self.params = {p.name: zeros("F32", p.shape) for p in stage_params(cfg, self.spec)}
        self.saved: dict[str, tuple[int, int]] = {}  # work id -> (batch, seq) of its forward
        self.forwards: list[str] = []
        self.backwards: list[str] = []
        self.rejected: list[str] = []
        self.freed: list[str] = []
        self.loads: list[TensorDict] = []
        self.steps = 0
        self.reject = 0  # this many coming forwards raise StageInputError
        self.hold: threading.Event | None = None  # set: forwards wait for it
        self.entered = threading.Event()  # a held forward has begun

    # --- the StageBackend interface ------------------------------------------------------------------

    def forward(self, work_id: str, inputs: TensorDict) -> TensorDict:
        if self.reject:
            self.reject -= 1
            self.rejected.append(work_id)
            raise StageInputError("rejected by the test")
        name = "tokens" if self.spec.kind == "head" else "activations"
        t = self._one(inputs, name, 2 if name == "tokens" else 3)
        if name == "activations" and t.shape[2] != self.cfg.bottleneck_dim:
            raise StageInputError(f"activations have width {t.shape[2]}")
        if self.hold is not None:
            self.entered.set()
            self.hold.wait(30)
        self.saved[work_id] = (t.shape[0], t.shape[1])
        self.forwards.append(work_id)
        return {} if self.spec.kind == "tail" else {"activations": self._boundary(work_id)}

    def backward(self, work_id: str, grads: TensorDict) -> BackwardResult:
        if work_id not in self.saved:
            raise UnknownWorkId(work_id)
        b, n = self.saved[work_id]
        tail = self.spec.kind == "tail"
        t = self._one(grads, "targets" if tail else "grad", 2 if tail else 3)
        if t.shape[:2] != (b, n):
            raise StageInputError(f"backward shape {t.shape} does not fit the forward's {(b, n)}")
        out = {"proof": self._proof()} if self.spec.kind == "head" else {"grad": self._boundary(work_id)}
        del self.saved[work_id]
        self.backwards.append(work_id)
        return BackwardResult(out, 3.0 if tail else None)

    def _proof(self) -> RawTensor:
        n = proof_size(self.cfg, self.spec.index)
        return RawTensor("F32", (n,), bytes(4 * n))

    def free(self, work_id: str) -> None:
        self.saved.pop(work_id, None)
        self.freed.append(work_id)

    def in_flight(self) -> list[str]:
        return list(self.saved)

    def step(self) -> float:
        self.steps += 1
        return 0.0

    def weights(self) -> TensorDict:
        return dict(self.params)

    def optimizer_state(self) -> TensorDict:
        return {"step": RawTensor("I64", (), self.steps.to_bytes(8, "little"))}

    def load(self, weights: TensorDict, optimizer_state: TensorDict | None = None) -> None:
        if set(weights) != set(self.params):
            raise StageInputError("weights do not match the stage")
        self.params = dict(weights)
        self.loads.append(dict(weights))

    # --- helpers -------------------------------------------------------------------------------------

    def _one(self, d: TensorDict, name: str, ndim: int) -> RawTensor:
        if set(d) != {name} or len(d[name].shape) != ndim:
            raise StageInputError(f"expected {name!r} with {ndim} dims, got {sorted(d)}")
        return d[name]

    def _boundary(self, work_id: str) -> RawTensor:
        b, n = self.saved[work_id]
        return zeros(self.wire, (b, n, self.cfg.bottleneck_dim))
