"""On-disk checkpoints of one worker's stage: weights, optimizer state and loop state in one verified file.

A directory (the worker uses `<data_dir>/checkpoints/<run_id>/stage-<n>`) holds `ckpt-<step>.safetensors`,
the newest two kept. Each is a plain safetensors file (torch and MLX loaders open it) with tensors named
`weights/<name>` and `optimizer/<name>`; its metadata carries the loop state as JSON and the sha256 of
the whole file computed with that digest field zeroed, so truncation or a flipped bit anywhere is caught.
Files are written with files.atomic_write (temp, fsync, rename), so a crash never leaves a half file.

Inspect one:
    python -c "from iota_cli.train.checkpoint import *; print(CheckpointStore(Path('DIR')).latest_info())"
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import struct
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

from iota_cli.core.files import atomic_write
from iota_cli.core.manifest import RunManifest
from iota_cli.core.tensors import MAX_HEADER, TensorDict, TensorFormatError, decode, encode

log = logging.getLogger("iota.checkpoint")

FORMAT = "iota-checkpoint"
FORMAT_VERSION = 1
DIGEST_KEY = "iota_sha256"
_ZERO = b"0" * 64
_NAME = re.compile(r"ckpt-(\d+)\.safetensors")
WEIGHTS, OPTIMIZER = "weights/", "optimizer/"


class CheckpointError(Exception):
    """A checkpoint that cannot be used: corrupt, truncated, foreign, or from a newer iota."""


@dataclass(frozen=True)
class LoopState:
    """Where the worker's loop stood when the checkpoint was taken."""

    run_id: str
    contributor_id: str
    stage: int
    step: int = 0  # local optimizer steps taken
    backward_passes: int = 0  # in total
    since_merge: int = 0  # backward passes since the last merge (a merge contribution's weight)
    epoch: int = 0  # merge epoch of the weights these descend from
    credits_seen: float = 0.0
    tokens: int = 0
    fingerprint: str = ""  # manifest_fingerprint() of the run; a mismatch refuses the checkpoint
    backend: str = ""  # the backend that wrote it (informative: every backend reads every checkpoint)
    saved_at: float = 0.0  # unix time, set by save()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopState:
        """Build from a dict, ignoring unknown keys (a newer iota may add some)."""
        kw = {}
        for f in fields(cls):
            if f.name in d:
                kind = {"str": str, "int": int, "float": float}[str(f.type)]
                kw[f.name] = kind(d[f.name])
        return cls(**kw)


@dataclass(frozen=True)
class Checkpoint:
    state: LoopState
    weights: TensorDict
    optimizer: TensorDict
    path: Path


@dataclass(frozen=True)
class CheckpointInfo:
    """What `iota status` shows, read from a file's header alone (its sha256 is not checked)."""

    path: Path
    state: LoopState
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "size": self.size, **self.state.to_dict()}


def manifest_fingerprint(manifest: RunManifest) -> str:
    """A short stable hash of everything in the manifest (model shape, split, optimizer, data)."""
    canonical = json.dumps(manifest.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def pack(state: LoopState, weights: TensorDict, optimizer: TensorDict) -> bytes:
    """Encode a checkpoint, its sha256 (over the file with the digest zeroed) inside the header."""
    tensors = {WEIGHTS + k: v for k, v in weights.items()}
    tensors.update({OPTIMIZER + k: v for k, v in optimizer.items()})
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "state": json.dumps(state.to_dict(), sort_keys=True),
        DIGEST_KEY: _ZERO.decode(),
    }
    blob = encode(tensors, meta)
    (n,) = struct.unpack("<Q", blob[:8])
    pos = blob.find(_digest_field(_ZERO), 8, 8 + n)
    if pos < 0:
        raise RuntimeError("tensors.encode no longer writes compact JSON headers")
    start = pos + len(_digest_field(b"")) - 1  # the digest's first character
    view = memoryview(blob)  # slices of a view copy nothing; the join makes the one copy
    return b"".join([view[:start], hashlib.sha256(blob).hexdigest().encode(), view[start + 64 :]])


def unpack(buf: bytes | bytearray) -> tuple[LoopState, TensorDict, TensorDict]:
    """Verify and decode a checkpoint; raise CheckpointError on any damage."""
    view = memoryview(buf)
    header, meta = _header(view)
    if meta.get("format") != FORMAT:
        raise CheckpointError("not an iota checkpoint")
    digest = str(meta.get(DIGEST_KEY, "")).encode()
    field = _digest_field(digest)
    if not re.fullmatch(rb"[0-9a-f]{64}", digest) or header.count(field) != 1:
        raise CheckpointError("checkpoint digest is missing or malformed")
    h = hashlib.sha256(view[:8])
    h.update(header.replace(field, _digest_field(_ZERO)))
    h.update(view[8 + len(header) :])
    if h.hexdigest().encode() != digest:
        raise CheckpointError("sha256 mismatch (truncated or corrupt)")
    state = _state(meta)
    try:
        tensors, _ = decode(view)
    except TensorFormatError as e:
        raise CheckpointError(str(e)) from None
    weights = {k[len(WEIGHTS) :]: v for k, v in tensors.items() if k.startswith(WEIGHTS)}
    optimizer = {k[len(OPTIMIZER) :]: v for k, v in tensors.items() if k.startswith(OPTIMIZER)}
    return state, weights, optimizer


class CheckpointStore:
    """The checkpoints of one (run, stage) on this machine; one writer at a time (an OS file lock)."""

    def __init__(self, directory: Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.directory, self.keep = Path(directory), keep
        self._lock: IO[str] | None = None

    def paths(self) -> list[Path]:
        """Checkpoint files, newest (highest step) first."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for p in self.directory.iterdir():
                if m := _NAME.fullmatch(p.name):
                    with contextlib.suppress(FileNotFoundError):
                        found.append((int(m.group(1)), p.stat().st_mtime_ns, p))
        return [p for *_, p in sorted(found, reverse=True)]

    def save(self, state: LoopState, weights: TensorDict, optimizer: TensorDict) -> Path:
        """Write `ckpt-<step>.safetensors` atomically, then drop all but the newest `keep`."""
        self._take_lock()
        state = dataclasses.replace(state, saved_at=time.time())
        path = self.directory / f"ckpt-{state.step}.safetensors"
        atomic_write(path, pack(state, weights, optimizer))
        for old in [p for p in self.paths() if p != path][self.keep - 1 :]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self, fingerprint: str | None = None) -> Checkpoint | None:
        """The newest checkpoint that verifies (and matches fingerprint when given); None if there is none."""
        for path in self.paths():
            try:
                state, weights, optimizer = unpack(path.read_bytes())
            except (OSError, CheckpointError) as e:
                log.warning("checkpoint %s is unusable (%s); trying an older one", path, e)
                continue
            if fingerprint is not None and state.fingerprint != fingerprint:
                log.warning("checkpoint %s belongs to another run configuration; ignoring it", path)
                continue
            return Checkpoint(state, weights, optimizer, path)
        return None

    def latest_info(self) -> CheckpointInfo | None:
        """Step, time and path of the newest checkpoint whose header reads, without loading tensors."""
        for path in self.paths():
            try:
                with open(path, "rb") as f:
                    head = f.read(8)
                    n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                    _, meta = _header(memoryview(head + f.read(min(n, MAX_HEADER))))
                return CheckpointInfo(path, _state(meta), path.stat().st_size)
            except (OSError, CheckpointError):
                continue
        return None

    def discard(self) -> int:
        """Delete every checkpoint here (`iota join --fresh`); return how many were removed."""
        self._take_lock()
        removed = 0
        for path in self.paths():
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def close(self) -> None:
        """Release the writer lock (also released when the process exits, however it exits)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _take_lock(self) -> None:
        if self._lock is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        f = open(self.directory / ".lock", "a")  # noqa: SIM115 - held for the store's lifetime
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no guard against a second writer
            pass
        except BlockingIOError:
            f.close()
            raise CheckpointError(f"another iota worker is writing checkpoints in {self.directory}") from None
        self._lock = f
        # A crash mid-write leaves atomic_write's temp file behind; nobody else writes here, so sweep them.
        for tmp in self.directory.glob(".ckpt-*.tmp"):
            tmp.unlink(missing_ok=True)


def _digest_field(digest: bytes) -> bytes:
    return b'"' + DIGEST_KEY.encode() + b'":"' + digest + b'"'


def _header(view: memoryview) -> tuple[bytes, dict[str, str]]:
    """The raw JSON header and its metadata; CheckpointError when it is cut short or not JSON."""
    if len(view) < 8:
        raise CheckpointError("too short for a header")
    (n,) = struct.unpack("<Q", view[:8])
    if n > MAX_HEADER or 8 + n > len(view):
        raise CheckpointError("header cut short")
    header = bytes(view[8 : 8 + n])
    try:
        meta = json.loads(header).get("__metadata__") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"header is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError("metadata is not an object")
    return header, meta


def _state(meta: dict[str, str]) -> LoopState:
    try:
        version = int(meta.get("format_version", "0"))
        if version > FORMAT_VERSION:
            raise CheckpointError(f"written by a newer iota (format {version}); upgrade iota-cli")
        return LoopState.from_dict(json.loads(meta["state"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"bad loop state: {e}") from None
