"""Text for a local run to train on: the Python standard library's source, or a small generated corpus.

`iota swarm` trains on default_data() unless told otherwise. write_corpus() makes a few deterministic
files of words, small enough that a run's data is indexed in milliseconds: the tests and
bench/orchestrator_load.py use it, and it lives here, in the package, so the bench can import it.
Try it: `python -c "from pathlib import Path; from iota_cli.swarm.corpus import *; write_corpus(Path('c'))"`.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

# A sentence reads better than 14 quoted words.
WORDS = "alpha beta gamma delta stage merge swarm token loss head tail body epoch credit".split()  # noqa: SIM905


def default_data() -> str:
    """The Python standard library's own source: real text present on every machine."""
    return str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")


def write_corpus(root: Path, files: int = 4, words: int = 6000, seed: int = 0) -> Path:
    """Deterministic text files of words under root (the orchestrator shards any directory of text)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(words)) + "\n")
    return root
