"""Throughput of one training step of a stage: forward + backward + AdamW step, per backend and stage kind.

Run: .venv/bin/python bench/backend_step.py [--config tiny|default|1b] [--backends torch-cpu,mlx-cpu]
     [--batch 8] [--seq 256] [--iters 5] [--threads N] [--peak-tflops 989]
Each iteration does what a worker does with a work item: decode the input from safetensors bytes,
forward, encode the output; decode the gradient, backward, encode the input gradient; step. It prints
tokens/s and the share of time spent outside the framework's forward/backward/step (safetensors
encode/decode, RawTensor <-> framework copies, input checks). With --peak-tflops it also prints MFU
(model FLOPs: 3x the stage's forward matmul FLOPs per token).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from iota_cli.core import backend as bk
from iota_cli.core import stage as runner
from iota_cli.core.manifest import TINY_MODEL, OptimConfig
from iota_cli.core.modelspec import ModelConfig, forward_flops_per_token, param_count, stage_spec
from iota_cli.core.tensors import DTYPE_CODES, RawTensor, decode, encode

CONFIGS = {
    "tiny": TINY_MODEL.to_dict(),
    "default": {},
    # ~1B parameters in IOTA's 1B shape: d_model 2048, 64x bottleneck, 16 layers split 4/8/4.
    "1b": dict(
        d_model=2048,
        n_layers=16,
        n_heads=16,
        n_kv_heads=8,
        ffn_dim=8192,
        context=2048,
        bottleneck_dim=32,
        stages=(4, 8, 4),
        dtype="bfloat16",
    ),
}

OUTSIDE = 0.0  # seconds spent in the wrapped (non-compute) functions


def timed(fn: Callable[..., Any], sync: Callable[[], None] | None = None) -> Callable[..., Any]:
    def wrapper(*a: Any, **kw: Any) -> Any:
        global OUTSIDE
        if sync:
            sync()  # don't charge queued GPU work to the copy that waits for it
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            OUTSIDE += time.perf_counter() - t0

    return wrapper


def instrument(name: str) -> Callable[[], None]:
    """Wrap the backend kernel's RawTensor conversions; return the device sync to call around timings."""
    if name.startswith("torch"):
        import torch
        from iota_torch import stage as mod

        sync = torch.cuda.synchronize if name == "torch-cuda" else (lambda: None)
        mod.to_torch, mod.from_torch = timed(mod.to_torch, sync), timed(mod.from_torch, sync)
        return sync
    from iota_mlx import stage as mod

    mod.to_mx, mod.from_mx = timed(mod.to_mx), timed(mod.from_mx)
    return lambda: None


def random_inputs(cfg: ModelConfig, index: int, b: int, t: int) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(index)
    wire = DTYPE_CODES[cfg.wire_dtype]

    def floats() -> RawTensor:
        a = rng.standard_normal((b, t, cfg.bottleneck_dim)).astype(np.float32)
        if wire == "BF16":
            return RawTensor("BF16", a.shape, (a.view(np.uint32) >> 16).astype("<u2").tobytes())
        return RawTensor(wire, a.shape, a.astype("<f4" if wire == "F32" else "<f2").tobytes())

    ids = RawTensor("I32", (b, t), rng.integers(0, cfg.vocab_size, (b, t)).astype("<i4").tobytes())
    inp = {"tokens": ids} if index == 0 else {"activations": floats()}
    cot = {"targets": ids} if index == cfg.n_stages - 1 else {"grad": floats()}
    return encode(inp), encode(cot)


def bench_stage(
    name: str, cfg: ModelConfig, index: int, b: int, t: int, iters: int, sync
) -> dict[str, float]:
    global OUTSIDE
    stage = bk.get_factory(name).create(cfg, index, OptimConfig())
    inp_bytes, cot_bytes = random_inputs(cfg, index, b, t)
    enc_dec = timed(lambda x: decode(x)[0]), timed(encode)
    times, steps, outside = [], [], []
    for i in range(iters + 1):  # the first iteration warms up (allocations, kernel selection)
        OUTSIDE = 0.0
        sync()
        t0 = time.perf_counter()
        out = stage.forward("w", enc_dec[0](inp_bytes))
        enc_dec[1](out)
        r = stage.backward("w", enc_dec[0](cot_bytes))
        if r.grads:
            enc_dec[1](r.grads)
        sync()
        t1 = time.perf_counter()
        stage.step()
        sync()
        t2 = time.perf_counter()
        if i:
            times.append(t2 - t0)
            steps.append(t2 - t1)
            outside.append(OUTSIDE)
    total = float(np.median(times))
    return {
        "tokens_per_s": b * t / total,
        "ms": 1e3 * total,
        "step_ms": 1e3 * float(np.median(steps)),
        "outside": float(np.median(outside)) / total,
        "flops": 3 * forward_flops_per_token(cfg, stage_spec(cfg, index)) * b * t / total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="default")
    ap.add_argument("--backends", default="", help="comma-separated; default: every available backend")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per stage (after one warm-up)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="override the config's compute dtype")
    ap.add_argument("--wire-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument(
        "--peak-tflops", type=float, default=0.0, help="device peak for MFU (H100 bf16 dense: 989)"
    )
    args = ap.parse_args()

    over = dict(CONFIGS[args.config], wire_dtype=args.wire_dtype)
    if args.dtype:
        over["dtype"] = args.dtype
    cfg = ModelConfig(**over)
    seq = min(args.seq, cfg.context)
    names = [n for n in args.backends.split(",") if n] or [i.name for i in bk.list_backends() if i.available]
    runner.check_forward_inputs = timed(runner.check_forward_inputs)
    runner.check_backward_grads = timed(runner.check_backward_grads)
    print(
        f"config {args.config}: d_model {cfg.d_model}, layers {list(cfg.stages)}, {param_count(cfg):,} params"
        f"\n  {cfg.dtype} compute, {cfg.wire_dtype} wire; batch {args.batch}x{seq}; median of {args.iters}"
    )
    print(
        f"{'backend':11s} {'stage':5s} {'params':>12s} {'tokens/s':>10s} {'ms/iter':>9s} {'step ms':>8s}"
        f" {'outside':>8s} {'TFLOP/s':>8s}" + ("  MFU" if args.peak_tflops else "")
    )
    for name in names:
        if args.threads and name.startswith("torch"):
            import torch

            torch.set_num_threads(args.threads)
        sync = instrument(name)
        for index in range(cfg.n_stages):
            r = bench_stage(name, cfg, index, args.batch, seq, args.iters, sync)
            spec = stage_spec(cfg, index)
            line = (
                f"{name:11s} {spec.kind:5s} {param_count(cfg, spec):>12,} {r['tokens_per_s']:>10,.0f}"
                f" {r['ms']:>9.1f} {r['step_ms']:>8.1f} {100 * r['outside']:>7.1f}% {r['flops'] / 1e12:>8.3f}"
            )
            if args.peak_tflops:
                line += f" {100 * r['flops'] / (args.peak_tflops * 1e12):>5.1f}%"
            print(line, flush=True)


if __name__ == "__main__":
    main()
