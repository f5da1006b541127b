"""The run manifest: everything a swarm agrees on before training (model, data, batch, optimizer, merging).

An operator writes it as TOML or JSON and creates a run with `iota orchestrator run create FILE`; every
worker receives it, typed, inside its assignment. Each field's description below is its documentation.
Try it: `python -c "from iota_cli.core.manifest import *; print(tiny_manifest('src').to_dict())"`.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from iota_cli.core import schema
from iota_cli.core.modelspec import ModelConfig

PLAIN = ConfigDict(extra="ignore")  # unknown keys are ignored, so old workers survive newer manifests


@dataclass(frozen=True, config=PLAIN)
class OptimConfig:
    """AdamW with bias correction (as torch), decay on matrices only, global-norm clipping."""

    lr: float = Field(default=3e-4, gt=0, description="learning rate")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW's two moment decay rates")
    eps: float = Field(default=1e-8, gt=0, description="AdamW's epsilon")
    weight_decay: float = Field(default=0.1, ge=0, description="decoupled weight decay, on matrices only")
    grad_clip: float = Field(default=1.0, gt=0, description="global gradient-norm clip")


@dataclass(frozen=True, config=PLAIN)
class TrainConfig:
    batch_size: int = Field(default=8, ge=1, le=1 << 16, description="sequences per work item (microbatch)")
    seq_len: int = Field(
        default=128, ge=1, le=1 << 20, description="tokens per sequence; at most model.context"
    )
    backward_per_step: int = Field(
        default=4, ge=1, le=1 << 20, description="local optimizer step every k backward passes"
    )
    max_samples: int = Field(
        default=0, ge=0, le=1 << 53, description="stop issuing new samples after this many (0: until stopped)"
    )
    lease_s: float = Field(default=30.0, ge=0.1, le=86400, description="a worker silent this long is dropped")
    work_timeout_s: float = Field(
        default=60.0, ge=0.1, le=86400, description="a claimed item not completed by then is re-issued"
    )
    max_inflight_per_head: int = Field(
        default=4, ge=1, le=1024, description="samples a head worker may have in the pipeline at once"
    )
    # Six: two claimed ahead, one computing, two being sent, one queued to be (iota_cli/train/pipeline.py).
    max_claims_per_worker: int = Field(
        default=6,
        ge=1,
        le=1024,
        description="work items one contributor may hold claimed at once, on any stage (1 while its "
        "claims lapse past their deadline more often than it completes them)",
    )

    wire_codec: Literal["none", "zstd"] = Field(
        default="zstd",
        description="how workers frame the results they upload: 'zstd' (lossless, about 1.4x smaller "
        "for bfloat16 activations) or 'none' (receivers read either; core/wire.py)",
    )

    def __post_init__(self) -> None:
        if self.batch_size * (self.seq_len + 1) > 1 << 24:
            raise ValueError("batch_size * (seq_len + 1) is too large (over 16M tokens a sample)")

    @property
    def sample_tokens(self) -> int:
        """Tokens one sample reads from the corpus: inputs plus the one-token shift of the targets."""
        return self.batch_size * (self.seq_len + 1)


@dataclass(frozen=True, config=PLAIN)
class MergeConfig:
    """How a stage's replicas merge (docs/protocol.md, "Merging"): rounds of butterfly all-reduce among
    the replicas, then an outer optimizer step on the mean of their pseudo-gradients."""

    # The default is bench/convergence.py's pick (docs/model.md, "Convergence"): at 250 steps of a
    # 0.8M-parameter model, averaging every 2 steps ended within 3% of one process at R = 2 and 4, in the
    # sweep and through the real stack; every 10 steps 7% behind through the real stack (a round's
    # latency adds to the interval). diloco at IOTA's outer lr 0.7 and momentum 0.9 lost to averaging at
    # every interval swept (2: +43%): its momentum pays over hundreds of inner steps, not a few. A round
    # runs beside training, so a short interval costs merge bytes, not steps: on a slow link the rounds
    # simply come as fast as the link allows.
    strategy: Literal["diloco", "average"] = Field(
        default="average",
        description="average: the replicas' weights averaged (weighted by counted work); diloco: outer "
        "Nesterov step on the mean pseudo-gradient",
    )
    interval: int = Field(
        default=2, ge=1, le=1 << 31, description="local optimizer steps between a replica's contributions"
    )
    timeout_s: float = Field(
        default=60.0,
        ge=0.1,
        le=86400,
        description="a round's contribute phase closes with whoever is in by then",
    )
    wire_dtype: Literal["BF16", "F32"] = Field(
        default="BF16",
        description="dtype of the pseudo-gradients and the outer momentum on the wire and at rest",
    )
    outer_lr: float = Field(default=0.7, gt=0, le=10, description="outer learning rate (diloco)")
    outer_momentum: float = Field(default=0.9, ge=0, lt=1, description="outer Nesterov momentum (diloco)")
    momentum_start: float = Field(
        default=0.5, ge=0, lt=1, description="the momentum of the first round, warming up to outer_momentum"
    )
    momentum_warmup: int = Field(
        default=20, ge=0, le=1 << 31, description="rounds over which the momentum warms up (0: none)"
    )


@dataclass(frozen=True, config=PLAIN)
class TrustConfig:
    """How the orchestrator checks contributors (docs/trust.md): sampled recomputation and standing."""

    sample_rate: float = Field(
        default=0.05, ge=0, le=1, description="share of a vetted contributor's forward items recomputed"
    )
    suspect_rate: float = Field(
        default=0.5, ge=0, le=1, description="the share for a contributor that has failed a check"
    )
    pass_reward: int = Field(default=1, ge=0, le=1000, description="standing a passed check adds")
    fail_penalty: int = Field(
        default=3, ge=1, le=1000, description="standing a failed check takes (below 0: banned from the run)"
    )
    merge_requires_pass: bool = Field(
        default=False, description="only contributors that passed a check may contribute to merges"
    )
    verdict_timeout_s: float = Field(
        default=120.0, ge=1, le=86400, description="a sample not recomputed by then is dropped, unjudged"
    )


@dataclass(frozen=True, config=PLAIN)
class DataConfig:
    source: str = Field(
        default="", description="a directory or glob of text files on the orchestrator's machine"
    )
    shard_bytes: int = Field(
        default=1 << 20, ge=1, le=1 << 40, description="bytes of corpus a data shard covers"
    )


@dataclass(frozen=True, config=PLAIN)
class RunManifest:
    name: str = Field(
        default="run", max_length=128, description="a name for people; the run id is the orchestrator's"
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    trust: TrustConfig = Field(default_factory=TrustConfig)
    seed: int = Field(
        default=0, ge=0, le=2**63 - 1, description="seeds the epoch-0 weights (modelspec.initial_weights)"
    )

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.context:
            raise ValueError(f"train.seq_len {self.train.seq_len} exceeds model.context {self.model.context}")
        if self.data.shard_bytes < self.train.sample_tokens:
            raise ValueError("data.shard_bytes must hold at least one sample: batch_size * (seq_len + 1)")

    def to_dict(self) -> dict[str, Any]:
        return schema.dump(self)

    @classmethod
    def from_dict(cls, d: Any) -> RunManifest:
        """Parse at the edge: unknown keys are ignored, missing ones take defaults; SchemaError if invalid."""
        return schema.parse(cls, d)

    @classmethod
    def load(cls, path: Path) -> RunManifest:
        text = path.read_text()
        d = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        return cls.from_dict(d)


# The model `iota swarm` trains: 4 layers in 3 stages, a 16x bottleneck, about 0.2M parameters.
TINY_MODEL = ModelConfig(
    d_model=64,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=176,
    context=128,
    bottleneck_dim=4,
    stages=(1, 2, 1),
)


def tiny_manifest(data_source: str, max_samples: int = 0) -> RunManifest:
    """The small run `iota swarm` trains on one machine (f32 on the wire: it never leaves loopback)."""
    train = TrainConfig(
        batch_size=8,
        seq_len=64,
        backward_per_step=2,
        max_samples=max_samples,
        lease_s=20.0,
        work_timeout_s=30.0,
        max_inflight_per_head=3,
    )
    return RunManifest(
        name="tiny",
        model=ModelConfig.from_dict({**TINY_MODEL.to_dict(), "wire_dtype": "float32"}),
        train=train,
        optim=OptimConfig(lr=3e-3, weight_decay=0.01),
        merge=MergeConfig(timeout_s=20.0, wire_dtype="F32"),
        data=DataConfig(source=data_source, shard_bytes=256 * 1024),
    )
