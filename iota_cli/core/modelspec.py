"""The framework-agnostic model: config, stage split, and the name, shape and init of every parameter.

Every backend builds its stage from this spec and stores weights under these names, so a stage trained
on MLX loads in torch and the two can be merged. Run `python -m iota_cli.core.modelspec` to print the default
config's stages and sizes.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass as plain_dataclass
from typing import Any, Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from iota_cli.core import schema
from iota_cli.core.tensors import RawTensor, TensorDict

StageKind = Literal["head", "body", "tail"]

# Byte-level tokenizer: ids 0..255 are bytes, then a few specials. No download is ever needed.
BYTE_VOCAB = 256
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<unk>")
BOS_ID, EOS_ID, PAD_ID, UNK_ID = range(BYTE_VOCAB, BYTE_VOCAB + len(SPECIAL_TOKENS))


@dataclass(frozen=True, config=ConfigDict(extra="ignore"))
class ModelConfig:
    """A Llama-style decoder split into pipeline stages joined by bottlenecks.

    A pydantic dataclass: built from a dict with from_dict (unknown keys ignored, so old clients survive new
    servers), checked once on construction, and passed around as this type.
    """

    vocab_size: int = Field(
        default=BYTE_VOCAB + len(SPECIAL_TOKENS), ge=1, le=1 << 24, description="token ids the model embeds"
    )
    d_model: int = Field(default=512, ge=1, le=1 << 16, description="width of the residual stream")
    n_layers: int = Field(default=8, ge=0, le=1024, description="transformer blocks in the whole model")
    n_heads: int = Field(default=8, ge=1, le=1024, description="query heads per block")
    n_kv_heads: int = Field(
        default=4, ge=1, le=1024, description="key/value heads per block (grouped-query attention)"
    )
    ffn_dim: int = Field(
        default=1408, ge=1, le=1 << 18, description="hidden width of the SwiGLU feed-forward"
    )
    context: int = Field(default=256, ge=1, le=1 << 20, description="longest sequence the model is built for")
    # 32x narrower than d_model, in int8: 128x fewer bytes than the float32 residual stream, at about half
    # the held-out loss cost of bfloat16 at 64x (the same bytes; bench/boundary_bytes.py, docs/model.md).
    bottleneck_dim: int = Field(
        default=16,
        ge=1,
        le=1 << 16,
        description="width of what crosses a stage boundary; d_model / bottleneck_dim is the compression",
    )
    rope_theta: float = Field(
        default=10000.0, gt=1.0, le=1e12, description="base of the rotary embedding angles"
    )
    norm_eps: float = Field(default=1e-5, gt=0.0, lt=1.0, description="RMSNorm epsilon")
    dtype: str = Field(
        default="float32",
        description="compute dtype (float32, bfloat16, float16); master weights are float32",
    )
    wire_dtype: str = Field(
        default="int8",
        description="dtype of activations and gradients on the wire: float32, bfloat16, float16, or int8 "
        "(float32 in the stages, quantized per channel and sequence for the wire: core/wire.py)",
    )
    tokenizer: str = Field(default="bytes", description="'bytes', or the path of a tokenizers tokenizer.json")
    stages: tuple[int, ...] = Field(
        default=(), description="layers per stage: head, body..., tail (empty: split_layers(n_layers, 3))"
    )
    init_std: float = Field(default=0.02, gt=0.0, le=1.0, description="standard deviation of the normal init")

    def __post_init__(self) -> None:
        if not self.stages:
            object.__setattr__(self, "stages", split_layers(self.n_layers, 3))
        problems = validate(self)
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def wire_bytes_ratio(self) -> float:
        """How many times fewer bytes a boundary tensor is on the wire than the float32 residual stream
        (int8's scales and zstd not counted: a few percent either way)."""
        return self.d_model * 4 / (self.bottleneck_dim * WIRE_BYTES[self.wire_dtype])

    @property
    def boundary_dtype(self) -> str:
        """The dtype a stage's boundary tensors have in memory (an int8 wire dequantizes to float32)."""
        return "float32" if self.wire_dtype == "int8" else self.wire_dtype

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    @property
    def compression(self) -> float:
        """How many times narrower a boundary activation is than the residual stream (same dtype)."""
        return self.d_model / self.bottleneck_dim

    def to_dict(self) -> dict[str, Any]:
        return schema.dump(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return schema.parse(cls, d)


def validate(cfg: ModelConfig) -> list[str]:
    """Every reason this config cannot be built (empty when it can)."""
    p = []
    if cfg.d_model % cfg.n_heads:
        p.append(f"d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")
    elif cfg.head_dim % 2:
        p.append(f"head_dim {cfg.head_dim} must be even for rotary embeddings")
    if cfg.n_heads % cfg.n_kv_heads:
        p.append(f"n_heads {cfg.n_heads} is not divisible by n_kv_heads {cfg.n_kv_heads}")
    if not 0 < cfg.bottleneck_dim <= cfg.d_model:
        p.append(f"bottleneck_dim {cfg.bottleneck_dim} must be in 1..d_model")
    if len(cfg.stages) < 2:
        p.append("a model needs at least two stages (head and tail)")
    if sum(cfg.stages) != cfg.n_layers or any(n < 0 for n in cfg.stages):
        p.append(f"stages {list(cfg.stages)} must be non-negative and sum to n_layers {cfg.n_layers}")
    if cfg.vocab_size < 1 or cfg.context < 1:
        p.append("vocab_size and context must be positive")
    if cfg.tokenizer == "bytes" and cfg.vocab_size <= EOS_ID:
        p.append(f"vocab_size must exceed {EOS_ID} for the byte tokenizer (bytes, then the special tokens)")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        p.append("dtype must be float32, bfloat16 or float16")
    if cfg.wire_dtype not in ("float32", "bfloat16", "float16", "int8"):
        p.append("wire_dtype must be float32, bfloat16, float16 or int8")
    return p


def split_layers(n_layers: int, n_stages: int) -> tuple[int, ...]:
    """Split layers so end stages get one fewer than middle ones (they carry embedding and LM head)."""
    if n_stages < 2:
        raise ValueError("need at least two stages")
    if n_stages == 2:
        return (n_layers - n_layers // 2, n_layers // 2)
    # Solve 2*(m-1) + (n_stages-2)*m ~= n_layers for the middle size m, then spread the remainder.
    m = max(1, round((n_layers + 2) / n_stages))
    sizes = [max(m - 1, 0)] + [m] * (n_stages - 2) + [max(m - 1, 0)]
    i = 1
    while sum(sizes) < n_layers:
        sizes[i % n_stages] += 1
        i += 1
    while sum(sizes) > n_layers:
        sizes[max(range(n_stages), key=lambda k: sizes[k])] -= 1
    return tuple(sizes)


@plain_dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    init: Literal["normal", "ones", "zeros"] = "normal"
    std: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@plain_dataclass(frozen=True)
class StageSpec:
    """One stage: its place in the pipeline and the global indices of its blocks."""

    index: int
    n_stages: int
    layers: tuple[int, ...]

    @property
    def kind(self) -> StageKind:
        if self.index == 0:
            return "head"
        return "tail" if self.index == self.n_stages - 1 else "body"


def stage_specs(cfg: ModelConfig) -> list[StageSpec]:
    out, start = [], 0
    for i, n in enumerate(cfg.stages):
        out.append(StageSpec(i, cfg.n_stages, tuple(range(start, start + n))))
        start += n
    return out


def stage_spec(cfg: ModelConfig, index: int) -> StageSpec:
    if not 0 <= index < cfg.n_stages:
        raise ValueError(f"stage {index} out of range 0..{cfg.n_stages - 1}")
    return stage_specs(cfg)[index]


def block_params(cfg: ModelConfig, layer: int) -> list[ParamSpec]:
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn_dim
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    p = f"layers.{layer}."
    return [
        ParamSpec(p + "input_layernorm.weight", (d,), "ones"),
        ParamSpec(p + "self_attn.q_proj.weight", (cfg.n_heads * hd, d), "normal", std),
        ParamSpec(p + "self_attn.k_proj.weight", (cfg.n_kv_heads * hd, d), "normal", std),
        ParamSpec(p + "self_attn.v_proj.weight", (cfg.n_kv_heads * hd, d), "normal", std),
        ParamSpec(p + "self_attn.o_proj.weight", (d, cfg.n_heads * hd), "normal", out_std),
        ParamSpec(p + "post_attention_layernorm.weight", (d,), "ones"),
        ParamSpec(p + "mlp.gate_proj.weight", (f, d), "normal", std),
        ParamSpec(p + "mlp.up_proj.weight", (f, d), "normal", std),
        ParamSpec(p + "mlp.down_proj.weight", (d, f), "normal", out_std),
    ]


def stage_params(cfg: ModelConfig, stage: StageSpec) -> list[ParamSpec]:
    """Parameters of a stage in forward order.

    Forward (identical in every backend):
      head:  x = embed_tokens[tokens]
      other: x = up_proj(z) + pad(z)      # z (B,T,b) from the previous stage; pad adds z to channels [:b]
      x = block(x) for each layer
      head/body: z = down_proj(rmsnorm(x)) + x[..., :b]   -> sent to the next stage
      tail:      logits = lm_head(rmsnorm(x)); loss = mean cross-entropy over all B*T targets
    The `+ x[..., :b]` / `+ pad(z)` pair is the narrow residual path that crosses every boundary.
    block(x): h = x + o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))), n = rmsnorm(x);
              out = h + down_proj(silu(gate_proj(m)) * up_proj(m)), m = rmsnorm(h).
    attn is causal softmax(q k^T / sqrt(head_dim)) v with n_heads // n_kv_heads query heads per kv head;
    rope rotates halves (x * cos + cat(-x2, x1) * sin) with the tables of rope_tables.
    rmsnorm(x) = x * rsqrt(mean(x^2) + norm_eps) * weight, in float32. The residual stream and the
    boundary tensors are float32; matmuls and attention run in cfg.dtype (inputs cast, as autocast does).
    """
    d, b, std = cfg.d_model, cfg.bottleneck_dim, cfg.init_std
    ps: list[ParamSpec] = []
    if stage.kind == "head":
        ps.append(ParamSpec("embed_tokens.weight", (cfg.vocab_size, d), "normal", std))
    else:
        ps.append(ParamSpec(f"bottleneck.{stage.index - 1}.up_proj.weight", (d, b), "normal", std))
    for layer in stage.layers:
        ps.extend(block_params(cfg, layer))
    if stage.kind == "tail":
        ps.append(ParamSpec("norm.weight", (d,), "ones"))
        ps.append(ParamSpec("lm_head.weight", (cfg.vocab_size, d), "normal", std))
    else:
        ps.append(ParamSpec(f"bottleneck.{stage.index}.norm.weight", (d,), "ones"))
        ps.append(ParamSpec(f"bottleneck.{stage.index}.down_proj.weight", (b, d), "normal", std))
    return ps


def param_count(cfg: ModelConfig, stage: StageSpec | None = None) -> int:
    stages = [stage] if stage else stage_specs(cfg)
    return sum(p.numel for s in stages for p in stage_params(cfg, s))


def forward_flops_per_token(cfg: ModelConfig, stage: StageSpec) -> float:
    """Matmul FLOPs of one token through the stage's forward (2 per multiply-add, attention included)."""
    matmul = sum(p.numel for p in stage_params(cfg, stage) if p.init == "normal")
    if stage.kind == "head":
        matmul -= cfg.vocab_size * cfg.d_model  # the embedding is a lookup
    attn = 2 * 2 * cfg.context * cfg.d_model * len(stage.layers) / 2  # QK^T and AV, causal half
    return 2.0 * matmul + attn


def initial_weights(cfg: ModelConfig, stage: StageSpec | int, seed: int = 0) -> TensorDict:
    """Fresh float32 weights from each ParamSpec: the one init, used by every backend and the orchestrator.

    Each parameter draws from its own generator seeded by (seed, crc32(name)), so its bytes depend only on
    the seed and its name: the same model whatever the stage split, and the same bytes in every backend.
    """
    import numpy as np  # the backends and the orchestrator, its only callers, depend on numpy

    out = {}
    for p in stage_params(cfg, _as_stage(cfg, stage)):
        if p.init == "normal":
            rng = np.random.default_rng([seed, zlib.crc32(p.name.encode())])
            a = rng.standard_normal(p.shape, dtype=np.float32) * np.float32(p.std)
        else:
            a = np.full(p.shape, 1.0 if p.init == "ones" else 0.0, dtype=np.float32)
        out[p.name] = RawTensor("F32", p.shape, a.astype("<f4").tobytes())
    return out


def rope_tables(cfg: ModelConfig, seq_len: int) -> tuple[list[float], list[float]]:
    """cos and sin of the RoPE angles pos * rope_theta^(-2i/head_dim), (seq_len, head_dim/2) row-major.

    Computed in float64 here so every backend rounds the same numbers to float32.
    """
    half = cfg.head_dim // 2
    inv = [cfg.rope_theta ** (-2.0 * i / cfg.head_dim) for i in range(half)]
    angles = [t * f for t in range(seq_len) for f in inv]
    return [math.cos(a) for a in angles], [math.sin(a) for a in angles]


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
WIRE_BYTES = {**DTYPE_BYTES, "int8": 1}


def _as_stage(cfg: ModelConfig, stage: StageSpec | int) -> StageSpec:
    return stage if isinstance(stage, StageSpec) else stage_spec(cfg, stage)


def saved_bytes_per_token(cfg: ModelConfig, stage: StageSpec | int) -> int:
    """Bytes autograd keeps per token of one in-flight item (norms in float32, the rest in cfg.dtype)."""
    s = _as_stage(cfg, stage)
    a, d, f = DTYPE_BYTES[cfg.dtype], cfg.d_model, cfg.ffn_dim
    kv = cfg.n_kv_heads * cfg.head_dim
    # A float32 RMSNorm keeps x, x*rstd and rstd; each matmul reading its output keeps its own cast.
    norm = 2 * 4 * d + 4
    reads = (1, 1) if a == 4 else (3, 2)  # autocast casts the norm's output once per q/k/v and gate/up
    attn = norm + a * d * reads[0] + a * (3 * d + 2 * kv) + 4 * cfg.n_heads  # q, k, v, out, o_proj in, lse
    mlp = norm + a * d * reads[1] + a * 4 * f  # gate, up, silu(gate) and the down_proj input
    per = len(s.layers) * (attn + mlp) + norm + a * d
    if s.kind == "tail":
        per += (4 + a) * cfg.vocab_size  # the logits and their float32 log-softmax
    if s.kind != "head":
        per += (4 + a) * cfg.bottleneck_dim  # the incoming boundary tensor and up_proj's cast of it
    return per


def estimate_memory(
    cfg: ModelConfig, stage: StageSpec | int, batch_size: int, seq_len: int, in_flight: int = 1
) -> int:
    """Bytes to train a stage: float32 weights, grads and two AdamW moments, plus per in-flight item
    of (batch_size, seq_len) its saved activations (and, at 16-bit compute, its cast copy of the weights),
    plus the transient peak of one backward. Excludes the framework's own overhead (a CUDA context ~0.5 GB).
    """
    s = _as_stage(cfg, stage)
    params = param_count(cfg, s)
    tokens = batch_size * seq_len
    per_item = tokens * saved_bytes_per_token(cfg, s)
    if cfg.dtype != "float32":
        matrices = sum(p.numel for p in stage_params(cfg, s) if len(p.shape) >= 2 and "embed" not in p.name)
        per_item += matrices * DTYPE_BYTES[cfg.dtype]
    # One backward at a time: attention scores when no fused kernel is used, or the tail's logit grads.
    scores = batch_size * cfg.n_heads * seq_len * seq_len * 4 if s.layers else 0
    logits = 2 * tokens * cfg.vocab_size * 4 if s.kind == "tail" else 0
    transient = max(scores, logits, per_item // max(len(s.layers), 1))
    return 4 * 4 * params + max(in_flight, 0) * per_item + transient


def _main() -> None:
    cfg = ModelConfig()
    print(f"default config: {cfg.n_layers} layers, d_model {cfg.d_model}, compression {cfg.compression:.0f}x")
    for s in stage_specs(cfg):
        mib = estimate_memory(cfg, s, 8, cfg.context) / 2**20
        print(
            f"  stage {s.index} {s.kind:4s} layers {list(s.layers)} params {param_count(cfg, s):,}"
            f"  memory at batch 8 x {cfg.context}: {mib:,.0f} MiB"
        )
    print(f"  total params {param_count(cfg):,}")


if __name__ == "__main__":
    _main()
