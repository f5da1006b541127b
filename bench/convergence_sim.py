"""The one-process runs of bench/convergence.py: the reference, and a swarm simulated as R pipelines.

The reference is one replica of each stage chained (bench/chain_reference.py), batch G per optimizer
step. The simulated swarm runs R such pipelines, replica r of every stage chained, each on its G / R
share of every global batch (samples in the orchestrator's order, bench/heldout.py's TrainStream), and
merges each stage's replicas with the swarm's own code: core.flat's vectors, partitions and wire
rounding, core.outer's reduce_partition ("diloco", "average"); "sync" averages the gradients through
the wire before every step instead (data parallel). Rounds land at once, so the overlap of a real
replica (its steps taken while a round is in flight) is not modelled here: the real stack has it.

    .venv/bin/python bench/convergence.py      # runs these; see its docstring
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from chain_reference import start, train_sample
from heldout import TrainStream

from iota_cli.core.backend import StageBackend
from iota_cli.core.flat import FlatLayout, partitions, wire_round
from iota_cli.core.manifest import DataConfig, MergeConfig, OptimConfig, RunManifest, TrainConfig
from iota_cli.core.modelspec import ModelConfig
from iota_cli.core.outer import reduce_partition, weighted_mean
from iota_cli.core.tensors import TensorDict

# The calibration size: about 0.8M parameters, 4 layers in 3 stages, an 8x bottleneck.
MODEL = ModelConfig(
    d_model=128,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=352,
    context=128,
    bottleneck_dim=16,
    stages=(1, 2, 1),
    wire_dtype="float32",
)


@dataclass(frozen=True)
class Plan:
    """The sizes every configuration shares: model, batch, global batch, steps and held-out batches."""

    model: ModelConfig = MODEL
    batch: int = 8  # sequences per sample (one work item)
    seq: int = 128
    global_batch: int = 32  # G: sequences per optimizer step across the swarm
    steps: int = 250  # optimizer steps, for every configuration
    lr: float = 3e-3
    eval_batches: int = 16
    seed: int = 0
    backend: str = "torch-cpu"

    @property
    def samples_per_step(self) -> int:
        return self.global_batch // self.batch

    @property
    def samples(self) -> int:
        return self.steps * self.samples_per_step

    @property
    def tokens(self) -> int:
        """Training tokens of every configuration (inputs; the targets are the same shifted by one)."""
        return self.samples * self.batch * self.seq

    def per_replica(self, replicas: int) -> int:
        """Samples one replica accumulates per optimizer step."""
        n, rest = divmod(self.global_batch, self.batch * replicas)
        if rest or n < 1:
            raise ValueError(f"G = {self.global_batch} does not split into {replicas} x {self.batch}")
        return n

    def manifest(self, source: str, replicas: int, merge: MergeConfig) -> RunManifest:
        train = TrainConfig(
            batch_size=self.batch,
            seq_len=self.seq,
            backward_per_step=self.per_replica(replicas),
            max_samples=self.samples,
            lease_s=20.0,
            work_timeout_s=60.0,
            # One sample in flight per head: with more, a gradient lands on weights a few steps (and
            # a merge) newer than its forward's; at R = 4 that cost 17.8% held-out against 2.1% with
            # one, at the same wall time on 2 cores (pipelining buys nothing when the cores are full).
            max_inflight_per_head=1,
        )
        return RunManifest(
            name="convergence",
            model=self.model,
            train=train,
            optim=OptimConfig(lr=self.lr, weight_decay=0.01),
            merge=merge,
            data=DataConfig(source=source, shard_bytes=256 * 1024),
            seed=self.seed,
        )


@dataclass(frozen=True)
class Config:
    strategy: str  # "sync", "diloco" or "average"
    replicas: int
    interval: int  # optimizer steps between merges (1 for sync)
    real_stack: bool = False

    def merge(self, base: MergeConfig | None = None) -> MergeConfig:
        strategy = "average" if self.strategy == "sync" else self.strategy
        return replace(base or MergeConfig(), strategy=strategy, interval=self.interval)  # type: ignore[arg-type]


def reference(
    plan: Plan, stream: TrainStream, wrap: Callable[[list[StageBackend]], list[StageBackend]] | None = None
) -> list[TensorDict]:
    """One replica of each stage, batch G per optimizer step, samples in the orchestrator's order
    (`wrap`: what the chain's boundaries do to the bytes, bench/boundary_bytes.py's wires)."""
    stages = start(plan.manifest("", 1, MergeConfig()), plan.backend)
    stages = wrap(stages) if wrap else stages
    for step in range(plan.steps):
        for j in range(plan.samples_per_step):
            train_sample(stages, stream.sample(step * plan.samples_per_step + j))
        for s in stages:
            s.step()
    return [s.weights() for s in stages]


@dataclass
class StageMerge:
    """A stage's merge state as the swarm keeps it: the published weights, outer momentum and epoch."""

    layout: FlatLayout
    base: np.ndarray
    momentum: np.ndarray | None = None
    epoch: int = 0


def merge_round(cfg: MergeConfig, st: StageMerge, replicas: Sequence[StageBackend], work: float) -> None:
    """One round of a stage: every replica's pseudo-gradient through the wire, reduced partition by
    partition by core.outer, loaded by every replica (the round lands at once, so the overlap adds
    nothing) with its own optimizer state kept, as a worker does."""
    updates = [wire_round(st.base - st.layout.flatten(r.weights()), cfg.wire_dtype) for r in replicas]
    new = np.empty_like(st.base)
    momentum = np.empty_like(st.base) if cfg.strategy == "diloco" else None
    for a, b in partitions(st.layout.size, len(replicas)):
        old = None if st.momentum is None else st.momentum[a:b]
        w, m = reduce_partition(
            cfg, st.base[a:b], [u[a:b] for u in updates], [work] * len(updates), old, st.epoch
        )
        new[a:b] = w
        if momentum is not None and m is not None:
            momentum[a:b] = m
    st.base, st.momentum, st.epoch = new, momentum, st.epoch + 1
    merged = st.layout.unflatten(new)
    for r in replicas:
        r.load(merged)


def all_reduce_gradients(layout: FlatLayout, replicas: Sequence[StageBackend], wire: str) -> None:
    """sync: every replica's accumulated gradient through the wire, averaged, written back into each.

    StageBackend does not expose gradients; this reaches core.stage.StageRunner's kernel (torch's
    accumulators are tensors copied into in place), which is why sync is a bench-only strategy here."""
    kernels = [getattr(r, "kernel") for r in replicas]  # noqa: B009 - not part of the protocol
    accs = [k.gradients() for k in kernels]
    vecs = [
        wire_round(layout.flatten({n: k.tensor_out(g) for n, g in acc.items()}), wire)  # type: ignore[arg-type]
        for k, acc in zip(kernels, accs, strict=True)
    ]
    mean = layout.unflatten(wire_round(weighted_mean(vecs, [1.0] * len(vecs)), wire))  # type: ignore[arg-type]
    for k, acc in zip(kernels, accs, strict=True):
        for name, g in acc.items():
            g.copy_(k.tensor_in(mean[name]))


def simulate(
    plan: Plan, stream: TrainStream, config: Config, merge: MergeConfig
) -> tuple[list[TensorDict], int]:
    """R pipelines (replica r of every stage chained), each G / R sequences per step on its share of
    every global batch, merged per stage; returns the final merged weights and the number of rounds."""
    R, n_stages = config.replicas, plan.model.n_stages
    pipes = [start(plan.manifest("", R, merge), plan.backend) for _ in range(R)]
    layouts = [FlatLayout.of(plan.model, s) for s in range(n_stages)]
    merges = [StageMerge(layouts[s], layouts[s].flatten(pipes[0][s].weights())) for s in range(n_stages)]
    per, rounds, since = plan.per_replica(R), 0, 0
    for step in range(plan.steps):
        for r, pipe in enumerate(pipes):
            for j in range(per):
                train_sample(pipe, stream.sample(step * plan.samples_per_step + r * per + j))
        if config.strategy == "sync":
            for s in range(n_stages):
                all_reduce_gradients(layouts[s], [p[s] for p in pipes], merge.wire_dtype)
            rounds += 1
        for pipe in pipes:
            for stage in pipe:
                stage.step()
        since += 1
        # The run's last round merges whatever the replicas did since the previous one, as open_final does.
        if config.strategy != "sync" and (since == config.interval or step + 1 == plan.steps):
            for s in range(n_stages):
                merge_round(merge, merges[s], [p[s] for p in pipes], float(since * per))
            rounds, since = rounds + 1, 0
    return [stage.weights() for stage in pipes[0]], rounds
