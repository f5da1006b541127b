"""CPU-seconds of processes, read from Linux /proc, for the benches that set a swarm against one process.

from proc_cpu import CpuSeries
s = CpuSeries({"orchestrator": pid})
s.poll(tokens)            # every POLL_S, with the run's token count
s.between(lo, hi)         # CPU-seconds by process, wall seconds and tokens between two token counts
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """user + system CPU-seconds of a live process (all its threads), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """user + system CPU-seconds of every reaped child process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Window:
    """What every process spent between two polls: CPU-seconds by name, wall seconds, tokens."""

    cpu_s: dict[str, float]
    wall_s: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def cores_busy(self) -> float:
        return sum(self.cpu_s.values()) / self.wall_s if self.wall_s else 0.0

    def ms_per_token(self, name: str | None = None) -> float:
        spent = sum(self.cpu_s.values()) if name is None else self.cpu_s.get(name, 0.0)
        return 1e3 * spent / self.tokens if self.tokens else 0.0


@dataclass
class CpuSeries:
    """Polls of (time, tokens, CPU-seconds by process): the steady part of a run is read from them,
    since start-up (imports, joining) and draining are one-off costs a long run does not pay per token."""

    pids: dict[str, int]
    polls: list[tuple[float, int, dict[str, float]]] = field(default_factory=list)

    def poll(self, tokens: int) -> None:
        cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.polls.append((time.monotonic(), tokens, cpu))

    def between(self, lo: int, hi: int) -> Window | None:
        """From the first poll that saw at least lo tokens to the first that saw hi."""
        a = next((p for p in self.polls if p[1] >= max(lo, 1)), None)
        b = next((p for p in self.polls if p[1] >= hi), None)
        if a is None or b is None or b[0] <= a[0]:
            return None
        # A process gone by b (its /proc entry read 0) has no figure for the window.
        cpu = {k: b[2][k] - a[2][k] for k in self.pids if b[2].get(k) and a[2].get(k) is not None}
        return Window(cpu, b[0] - a[0], b[1] - a[1])
