"""Stage weights on the orchestrator: epoch 0 from the model spec's init and their expected shapes.

Weights travel as safetensors (iota_cli/core/tensors.py) in float32 under modelspec's names, so what a torch
worker uploads, an MLX worker loads. Merging is the replicas' job (publish.py only assembles their parts).
"""

from __future__ import annotations

from iota_cli.core.modelspec import ModelConfig, initial_weights, stage_params, stage_spec
from iota_cli.core.tensors import encode


def init_stage(cfg: ModelConfig, stage: int, seed: int) -> bytes:
    """Epoch-0 weights of a stage as safetensors bytes: the model spec's init, as every backend makes it."""
    return encode(initial_weights(cfg, stage, seed), {"stage": str(stage), "epoch": "0"})


def expected(cfg: ModelConfig, stage: int) -> dict[str, tuple[int, ...]]:
    return {p.name: p.shape for p in stage_params(cfg, stage_spec(cfg, stage))}
