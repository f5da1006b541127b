"""What validation costs: the validator's CPU time as a share of the swarm's, at the run's sampling rate.

Run: .venv/bin/python bench/validator_cost.py [--workers 6] [--max-steps 60] [--sample-rate 0.05]

Starts a local swarm the way `iota swarm` does (a real orchestrator, its validator and N `iota join`
processes on loopback, torch-cpu), trains the tiny run to its end, and reads every process's CPU seconds
from /proc while it runs (the last reading before it exits). The share is validator CPU-s / worker CPU-s:
the validator recomputes every item of a newcomer until it passes once, then `--sample-rate` of them,
and scores merge updates on held-out tokens the same way. Prints a table per process, then one JSON line:
{"sample_rate", "checks_judged", "validator_cpu_s", "workers_cpu_s", "validator_share", "tokens"}.
Run it alone: other jobs on the cores inflate every figure (the share less than the seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from iota_cli.core.manifest import TrustConfig
from iota_cli.swarm.local import Swarm, SwarmOptions

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float | None:
    """utime + stime of a live process, in seconds (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--sample-rate", type=float, default=TrustConfig().sample_rate)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="iota-validator-cost-"))
    options = SwarmOptions(workers=args.workers, max_steps=args.max_steps, backends=("torch-cpu",), home=home)
    swarm = Swarm.create(options, home)
    trust = replace(swarm.manifest.trust, sample_rate=args.sample_rate)
    swarm.manifest = replace(swarm.manifest, trust=trust)
    last: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        swarm.start()
        assert swarm.validator is not None and swarm.validator.proc is not None
        pids = {f"worker-{w.index}": w for w in swarm.workers}
        while swarm.any_running() and time.monotonic() - t0 < options.timeout_s:
            for name, w in pids.items():
                if w.proc is not None and (s := cpu_s(w.proc.pid)) is not None:
                    last[name] = s
            if (s := cpu_s(swarm.validator.proc.pid)) is not None:
                last["validator"] = s
            time.sleep(0.25)
        status = swarm.status()
        swarm.stop_workers()
    finally:
        swarm.stop_server()
    log = (home / "validator.log").read_text()
    judged = re.findall(r"validator: (\d+) checks judged", log)
    workers = sum(v for k, v in last.items() if k != "validator")
    validator = last.get("validator", 0.0)
    print(f"{'process':<12} {'CPU-s':>8}")
    for name in sorted(last):
        print(f"{name:<12} {last[name]:>8.1f}")
    share = validator / workers if workers else 0.0
    print(f"validator share of the workers' CPU: {share:.3f} at sample rate {args.sample_rate}")
    print(
        json.dumps(
            {
                "sample_rate": args.sample_rate,
                "checks_judged": int(judged[-1]) if judged else 0,
                "validator_cpu_s": round(validator, 2),
                "workers_cpu_s": round(workers, 2),
                "validator_share": round(share, 4),
                "tokens": status.tokens_processed if status else 0,
            }
        )
    )


if __name__ == "__main__":
    main()
