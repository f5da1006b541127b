"""Does the swarm train as well as one machine? Held-out loss of merged replicas against one process.

Every configuration trains the same model on the same tokens (the orchestrator's own sample order over
the training files of a held-out split, bench/heldout.py) with a fixed global batch of G sequences per
optimizer step, for the same number of optimizer steps:
  - the reference: one process, one replica of each stage chained, batch G (gradients accumulated
    over G / batch samples);
  - a swarm of 3 stages x R replicas, simulated here as R pipelines of G / R sequences per step, each
    stage's replicas merged every `interval` steps by the swarm's own code (core.flat, core.outer):
    "diloco" and "average" as the manifest names them, and "sync" (gradients averaged before every step:
    data parallel, measured here only);
  - the default strategy through the real stack: an orchestrator and 3 x R `iota join` processes
    (bench/convergence_stack.py), its final published weights evaluated by the same code.
Prints a table and, last, one JSON line:
  {"reference_loss", "default", "configs": [{"strategy", "replicas", "interval", "real_stack", "loss",
   "ratio", "merge_bytes_per_token"}]}
merge_bytes_per_token is what a replica sends and receives to merge, per token it trains, summed over the
three stages (one replica of each): the swarm's merge traffic over its training tokens.

    .venv/bin/python bench/convergence.py [--quick] [--data DIR]

--quick runs only the reference and the manifest's default merge (MergeConfig()) at R = 2 and 4 through
the real stack. The full run (the sweep, then its pick through the real stack) takes about 30 minutes on
2 cores; --steps shortens both while trying it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from convergence_sim import Config, Plan, reference, simulate
from heldout import Evaluator, TrainStream, heldout_batches, link_tree, split_corpus

from iota_cli.core.flat import WIRE_SIZES, FlatLayout
from iota_cli.core.manifest import MergeConfig
from iota_cli.swarm.corpus import default_data

MERGED = ("diloco", "average")  # the strategies a manifest can name
REPLICAS = (2, 4)
INTERVALS = (2, 5, 10)
TOLERANCE = 0.03  # the target: within 3% of one process


@dataclass(frozen=True)
class Result:
    config: Config
    loss: float
    ratio: float
    merge_bytes_per_token: float
    seconds: float

    def row(self) -> dict[str, Any]:
        c = self.config
        return {
            "strategy": c.strategy,
            "replicas": c.replicas,
            "interval": c.interval,
            "real_stack": c.real_stack,
            "loss": round(self.loss, 5),
            "ratio": round(self.ratio, 5),
            "merge_bytes_per_token": round(self.merge_bytes_per_token, 4),
        }


# --- byte accounting (the design's: per replica and round, for an n-element stage) ----------------------


def round_bytes(n: int, replicas: int, strategy: str, wire: str) -> float:
    """Bytes one replica sends + receives in one round: its update, the slices of the (up to) two
    partitions it owns from every other replica, its results for them, and the merged values of the
    partitions it does not own. The outer momentum it owns stays cached, so it is not counted."""
    if replicas < 2:
        return 0.0
    w = WIRE_SIZES[wire]
    # diloco sends f32 weights and the momentum; average f32 weights; sync the mean gradient in wire dtype.
    result, merged = {"diloco": (4 + w, 4), "average": (4, 4), "sync": (w, w)}[strategy]
    part, own = n / replicas, min(2, replicas)
    return w * n + own * part * (replicas - 1) * w + own * part * result + (replicas - own) * part * merged


def bytes_per_token(plan: Plan, config: Config, rounds: int, wire: str) -> float:
    """The swarm's merge bytes (every replica of every stage) over its training tokens."""
    per_round = sum(
        config.replicas
        * round_bytes(FlatLayout.of(plan.model, s).size, config.replicas, config.strategy, wire)
        for s in range(plan.model.n_stages)
    )
    return rounds * per_round / plan.tokens


def sweep_configs(replicas: Sequence[int] = REPLICAS, intervals: Sequence[int] = INTERVALS) -> list[Config]:
    out = [Config("sync", r, 1) for r in replicas]
    return out + [Config(s, r, h) for s in MERGED for h in intervals for r in replicas]


# --- choosing the default, and the report ----------------------------------------------------------------


def choose_default(results: Sequence[Result]) -> tuple[Config, str]:
    """The (strategy, interval) with the lowest held-out ratio at the largest R among those within
    TOLERANCE at the smallest R (else the lowest worst ratio), and why, in words."""
    table: dict[tuple[str, int], dict[int, float]] = {}
    for r in results:
        c = r.config
        if c.strategy in MERGED and not c.real_stack:
            table.setdefault((c.strategy, c.interval), {})[c.replicas] = r.ratio
    if not table:
        raise ValueError("no swarm configuration of a manifest strategy to choose from")
    lo, hi = min(REPLICAS), max(REPLICAS)
    full = {k: v for k, v in table.items() if lo in v and hi in v}
    pool = full or table
    holding = {k: v for k, v in pool.items() if v.get(lo, np.inf) <= 1 + TOLERANCE}
    if holding:
        pick = min(holding, key=lambda k: (holding[k][hi], holding[k][lo]))
        why = (
            f"lowest held-out ratio at R={hi} ({holding[pick][hi]:.4f}) among the {len(holding)} "
            f"(strategy, interval) pairs within {TOLERANCE:.0%} of one process at R={lo}"
        )
    else:
        pick = min(pool, key=lambda k: max(pool[k].values()))
        why = f"no pair is within {TOLERANCE:.0%} at R={lo}; this one has the lowest worst ratio"
    return Config(pick[0], hi, pick[1]), why


def table(reference_loss: float, results: Sequence[Result]) -> str:
    head = (
        f"{'strategy':9} {'R':>2} {'interval':>8} {'real':>5} {'held-out':>9} {'ratio':>7} "
        f"{'B/token':>9} {'s':>6}"
    )
    lines = [
        head,
        f"{'reference':9} {1:>2} {'-':>8} {'-':>5} {reference_loss:9.4f} {1:7.4f} {0:9.3f} {'':>6}",
    ]
    for r in results:
        c = r.config
        lines.append(
            f"{c.strategy:9} {c.replicas:>2} {c.interval:>8} {'yes' if c.real_stack else 'no':>5} "
            f"{r.loss:9.4f} {r.ratio:7.4f} {r.merge_bytes_per_token:9.3f} {r.seconds:6.0f}"
        )
    return "\n".join(lines)


@dataclass
class Bench:
    plan: Plan
    source: str
    home: Path
    results: list[Result] = field(default_factory=list)
    reference_loss: float = 0.0
    problems: list[str] = field(default_factory=list)  # what went wrong in real-stack runs

    def __post_init__(self) -> None:
        self.split = split_corpus(self.source)
        self.train_dir = link_tree(self.split, self.home / "train")
        self.stream = TrainStream(
            self.plan.manifest(str(self.train_dir), 1, MergeConfig()), str(self.train_dir)
        )
        batches = heldout_batches(self.split.heldout, self.plan.eval_batches, self.plan.batch, self.plan.seq)
        self.evaluator = Evaluator(self.plan.model, batches, self.plan.backend)

    def run_reference(self) -> float:
        t0 = time.monotonic()
        self.reference_loss = self.evaluator.loss(reference(self.plan, self.stream))
        print(f"reference: held-out {self.reference_loss:.4f} ({time.monotonic() - t0:.0f} s)", flush=True)
        return self.reference_loss

    def record(self, config: Config, loss: float, bpt: float, seconds: float) -> Result:
        r = Result(config, loss, loss / self.reference_loss, bpt, seconds)
        self.results.append(r)
        print(table(self.reference_loss, [r]).splitlines()[-1], flush=True)
        return r

    def run_sim(self, config: Config, base: MergeConfig | None = None) -> Result:
        t0, merge = time.monotonic(), config.merge(base)
        weights, rounds = simulate(self.plan, self.stream, config, merge)
        bpt = bytes_per_token(self.plan, config, rounds, merge.wire_dtype)
        return self.record(config, self.evaluator.loss(weights), bpt, time.monotonic() - t0)

    def run_real(self, config: Config, base: MergeConfig | None = None) -> Result:
        from convergence_stack import run_stack

        t0, merge = time.monotonic(), config.merge(base)
        m = self.plan.manifest(str(self.train_dir), config.replicas, merge)
        out = run_stack(m, config.replicas, self.home / f"stack-{config.strategy}-r{config.replicas}")
        print(
            f"real stack R={config.replicas}: {out.tokens:,} tokens in {out.wall_s:.0f} s, stage epochs "
            f"{out.epochs}, merge bytes {'logged' if out.logged_bytes is not None else 'computed'}",
            flush=True,
        )
        for problem in out.problems:
            print(f"  problem: {problem}", flush=True)
        self.problems += out.problems
        bpt = out.bytes_per_token(lambda rounds: bytes_per_token(self.plan, config, rounds, merge.wire_dtype))
        loss = self.evaluator.loss(out.weights)
        return self.record(replace(config, real_stack=True), loss, bpt, time.monotonic() - t0)

    def run_sweep(self, configs: Sequence[Config], jobs: int) -> None:
        """The reference and every configuration in `jobs` processes of one thread each (one process per
        core trains more tokens per second than one process using both: the matrices are small)."""
        if jobs <= 1:
            self.run_reference()
            for c in configs:
                self.run_sim(c)
            return
        args = (self.plan, self.source, self.home)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=one_thread) as pool:
            ref = pool.submit(train_one, *args, None)
            futures = [(c, pool.submit(train_one, *args, c)) for c in configs]
            self.reference_loss, _, seconds = ref.result()
            print(f"reference: held-out {self.reference_loss:.4f} ({seconds:.0f} s)", flush=True)
            for c, f in futures:
                loss, bpt, seconds = f.result()
                self.record(c, loss, bpt, seconds)

    def report(self, default: str) -> dict[str, Any]:
        return {
            "reference_loss": round(self.reference_loss, 5),
            "default": default,
            "configs": [r.row() for r in self.results],
        }


def one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # read when the child first imports torch, after this


def train_one(plan: Plan, source: str, home: Path, config: Config | None) -> tuple[float, float, float]:
    """In a sweep process: (held-out loss, merge bytes per token, seconds) of the reference (None) or of
    one simulated configuration."""
    bench = Bench(plan, source, home)
    t0 = time.monotonic()
    if config is None:
        return bench.evaluator.loss(reference(plan, bench.stream)), 0.0, time.monotonic() - t0
    merge = config.merge()
    weights, rounds = simulate(plan, bench.stream, config, merge)
    loss = bench.evaluator.loss(weights)
    return loss, bytes_per_token(plan, config, rounds, merge.wire_dtype), time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="reference + the default merge through the real stack"
    )
    ap.add_argument("--data", default=default_data(), help="a directory or glob of text files (the corpus)")
    ap.add_argument("--steps", type=int, default=Plan.steps, help="optimizer steps of every configuration")
    ap.add_argument(
        "--home", type=Path, default=None, help="where runs keep their files (default: a temp dir)"
    )
    ap.add_argument("--jobs", type=int, default=2, help="processes the sweep trains in (one thread each)")
    args = ap.parse_args()
    # One thread per process, set before torch is first imported: two threads on two shared cores spin
    # and measured 4x slower than one (527 vs 2,214 tokens/s beside other work); the sweep uses --jobs.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.monotonic()
    home = args.home or Path(tempfile.mkdtemp(prefix="iota-convergence-"))
    bench = Bench(replace(Plan(), steps=args.steps), args.data, home)
    p = bench.plan
    print(bench.split.describe())
    print(
        f"model {sum(FlatLayout.of(p.model, s).size for s in range(p.model.n_stages)):,} parameters; "
        f"G = {p.global_batch} x {p.seq} tokens per step, {p.steps} steps, {p.tokens:,} training tokens; "
        f"held-out {p.eval_batches} x {p.batch} x {p.seq} tokens",
        flush=True,
    )
    if args.quick:
        bench.run_reference()
        default = MergeConfig()
        pick, why = (
            Config(default.strategy, max(REPLICAS), default.interval),
            "the manifest's default (--quick)",
        )
    else:
        bench.run_sweep(sweep_configs(), args.jobs)
        pick, why = choose_default(bench.results)
    print(f"default: {pick.strategy} every {pick.interval} steps: {why}", flush=True)
    for r in REPLICAS:
        bench.run_real(replace(pick, replicas=r))
    print()
    print(table(bench.reference_loss, bench.results))
    print(f"total {time.monotonic() - started:.0f} s; runs under {home}")
    print(json.dumps(bench.report(pick.strategy)))


if __name__ == "__main__":
    main()
