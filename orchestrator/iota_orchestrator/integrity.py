"""Bytes the orchestrator takes in or keeps: every uploaded tensor checked, rotten blobs quarantined.

Uploads (activations, gradients, merge contributions) are read in full before they are accepted: the one
bounded safetensors parser (iota_cli/core/tensors.py), exactly the wanted names, dtypes and shapes, and
every value finite. A stored blob whose bytes no longer hash to their recorded sha256 is quarantined:
its row is flagged (never served again: 410), its file deleted, and what depended on it is remade from
the corpus (token batches) or given up (a chain's activations or gradients). Stage weights are watched
by the reaper; a damaged epoch is rebuilt (see weights_damaged).

    python -c "from iota_orchestrator import integrity; print(integrity.problem_in(b'junk', {}))"
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from iota_cli.core import wire
from iota_cli.core.tensors import (
    Header,
    RawTensor,
    TensorFormatError,
    all_finite,
    mismatch,
    parse_header,
    read_header,
)
from iota_orchestrator import chains, db
from iota_orchestrator.blobs import BlobStore, StoreUnavailable
from iota_orchestrator.errors import BadRequest
from iota_orchestrator.faults import Rejected
from iota_orchestrator.runs import RunCtx

log = logging.getLogger("iota_orchestrator")
Want = Mapping[str, tuple[str, tuple[int, ...]]]
CHUNK = 1 << 20
SMALL = 16 << 20  # files up to this size are checked from one read
INFLATED = 4 * SMALL  # the most a zstd-framed upload may inflate to (larger ones must come unframed)
B = db.blobs


# --- uploads --------------------------------------------------------------------------------------------


def problem_in(data: bytes, want: Want) -> str | None:
    """Why these safetensors bytes are not exactly the wanted tensors, all finite (None when they are)."""
    try:
        data = wire.unpack(data, INFLATED)
        header = parse_header(data, len(data))
    except TensorFormatError as e:
        return f"not a valid safetensors file: {e}"
    return mismatch(header, want) or _non_finite(header, lambda lo, hi: data[lo:hi])


@dataclass(frozen=True)
class Checked:
    """A file read through: what its bytes hash to, and why it is refused (None: it is accepted)."""

    sha256: str
    size: int
    problem: str | None


def check_file(path: Path, want: Want) -> Checked:
    """problem_in for a file; a large one is read a tensor at a time (weights need not fit in memory)."""
    return check_with(path, lambda header: mismatch(header, want))


def check_with(path: Path, wrong: Callable[[Header], str | None]) -> Checked:
    """A file read through: a valid container, `wrong(header)` None (its names, dtypes, shapes), every
    value finite. A merge update is checked with core.flat.check_update this way."""
    try:
        if path.stat().st_size <= SMALL:  # activations, gradients: one read
            data = path.read_bytes()
            return Checked(hashlib.sha256(data).hexdigest(), len(data), _problem(data, wrong))
        sha, size = hash_file(path)
    except OSError as e:
        return Checked("", 0, f"cannot be read: {e}")
    try:
        header = read_header(path)
    except (OSError, TensorFormatError) as e:
        return Checked(sha, size, f"not a valid safetensors file: {e}")
    problem = wrong(header)
    if problem is None:
        with open(path, "rb") as f:

            def read(lo: int, hi: int) -> bytes:
                f.seek(lo)
                return f.read(hi - lo)

            problem = _non_finite(header, read)
    return Checked(sha, size, problem)


def _problem(data: bytes, wrong: Callable[[Header], str | None]) -> str | None:
    try:
        data = wire.unpack(data, INFLATED)  # a result a worker framed in zstd (train.wire_codec)
        header = parse_header(data, len(data))
    except TensorFormatError as e:
        return f"not a valid safetensors file: {e}"
    return wrong(header) or _non_finite(header, lambda lo, hi: data[lo:hi])


def _non_finite(header: Header, read: Any) -> str | None:
    for name, e in header.entries.items():
        try:
            tensor = RawTensor(e.dtype, e.shape, read(header.data_start + e.start, header.data_start + e.end))
        except TensorFormatError as err:  # the file changed under us
            return str(err)
        if not all_finite(tensor):
            return f"{name[:64]} holds NaN or infinite values"
    return None


def hash_file(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def intact(blobs: BlobStore, key: str, sha256: str) -> bool:
    """Whether the stored file of key still hashes to sha256 (a missing file is not intact). An object
    store that does not answer raises StoreUnavailable: that says nothing about the blob."""
    try:
        return hash_file(blobs.path(key))[0] == sha256
    except StoreUnavailable:
        raise
    except OSError:
        return False


_STORED = select(B.c.sha256, B.c.size).where(B.c.key == bindparam("key"))
_SEAL = update(B).where(B.c.key == bindparam("blob")).values(sealed=True)


def accept_result(
    conn: Connection, ctx: RunCtx, blobs: BlobStore, key: str, sha: str | None, size: int, want: Want
) -> None:
    """Check an item's uploaded result and seal it; Rejected (422, the uploader's fault) if it is bad."""
    if sha is None:
        raise BadRequest("sha256 of the uploaded result is required")
    b = conn.execute(_STORED, {"key": key}).first()
    if b is None:
        raise BadRequest("no result uploaded yet: PUT it to the item's upload URL first")
    if b.sha256 != sha or b.size != size:
        raise BadRequest(f"the uploaded result has sha256 {b.sha256} and {b.size} bytes, not what you sent")
    checked = check_file(blobs.path(key), want)
    if checked.sha256 != b.sha256:  # lost or damaged on this disk since it came in: not the uploader's fault
        blobs.delete(key)
        raise BadRequest("the uploaded result was damaged on the orchestrator's disk; upload it again")
    if checked.problem:
        raise Rejected(f"result rejected: {checked.problem}", ctx.run_id)
    conn.execute(_SEAL, {"blob": key})


# --- quarantine -----------------------------------------------------------------------------------------

_ROW = select(B.c.sha256, B.c.quarantined).where(B.c.key == bindparam("key"))


def quarantine(conn: Connection, blobs: BlobStore, key: str, why: str) -> None:
    """Never serve key again: flag its row and delete its file."""
    conn.execute(update(B).where(B.c.key == key).values(quarantined=True))
    blobs.delete(key)
    log.warning("quarantined blob %s: %s", key, why)


def recheck_inputs(conn: Connection, ctx: RunCtx, blobs: BlobStore, row: Any, now: float) -> set[str] | None:
    """A worker could not verify an item's inputs: re-hash the orchestrator's own copies.

    A damaged token batch is made again from the corpus (the item is then simply re-issued); a damaged
    activation or gradient cannot be, so it is quarantined and the chain dropped (its wakeup keys are
    returned). None when the item may go on: its inputs are intact (the fault was on the way, or the
    worker's) or its tokens were made again.
    """
    chain = conn.execute(
        select(db.chains).where(db.chains.c.run_id == ctx.run_id, db.chains.c.sample_id == row.sample_id)
    ).first()
    if row.input_key:
        stored = conn.execute(_ROW, {"key": row.input_key}).first()
        if stored is None or stored.quarantined or not intact(blobs, row.input_key, stored.sha256):
            if stored is not None:
                quarantine(conn, blobs, row.input_key, f"no longer hashes to {stored.sha256}")
            return chains.drop_chain(conn, ctx, row.sample_id, now)
    needs_tokens = row.kind == "forward" and row.stage in (0, ctx.n_stages - 1)
    if chain is not None and needs_tokens and not intact(blobs, chain.tokens_key, chain.tokens_sha):
        data = chains.tokens_blob(ctx, chain.data_index)
        if hashlib.sha256(data).hexdigest() != chain.tokens_sha:  # the corpus changed since it was issued
            quarantine(conn, blobs, chain.tokens_key, "the corpus no longer yields the same tokens")
            return chains.drop_chain(conn, ctx, row.sample_id, now)
        blobs.write(chain.tokens_key, data)
        log.warning("token batch %s was damaged on disk; made again from the corpus", chain.tokens_key)
    return None
