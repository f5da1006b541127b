"""Bytes across a stage boundary against held-out loss: how narrow (and how coarse) the wire can get.

One process, torch-cpu, one replica of each stage chained (bench/chain_reference.py's start and
train_sample), every configuration trained on the same tokens (the orchestrator's sample order over the
training files of bench/heldout.py's split) for the same optimizer steps, then scored by bench/heldout.py's
Evaluator on the held-out text. Configurations are (bottleneck_dim, wire):
  - the uncompressed reference: bottleneck_dim = d_model, float32 on the wire;
  - bfloat16 (a real wire dtype: the stages themselves cast) at 16x, 32x and 64x width;
  - int8, simulated here only: every float tensor crossing a boundary (the activations forward, the
    gradient back) is quantized and dequantized between the stages, so the receiving stage sees what an
    int8 wire would deliver and the gradient passes straight through the rounding. Two scale layouts:
    "int8-tok", one float16 scale per token (a row of b values), and "int8-seq", one float16 scale per
    channel per sequence (a row of T values). Scales are absmax / 127, symmetric, round to nearest.
bytes_per_token is what one direction of one boundary carries per token (the gradient back is the same
size again), scales included; ratio is d_model * 4 (the float32 hidden state) over it; loss_cost is the
held-out loss over the reference's, minus one. Then zstd (python-zstandard, when installed; zlib and
lzma from the stdlib beside it) on a token batch, a bfloat16 activation blob and a weights blob.

Prints a table, then one JSON line:
  {"configs": [{"bottleneck_dim", "wire", "bytes_per_token", "ratio", "heldout_loss", "loss_cost"}],
   "zstd": {"available", "blobs": [{"blob", "bytes", "codec", "ratio", "compress_MBps",
   "decompress_MBps"}]}}

    .venv/bin/python bench/boundary_bytes.py [--steps 150] [--only ref,bf16-32x] [--data DIR]

Losses are deterministic (one thread, fixed seeds and sample order); times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import lzma
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from chain_reference import start
from convergence_sim import MODEL, Plan, reference
from heldout import Evaluator, TrainStream, heldout_batches, link_tree, split_corpus

from iota_cli.core.backend import BackwardResult, StageBackend
from iota_cli.core.flat import FlatLayout
from iota_cli.core.manifest import MergeConfig
from iota_cli.core.tensors import RawTensor, TensorDict
from iota_cli.swarm.corpus import default_data

D_MODEL = 128  # convergence_sim's calibration model: 4 layers in 3 stages
WIRE_BYTES = {"float32": 4, "bfloat16": 2, "int8-tok": 1, "int8-seq": 1}
SCALE_BYTES = 2  # a float16 scale


@dataclass(frozen=True)
class Variant:
    name: str
    bottleneck_dim: int
    wire: str  # float32, bfloat16, int8-tok, int8-seq

    def bytes_per_token(self, seq: int) -> float:
        b = self.bottleneck_dim
        if self.wire == "int8-tok":
            return b + SCALE_BYTES
        if self.wire == "int8-seq":
            return b + SCALE_BYTES * b / seq
        return float(b * WIRE_BYTES[self.wire])


VARIANTS = (
    Variant("ref", D_MODEL, "float32"),
    Variant("bf16-16x", D_MODEL // 16, "bfloat16"),
    Variant("bf16-32x", D_MODEL // 32, "bfloat16"),
    Variant("bf16-64x", D_MODEL // 64, "bfloat16"),
    Variant("f32-32x", D_MODEL // 32, "float32"),  # controls: the width alone, no wire rounding
    Variant("f32-64x", D_MODEL // 64, "float32"),
    Variant("int8seq-32x", D_MODEL // 32, "int8-seq"),
    Variant("int8tok-32x", D_MODEL // 32, "int8-tok"),
    Variant("int8seq-64x", D_MODEL // 64, "int8-seq"),
)


# --- the simulated int8 wire -------------------------------------------------------------------------


def fake_int8(x: np.ndarray, axis: int) -> np.ndarray:
    """x quantized to int8 with a symmetric float16 absmax scale along `axis`, then dequantized."""
    scale = (np.abs(x).max(axis=axis, keepdims=True) / 127.0).astype(np.float16).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(x / scale), -127, 127)
    return (q * scale).astype(np.float32)


def int8_round(t: RawTensor, wire: str) -> RawTensor:
    """A (B, T, b) float32 tensor as an int8 wire delivers it: scale per token or per channel and sequence."""
    if t.dtype != "F32" or len(t.shape) != 3:  # the head's proof vector is not on the boundary
        return t
    x = np.frombuffer(t.data, dtype=np.float32).reshape(t.shape)
    y = fake_int8(x, axis=-1 if wire == "int8-tok" else -2)
    return RawTensor("F32", t.shape, y.tobytes())


class Int8Wire:
    """A stage whose float outputs (activations forward, the gradient back) go through fake_int8."""

    def __init__(self, inner: StageBackend, wire: str):
        self.inner, self.wire = inner, wire
        self.name = inner.name

    def _round(self, d: TensorDict) -> TensorDict:
        return {k: int8_round(v, self.wire) for k, v in d.items()}

    def forward(self, work_id: str, inputs: TensorDict) -> TensorDict:
        return self._round(self.inner.forward(work_id, inputs))

    def backward(self, work_id: str, grads: TensorDict) -> BackwardResult:
        r = self.inner.backward(work_id, grads)
        return replace(r, grads=None if r.grads is None else self._round(r.grads))

    def step(self) -> float:
        return self.inner.step()

    def load(self, weights: TensorDict) -> None:
        self.inner.load(weights)

    def weights(self) -> TensorDict:
        return self.inner.weights()


def wrap(stages: list[StageBackend], wire: str) -> list[Any]:
    return [Int8Wire(s, wire) for s in stages] if wire.startswith("int8") else list(stages)


# --- training and scoring ----------------------------------------------------------------------------


def model_of(v: Variant) -> Any:
    wire = v.wire if v.wire in ("float32", "bfloat16") else "float32"
    return replace(MODEL, bottleneck_dim=v.bottleneck_dim, wire_dtype=wire)


def train(plan: Plan, stream: TrainStream, v: Variant) -> list[TensorDict]:
    """convergence_sim.reference, the chain wrapped in the variant's wire."""
    return reference(plan, stream, lambda stages: wrap(stages, v.wire))


def heldout_loss(plan: Plan, batches: list[np.ndarray], v: Variant, weights: list[TensorDict]) -> float:
    ev = Evaluator(plan.model, batches, plan.backend)
    ev.stages = wrap(ev.stages, v.wire)
    return ev.loss(weights)


# --- zstd and friends on the blobs a run ships ---------------------------------------------------------


def codecs() -> tuple[bool, dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]]]:
    out: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {}
    try:
        import zstandard  # type: ignore[import-not-found]

        for level in (1, 3, 9):
            c, d = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
            out[f"zstd-{level}"] = (c.compress, d.decompress)
        have = True
    except ImportError:
        have = False
    out["zlib-1"] = (lambda b: zlib.compress(b, 1), zlib.decompress)
    out["zlib-6"] = (lambda b: zlib.compress(b, 6), zlib.decompress)
    out["lzma-0"] = (lambda b: lzma.compress(b, preset=0), lzma.decompress)
    return have, out


def timed(f: Callable[[bytes], bytes], data: bytes) -> tuple[bytes, float]:
    best, out = float("inf"), b""
    for _ in range(3):
        t0 = time.perf_counter()
        out = f(data)
        best = min(best, time.perf_counter() - t0)
    return out, best


def blobs(plan: Plan, stream: TrainStream, weights: list[TensorDict]) -> dict[str, bytes]:
    """What a run ships: a work item's tokens (int32, as RawTensor carries them), one boundary's bf16
    activations from the trained model, and a stage's float32 weights (flattened as a merge sends them)."""
    tokens = stream.sample(0)
    stages = start(plan.manifest("", 1, MergeConfig()), plan.backend)
    for s, w in zip(stages, weights, strict=True):
        s.load(w)
    b, t = tokens.shape[0], tokens.shape[1] - 1
    x = {"tokens": RawTensor("I32", (b, t), np.ascontiguousarray(tokens[:, :-1]).tobytes())}
    act = stages[0].forward("z", x)["activations"]
    a32 = np.frombuffer(act.data, dtype=np.float32) if act.dtype == "F32" else None
    bf16 = (
        torch.from_numpy(a32.copy()).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
        if a32 is not None
        else act.data
    )
    flat = FlatLayout.of(plan.model, 1).flatten(weights[1]).astype(np.float32)
    return {
        "tokens-i32": np.ascontiguousarray(tokens, dtype=np.int32).tobytes(),
        "tokens-u8": np.ascontiguousarray(tokens, dtype=np.uint8).tobytes(),
        "activations-bf16": bf16,
        "weights-f32": flat.tobytes(),
    }


def measure_zstd(plan: Plan, stream: TrainStream, weights: list[TensorDict]) -> dict[str, Any]:
    have, cs = codecs()
    rows = []
    for name, data in blobs(plan, stream, weights).items():
        for codec, (comp, decomp) in cs.items():
            packed, tc = timed(comp, data)
            back, td = timed(decomp, packed)
            assert back == data
            mb = len(data) / 1e6
            rows.append(
                {
                    "blob": name,
                    "bytes": len(data),
                    "codec": codec,
                    "ratio": round(len(data) / len(packed), 3),
                    "compress_MBps": round(mb / tc, 1),
                    "decompress_MBps": round(mb / td, 1),
                }
            )
    return {"available": have, "blobs": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=default_data(), help="a directory or glob of text files")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per configuration")
    ap.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    split = split_corpus(args.data)
    print(split.describe(), flush=True)
    plan = Plan(steps=args.steps, global_batch=args.global_batch)
    batches = heldout_batches(split.heldout, plan.eval_batches, plan.batch, plan.seq)
    wanted = [v for v in VARIANTS if not args.only or v.name in args.only.split(",")]
    if wanted[0].name != "ref":
        wanted = [VARIANTS[0], *wanted]
    with tempfile.TemporaryDirectory() as tmp:
        train_dir = str(link_tree(split, Path(tmp) / "train"))
        stream = TrainStream(plan.manifest(train_dir, 1, MergeConfig()), train_dir)
        print(f"{plan.steps} steps x {plan.global_batch} x {plan.seq} tokens per configuration", flush=True)
        rows: list[dict[str, Any]] = []
        ref_loss, ref_weights = 0.0, None
        for v in wanted:
            p = replace(plan, model=model_of(v))
            t0 = time.time()
            weights = train(p, stream, v)
            loss = heldout_loss(p, batches, v, weights)
            if v.name == "ref":
                ref_loss, ref_weights = loss, weights
            bpt = v.bytes_per_token(plan.seq)
            row: dict[str, Any] = {
                "name": v.name,
                "bottleneck_dim": v.bottleneck_dim,
                "wire": v.wire,
                "bytes_per_token": round(bpt, 3),
                "ratio": round(D_MODEL * 4 / bpt, 2),
                "heldout_loss": round(loss, 5),
                "loss_cost": round(loss / ref_loss - 1, 5),
            }
            rows.append(row)
            print(
                f"{v.name:12s} b={v.bottleneck_dim:<4d} {v.wire:9s} {bpt:8.2f} B/token "
                f"{row['ratio']:7.1f}x  held-out {loss:.4f}  cost {100 * row['loss_cost']:+6.2f}%  "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
        z = measure_zstd(replace(plan, model=model_of(VARIANTS[0])), stream, ref_weights or [])
    print()
    print(
        f"{'config':12s} {'b':>4s} {'wire':9s} {'B/token':>8s} {'vs f32 h':>9s} {'held-out':>9s} {'cost':>8s}"
    )
    for r in rows:
        print(
            f"{r['name']:12s} {r['bottleneck_dim']:4d} {r['wire']:9s} {r['bytes_per_token']:8.2f} "
            f"{r['ratio']:8.1f}x {r['heldout_loss']:9.4f} {100 * r['loss_cost']:+7.2f}%"
        )
    print(f"\nzstd installed: {z['available']}")
    print(f"{'blob':18s} {'bytes':>9s} {'codec':8s} {'ratio':>6s} {'comp MB/s':>10s} {'dec MB/s':>9s}")
    for r in z["blobs"]:
        print(
            f"{r['blob']:18s} {r['bytes']:9d} {r['codec']:8s} {r['ratio']:6.2f} "
            f"{r['compress_MBps']:10.1f} {r['decompress_MBps']:9.1f}"
        )
    print(json.dumps({"configs": rows, "zstd": z}))


if __name__ == "__main__":
    main()
