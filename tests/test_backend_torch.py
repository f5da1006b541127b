"""The torch backend (torch-cpu here): the stage contract on its kernel, and what only torch has."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import iota_torch  # noqa: E402
from stage_contract import CFG, OPTIM, StageContract, arr, run_item  # noqa: E402

from iota_cli.core.backend import BackendError  # noqa: E402
from iota_cli.core.manifest import TINY_MODEL  # noqa: E402
from iota_cli.core.modelspec import ModelConfig, estimate_memory, initial_weights, stage_spec  # noqa: E402

torch.set_num_threads(1)  # the CI box has two cores shared with other jobs


class TestTorchStage(StageContract):
    factory = iota_torch.cpu_backend


def test_loading_the_entry_points_imports_no_framework():
    code = (
        "import sys; from iota_cli.core.backend import factories; fs = factories();"
        "assert {'torch-cpu', 'torch-cuda', 'torch-mps', 'mlx', 'mlx-cpu'} <= set(fs), fs;"
        "assert 'torch' not in sys.modules and 'mlx' not in sys.modules, 'framework imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/", timeout=60)


def test_cuda_and_mps_say_why_they_are_unavailable_on_a_cpu_build():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ok, why = iota_torch.cuda_backend.available()
    assert not ok and ("CPU-only" in why or "CUDA" in why)
    with pytest.raises(BackendError, match="not available"):
        iota_torch.cuda_backend.create(CFG, 0, OPTIM)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_memory_estimate_bounds_what_autograd_saves(dtype, index):
    """estimate_memory's per-item term against the bytes torch's autograd really keeps for one item."""
    from iota_torch import model
    from iota_torch.stage import to_torch

    cfg = dataclasses.replace(TINY_MODEL, context=64, dtype=dtype)
    spec = stage_spec(cfg, index)
    w = {n: to_torch(t).requires_grad_() for n, t in initial_weights(cfg, spec).items()}
    weight_storage = {p.untyped_storage().data_ptr() for p in w.values()}
    b, t = 4, 64
    x = torch.randint(0, cfg.vocab_size, (b, t)) if index == 0 else torch.randn(b, t, 4, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(tensor):
        st = tensor.untyped_storage()
        if st.data_ptr() not in weight_storage:
            saved[st.data_ptr()] = st.nbytes()
        return tensor

    cos, sin = model.rope(cfg, t, torch.device("cpu"))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), autocast:
        out = model.stage_forward(w, cfg, spec, x, cos, sin)
        if spec.kind == "tail":
            model.loss_fn(out, torch.randint(0, cfg.vocab_size, (b, t)))
    per_item = estimate_memory(cfg, spec, b, t, in_flight=2) - estimate_memory(cfg, spec, b, t, in_flight=1)
    measured = sum(saved.values())
    assert measured <= per_item <= 1.25 * measured


def test_bfloat16_compute_trains_under_cpu_autocast():
    cfg = ModelConfig(**{**CFG.to_dict(), "dtype": "bfloat16", "wire_dtype": "bfloat16"})
    s = iota_torch.cpu_backend.create(cfg, 2, OPTIM)
    losses = []
    for _ in range(5):
        losses.append(run_item(s, 2, "w", seed=4).loss)
        s.step()
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(arr(t).dtype == np.float32 for t in s.weights().values())  # master weights stay float32
