"""A run's Hugging Face `tokenizers` tokenizer.json: load and fingerprint it, choose its EOS, and encode
the corpus once into a flat int32 cache that every sample is read from.

Used by runs.py when `model.tokenizer` names a file instead of "bytes"; `tokenizers` is imported only
here and only then, so byte-level runs never load it. EOS is the tokenizer's own end-of-text token (the
first of EOS_NAMES it has), else the first id past its vocabulary.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from iota_cli.core.files import atomic_writer
from iota_orchestrator.data import FileEntry, TokenCache
from iota_orchestrator.errors import ApiError, Conflict, Invalid

log = logging.getLogger("iota_orchestrator")

# End-of-text tokens of common tokenizer families, most common first.
EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|eos|>", "[EOS]")
CACHE_NAME = "tokens.i32"
READ_BYTES = 1 << 20  # files are encoded in pieces of about this size, cut before a space or newline
# Pieces per encode call, across files (tokenizers spreads a batch over its threads), and a memory bound.
BATCH, BATCH_CHARS = 64, 16 << 20


@dataclass(frozen=True)
class Loaded:
    tokenizer: Any  # tokenizers.Tokenizer
    path: str  # resolved
    sha256: str  # of the file's bytes: the fingerprint kept with the run
    eos_id: int
    n_ids: int  # the tokenizer's largest id + 1

    @property
    def vocab_needed(self) -> int:
        """The smallest model.vocab_size that covers every id the stream can hold."""
        return max(self.n_ids, self.eos_id + 1)


@dataclass(frozen=True)
class Record:
    """What a tokenized run keeps in the database (table run_tokenizers)."""

    path: str
    sha256: str
    eos_id: int
    n_ids: int
    cache: str
    cache_sha256: str
    n_tokens: int

    def token_cache(self) -> TokenCache:
        return TokenCache(self.cache, self.n_tokens, self.eos_id)


def choose_eos(vocab: dict[str, int]) -> int:
    """The id of the first of EOS_NAMES in the vocabulary, else the first id past it."""
    for name in EOS_NAMES:
        if name in vocab:
            return vocab[name]
    return max(vocab.values()) + 1


def file_sha256(path: str | Path) -> str | None:
    """sha256 of a file's bytes, None when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def load(path: str) -> Loaded:
    """Load a tokenizer.json; Invalid (422) with the reason when it is missing or not one."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise Invalid(f"model.tokenizer {path!r} is not a file on the orchestrator's machine")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise Invalid(
            "model.tokenizer names a tokenizer.json, but this orchestrator lacks the `tokenizers` package "
            "(pip install 'iota-cli[orchestrator]')"
        ) from None
    try:
        raw = p.read_bytes()
        tok = Tokenizer.from_str(raw.decode("utf-8"))
        vocab = tok.get_vocab(with_added_tokens=True)
    except BaseException as e:  # a Rust panic surfaces as pyo3's PanicException, a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise Invalid(f"model.tokenizer {path!r} is not a tokenizers tokenizer.json: {reason}") from None
    if not vocab:
        raise Invalid(f"model.tokenizer {path!r} has an empty vocabulary")
    n_ids = max(vocab.values()) + 1
    return Loaded(tok, str(p.resolve()), hashlib.sha256(raw).hexdigest(), choose_eos(vocab), n_ids)


def vocab_problem(t: Loaded, vocab_size: int) -> str | None:
    if vocab_size >= t.vocab_needed:
        return None
    eos = "its own EOS" if t.eos_id < t.n_ids else f"an EOS at id {t.eos_id} (no EOS token of its own)"
    return (
        f"model.vocab_size {vocab_size} is too small for tokenizer {t.path}: it has {t.n_ids} ids and "
        f"{eos}, so model.vocab_size must be at least {t.vocab_needed}"
    )


@dataclass
class Progress:
    """How far encode_files has read: the bytes of text and the whole files taken in so far."""

    bytes_done: int = 0
    files_done: int = 0


def _pieces(path: Path, seen: Progress) -> Iterator[str]:
    """A file's text in pieces of about READ_BYTES (invalid UTF-8 replaced).

    A piece ends before its last space or newline, where pre-tokenizers split anyway, so with a
    byte-level (GPT-2 style) tokenizer the pieces encode to the same ids as the whole file.
    """
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    rest = ""
    try:
        f = open(path, "rb")  # noqa: SIM115 (the with below closes it; only the open is guarded)
    except OSError as e:
        raise Invalid(f"cannot read data file {path}: {e.strerror}") from None
    with f:
        while block := f.read(READ_BYTES):
            seen.bytes_done += len(block)
            text = rest + dec.decode(block)
            cut = max(text.rfind(" "), text.rfind("\n"))
            if cut <= 0 and len(text) < 4 * READ_BYTES:
                rest = text  # no place to cut yet: keep reading, up to a bound
                continue
            cut = cut if cut > 0 else len(text)
            rest = text[cut:]
            yield text[:cut]
    tail = rest + dec.decode(b"", final=True)
    if tail:
        yield tail


def _batches(paths: list[Path], seen: Progress) -> Iterator[list[tuple[int, str]]]:
    """(file number, piece) in stream order, in batches of up to BATCH pieces or BATCH_CHARS characters."""
    batch: list[tuple[int, str]] = []
    size = 0
    for i, p in enumerate(paths):
        for piece in _pieces(p, seen):
            batch.append((i, piece))
            size += len(piece)
            if len(batch) == BATCH or size >= BATCH_CHARS:
                yield batch
                batch, size = [], 0
        seen.files_done = i + 1
    if batch:
        yield batch


class _Writer:
    """Appends ids to the cache file and its sha256, and indexes the files as each one ends."""

    def __init__(self, f: BinaryIO, eos_id: int) -> None:
        self.f, self.h = f, hashlib.sha256()
        self.eos = np.array([eos_id], dtype="<i4")
        self.entries: list[FileEntry] = []
        self.start = self.n = 0

    def write(self, ids: np.ndarray) -> None:
        raw = ids.tobytes()
        self.f.write(raw)
        self.h.update(raw)
        self.n += len(ids)

    def end_file(self, path: Path) -> None:
        size = self.n
        self.write(self.eos)
        self.entries.append(FileEntry(str(path.resolve()), size, self.start))
        self.start, self.n = self.start + size + 1, 0


def _encode(tok: Any, pieces: list[str]) -> list[np.ndarray]:
    fast = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [np.asarray(e.ids, dtype="<i4") for e in fast(pieces, add_special_tokens=False)]


def encode_files(
    t: Loaded,
    paths: list[Path],
    dest: Path,
    expect_sha: str = "",
    progress: Callable[[Progress], None] | None = None,
) -> tuple[list[FileEntry], str]:
    """Encode every file, an EOS after each, into `dest` (written whole or not at all).

    Returns the stream's file index (sizes in tokens) and the cache's sha256; with `expect_sha`, a
    different stream is refused (Conflict) and `dest` is left alone. `progress` is called after each
    batch with how far the encode has read; whatever it raises ends the encode, leaving `dest` alone.
    """
    seen = Progress()
    with atomic_writer(dest) as f:
        out = _Writer(f, t.eos_id)
        for batch in _batches(paths, seen):
            for (i, _), ids in zip(batch, _encode(t.tokenizer, [b[1] for b in batch]), strict=True):
                while len(out.entries) < i:
                    out.end_file(paths[len(out.entries)])
                out.write(ids)
            if progress is not None:
                progress(seen)
        while len(out.entries) < len(paths):
            out.end_file(paths[len(out.entries)])
        entries, sha = out.entries, out.h.hexdigest()
        if expect_sha and sha != expect_sha:
            raise Conflict(
                f"re-encoding the corpus with {t.path} gave a different token stream than when the run was "
                "created (the data files changed); restore them or the cache, or create a new run"
            )
    return entries, sha


def open_cache(run_id: str, rec: Record, sources: list[str]) -> TokenCache:
    """The run's token cache after a restart: checked by sha256, rebuilt from the sources if lost.

    A tokenizer.json changed since the run was created is only a warning while the cache is intact (the
    stream was fixed at creation); it is refused when the cache would have to be rebuilt with it.
    """
    now = file_sha256(rec.path)
    changed = now != rec.sha256
    if changed:
        log.warning(
            "run %s: tokenizer %s %s since the run was created (sha256 %s); the cached token stream made "
            "with the original is served unchanged",
            run_id,
            rec.path,
            "is gone" if now is None else f"changed (sha256 now {now})",
            rec.sha256,
        )
    if file_sha256(rec.cache) == rec.cache_sha256:
        return rec.token_cache()
    if changed:
        raise Conflict(
            f"run {run_id}: the token cache {rec.cache} is missing or damaged and the tokenizer "
            f"{rec.path} is not the one the run was created with (sha256 {rec.sha256}), "
            "so the cache cannot be rebuilt"
        )
    log.warning("run %s: token cache %s is missing or damaged; encoding the corpus again", run_id, rec.cache)
    try:
        encode_files(load(rec.path), [Path(s) for s in sources], Path(rec.cache), rec.cache_sha256)
    except (ApiError, OSError) as e:
        why = e.detail if isinstance(e, ApiError) else f"{e.filename}: {e.strerror}"
        raise Conflict(f"run {run_id}: the token cache is lost and cannot be rebuilt: {why}") from None
    return rec.token_cache()
