"""Training data by reference: text files become one token stream, cut into shards and samples.

The stream is every file's tokens followed by an EOS token, files in sorted path order. With the byte
tokenizer a token is a byte (id = byte), read straight from the files; with a tokenizer.json the stream is
encoded once into a flat int32 cache (tokenizer.py) and read from there. Shards are `data.shard_bytes`
tokens; a sample is `batch_size * (seq_len + 1)` consecutive tokens inside one shard, addressed by
(shard, offset). Sample k of the run reads data index perm(epoch)[k % n], so every sample is used once per
epoch and no two chains share a sample within an epoch.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from iota_cli.core.modelspec import EOS_ID
from iota_cli.core.textfiles import text_files


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int  # tokens (bytes, for the byte tokenizer) before the EOS that follows the file
    start: int  # stream offset of the file's first token


def list_files(source: str) -> list[Path]:
    """Text files named by a file, a directory (recursively) or a glob, in sorted order."""
    return sorted(text_files(source))


def index_files(paths: list[Path]) -> list[FileEntry]:
    out, start = [], 0
    for p in paths:
        size = p.stat().st_size
        out.append(FileEntry(str(p.resolve()), size, start))
        start += size + 1  # the EOS after each file
    return out


@dataclass(frozen=True)
class Layout:
    total_tokens: int
    shard_tokens: int
    sample_tokens: int

    @property
    def per_shard(self) -> int:
        return self.shard_tokens // self.sample_tokens

    @property
    def n_shards(self) -> int:
        return -(-self.total_tokens // self.shard_tokens)

    @property
    def n_samples(self) -> int:
        full, rest = divmod(self.total_tokens, self.shard_tokens)
        return full * self.per_shard + min(rest // self.sample_tokens, self.per_shard)

    def locate(self, data_index: int) -> tuple[int, int]:
        """(shard, token offset inside the shard) of a sample."""
        if not 0 <= data_index < self.n_samples:
            raise IndexError(f"sample {data_index} outside 0..{self.n_samples - 1}")
        shard, k = divmod(data_index, self.per_shard)
        return shard, k * self.sample_tokens

    def stream_offset(self, data_index: int) -> int:
        shard, offset = self.locate(data_index)
        return shard * self.shard_tokens + offset


@lru_cache(maxsize=4)
def permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def data_index(k: int, n_samples: int, seed: int) -> int:
    """The corpus sample that the run's k-th issued sample reads."""
    epoch, pos = divmod(k, n_samples)
    return int(permutation(seed, epoch, n_samples)[pos])


def read_tokens(files: list[FileEntry], start: int, n: int) -> np.ndarray:
    """Tokens [start, start + n) of the stream as int32 (EOS between files and past a shrunk file)."""
    out = np.full(n, EOS_ID, dtype=np.int32)
    starts = [f.start for f in files]
    i = max(bisect.bisect_right(starts, start) - 1, 0)
    end = start + n
    while i < len(files) and files[i].start < end:
        f = files[i]
        lo, hi = max(start, f.start), min(end, f.start + f.size)
        if lo < hi:
            with open(f.path, "rb") as fh:
                fh.seek(lo - f.start)
                raw = fh.read(hi - lo)
            out[lo - start : lo - start + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        i += 1
    return out


@dataclass(frozen=True)
class TokenCache:
    """A run's encoded stream: `n_tokens` little-endian int32 ids in one flat file."""

    path: str
    n_tokens: int
    eos_id: int

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as int32, EOS past the end."""
        out = np.full(n, self.eos_id, dtype=np.int32)
        avail = max(min(n, self.n_tokens - start), 0)
        if avail:
            with open(self.path, "rb") as fh:
                fh.seek(4 * start)
                raw = fh.read(4 * avail)
            out[: len(raw) // 4] = np.frombuffer(raw, dtype="<i4", count=len(raw) // 4)
        return out


def sample_tokens(
    files: list[FileEntry],
    layout: Layout,
    index: int,
    batch: int,
    seq: int,
    cache: TokenCache | None = None,
) -> np.ndarray:
    """The (batch, seq + 1) int32 tokens of corpus sample `index` (from `cache` when the run has one)."""
    start, n = layout.stream_offset(index), batch * (seq + 1)
    flat = cache.read(start, n) if cache is not None else read_tokens(files, start, n)
    return flat.reshape(batch, seq + 1)
