"""The worker's live status file: what it is doing right now, for `iota status --watch` to read.

`iota join` writes `<data dir>/live.json` through its Progress (progress.py): the stage, step, tokens,
tokens/s, loss, credits and the state text (what it waits for, and since when), at most once every
`every_s` and at once when the state changes. One small JSON object, replaced whole (a rename, no
fsync: it is remade within a second), owner-only like the rest of the data dir. It holds nothing secret.

    live = LiveFile(data_dir / NAME, run_id="run-1", stage=1, kind="body", backend="torch-cpu")
    live.write(facts)            # from Progress, throttled
    read(data_dir / NAME)        # -> dict, with "running" false once its pid has gone
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iota_cli.core.files import atomic_writer

if TYPE_CHECKING:
    from iota_cli.headless.progress import Facts

NAME = "live.json"
log = logging.getLogger("iota.progress")


class LiveFile:
    def __init__(
        self, path: Path, *, run_id: str, stage: int, kind: str, backend: str, every_s: float = 1.0
    ) -> None:
        self.path, self.every_s = Path(path), every_s
        self.about = {"run_id": run_id, "stage": stage, "kind": kind, "backend": backend, "pid": os.getpid()}
        self._last: float | None = None
        self._state: str | None = None
        self._since = time.time()
        self._failed = False

    def write(self, facts: Facts, force: bool = False) -> None:
        """Record the facts now if due (every_s passed, the state changed, or force: the final word)."""
        now = time.monotonic()
        changed = facts.state != self._state
        if changed:
            self._state, self._since = facts.state, time.time()
        if not (force or changed or self._last is None or now - self._last >= self.every_s):
            return
        self._last = now
        doc = {**self.about, **asdict(facts), "state_since": self._since, "updated": time.time()}
        try:
            with atomic_writer(self.path, durable=False) as f:
                f.write(json.dumps(doc).encode())
        except OSError as e:  # a full disk must not stop training; `iota status` then shows it stale
            if not self._failed:
                log.warning("cannot write %s: %s", self.path, e.strerror or e)
            self._failed = True


def read(path: Path) -> dict[str, Any] | None:
    """The live facts a worker wrote, with `running` (its process is alive) and `age_s`; None if none."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    doc["running"] = alive(doc.get("pid"))
    doc["age_s"] = round(max(0.0, time.time() - float(doc.get("updated") or 0.0)), 1)
    return doc


def alive(pid: object) -> bool:
    """Whether a process with this pid runs (signal 0 checks without sending anything)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:  # someone else's process: it exists
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True
