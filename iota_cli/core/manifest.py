"""The run manifest: everything a swarm agrees on before training (model, data, batch, optimizer, merging).

An operator writes it as TOML or JSON and creates a run with `iota orchestrator run create FILE`; every
worker receives it with its assignment.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from iota_cli.core.modelspec import ModelConfig


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with bias correction (as torch), decay on matrices only, global-norm clipping."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8  # sequences per work item (microbatch)
    seq_len: int = 128  # tokens per sequence; at most model.context
    backward_per_step: int = 4  # local optimizer step every k backward passes
    merge_interval: int = 10  # local optimizer steps between merges of a stage's replicas
    merge_timeout_s: float = 60.0  # a merge round closes with whoever contributed by then
    max_samples: int = 0  # stop issuing new samples after this many (0: run until stopped)
    lease_s: float = 30.0  # a worker silent this long is dropped
    work_timeout_s: float = 60.0  # a claimed item not completed by then is re-issued
    max_inflight_per_head: int = 4  # samples a head worker may have in the pipeline at once


@dataclass(frozen=True)
class DataConfig:
    source: str = ""  # a directory or glob of text files on the orchestrator's machine
    shard_bytes: int = 1 << 20


@dataclass(frozen=True)
class RunManifest:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.context:
            raise ValueError(f"train.seq_len {self.train.seq_len} exceeds model.context {self.model.context}")
        if self.train.batch_size < 1 or self.train.backward_per_step < 1:
            raise ValueError("train.batch_size and train.backward_per_step must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["optim"]["betas"] = list(self.optim.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunManifest:
        """Build from a dict; unknown keys are ignored, missing ones take defaults."""
        optim = _pick(OptimConfig, d.get("optim", {}))
        if "betas" in optim:
            optim["betas"] = tuple(optim["betas"])
        return cls(
            name=str(d.get("name", "run")),
            model=ModelConfig.from_dict(d.get("model", {})),
            train=TrainConfig(**_pick(TrainConfig, d.get("train", {}))),
            optim=OptimConfig(**optim),
            data=DataConfig(**_pick(DataConfig, d.get("data", {}))),
            seed=int(d.get("seed", 0)),
        )

    @classmethod
    def load(cls, path: Path) -> RunManifest:
        text = path.read_text()
        d = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        return cls.from_dict(d)


def _pick(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in known}


# The model `iota swarm` trains: 4 layers in 3 stages, a 16x bottleneck, about 0.2M parameters.
TINY_MODEL = dict(
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
    model = ModelConfig(**TINY_MODEL, wire_dtype="float32")  # type: ignore[arg-type]
    train = TrainConfig(
        batch_size=8,
        seq_len=64,
        backward_per_step=2,
        merge_interval=10,
        merge_timeout_s=20.0,
        max_samples=max_samples,
        lease_s=20.0,
        work_timeout_s=30.0,
        max_inflight_per_head=3,
    )
    return RunManifest(
        name="tiny",
        model=model,
        train=train,
        optim=OptimConfig(lr=3e-3, weight_decay=0.01),
        data=DataConfig(source=data_source, shard_bytes=256 * 1024),
    )
