"""Validation: the wire models of a sampled check, and how a recomputation is compared with a result.

The orchestrator samples a contributor's forward items (orchestrator standing.py / audits.py); the
worker uploads the weights the item ran on; a validator (iota_cli/validate) recomputes the item (and, on
the head and body, its backward) from the stored inputs and posts a verdict. Results are compared as
vectors, by cosine similarity and by the magnitude ratio min(|a|, |b|) / max(|a|, |b|) (IOTA's test),
within a tolerance that depends on how the contributor computes (TOLERANCES). docs/trust.md has the why.

    python -c "import numpy as np; from iota_cli.core.validation import *; \
a = np.arange(8.0); print(compare('out', a, 2 * a, tolerance('torch-cpu', 'float32')))"
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from iota_cli.core.flat import from_wire
from iota_cli.core.manifest import RunManifest
from iota_cli.core.protocol import BlobRef, Count, Model, Sha256
from iota_cli.core.tensors import RawTensor

# --- the wire --------------------------------------------------------------------------------------------


class WeightsReport(Model):
    """POST /v1/work/{id}/weights: the snapshot a sampled item asked for is uploaded."""

    sha256: Sha256
    size: Count


class AuditTask(Model):
    """GET /v1/audits/next (operator token): one check to make, with everything it needs.

    kind "work": recompute a sampled item. kind "merge": score a replica's merge update on held-out
    tokens (the pipeline's loss with the stage at base - update, against the loss at base)."""

    audit_id: int
    kind: Literal["work", "merge"] = "work"
    run_id: str
    manifest: RunManifest
    stage: int
    backend: str  # what the contributor said it computes with (picks the tolerance)
    weights: BlobRef | None = None  # work: the stage's weights as the item used them (its snapshot)
    tokens: BlobRef | None = None  # head: its input; tail: the targets (the batch, one token longer)
    input: BlobRef | None = None  # body and tail: the activations the item read
    output: BlobRef | None = None  # head and body: the activations it sent; tail: the gradient it sent
    loss: float | None = None  # tail: the loss it reported
    grad: BlobRef | None = None  # head and body, once its backward is in: the gradient that came back
    grad_output: BlobRef | None = None  # body: the gradient it sent on; head: its proof of work
    # The published weights of the epoch the contributor held, if still kept, and the most optimizer steps
    # its counted work allows since: the snapshot must lie within core.bounds.update_bound of them.
    base: BlobRef | None = None
    max_steps: int | None = None
    # merge: the update ({"update": wire dtype [N]}), every stage's weights (the checked stage's at the
    # round's epoch: the update's base) and a batch of tokens the run has not issued (held out).
    update: BlobRef | None = None
    pipeline: list[BlobRef] = []
    heldout: BlobRef | None = None


class AuditVerdict(Model):
    """POST /v1/audits/{id}: what the recomputation found (passed: the contributor's work stands)."""

    passed: bool
    detail: Annotated[str, Field(max_length=500)] = ""
    loss: float | None = Field(None, allow_inf_nan=False)  # tail: the recomputed loss
    cosine: float | None = Field(None, allow_inf_nan=False)  # the lowest over the tensors compared
    magnitude: float | None = Field(None, allow_inf_nan=False)


# --- the comparison -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    cosine: float  # at least
    magnitude: float  # min(|a|, |b|) / max(|a|, |b|) at least
    loss_abs: float  # |loss - recomputed| at most loss_abs + loss_rel * |recomputed|
    loss_rel: float


# Float32 end to end (torch and MLX on the CPU, MLX on Apple Silicon) agrees to rounding: the measured
# cosine between backends is above 0.9999 (tests/test_validation.py). bf16 anywhere (the wire, or CUDA's
# autocast) loses about 3 significant digits per value: IOTA's own bounds, 0.9 and 0.8.
EXACT = Tolerance(cosine=0.99, magnitude=0.95, loss_abs=1e-3, loss_rel=1e-3)
LOOSE = Tolerance(cosine=0.9, magnitude=0.8, loss_abs=0.05, loss_rel=0.02)
FLOAT32_BACKENDS = frozenset({"torch-cpu", "mlx", "mlx-cpu"})


def tolerance(backend: str, wire_dtype: str, compute_dtype: str = "float32") -> Tolerance:
    """The bound for a contributor on this backend, in a run with these dtypes."""
    exact = backend in FLOAT32_BACKENDS and wire_dtype == "float32" and compute_dtype == "float32"
    return EXACT if exact else LOOSE


@dataclass(frozen=True)
class Comparison:
    name: str
    cosine: float
    magnitude: float
    passed: bool

    def why(self) -> str:
        return f"{self.name}: cosine {self.cosine:.4f}, magnitude ratio {self.magnitude:.4f}"


def as_f32(t: RawTensor) -> np.ndarray:
    """A float tensor's values as a flat float32 vector."""
    if t.dtype == "F16":
        return np.frombuffer(t.data, dtype="<f2").astype(np.float32)
    if t.dtype not in ("F32", "BF16"):
        raise ValueError(f"{t.dtype} is not a float dtype")
    return from_wire(t.data, t.dtype)  # type: ignore[arg-type]


def compare(name: str, expected: np.ndarray, got: np.ndarray, tol: Tolerance) -> Comparison:
    """How close a result is to its recomputation (non-finite or misshapen: cosine and magnitude 0)."""
    a = np.asarray(expected, dtype=np.float64).ravel()
    b = np.asarray(got, dtype=np.float64).ravel()
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return Comparison(name, 0.0, 0.0, False)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return Comparison(name, 1.0, 1.0, True)
    if na == 0.0 or nb == 0.0:
        return Comparison(name, 0.0, 0.0, False)
    cosine = float(np.dot(a, b) / (na * nb))
    magnitude = min(na, nb) / max(na, nb)
    return Comparison(name, cosine, magnitude, cosine >= tol.cosine and magnitude >= tol.magnitude)


# A merge update may make the held-out loss worse by this much before it is refused (Templar's
# loss-before/after test). The comparison is paired (one batch, before and after), so batch noise
# cancels: what is left is the update's own effect, which a few honest local steps make negative or
# tiny, and an update pushing up the loss at the optimizer's bound makes larger (docs/trust.md).
MERGE_LOSS_SLACK_ABS = 0.01
MERGE_LOSS_SLACK_REL = 0.005


def merge_loss_ok(before: float, after: float) -> bool:
    return math.isfinite(after) and after <= before + MERGE_LOSS_SLACK_ABS + MERGE_LOSS_SLACK_REL * abs(
        before
    )


def loss_agrees(claimed: float | None, recomputed: float, tol: Tolerance) -> bool:
    if claimed is None or not math.isfinite(claimed):
        return False
    return abs(claimed - recomputed) <= tol.loss_abs + tol.loss_rel * abs(recomputed)
