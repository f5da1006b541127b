"""What `iota swarm` checks before it starts anything, and how it says why a swarm could not go on.

A bad --backends name or a --data directory without enough text fails here in a moment, before a process
starts (exit 2: the argument is wrong); a worker that exits early is reported with the `error:` and
`hint:` lines from its own log. Try it: `iota swarm --backends nosuch` or `iota swarm --data /tmp/empty`.
"""

from __future__ import annotations

import os
from pathlib import Path

from iota_cli import output
from iota_cli.core.manifest import RunManifest
from iota_cli.core.textfiles import text_files

# Exit codes a worker's exit passes through to `iota swarm`'s; anything else (a signal, a usage error we
# caused) is reported as a plain failure.
PASSED_ON = (output.EXIT_FAIL, output.EXIT_UNAVAILABLE, output.EXIT_CONFIG)


class SwarmError(output.Failure):
    """The swarm cannot start or go on; code is `iota swarm`'s exit status (output.EXIT_*)."""


def check_backends(names: tuple[str, ...]) -> None:
    """Every name must be a registered backend (entry points only: no framework is imported)."""
    from iota_cli.core.backend import known_names

    known = known_names()
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        listed = ", ".join(map(repr, unknown))
        what = f"unknown backend{'s' * (len(unknown) > 1)} {listed}" if unknown else "no backend given"
        raise SwarmError(
            f"--backends: {what} (known: {', '.join(known) or 'none installed'})",
            code=output.EXIT_USAGE,
            hint="`iota backends` says which ones this machine can run",
        )


def check_data(source: Path, manifest: RunManifest) -> None:
    """The --data directory must hold at least one training sample of text (SwarmError, exit 2, if not)."""
    problem = data_problem(source, manifest)
    if problem:
        raise SwarmError(problem, code=output.EXIT_USAGE, hint="point --data at a directory of text files")


def data_problem(source: Path, manifest: RunManifest) -> str | None:
    """What is wrong with source as the orchestrator counts it (iota_orchestrator/data.py: the text files'
    bytes, each file followed by one end-of-text token, must hold one sample), or None when it is enough."""
    need = manifest.train.sample_tokens
    files = tokens = 0
    for path in text_files(str(source)):
        files += 1
        tokens += path.stat().st_size + 1
        if tokens >= need:
            return None  # one sample is enough; a large corpus is not read any further
    if files == 0:
        return f"--data {source}: no text files in it (it is empty, or holds only binary or hidden files)"
    t = manifest.train
    return (
        f"--data {source}: too little text ({tokens - files:,} bytes in {files} file{'s' * (files > 1)}); "
        f"need at least {need - files:,} bytes (one sample: {t.batch_size} sequences of {t.seq_len + 1})"
    )


def log_reason(path: Path, tail_bytes: int = 64 * 1024) -> tuple[str, str | None]:
    """Why a process stopped, from the end of its log file (see reason())."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            return reason(f.read().decode(errors="replace").splitlines())
    except OSError as e:
        return f"its log could not be read ({e.strerror})", None


def reason(output_lines: list[str]) -> tuple[str, str | None]:
    """Why a process stopped, from its output: (message, hint) of its last `error:` line and the `hint:`
    right after it, else its last ERROR record, else its last line (a traceback's names the exception)."""
    lines = [line.strip() for line in output_lines if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if errors:
        i = errors[-1]
        after = lines[i + 1] if i + 1 < len(lines) else ""
        hint = after.removeprefix("hint: ") if after.startswith("hint: ") else None
        return lines[i].removeprefix("error: "), hint
    records = [line for line in lines if " ERROR " in line or " CRITICAL " in line]
    if records:
        return records[-1].split(": ", 1)[-1], None
    return (lines[-1] if lines else "it printed nothing"), None
