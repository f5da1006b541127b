"""The stage model in MLX: pure functions of a weight dict, with the semantics of modelspec.stage_params.

The mirror of iota_torch/model.py line for line (torch autocast's casts are written out here), so the
two agree to float32 rounding; `pytest tests/test_backend_parity.py` checks that they do.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from iota_cli.core.modelspec import ModelConfig, StageSpec, rope_tables

Weights = dict[str, mx.array]


def rms_norm(x: mx.array, w: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x.astype(mx.float32), w, eps)


def linear(x: mx.array, w: mx.array, dtype: mx.Dtype) -> mx.array:
    return x.astype(dtype) @ w.astype(dtype).T


def rope(cfg: ModelConfig, seq_len: int) -> tuple[mx.array, mx.array]:
    """cos and sin tables (seq_len, head_dim), float32, for rotate-half RoPE."""
    cos, sin = rope_tables(cfg, seq_len)
    shape = (seq_len, cfg.head_dim // 2)
    c = np.asarray(cos, dtype=np.float64).reshape(shape).astype(np.float32)
    s = np.asarray(sin, dtype=np.float64).reshape(shape).astype(np.float32)
    return mx.array(np.concatenate([c, c], -1)), mx.array(np.concatenate([s, s], -1))


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return x * cos + mx.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def attention(w: Weights, p: str, cfg: ModelConfig, x: mx.array, cos: mx.array, sin: mx.array, dt: mx.Dtype):
    b, t, _ = x.shape
    hd = cfg.head_dim
    q = linear(x, w[p + "q_proj.weight"], dt).reshape(b, t, cfg.n_heads, hd).transpose(0, 2, 1, 3)
    k = linear(x, w[p + "k_proj.weight"], dt).reshape(b, t, cfg.n_kv_heads, hd).transpose(0, 2, 1, 3)
    v = linear(x, w[p + "v_proj.weight"], dt).reshape(b, t, cfg.n_kv_heads, hd).transpose(0, 2, 1, 3)
    q, k = apply_rope(q, cos, sin).astype(dt), apply_rope(k, cos, sin).astype(dt)
    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=hd**-0.5, mask="causal")
    return linear(o.transpose(0, 2, 1, 3).reshape(b, t, cfg.d_model), w[p + "o_proj.weight"], dt)


def block(w: Weights, layer: int, cfg: ModelConfig, x: mx.array, cos, sin, dt: mx.Dtype) -> mx.array:
    p = f"layers.{layer}."
    n = rms_norm(x, w[p + "input_layernorm.weight"], cfg.norm_eps)
    h = x + attention(w, p + "self_attn.", cfg, n, cos, sin, dt)
    m = rms_norm(h, w[p + "post_attention_layernorm.weight"], cfg.norm_eps)
    gate, up = linear(m, w[p + "mlp.gate_proj.weight"], dt), linear(m, w[p + "mlp.up_proj.weight"], dt)
    return h + linear(gate * mx.sigmoid(gate) * up, w[p + "mlp.down_proj.weight"], dt)


def stage_forward(
    w: Weights, cfg: ModelConfig, spec: StageSpec, x: mx.array, cos, sin, dt: mx.Dtype
) -> mx.array:
    """Tokens (head) or a boundary tensor z (B,T,b) in; z out, or the tail's float32 logits."""
    b = cfg.bottleneck_dim
    if spec.kind == "head":
        h = w["embed_tokens.weight"][x]
    else:
        up = linear(x, w[f"bottleneck.{spec.index - 1}.up_proj.weight"], dt)
        h = up + mx.pad(x, [(0, 0), (0, 0), (0, cfg.d_model - b)])
    for layer in spec.layers:
        h = block(w, layer, cfg, h, cos, sin, dt)
    if spec.kind == "tail":
        return linear(rms_norm(h, w["norm.weight"], cfg.norm_eps), w["lm_head.weight"], dt).astype(mx.float32)
    n = rms_norm(h, w[f"bottleneck.{spec.index}.norm.weight"], cfg.norm_eps)
    return linear(n, w[f"bottleneck.{spec.index}.down_proj.weight"], dt) + h[..., :b].astype(mx.float32)


def loss_fn(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean cross-entropy over every position."""
    lse = mx.logsumexp(logits, axis=-1)
    picked = mx.take_along_axis(logits, targets[..., None].astype(mx.int32), axis=-1)[..., 0]
    return (lse - picked).mean()
