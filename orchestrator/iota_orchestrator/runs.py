"""Runs: create one from a manifest (index or encode the data, make epoch-0 weights) and the facts derived
from it. A run with a tokenizer.json is prepared in the background (preparing.py calls build and record).

A RunCtx holds what never changes during a run (manifest, file index, sizes, per-stage costs); it is
cached per run id, so hot endpoints never re-parse the manifest.
"""

from __future__ import annotations

import json
import secrets
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from iota_cli.core.manifest import RunManifest
from iota_cli.core.modelspec import (
    ModelConfig,
    estimate_memory,
    forward_flops_per_token,
    param_count,
    stage_spec,
)
from iota_cli.core.stage import proof_size
from iota_cli.core.tensors import DTYPE_CODES, DTYPE_SIZES
from iota_orchestrator import data, db, tokenizer, weights
from iota_orchestrator.blobs import BlobStore
from iota_orchestrator.errors import Conflict, Invalid, NotFound, Unavailable

HEADER_SLACK = 4096
UNREADY = ("preparing", "failed")  # states of a run that has no token stream or weights (yet)
RETRY = {"Retry-After": "5"}  # a run being prepared: ask again in a few seconds


@dataclass(frozen=True)
class RunCtx:
    run_id: str
    manifest: RunManifest
    files: tuple[data.FileEntry, ...]
    layout: data.Layout
    gflops: tuple[float, ...]  # forward GFLOP per token, per stage
    memory_need: tuple[int, ...]  # estimated bytes a worker needs per stage
    cache: data.TokenCache | None = None  # the encoded stream of a run with a tokenizer.json

    @property
    def cfg(self) -> ModelConfig:
        return self.manifest.model

    @property
    def n_stages(self) -> int:
        return self.cfg.n_stages

    @property
    def tokens_per_sample(self) -> int:
        return self.manifest.train.batch_size * self.manifest.train.seq_len

    @property
    def wire_dtype(self) -> str:
        return DTYPE_CODES[self.cfg.boundary_dtype]  # as checked: an int8 upload is read dequantized

    @property
    def act_shape(self) -> tuple[int, int, int]:
        t = self.manifest.train
        return (t.batch_size, t.seq_len, self.cfg.bottleneck_dim)

    @property
    def act_max_size(self) -> int:
        b, t, d = self.act_shape
        return b * t * d * DTYPE_SIZES[self.wire_dtype] + HEADER_SLACK

    def expect(self, name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {name: (self.wire_dtype, self.act_shape)}

    def expect_proof(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The head backward's proof of work (core.stage.proof_params)."""
        return {"proof": ("F32", (proof_size(self.cfg, 0),))}


def manifest_problems(m: RunManifest, max_params: int) -> list[str]:
    """What this orchestrator cannot serve in a manifest the model spec accepts (its machine, its limits)."""
    p = []
    if m.model.tokenizer != "bytes" and not Path(m.model.tokenizer).expanduser().is_file():
        p.append(
            f"model.tokenizer {m.model.tokenizer!r} is not a file on the orchestrator's machine "
            "(use 'bytes' or the path of a tokenizers tokenizer.json)"
        )
    if param_count(m.model) > max_params:
        p.append(
            f"model has {param_count(m.model):,} parameters, over this orchestrator's limit {max_params:,}"
        )
    if not m.data.source:
        p.append("data.source is required: a directory or glob of text files on the orchestrator's machine")
    return p


def parse_manifest(raw: Any, max_params: int) -> RunManifest:
    """A manifest from the wire, checked by the model spec and then against this orchestrator (422 if not)."""
    try:
        m = raw if isinstance(raw, RunManifest) else RunManifest.from_dict(raw)
    except ValueError as e:
        raise Invalid(f"invalid manifest: {e}") from None
    problems = manifest_problems(m, max_params)
    if problems:
        raise Invalid("invalid manifest: " + "; ".join(problems))
    return m


def memory_need(m: RunManifest, stage: int) -> int:
    """Bytes a worker needs for a stage: the model spec's estimate with a head's whole pipeline in flight."""
    t = m.train
    return estimate_memory(m.model, stage, t.batch_size, t.seq_len, t.max_inflight_per_head)


def make_ctx(
    run_id: str, m: RunManifest, files: list[data.FileEntry], cache: data.TokenCache | None = None
) -> RunCtx:
    total = (files[-1].start + files[-1].size + 1) if files else 0
    layout = data.Layout(total, m.data.shard_bytes, m.train.batch_size * (m.train.seq_len + 1))
    cfg = m.model
    gflops = tuple(forward_flops_per_token(cfg, stage_spec(cfg, s)) / 1e9 for s in range(cfg.n_stages))
    mem = tuple(memory_need(m, s) for s in range(cfg.n_stages))
    return RunCtx(run_id, m, tuple(files), layout, gflops, mem, cache)


def weights_key(run_id: str, stage: int, epoch: int) -> str:
    return f"runs/{run_id}/weights/s{stage}/e{epoch}.safetensors"


@dataclass(frozen=True)
class Prepared:
    ctx: RunCtx
    weights: tuple[tuple[str, str, int], ...]  # (key, sha256, size) per stage
    tok: tokenizer.Record | None = None  # set when the run has a tokenizer.json


def run_dir(data_dir: Path, run_id: str) -> Path:
    """Where a run keeps files that are not blobs (the token cache)."""
    return data_dir / "runs" / run_id


# How far a background preparation is (preparing.py): its phase, and what the encode has read.
Progress = Callable[[str, tokenizer.Progress], None]


def encode(
    m: RunManifest, paths: list[Path], dest: Path, progress: Progress | None = None
) -> tuple[list[data.FileEntry], tokenizer.Record]:
    """Check the run's tokenizer.json against the model and encode the corpus into `dest`."""
    t = tokenizer.load(m.model.tokenizer)
    problem = tokenizer.vocab_problem(t, m.model.vocab_size)
    if problem:
        raise Invalid("invalid manifest: " + problem)
    on_read = None if progress is None else lambda seen: progress("encoding", seen)
    files, sha = tokenizer.encode_files(t, paths, dest, progress=on_read)
    n = (files[-1].start + files[-1].size + 1) if files else 0
    return files, tokenizer.Record(t.path, t.sha256, t.eos_id, t.n_ids, str(dest), sha, n)


def prepare(blobs: BlobStore, m: RunManifest, data_dir: Path) -> Prepared:
    """Index (or encode) the data and write epoch-0 weights for every stage (slow; outside the write lock).

    A run with a tokenizer.json is prepared in the background instead (preparing.py calls build)."""
    run_id = "run-" + secrets.token_hex(4)
    try:
        return build(blobs, m, data_dir, run_id)
    except BaseException:  # a full disk mid-way, say: a run never recorded leaves nothing behind
        discard_files(blobs, data_dir, run_id)
        raise


def build(
    blobs: BlobStore, m: RunManifest, data_dir: Path, run_id: str, progress: Progress | None = None
) -> Prepared:
    """prepare's work for a run id; on failure the caller discards what it wrote (discard_files)."""
    paths = data.list_files(m.data.source)
    tok: tokenizer.Record | None = None
    if m.model.tokenizer == "bytes":
        files = data.index_files(paths)
    else:
        files, tok = encode(m, paths, run_dir(data_dir, run_id) / tokenizer.CACHE_NAME, progress)
    ctx = make_ctx(run_id, m, files, tok.token_cache() if tok else None)
    if ctx.layout.n_samples < 1:
        raise Invalid(f"data.source {m.data.source!r} yields no sample (no text files, or too little text)")
    stored: list[tuple[str, str, int]] = []
    for s in range(m.model.n_stages):
        if progress is not None:
            progress("weights", tokenizer.Progress())
        key = weights_key(run_id, s, 0)
        b = blobs.write(key, weights.init_stage(m.model, s, m.seed))
        stored.append((key, b.sha256, b.size))
    return Prepared(ctx, tuple(stored), tok)


def discard_files(blobs: BlobStore, data_dir: Path, run_id: str) -> None:
    """Delete what build wrote for a run that will not be recorded (its weights, its token cache)."""
    # Its blob folder holds the weights (weights_key's layout); nothing else uses it yet.
    blobs.delete_tree(f"runs/{run_id}")
    shutil.rmtree(run_dir(data_dir, run_id), ignore_errors=True)


def discard(blobs: BlobStore, data_dir: Path, p: Prepared) -> None:
    """Delete what prepare wrote for a run that will not be recorded."""
    for key, _, _ in p.weights:
        blobs.delete(key)
    discard_files(blobs, data_dir, p.ctx.run_id)


def record(conn: Connection, p: Prepared, now: float) -> str:
    """Store a prepared run; from here on workers can be assigned to it."""
    ctx, m, run_id = p.ctx, p.ctx.manifest, p.ctx.run_id
    R = db.runs
    if conn.execute(select(R.c.state).where(R.c.run_id == run_id)).scalar() == "preparing":
        conn.execute(
            update(R)
            .where(R.c.run_id == run_id)
            .values(state="running", n_samples_epoch=ctx.layout.n_samples)
        )
    else:
        conn.execute(
            insert(R).values(**new_run(m, run_id, "running", now), n_samples_epoch=ctx.layout.n_samples)
        )
    if ctx.files:
        conn.execute(
            insert(db.run_files),
            [
                {"run_id": run_id, "idx": i, "path": f.path, "size": f.size, "start": f.start}
                for i, f in enumerate(ctx.files)
            ],
        )
    if p.tok is not None:
        conn.execute(insert(db.run_tokenizers).values(run_id=run_id, **asdict(p.tok)))
    for s, (key, sha, size) in enumerate(p.weights):
        conn.execute(insert(db.blobs).values(key=key, sha256=sha, size=size, created=now, sealed=True))
        conn.execute(insert(db.stages).values(run_id=run_id, stage=s, epoch=0, weights_key=key, updated=now))
    with _cache_lock:
        _cache[run_id] = ctx
    return run_id


def new_run(m: RunManifest, run_id: str, state: str, now: float) -> dict[str, Any]:
    """A runs row (but n_samples_epoch, which a prepared run knows)."""
    counts = dict.fromkeys(("samples_issued", "samples_completed", "samples_dropped", "tokens"), 0)
    return {
        "run_id": run_id,
        "name": m.name[:128],
        "manifest": json.dumps(m.to_dict()),
        "state": state,
        "created": now,
        "stop_requested": False,
        **counts,
    }


_cache: dict[str, RunCtx] = {}
_cache_lock = threading.Lock()


def context(conn: Connection, run_id: str) -> RunCtx:
    """The run's fixed facts, loaded once."""
    ctx = _cache.get(run_id)
    if ctx is not None:
        return ctx
    row = conn.execute(select(db.runs.c.manifest, db.runs.c.state).where(db.runs.c.run_id == run_id)).first()
    if row is None:
        raise NotFound(f"no run {run_id!r}")
    if row.state == "preparing":  # workers wait it out, as they wait out a busy orchestrator
        raise Unavailable(f"run {run_id} is being prepared (its corpus is encoded); see its status", RETRY)
    if row.state == "failed":
        raise Conflict(f"run {run_id} could not be prepared; its status says why")
    m = RunManifest.from_dict(json.loads(row[0]))
    rows = conn.execute(
        select(db.run_files).where(db.run_files.c.run_id == run_id).order_by(db.run_files.c.idx)
    ).all()
    files = [data.FileEntry(r.path, r.size, r.start) for r in rows]
    cache = None
    if m.model.tokenizer != "bytes":
        tok = conn.execute(select(db.run_tokenizers).where(db.run_tokenizers.c.run_id == run_id)).first()
        if tok is None:
            raise Conflict(f"run {run_id!r} names a tokenizer but has no record of its token stream")
        rec = tokenizer.Record(**{k: getattr(tok, k) for k in tokenizer.Record.__dataclass_fields__})
        cache = tokenizer.open_cache(run_id, rec, [f.path for f in files])
    ctx = make_ctx(run_id, m, files, cache)
    with _cache_lock:
        _cache[run_id] = ctx
    return ctx


_RUN = select(db.runs).where(db.runs.c.run_id == bindparam("run"))


def get_run(conn: Connection, run_id: str) -> Any:
    row = conn.execute(_RUN, {"run": run_id}).first()
    if row is None:
        raise NotFound(f"no run {run_id!r}")
    return row


def newest_running(conn: Connection) -> str:
    row = conn.execute(
        select(db.runs.c.run_id)
        .where(db.runs.c.state == "running")
        .order_by(db.runs.c.created.desc())
        .limit(1)
    ).first()
    if row is None:
        raise NotFound(
            "no running run on this orchestrator; an operator creates one with `iota orchestrator run create`"
        )
    return row[0]


def info(row: Any) -> dict[str, Any]:
    return {
        "run_id": row.run_id,
        "name": row.name,
        "manifest": json.loads(row.manifest),
        "state": row.state,
        "created": row.created,
    }


def list_runs(conn: Connection) -> list[dict[str, Any]]:
    rows = conn.execute(select(db.runs).order_by(db.runs.c.created)).all()
    return [info(r) for r in rows]
