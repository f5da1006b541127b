"""The StageBackend contract as tests, shared by every backend's test module.

A backend's test module subclasses StageContract and sets `factory`; pytest then runs these tests
against the StageRunner it builds, so they cover the backend's kernel and the runner together (this
file's name keeps pytest from collecting it on its own).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from iota_cli.core import backend as bk
from iota_cli.core.backend import StageInputError, UnknownWorkId
from iota_cli.core.manifest import OptimConfig
from iota_cli.core.modelspec import ModelConfig, initial_weights
from iota_cli.core.stage import StageRunner, optimizer_state_shapes, proof_params, proof_size
from iota_cli.core.tensors import RawTensor, decode, encode

CFG = ModelConfig(
    d_model=32,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=64,
    context=16,
    bottleneck_dim=4,
    stages=(1, 1, 1),
    wire_dtype="float32",
)
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=1.0)
B, T = 2, 8
NP = {"F32": "<f4", "I32": "<i4", "I64": "<i8"}


def raw(a: np.ndarray) -> RawTensor:
    a = np.ascontiguousarray(a)
    code = {np.dtype("float32"): "F32", np.dtype("int32"): "I32", np.dtype("int64"): "I64"}[a.dtype]
    return RawTensor(code, a.shape, a.astype(a.dtype.newbyteorder("<")).tobytes())


def arr(t: RawTensor) -> np.ndarray:
    if t.dtype == "BF16":  # widen to float32 by putting the 16 bits on top
        u = np.frombuffer(t.data, "<u2").astype(np.uint32) << 16
        return u.view(np.float32).reshape(t.shape)
    return np.frombuffer(t.data, NP[t.dtype]).reshape(t.shape)


def tokens(seed: int, b: int = B, t: int = T) -> RawTensor:
    return raw(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)).astype(np.int32))


def boundary(seed: int, b: int = B, t: int = T) -> RawTensor:
    return raw(np.random.default_rng(seed).standard_normal((b, t, CFG.bottleneck_dim)).astype(np.float32))


def stage_input(stage: int, seed: int) -> dict[str, RawTensor]:
    return {"tokens": tokens(seed)} if stage == 0 else {"activations": boundary(seed)}


def stage_cotangent(stage: int, seed: int) -> dict[str, RawTensor]:
    return {"targets": tokens(seed + 1000)} if stage == CFG.n_stages - 1 else {"grad": boundary(seed + 1000)}


def max_diff(a: dict[str, RawTensor], b: dict[str, RawTensor]) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(arr(a[n]) - arr(b[n])).max()) for n in a)


def gradients(stage: StageRunner) -> dict[str, RawTensor]:
    """The parameter gradients accumulated since the last step, read from the stage's kernel."""
    k = stage.kernel
    return {n: k.tensor_out(g) for n, g in k.gradients().items()}


def run_item(stage, index: int, work_id: str, seed: int):
    stage.forward(work_id, stage_input(index, seed))
    return stage.backward(work_id, stage_cotangent(index, seed))


class StageContract:
    factory: bk.BackendFactory

    def make(self, index: int, cfg: ModelConfig = CFG, seed: int = 0):
        return self.factory.create(cfg, index, OPTIM, seed=seed)

    def test_tensors_in_and_out_have_the_documented_names_shapes_and_dtypes(self):
        cfg = ModelConfig(**{**CFG.to_dict(), "stages": (1, 1, 1), "wire_dtype": "bfloat16"})
        head, body, tail = (self.make(i, cfg) for i in range(3))
        assert all(isinstance(s, StageRunner) and isinstance(s, bk.StageBackend) for s in (head, body, tail))
        z = head.forward("w", {"tokens": tokens(1)})
        assert set(z) == {"activations"} and z["activations"].dtype == "BF16"
        assert z["activations"].shape == (B, T, cfg.bottleneck_dim)
        z2 = body.forward("w", z)
        assert z2["activations"].dtype == "BF16" and z2["activations"].shape == (B, T, 4)
        assert tail.forward("w", z2) == {}
        r = tail.backward("w", {"targets": tokens(2)})
        # Small init gives near-uniform predictions: the loss starts at ln(vocab).
        assert r.loss is not None and abs(r.loss - math.log(cfg.vocab_size)) < 0.05
        assert r.grads is not None and r.grads["grad"].dtype == "BF16" and r.grads["grad"].shape == (B, T, 4)
        r2 = body.backward("w", r.grads)
        assert r2.loss is None and r2.grads["grad"].shape == (B, T, 4)
        r3 = head.backward("w", r2.grads)
        assert r3.loss is None and r3.grads is not None and set(r3.grads) == {"proof"}
        proof = r3.grads["proof"]
        assert proof.dtype == "F32" and proof.shape == (proof_size(cfg, 0),)
        # The head's proof of work is the gradient its backward added to its 1-D weights.
        grads = gradients(head)
        want = np.concatenate([arr(grads[n]).ravel() for n in proof_params(cfg, 0)])
        assert np.abs(want).max() > 0 and np.allclose(arr(proof), want, rtol=1e-5, atol=1e-8)
        for s in (head, body, tail):
            assert s.in_flight() == [] and all(np.abs(arr(g)).max() > 0 for g in gradients(s).values())

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_non_finite_inputs_are_refused_before_they_reach_the_stage(self, bad):
        body, tail = self.make(1), self.make(2)
        poisoned = arr(boundary(1)).copy()
        poisoned[0, 0, 0] = bad
        with pytest.raises(StageInputError, match="NaN or infinite"):
            body.forward("w", {"activations": raw(poisoned)})
        assert body.in_flight() == []
        body.forward("w", stage_input(1, 1))
        with pytest.raises(StageInputError, match="NaN or infinite"):
            body.backward("w", {"grad": raw(poisoned)})
        with pytest.raises(StageInputError, match="NaN or infinite"):
            tail.forward("w", {"activations": raw(poisoned)})

    def test_an_input_that_overflows_is_refused_and_its_gradients_never_step(self):
        tail = self.make(2)
        before = tail.weights()
        huge = np.full((B, T, CFG.bottleneck_dim), 3e38, np.float32)
        tail.forward("w", {"activations": raw(huge)})
        try:
            r = tail.backward("w", {"targets": tokens(2)})
        except StageInputError as e:  # the framework overflowed: nothing non-finite leaves or steps
            assert "non-finite" in str(e)
            assert tail.step() == 0.0, "the poisoned sum is discarded, not applied"
            assert max_diff(tail.weights(), before) == 0.0
        else:  # the framework's kernels stayed finite: then so is everything it returns
            assert r.loss is not None and math.isfinite(r.loss)
            assert r.grads is not None and np.isfinite(arr(r.grads["grad"])).all()
            tail.step()
        assert np.isfinite(np.concatenate([arr(w).ravel() for w in tail.weights().values()])).all()
        run_item(tail, 2, "next", seed=4)  # and the stage carries on
        assert tail.step() > 0.0 and max_diff(tail.weights(), before) > 0.0

    def test_same_seed_gives_the_spec_initial_weights(self):
        w = self.make(1, seed=7).weights()
        assert max_diff(w, initial_weights(CFG, 1, 7)) == 0.0
        assert max_diff(w, self.make(1, seed=8).weights()) > 0.0

    @pytest.mark.parametrize("index", [0, 1, 2])
    def test_gradients_accumulate_and_step_averages_them(self, index):
        twice, once = self.make(index), self.make(index)
        run_item(twice, index, "a", seed=3)
        run_item(twice, index, "b", seed=3)
        run_item(once, index, "a", seed=3)
        g2, g1 = gradients(twice), gradients(once)
        assert max(float(np.abs(arr(g2[n]) - 2 * arr(g1[n])).max()) for n in g1) < 1e-6
        assert twice.step() == pytest.approx(once.step(), rel=1e-5)
        assert max_diff(twice.weights(), once.weights()) < 1e-6
        assert max(float(np.abs(arr(g)).max()) for g in gradients(twice).values()) == 0.0

    @pytest.mark.parametrize("index", [0, 1, 2])
    def test_in_flight_work_keeps_the_weights_its_forward_used(self, index):
        s, ref = self.make(index), self.make(index)
        s.forward("a", stage_input(index, 1))
        out_b = s.forward("b", stage_input(index, 2))
        s.backward("a", stage_cotangent(index, 1))
        s.step()
        s.load(initial_weights(CFG, index, seed=99))  # a merge arrives while "b" is in flight
        rb = s.backward("b", stage_cotangent(index, 2))
        assert ref.forward("b", stage_input(index, 2)) == out_b
        rref = ref.backward("b", stage_cotangent(index, 2))
        assert max_diff(gradients(s), gradients(ref)) < 1e-6
        assert rb.loss == rref.loss
        if index > 0:
            assert max_diff(rb.grads, rref.grads) < 1e-7
        assert max_diff(s.weights(), initial_weights(CFG, index, seed=99)) == 0.0

    def test_step_after_load_uses_the_new_weights(self):
        s = self.make(0)
        before = s.forward("a", stage_input(0, 1))
        s.free("a")
        s.load(initial_weights(CFG, 0, seed=5))
        after = s.forward("a", stage_input(0, 1))
        assert max_diff(before, after) > 1e-3

    def test_step_with_nothing_accumulated_changes_nothing(self):
        s = self.make(1)
        w = s.weights()
        assert s.step() == 0.0
        assert max_diff(w, s.weights()) == 0.0
        assert int(arr(s.optimizer_state()["step"])) == 0

    def test_weight_decay_applies_to_matrices_only(self):
        s = self.make(0)
        w0 = s.weights()
        s.forward("z", stage_input(0, 1))
        s.backward("z", {"grad": raw(np.zeros((B, T, CFG.bottleneck_dim), np.float32))})
        assert s.step() == 0.0  # zero gradients: Adam moves nothing, only decay acts
        w1, shrink = s.weights(), 1 - OPTIM.lr * OPTIM.weight_decay
        for n in w0:
            want = arr(w0[n]) * (shrink if len(w0[n].shape) >= 2 else 1.0)
            np.testing.assert_allclose(arr(w1[n]), want, rtol=1e-6, atol=0)

    def test_optimizer_state_round_trips_through_safetensors_and_resumes(self):
        a = self.make(2)
        for i in range(2):
            run_item(a, 2, f"w{i}", seed=i)
            a.step()
        state = a.optimizer_state()
        assert set(state) == set(optimizer_state_shapes(CFG, 2))
        assert state["step"].dtype == "I64" and state["step"].shape == () and int(arr(state["step"])) == 2
        w_bytes, s_bytes = encode(a.weights()), encode(state)
        b = self.make(2, seed=123)
        b.load(decode(w_bytes)[0], decode(s_bytes)[0])
        assert max_diff(b.optimizer_state(), state) == 0.0
        for s in (a, b):
            run_item(s, 2, "next", seed=9)
            s.step()
        assert max_diff(a.weights(), b.weights()) < 1e-7
        assert max_diff(a.optimizer_state(), b.optimizer_state()) < 1e-7

    def test_bad_input_is_rejected_with_a_clear_error(self):
        head, body, tail = (self.make(i) for i in range(3))
        with pytest.raises(UnknownWorkId):
            body.backward("never", {"grad": boundary(1)})
        body.forward("w", {"activations": boundary(1)})
        with pytest.raises(StageInputError, match="already in flight"):
            body.forward("w", {"activations": boundary(1)})
        with pytest.raises(StageInputError, match="shape"):
            body.backward("w", {"grad": boundary(1, t=T - 1)})
        body.backward("w", {"grad": boundary(1)})  # a bad backward leaves the work id usable
        body.forward("x", {"activations": boundary(1)})
        body.free("x")
        body.free("unknown")
        with pytest.raises(UnknownWorkId):
            body.backward("x", {"grad": boundary(1)})
        bad_ids = raw(np.full((B, T), CFG.vocab_size, np.int32))
        with pytest.raises(StageInputError, match="tokens must lie"):
            head.forward("t", {"tokens": bad_ids})
        with pytest.raises(StageInputError, match="width"):
            body.forward("y", {"activations": raw(np.zeros((B, T, 5), np.float32))})
        with pytest.raises(StageInputError, match="context"):
            head.forward("long", {"tokens": tokens(1, t=CFG.context + 1)})
        with pytest.raises(StageInputError, match="expected exactly"):
            head.forward("t", {"activations": boundary(1)})
        tail.forward("t", {"activations": boundary(1)})
        with pytest.raises(StageInputError, match="targets must lie"):
            tail.backward("t", {"targets": raw(np.full((B, T), -1, np.int32))})
        w = head.weights()
        del w["embed_tokens.weight"]
        with pytest.raises(StageInputError, match="missing embed_tokens.weight"):
            head.load(w)
        with pytest.raises(StageInputError, match="expected"):
            head.load({**head.weights(), "embed_tokens.weight": raw(np.zeros((3, 3), np.float32))})
