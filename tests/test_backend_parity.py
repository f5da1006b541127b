"""torch-cpu and mlx-cpu compute the same model: same weights in, same numbers out (within float32 rounding).

Tolerances (measured errors are about 10x smaller; see docs/model.md): at float32, forward outputs, input
gradients and parameter gradients agree to 1e-5 relative to each tensor's largest entry and the loss to
1e-5 absolute. After AdamW steps every weight agrees to 10% of the learning rate and all but 0.1% to 1%:
Adam divides each gradient entry by its own magnitude, so an entry near eps (1e-8), where float32
rounding is a large relative error, moves visibly differently. bfloat16 compute: 3e-2 relative.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")

import iota_mlx  # noqa: E402
import iota_torch  # noqa: E402
from stage_contract import arr, gradients, raw  # noqa: E402

from iota_cli.core.manifest import TINY_MODEL, OptimConfig  # noqa: E402
from iota_cli.core.modelspec import ModelConfig, initial_weights  # noqa: E402
from iota_cli.core.tensors import decode, encode  # noqa: E402

torch.set_num_threads(1)

CFG = dataclasses.replace(TINY_MODEL, context=32, wire_dtype="float32")
OPTIM = OptimConfig(lr=1e-3, weight_decay=0.1, grad_clip=1.0)
B, T = 4, 32
FACTORIES = {"torch": iota_torch.cpu_backend, "mlx": iota_mlx.cpu_backend}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def weights(cfg: ModelConfig, index: int, seed: int = 1):
    """Initial weights nudged off their init, so norms are not all ones and every path carries signal."""
    rng = np.random.default_rng(seed)
    return {
        n: raw(arr(t) + 0.05 * rng.standard_normal(t.shape).astype(np.float32))
        for n, t in initial_weights(cfg, index, seed).items()
    }


def item(cfg: ModelConfig, index: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = lambda: raw(rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32))  # noqa: E731
    z = lambda: raw(rng.standard_normal((B, T, cfg.bottleneck_dim)).astype(np.float32))  # noqa: E731
    inp = {"tokens": ids()} if index == 0 else {"activations": z()}
    cot = {"targets": ids()} if index == cfg.n_stages - 1 else {"grad": z()}
    return inp, cot


def assert_steps_agree(a: dict, b: dict, lr: float) -> None:
    d = np.concatenate([np.abs(arr(a[n]) - arr(b[n])).ravel() for n in a])
    assert d.max() < 0.1 * lr and np.mean(d > 0.01 * lr) < 1e-3


def pair(cfg: ModelConfig, index: int):
    w = weights(cfg, index)
    stages = {k: f.create(cfg, index, OPTIM) for k, f in FACTORIES.items()}
    for s in stages.values():
        s.load(w)
    return stages["torch"], stages["mlx"]


def compare(cfg: ModelConfig, index: int, tol: float, loss_tol: float) -> None:
    t, m = pair(cfg, index)
    inp, cot = item(cfg, index, seed=index)
    out_t, out_m = t.forward("w", inp), m.forward("w", inp)
    if index < cfg.n_stages - 1:
        assert rel(arr(out_m["activations"]), arr(out_t["activations"])) < tol
    rt, rm = t.backward("w", cot), m.backward("w", cot)
    if rt.loss is not None:
        assert abs(rt.loss - rm.loss) < loss_tol
    if index > 0:
        assert rel(arr(rm.grads["grad"]), arr(rt.grads["grad"])) < tol
    gt, gm = gradients(t), gradients(m)
    errors = {n: rel(arr(gm[n]), arr(gt[n])) for n in gt}
    assert max(errors.values()) < tol, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["head", "body", "tail"])
def test_forward_loss_and_gradients_agree_at_float32(index):
    compare(CFG, index, tol=1e-5, loss_tol=1e-5)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["head", "body", "tail"])
def test_bfloat16_compute_agrees_loosely(index):
    compare(ModelConfig(**{**CFG.to_dict(), "dtype": "bfloat16"}), index, tol=3e-2, loss_tol=1e-3)


@pytest.mark.parametrize("writer,reader", [("torch", "mlx"), ("mlx", "torch")])
def test_a_weights_file_written_by_one_loads_in_the_other(tmp_path, writer, reader):
    index = 1
    src = FACTORIES[writer].create(CFG, index, OPTIM, seed=3)
    inp, _ = item(CFG, index, seed=5)
    want = src.forward("w", inp)
    path = tmp_path / "stage1.safetensors"
    path.write_bytes(encode(src.weights(), {"stage": "1"}))
    dst = FACTORIES[reader].create(CFG, index, OPTIM, seed=4)
    dst.load(decode(path.read_bytes())[0])
    assert dst.weights() == src.weights()  # bit-exact round trip
    assert rel(arr(dst.forward("w", inp)["activations"]), arr(want["activations"])) < 1e-5
    assert set(mx.load(str(path))) == set(src.weights())  # MLX's own loader reads the file too


def test_optimizer_steps_agree_and_either_resumes_the_others_state():
    index = 2
    t, m = pair(CFG, index)
    for k in range(2):
        inp, cot = item(CFG, index, seed=10 + k)
        for s in (t, m):
            s.forward("w", inp)
            s.backward("w", cot)
        assert t.step() == pytest.approx(m.step(), rel=1e-5)
    assert_steps_agree(t.weights(), m.weights(), OPTIM.lr)
    st, sm = t.optimizer_state(), m.optimizer_state()
    assert int(arr(st["step"])) == int(arr(sm["step"])) == 2
    moments = [n for n in st if n != "step"]
    assert max(rel(arr(sm[n]), arr(st[n])) for n in moments if np.abs(arr(st[n])).max() > 0) < 1e-4
    # Swap: torch continues from MLX's state and vice versa; one more step keeps them together.
    t2, m2 = (f.create(CFG, index, OPTIM, seed=9) for f in FACTORIES.values())
    t2.load(m.weights(), m.optimizer_state())
    m2.load(t.weights(), t.optimizer_state())
    inp, cot = item(CFG, index, seed=20)
    for s in (t, m, t2, m2):
        s.forward("w", inp)
        s.backward("w", cot)
        s.step()
    assert_steps_agree(t.weights(), m2.weights(), OPTIM.lr)
    assert_steps_agree(m.weights(), t2.weights(), OPTIM.lr)
