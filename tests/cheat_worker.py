"""A real `iota join` process with one bad habit: the product's own worker, one method changed.

tests/test_trust_e2e.py starts these beside an honest swarm; each cheats in the way its kind says and is
otherwise a faithful worker (it heartbeats, checkpoints, answers checks with the weights it holds):

    random-activations  head/body: sends random activations of the right shape and scale
    scaled-activations  head/body: computes honestly, sends 3x the activations
    fake-loss           tail: computes honestly, reports a loss of 0.01
    no-backward         head: completes its backward items without running them (a made-up proof)
    own-weights         body: computes honestly, but with weights of its own (never takes the swarm's)
    ascent              any stage: works honestly, but every merge update it sends pushes the loss up,
                        at 0.9 of the optimizer's bound on every coordinate (so the bound lets it in)

Run one by hand against a local swarm (URL, run id and a token from `iota orchestrator status`):
    IOTA_TOKEN=... python tests/cheat_worker.py scaled-activations join --orchestrator URL --run R \
        --backend torch-cpu --stage 1 --force
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np

from iota_cli.core.bounds import update_bound
from iota_cli.core.stage import proof_size
from iota_cli.core.tensors import RawTensor, TensorDict
from iota_cli.core.validation import as_f32
from iota_cli.train import worker as worker_module

Honest = worker_module.Worker


def _like(t: RawTensor, values: np.ndarray) -> RawTensor:
    """values in t's shape and dtype (float32, or bf16 by truncation: close enough for a cheat)."""
    v = np.asarray(values, dtype="<f4").reshape(t.shape)
    if t.dtype == "BF16":
        return RawTensor("BF16", t.shape, (v.view("<u4") >> 16).astype("<u2").tobytes())
    return RawTensor("F32", t.shape, v.tobytes())


class RandomActivations(Honest):
    def _forward(self, item, key, fetched):  # type: ignore[no-untyped-def]
        out, loss = super()._forward(item, key, fetched)
        if out is None or "activations" not in out:
            return out, loss
        t = out["activations"]
        scale = float(np.std(as_f32(t))) or 1.0
        rng = np.random.default_rng(item.sample_id)
        return {"activations": _like(t, rng.normal(0.0, scale, size=t.shape))}, loss


class ScaledActivations(Honest):
    def _forward(self, item, key, fetched):  # type: ignore[no-untyped-def]
        out, loss = super()._forward(item, key, fetched)
        if out is None or "activations" not in out:
            return out, loss
        t = out["activations"]
        return {"activations": _like(t, 3.0 * as_f32(t))}, loss


class FakeLoss(Honest):
    def _forward(self, item, key, fetched):  # type: ignore[no-untyped-def]
        out, loss = super()._forward(item, key, fetched)
        return out, (0.01 if loss is not None else None)


class NoBackward(Honest):
    def _backward(self, key, fetched):  # type: ignore[no-untyped-def]
        self._forget(key)  # the saved forward is dropped, never used: no gradient, no step's worth of work
        n = proof_size(self.manifest.model, 0)
        rng = np.random.default_rng(abs(hash(key)) % (1 << 32))
        proof: TensorDict = {"proof": RawTensor("F32", (n,), rng.normal(0, 1e-3, n).astype("<f4").tobytes())}
        return proof, None


class OwnWeights(Honest):
    def run(self) -> None:
        rng = np.random.default_rng(7)
        mine = {
            n: _like(t, as_f32(t) * (1.0 + rng.normal(0.0, 0.5, size=as_f32(t).shape)))
            for n, t in self.backend.weights().items()
        }
        self.backend.load(mine)
        super().run()

    def _land(self) -> None:  # merged weights are ignored: it keeps training its own
        self.merger.take()

    def _catch_up(self, news) -> None:  # type: ignore[no-untyped-def]
        self.state = replace(self.state, epoch=news.epoch)


class Ascent(Honest):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        honest_begin, m = self.merger.begin, self.merger

        def begin(offer, weights, step):  # type: ignore[no-untyped-def]
            honest = m.layout.flatten(weights)
            downhill = np.sign(honest - m.base)  # where its honest steps went (none yet: an empty update)
            o = self.manifest
            reach = 0.9 * update_bound(o.optim, o.merge.interval, float(np.abs(m.base).max()))
            uphill = (m.base - downhill * reach).astype(np.float32)  # its update: the opposite way
            began = honest_begin(offer, m.layout.unflatten(uphill), step)
            if began:
                self.honest_snapshot = honest
            return began

        self.merger.begin = begin  # type: ignore[method-assign]

    def _land(self) -> None:  # merged + its own steps since its honest snapshot (not the poisoned one)
        landed = self.merger.take()
        if landed is None or landed.merged is None or landed.epoch != self.state.epoch:
            return
        layout = self.merger.layout
        current = layout.flatten(self.backend.weights())
        self.backend.load(layout.unflatten(landed.merged + (current - self.honest_snapshot)))
        self._synced(landed.merged, landed.epoch + 1)


KINDS = {
    "random-activations": RandomActivations,
    "scaled-activations": ScaledActivations,
    "fake-loss": FakeLoss,
    "no-backward": NoBackward,
    "own-weights": OwnWeights,
    "ascent": Ascent,
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in KINDS:
        sys.exit(f"usage: cheat_worker.py {{{','.join(KINDS)}}} join ARGS...")
    worker_module.Worker = KINDS[argv[0]]  # type: ignore[misc]  # join.py builds the Worker it finds here
    from iota_cli.app import main as iota

    sys.argv = ["iota", *argv[1:]]
    iota()


if __name__ == "__main__":
    main(sys.argv[1:])
