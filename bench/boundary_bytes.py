"""Bytes across a stage boundary against held-out loss: how narrow (and how coarse) the wire can get.

One process, torch-cpu, one replica of each stage chained (bench/chain_reference.py's start and
train_sample), every configuration trained on the same tokens (the orchestrator's sample order over the
training files of bench/heldout.py's split) for the same optimizer steps, then scored by bench/heldout.py's
Evaluator on the held-out text. Configurations are (bottleneck_dim, wire):
  - the uncompressed reference: bottleneck_dim = d_model, float32 on the wire;
  - bfloat16 (a real wire dtype: the stages themselves cast) at 16x, 32x and 64x width;
  - int8: every float tensor crossing a boundary (the activations forward, the gradient back) is
    quantized and dequantized between the stages, so the receiving stage sees what the int8 wire
    delivers and the gradient passes straight through the rounding. Two scale layouts: "int8-seq", one
    float32 scale per channel per sequence (a row of T values), is the product's wire
    (model.wire_dtype = "int8", core.wire.quantize: the same code); "int8-tok", one float16 scale per
    token (a row of b values), is simulated here only. Scales are absmax / 127, symmetric, to nearest.
bytes_per_token is what one direction of one boundary carries per token (the gradient back is the same
size again), scales included; ratio is d_model * 4 (the float32 hidden state) over it; loss_cost is the
held-out loss over the reference's, minus one. blob_bytes_per_token and zstd_bytes_per_token weigh the
trained model's own boundary tensors (activations and gradients of a few training samples) as the blobs a
worker uploads: safetensors as they are, and zstd-framed as core.wire frames them (train.wire_codec's
default; lossless, so its loss is the variant's); zstd_ratio is d_model * 4 over the latter. Then zstd
(python-zstandard; zlib and lzma from the stdlib beside it) on a token batch, a bfloat16 activation blob
and a weights blob.

Prints a table, then one JSON line:
  {"configs": [{"bottleneck_dim", "wire", "bytes_per_token", "ratio", "blob_bytes_per_token",
   "zstd_bytes_per_token", "zstd_ratio", "heldout_loss", "loss_cost"}],
   "zstd": {"available", "blobs": [{"blob", "bytes", "codec", "ratio", "compress_MBps",
   "decompress_MBps"}]}}

    .venv/bin/python bench/boundary_bytes.py [--steps 150] [--only ref,bf16-32x] [--data DIR]
        [--d-model 256] [--seed 1]   (another width: head_dim 32, the same ffn ratio; another init)

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
from chain_reference import start, train_sample
from convergence_sim import MODEL, Plan, reference
from heldout import Evaluator, TrainStream, heldout_batches, link_tree, split_corpus

from iota_cli.core import wire as wire_mod
from iota_cli.core.backend import BackwardResult, StageBackend
from iota_cli.core.flat import FlatLayout
from iota_cli.core.manifest import MergeConfig
from iota_cli.core.tensors import RawTensor, TensorDict, encode
from iota_cli.swarm.corpus import default_data

WIRE_BYTES = {"float32": 4, "bfloat16": 2, "int8-tok": 1, "int8-seq": 1}
SCALE_BYTES = {"int8-tok": 2, "int8-seq": 4}  # a float16 scale per token; the product's float32 ones


@dataclass(frozen=True)
class Variant:
    name: str
    bottleneck_dim: int
    wire: str  # float32, bfloat16, int8-tok, int8-seq

    def bytes_per_token(self, seq: int) -> float:
        b = self.bottleneck_dim
        if self.wire == "int8-tok":
            return b + SCALE_BYTES["int8-tok"]
        if self.wire == "int8-seq":
            return b + SCALE_BYTES["int8-seq"] * b / seq
        return float(b * WIRE_BYTES[self.wire])


# name, width divisor (d_model // it crosses the boundary), wire
WIDTHS = (
    ("ref", 1, "float32"),
    ("bf16-16x", 16, "bfloat16"),
    ("bf16-32x", 32, "bfloat16"),
    ("bf16-64x", 64, "bfloat16"),
    ("f32-32x", 32, "float32"),  # controls: the width alone, no wire rounding
    ("f32-64x", 64, "float32"),
    ("int8seq-32x", 32, "int8-seq"),
    ("int8tok-32x", 32, "int8-tok"),
    ("int8seq-64x", 64, "int8-seq"),
)


def variants(d_model: int) -> list[Variant]:
    return [Variant(name, d_model // k, w) for name, k, w in WIDTHS]


def model_at(d_model: int) -> Any:
    """convergence_sim's model at another width: head_dim 32, the same ffn ratio, 4 layers in 1+2+1."""
    heads = max(1, d_model // 32)
    ffn = MODEL.ffn_dim * d_model // MODEL.d_model
    return replace(MODEL, d_model=d_model, n_heads=heads, n_kv_heads=max(1, heads // 2), ffn_dim=ffn)


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
    if wire == "int8-seq":  # the product's int8 wire (model.wire_dtype = "int8")
        return wire_mod.dequantize(wire_mod.quantize({"x": t}))["x"]
    x = np.frombuffer(t.data, dtype=np.float32).reshape(t.shape)
    return RawTensor("F32", t.shape, fake_int8(x, axis=-1).tobytes())


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


# --- what the boundary tensors weigh as blobs, plain and zstd-framed (core.wire) -------------------------


def as_blob(t: RawTensor, wire_name: str) -> bytes:
    """The blob a boundary tensor travels in: as the stage made it, or, for an int8 wire, its int8
    values and scales (what the int8 wire ships; the values are already on its grid)."""
    if not wire_name.startswith("int8"):
        return encode({"activations": t})
    if wire_name == "int8-seq":
        return encode(wire_mod.quantize({"activations": t}))
    x = np.frombuffer(t.data, dtype=np.float32).reshape(t.shape)
    scale = (np.abs(x).max(axis=-1, keepdims=True) / 127.0).astype(np.float16)
    safe = np.where(scale > 0, scale.astype(np.float32), np.float32(1.0))
    q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    return encode(
        {
            "q": RawTensor("U8", q.shape, q.view(np.uint8).tobytes()),
            "scale": RawTensor("F16", scale.shape, scale.tobytes()),
        }
    )


class Weigher:
    """A stage whose boundary outputs (activations forward, the gradient back) are weighed as blobs."""

    def __init__(self, inner: Any, wire_name: str, sizes: dict[str, int]):
        self.inner, self.wire_name, self.sizes = inner, wire_name, sizes

    def _weigh(self, d: TensorDict | None) -> None:
        for t in (d or {}).values():
            if len(t.shape) == 3:  # (B, T, b): on the boundary (the head's proof vector is not)
                blob = as_blob(t, self.wire_name)
                self.sizes["tokens"] += t.shape[0] * t.shape[1]
                self.sizes["plain"] += len(blob)
                self.sizes["zstd"] += len(wire_mod.pack(blob, "zstd"))

    def forward(self, work_id: str, inputs: TensorDict) -> TensorDict:
        out = self.inner.forward(work_id, inputs)
        self._weigh(out)
        return out

    def backward(self, work_id: str, grads: TensorDict) -> BackwardResult:
        r = self.inner.backward(work_id, grads)
        self._weigh(r.grads)
        return r


def weigh(plan: Plan, stream: TrainStream, v: Variant, weights: list[TensorDict], samples: int = 4) -> dict:
    """Bytes per token one direction of one boundary carries, plain and zstd-framed, measured on the
    trained model's own activations and gradients (a few training samples through the chain)."""
    stages = start(plan.manifest("", 1, MergeConfig()), plan.backend)
    for s, w in zip(stages, weights, strict=True):
        s.load(w)
    sizes = {"tokens": 0, "plain": 0, "zstd": 0}
    chain = [Weigher(s, v.wire, sizes) for s in wrap(stages, v.wire)]
    for i in range(samples):
        train_sample(chain, stream.sample(i), work_id=f"weigh{i}")
    return {k: sizes[k] / sizes["tokens"] for k in ("plain", "zstd")}


# --- training and scoring ----------------------------------------------------------------------------


def model_of(base: Any, v: Variant) -> Any:
    wire = v.wire if v.wire in ("float32", "bfloat16") else "float32"
    return replace(base, bottleneck_dim=v.bottleneck_dim, wire_dtype=wire)


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
    ap.add_argument("--d-model", type=int, default=0, help="another model width (default: 128)")
    ap.add_argument("--seed", type=int, default=0, help="the models' init seed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    split = split_corpus(args.data)
    print(split.describe(), flush=True)
    plan = Plan(steps=args.steps, global_batch=args.global_batch, seed=args.seed)
    batches = heldout_batches(split.heldout, plan.eval_batches, plan.batch, plan.seq)
    base = model_at(args.d_model) if args.d_model else MODEL
    d = base.d_model
    every = variants(d)
    wanted = [v for v in every if not args.only or v.name in args.only.split(",")]
    if wanted[0].name != "ref":
        wanted = [every[0], *wanted]
    with tempfile.TemporaryDirectory() as tmp:
        train_dir = str(link_tree(split, Path(tmp) / "train"))
        stream = TrainStream(plan.manifest(train_dir, 1, MergeConfig()), train_dir)
        print(f"{plan.steps} steps x {plan.global_batch} x {plan.seq} tokens per configuration", flush=True)
        rows: list[dict[str, Any]] = []
        ref_loss, ref_weights = 0.0, None
        for v in wanted:
            p = replace(plan, model=model_of(base, v))
            t0 = time.time()
            weights = train(p, stream, v)
            loss = heldout_loss(p, batches, v, weights)
            if v.name == "ref":
                ref_loss, ref_weights = loss, weights
            bpt = v.bytes_per_token(plan.seq)
            blobs_w = weigh(p, stream, v, weights)
            row: dict[str, Any] = {
                "name": v.name,
                "bottleneck_dim": v.bottleneck_dim,
                "wire": v.wire,
                "bytes_per_token": round(bpt, 3),
                "ratio": round(d * 4 / bpt, 2),
                "blob_bytes_per_token": round(blobs_w["plain"], 3),
                "zstd_bytes_per_token": round(blobs_w["zstd"], 3),
                "zstd_ratio": round(d * 4 / blobs_w["zstd"], 2),
                "heldout_loss": round(loss, 5),
                "loss_cost": round(loss / ref_loss - 1, 5),
            }
            rows.append(row)
            print(
                f"{v.name:12s} b={v.bottleneck_dim:<4d} {v.wire:9s} {bpt:8.2f} B/token "
                f"{row['ratio']:7.1f}x  zstd blob {row['zstd_bytes_per_token']:6.2f} B/token "
                f"{row['zstd_ratio']:6.1f}x  held-out {loss:.4f}  cost {100 * row['loss_cost']:+6.2f}%  "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
        z = measure_zstd(replace(plan, model=model_of(base, every[0])), stream, ref_weights or [])
    print()
    print(
        f"{'config':12s} {'b':>4s} {'wire':9s} {'B/token':>8s} {'vs f32 h':>9s} {'blob':>7s} {'zstd':>7s} "
        f"{'vs f32 h':>9s} {'held-out':>9s} {'cost':>8s}"
    )
    for r in rows:
        print(
            f"{r['name']:12s} {r['bottleneck_dim']:4d} {r['wire']:9s} {r['bytes_per_token']:8.2f} "
            f"{r['ratio']:8.1f}x {r['blob_bytes_per_token']:7.2f} {r['zstd_bytes_per_token']:7.2f} "
            f"{r['zstd_ratio']:8.1f}x {r['heldout_loss']:9.4f} {100 * r['loss_cost']:+7.2f}%"
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
