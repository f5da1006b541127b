"""The stage model in torch: pure functions of a weight dict, with the semantics of modelspec.stage_params.

Functions rather than an nn.Module so a forward keeps the exact weight tensors it used while the stage
steps or loads new ones (pipelining). Checked against MLX by `pytest tests/test_backend_parity.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from iota_cli.core.modelspec import ModelConfig, StageSpec, rope_tables

Weights = dict[str, Tensor]


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(cfg: ModelConfig, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin tables (seq_len, head_dim), float32, for rotate-half RoPE."""
    cos, sin = rope_tables(cfg, seq_len)
    shape = (seq_len, cfg.head_dim // 2)
    c = torch.tensor(cos, dtype=torch.float64).view(shape).float()
    s = torch.tensor(sin, dtype=torch.float64).view(shape).float()
    return torch.cat([c, c], -1).to(device), torch.cat([s, s], -1).to(device)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def attention(w: Weights, p: str, cfg: ModelConfig, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    b, t, _ = x.shape
    hd = cfg.head_dim
    q = F.linear(x, w[p + "q_proj.weight"]).view(b, t, cfg.n_heads, hd).transpose(1, 2)
    k = F.linear(x, w[p + "k_proj.weight"]).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
    v = F.linear(x, w[p + "v_proj.weight"]).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if q.dtype != v.dtype:  # rope promoted q, k to float32; attention runs in the compute dtype
        q, k = q.to(v.dtype), k.to(v.dtype)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.n_kv_heads != cfg.n_heads)
    return F.linear(o.transpose(1, 2).reshape(b, t, cfg.d_model), w[p + "o_proj.weight"])


def block(w: Weights, layer: int, cfg: ModelConfig, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    p = f"layers.{layer}."
    h = x + attention(
        w, p + "self_attn.", cfg, rms_norm(x, w[p + "input_layernorm.weight"], cfg.norm_eps), cos, sin
    )
    m = rms_norm(h, w[p + "post_attention_layernorm.weight"], cfg.norm_eps)
    gate, up = F.linear(m, w[p + "mlp.gate_proj.weight"]), F.linear(m, w[p + "mlp.up_proj.weight"])
    return h + F.linear(F.silu(gate) * up, w[p + "mlp.down_proj.weight"])


def stage_forward(
    w: Weights, cfg: ModelConfig, spec: StageSpec, x: Tensor, cos: Tensor, sin: Tensor
) -> Tensor:
    """Tokens (head) or a boundary tensor z (B,T,b) in; z out, or the tail's float32 logits."""
    b = cfg.bottleneck_dim
    if spec.kind == "head":
        h = F.embedding(x, w["embed_tokens.weight"])
    else:
        h = F.linear(x, w[f"bottleneck.{spec.index - 1}.up_proj.weight"]) + F.pad(x, (0, cfg.d_model - b))
    for layer in spec.layers:
        h = block(w, layer, cfg, h, cos, sin)
    if spec.kind == "tail":
        return F.linear(rms_norm(h, w["norm.weight"], cfg.norm_eps), w["lm_head.weight"]).float()
    n = rms_norm(h, w[f"bottleneck.{spec.index}.norm.weight"], cfg.norm_eps)
    return F.linear(n, w[f"bottleneck.{spec.index}.down_proj.weight"]) + h[..., :b].float()


def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long())
