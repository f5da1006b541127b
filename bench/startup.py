"""How fast the CLI starts: median wall time of `iota --help` and `iota doctor` over repeated runs.

Run: .venv/bin/python bench/startup.py [--runs 15]
The target for `iota --help` is under 0.3 s (it imports no ML framework, HTTP or keyring library).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time


def iota_command() -> list[str]:
    """The installed console script next to this Python, else `python -m iota_cli`."""
    script = shutil.which("iota", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "iota_cli"]


def time_runs(cmd: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15, help="runs per command (after one warm-up run)")
    args = ap.parse_args()
    base = iota_command()
    print(f"command: {' '.join(base)}   runs: {args.runs}   python: {sys.version.split()[0]}")
    for extra in (["--help"], ["doctor"]):
        cmd = base + extra
        time_runs(cmd, 1)  # warm the page cache and .pyc files
        t = time_runs(cmd, args.runs)
        print(
            f"iota {' '.join(extra):8}  median {statistics.median(t):.3f} s   "
            f"min {min(t):.3f} s   max {max(t):.3f} s"
        )


if __name__ == "__main__":
    main()
