"""Held-out text for bench/convergence.py: a split of a corpus by file, the training stream, and evaluation.

The corpus is what a run's `data.source` names (a directory, a glob or a file), listed by the
orchestrator's own `iota_orchestrator.data.list_files`. Files are grouped by the directory they sit in
(a package), or one group per file when they all share one directory (the standard library's top-level
modules); whole groups, picked by a hash of their names, are held out until they hold HELDOUT_SHARE of the
bytes. Training reads the other files through a tree of symbolic links (`link_tree`), so a real run's
manifest can name exactly them and the one-process sweep reads the same token stream the orchestrator
serves (`TrainStream`: its shards, its permutation). Evaluation is the mean cross-entropy of every stage
chained forward over fixed batches of held-out text, taken at evenly spaced offsets.

Try it:
    .venv/bin/python bench/heldout.py [--data DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from chain_reference import train_sample
from iota_orchestrator import data

from iota_cli.core.backend import StageBackend, get_factory
from iota_cli.core.manifest import OptimConfig, RunManifest
from iota_cli.core.modelspec import ModelConfig
from iota_cli.core.tensors import TensorDict
from iota_cli.swarm.corpus import default_data

HELDOUT_SHARE = 0.1  # of the corpus's bytes
MAGIC = "*?["


@dataclass(frozen=True)
class Split:
    """A corpus cut by file: what training reads and what it never does."""

    root: Path  # the directory the group names are relative to
    train: tuple[Path, ...]
    heldout: tuple[Path, ...]
    heldout_groups: tuple[str, ...]

    def bytes(self, which: Sequence[Path]) -> int:
        return sum(p.stat().st_size for p in which)

    def describe(self) -> str:
        names = ", ".join(self.heldout_groups[:6]) + (" ..." if len(self.heldout_groups) > 6 else "")
        return (
            f"corpus {self.root}: training {len(self.train)} files ({self.bytes(self.train) / 1e6:.2f} MB), "
            f"held out {len(self.heldout)} files ({self.bytes(self.heldout) / 1e6:.2f} MB): {names}"
        )


def corpus_root(source: str) -> Path:
    """The directory a source's files are named relative to: itself, a glob's fixed prefix, a file's."""
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        return p.parent
    parts = []
    for part in Path(os.path.expanduser(source)).parts:
        if any(c in part for c in MAGIC):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def group_of(path: Path, root: Path, by_file: bool) -> str:
    rel = path.relative_to(root)
    return str(rel) if by_file else str(rel.parent)


def split_corpus(source: str, share: float = HELDOUT_SHARE) -> Split:
    """Hold out whole groups (packages, else files) by a hash of their names until they hold `share`."""
    root = corpus_root(source)
    files = data.list_files(source)
    if len(files) < 2:
        raise ValueError(f"{source!r} holds {len(files)} text files; a held-out split needs at least two")
    by_file = len({f.parent for f in files}) == 1
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(group_of(f, root, by_file), []).append(f)
    if len(groups) < 2:  # one directory of files and a deeper one: fall back to files
        groups = {str(f.relative_to(root)): [f] for f in files}
    total = sum(f.stat().st_size for f in files)
    order = sorted(groups, key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    held: list[str] = []
    size = 0
    for g in order:
        if size >= share * total:
            break
        g_size = sum(f.stat().st_size for f in groups[g])
        if size + g_size > 2.5 * share * total and len(order) > 2:  # a huge package would eat the corpus
            continue
        held.append(g)
        size += g_size
    held_files = {f for g in held for f in groups[g]}
    train = tuple(f for f in files if f not in held_files)
    if not held or not train:
        raise ValueError(f"could not split {source!r} into training and held-out files")
    return Split(root, train, tuple(sorted(held_files)), tuple(sorted(held)))


def link_tree(split: Split, dest: Path) -> Path:
    """A directory of symbolic links to the training files, at their paths under the root (sorted alike)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in split.train:
        link = dest / f.relative_to(split.root)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(f.resolve())
    return dest


class TrainStream:
    """The samples of a run whose data.source is `source`: sample k is what the orchestrator issues k-th."""

    def __init__(self, m: RunManifest, source: str):
        self.files = data.index_files(data.list_files(source))
        total = (self.files[-1].start + self.files[-1].size + 1) if self.files else 0
        self.layout = data.Layout(total, m.data.shard_bytes, m.train.sample_tokens)
        self.batch, self.seq, self.seed = m.train.batch_size, m.train.seq_len, m.seed
        if self.layout.n_samples < 1:
            raise ValueError(f"{source!r} is too small for one sample of {m.train.sample_tokens} tokens")

    @property
    def tokens(self) -> int:
        return self.layout.total_tokens

    def sample(self, k: int) -> np.ndarray:
        """(batch, seq + 1) int32 tokens of the run's k-th sample."""
        index = data.data_index(k, self.layout.n_samples, self.seed)
        return data.sample_tokens(self.files, self.layout, index, self.batch, self.seq)


def heldout_batches(files: Sequence[Path], count: int, batch: int, seq: int) -> list[np.ndarray]:
    """`count` (batch, seq + 1) token arrays at evenly spaced offsets of the held-out files' stream."""
    entries = data.index_files(list(files))
    total = entries[-1].start + entries[-1].size + 1
    need = batch * (seq + 1)
    if total < need:
        raise ValueError(f"the held-out text ({total} tokens) is shorter than one batch ({need})")
    starts = np.linspace(0, total - need, num=count).astype(np.int64)
    return [data.read_tokens(entries, int(s), need).reshape(batch, seq + 1) for s in starts]


class Evaluator:
    """Mean held-out cross-entropy of a model given as one weights dict per stage (stages of its own)."""

    def __init__(self, cfg: ModelConfig, batches: Sequence[np.ndarray], backend: str = "torch-cpu"):
        factory = get_factory(backend)
        self.stages: list[StageBackend] = [
            factory.create(cfg, s, OptimConfig(), seed=0) for s in range(cfg.n_stages)
        ]
        self.batches = list(batches)

    def loss(self, weights: Sequence[TensorDict]) -> float:
        for stage, w in zip(self.stages, weights, strict=True):
            stage.load(w)
        # The chain's own pass (bench/chain_reference.py); the gradients it leaves are never stepped.
        losses = [train_sample(self.stages, tokens, f"eval{i}") for i, tokens in enumerate(self.batches)]
        return float(np.mean(losses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=default_data(), help="a directory or glob of text files")
    args = ap.parse_args()
    split = split_corpus(args.data)
    print(split.describe())
    print("\n".join(f"  held out: {g}" for g in split.heldout_groups))


if __name__ == "__main__":
    main()
