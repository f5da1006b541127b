"""The swarm's model trained sequentially in one process: the loss a local swarm is compared against.

Same tiny manifest, data (the stdlib's *.py, or --data GLOB), batch and optimizer as `iota swarm`, but one
replica per stage and no pipeline staleness or merging. Prints the mean tail loss every 100 samples.

    .venv/bin/python bench/chain_reference.py --samples 600 [--backend torch-cpu]
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np

from iota_cli.core.backend import StageBackend, get_factory
from iota_cli.core.manifest import RunManifest, tiny_manifest
from iota_cli.core.tensors import RawTensor
from iota_cli.swarm.local import default_data


def start(m: RunManifest, backend: str) -> list[StageBackend]:
    """Every stage at epoch 0: the model spec's init for the manifest's seed, as the orchestrator makes it."""
    factory = get_factory(backend)
    return [factory.create(m.model, i, m.optim, seed=m.seed) for i in range(m.model.n_stages)]


def train_sample(stages: list[StageBackend], tokens: np.ndarray, work_id: str = "w") -> float:
    """One sample through the chain: forward, the tail's loss, backward into every stage's accumulators.

    tokens is (batch, seq + 1) int32: inputs and the targets one position later. Returns the tail's loss.
    """
    b, t = tokens.shape[0], tokens.shape[1] - 1
    x = {"tokens": RawTensor("I32", (b, t), np.ascontiguousarray(tokens[:, :-1], dtype=np.int32).tobytes())}
    for s in stages[:-1]:
        x = s.forward(work_id, x)
    stages[-1].forward(work_id, x)
    targets = RawTensor("I32", (b, t), np.ascontiguousarray(tokens[:, 1:], dtype=np.int32).tobytes())
    r = stages[-1].backward(work_id, {"targets": targets})
    grads = r.grads
    for s in reversed(stages[:-1]):
        assert grads is not None  # the tail and body return the gradient toward the stage before
        grads = s.backward(work_id, grads).grads
    assert r.loss is not None
    return r.loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--backend", default="torch-cpu")
    ap.add_argument("--data", default=default_data(), help="glob of text files")
    args = ap.parse_args()

    m = tiny_manifest(args.data)
    train = m.train
    text = b"".join(Path(f).read_bytes() for f in sorted(glob.glob(args.data, recursive=True)))
    data = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
    stages = start(m, args.backend)
    rng = np.random.default_rng(0)
    b, t = train.batch_size, train.seq_len
    losses = []
    for i in range(1, args.samples + 1):
        off = int(rng.integers(0, len(data) - b * (t + 1)))
        losses.append(train_sample(stages, data[off : off + b * (t + 1)].reshape(b, t + 1)))
        if i % train.backward_per_step == 0:
            for s in stages:
                s.step()
        if i % 100 == 0:
            print(f"samples {i:5d}  tail loss (mean of last 20) {np.mean(losses[-20:]):.3f}")


if __name__ == "__main__":
    main()
