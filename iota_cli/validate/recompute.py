"""Recompute one sampled item and judge it: the validator's arithmetic, on any installed backend.

The stage is loaded with the contributor's snapshot (the weights the item ran on); its forward runs on
the stored input and is compared with what the contributor sent on; on the head and body the backward
runs on the gradient that came back and is compared with what the contributor sent (the body's input
gradient, the head's proof of work); on the tail the loss and the gradient it sent are recomputed
together. Every comparison uses core.validation (cosine, magnitude ratio, the contributor's tolerance).

    python -c "from iota_cli.validate import recompute; help(recompute.judge)"
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from iota_cli.core.backend import StageBackend, StageInputError
from iota_cli.core.bounds import update_bound
from iota_cli.core.flat import FlatLayout
from iota_cli.core.manifest import TrainConfig
from iota_cli.core.modelspec import stage_spec
from iota_cli.core.protocol import BlobRef
from iota_cli.core.tensors import RawTensor, TensorDict, column_slice
from iota_cli.core.validation import (
    AuditTask,
    AuditVerdict,
    Comparison,
    Tolerance,
    as_f32,
    compare,
    loss_agrees,
    merge_loss_ok,
    tolerance,
)

Fetch = Callable[[BlobRef], TensorDict]  # a verified blob, decoded


class Unjudgeable(RuntimeError):
    """The check lacks what recomputing it needs (a blob the orchestrator no longer has)."""


def _one(fetch: Fetch, ref: BlobRef | None, name: str) -> RawTensor:
    if ref is None:
        raise Unjudgeable(f"the check has no {name} to read")
    tensors = fetch(ref)
    if set(tensors) != {name}:
        raise Unjudgeable(f"expected {{{name!r}}} in the blob, got {sorted(tensors)[:4]}")
    return tensors[name]


def judge(task: AuditTask, stage: StageBackend, fetch: Fetch) -> AuditVerdict:
    """The verdict on one check; `stage` is a backend of the task's stage (its weights are replaced)."""
    cfg = task.manifest.model
    tol = tolerance(task.backend, cfg.wire_dtype, cfg.dtype)
    kind = stage_spec(cfg, task.stage).kind
    if task.weights is None:
        raise Unjudgeable("the check has no weights snapshot")
    snapshot = fetch(task.weights)
    try:
        stage.load(snapshot)
    except StageInputError as e:
        return AuditVerdict(passed=False, detail=f"the weights snapshot does not fit the stage: {e}")
    if (far := _too_far(task, snapshot, fetch)) is not None:
        return AuditVerdict(passed=False, detail=far)
    key = f"audit-{task.audit_id}"
    try:
        if kind == "head":
            inputs = {"tokens": column_slice(_one(fetch, task.tokens, "tokens"), 0, -1)}
        else:
            inputs = {"activations": _one(fetch, task.input, "activations")}
        out = stage.forward(key, inputs)
        if kind == "tail":
            return _tail(task, stage, key, fetch, tol)
        sent = _f32(fetch, task.output, "activations")
        checks = [compare("activations", as_f32(out["activations"]), sent, tol)]
        if task.grad is None:
            stage.free(key)  # the chain ended before its backward: the forward alone is judged
        else:
            result = stage.backward(key, {"grad": _one(fetch, task.grad, "grad")})
            name = "proof" if kind == "head" else "grad"
            if result.grads is None:
                raise Unjudgeable(f"the backend returned no {name}")
            back = _f32(fetch, task.grad_output, name)
            checks.append(compare(name, as_f32(result.grads[name]), back, tol))
    except StageInputError as e:
        stage.free(key)
        return AuditVerdict(passed=False, detail=f"recomputing with its weights fails: {e}")
    finally:
        stage.step()  # empties the accumulators (the next check loads its own weights)
    return _verdict(checks)


def judge_merge(task: AuditTask, stages: list[StageBackend], fetch: Fetch) -> AuditVerdict:
    """The verdict on a merge update: the pipeline's held-out loss with the stage at base - update must
    not be worse than at base beyond core.validation.merge_loss_ok. `stages` holds one backend per stage."""
    if task.update is None or task.heldout is None or len(task.pipeline) != len(stages):
        raise Unjudgeable("the merge check lacks its update, held-out tokens or weights")
    cfg = task.manifest.model
    weights = [fetch(ref) for ref in task.pipeline]
    tokens = _one(fetch, task.heldout, "tokens")
    layout = FlatLayout.of(cfg, task.stage)
    update = as_f32(_one(fetch, task.update, "update"))
    base = layout.flatten(weights[task.stage])
    if update.shape != base.shape:
        raise Unjudgeable(f"the update has {update.size} values, the stage {base.size}")
    before = _pipeline_loss(stages, weights, tokens, f"m{task.audit_id}b")
    moved = list(weights)
    moved[task.stage] = layout.unflatten(base - update)
    try:
        after = _pipeline_loss(stages, moved, tokens, f"m{task.audit_id}a")
    except StageInputError as e:  # the update drives the model to non-finite values
        return AuditVerdict(passed=False, detail=f"held-out loss: the updated stage fails: {e}")
    detail = f"held-out loss {before:.4f} at the base, {after:.4f} with the update"
    return AuditVerdict(passed=merge_loss_ok(before, after), detail=detail, loss=after)


def _pipeline_loss(
    stages: list[StageBackend], weights: list[TensorDict], tokens: RawTensor, key: str
) -> float:
    """Mean cross-entropy of the whole model on one batch (every stage loaded with its weights)."""
    for stage, w in zip(stages, weights, strict=True):
        stage.load(w)
    x: TensorDict = {"tokens": column_slice(tokens, 0, -1)}
    try:
        for stage in stages[:-1]:
            x = stage.forward(key, x)
            stage.free(key)
        stages[-1].forward(key, x)
        result = stages[-1].backward(key, {"targets": column_slice(tokens, 1, None)})
    finally:
        for stage in stages:
            stage.free(key)
        stages[-1].step()  # empties its accumulators (the next pass loads its weights again)
    if result.loss is None:
        raise Unjudgeable("the tail returned no loss")
    return result.loss


def _too_far(task: AuditTask, snapshot: TensorDict, fetch: Fetch) -> str | None:
    """Why the snapshot cannot be the base weights plus the steps its counted work allows (None: it can).

    Without this, a contributor could compute honestly with weights of its own making (garbage, or
    another model's) and pass every recomputation."""
    if task.base is None or task.max_steps is None:
        return None  # the base epoch is no longer kept: the recomputation alone judges
    layout = FlatLayout.of(task.manifest.model, task.stage)
    base = layout.flatten(fetch(task.base))
    moved = float(np.abs(layout.flatten(snapshot) - base).max())
    steps = task.max_steps + in_flight_steps(task.manifest.train)
    bound = update_bound(task.manifest.optim, steps, float(np.abs(base).max()))
    if moved <= bound:
        return None
    return f"its weights are {moved:.3g} from the swarm's (at most {bound:.3g} in {steps} steps)"


def in_flight_steps(train: TrainConfig) -> int:
    """Steps an honest replica may have taken on work not yet counted: the items it holds at once, and
    completes the orchestrator has not acknowledged (a kill -9 of the orchestrator loses the answer,
    not the step). One step over the counted work banned an honest tail in tests/test_merge_e2e.py."""
    return math.ceil(train.max_claims_per_worker / train.backward_per_step) + 1


def _tail(task: AuditTask, stage: StageBackend, key: str, fetch: Fetch, tol: Tolerance) -> AuditVerdict:
    targets = column_slice(_one(fetch, task.tokens, "tokens"), 1, None)
    result = stage.backward(key, {"targets": targets})
    if result.grads is None or result.loss is None:
        raise Unjudgeable("the backend returned no gradient or loss for the tail")
    checks = [compare("grad", as_f32(result.grads["grad"]), _f32(fetch, task.output, "grad"), tol)]
    verdict = _verdict(checks)
    ok = loss_agrees(task.loss, result.loss, tol)
    claimed = "none" if task.loss is None else f"{task.loss:.4f}"
    detail = f"{verdict.detail}; loss {claimed} reported, {result.loss:.4f} recomputed"
    return verdict.model_copy(update={"passed": verdict.passed and ok, "loss": result.loss, "detail": detail})


def _f32(fetch: Fetch, ref: BlobRef | None, name: str) -> np.ndarray:
    return as_f32(_one(fetch, ref, name))


def _verdict(checks: list[Comparison]) -> AuditVerdict:
    return AuditVerdict(
        passed=all(c.passed for c in checks),
        detail="; ".join(c.why() for c in checks)[:500],
        cosine=min(c.cosine for c in checks),
        magnitude=min(c.magnitude for c in checks),
    )
