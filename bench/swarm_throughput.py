"""Swarm throughput against one process: how much of one machine's speed a local swarm keeps (issue 15).

For each model (the tiny one `iota swarm` trains, and a compute-bound one) this runs, in the same run:
  - a local swarm built by iota_cli.swarm.local (the code `iota swarm` runs: an orchestrator process and
    `iota join` subprocesses on loopback), one torch-cpu worker per stage (3), a fixed max_samples;
  - the same model, batch and number of samples trained in this process, stage after stage
    (bench/chain_reference.py), with torch on 2 threads: the cores the swarm's processes share; timed
    before and after each swarm, and the swarm is set against the mean of the two (the machine's speed
    drifts between runs; both are printed).
efficiency = swarm tokens/s / one-process tokens/s. Per worker it prints the `profile:` line each worker
logs at exit (compute, waiting for work, claim/download/upload/complete/serialize, which overlap compute
on the worker's own threads) and its bytes up and down per token.

    .venv/bin/python bench/swarm_throughput.py [--models tiny,compute] [--samples N]
        [--rtt-ms 100 --loss 0.01 --mbit 50]

With --rtt-ms (or --loss/--mbit) each model also runs with every worker's traffic through a loopback
proxy of its own (iota_cli.swarm.link: that delay, that share of connections cut, that bandwidth cap),
beside the plain loopback config. With --repeat N every config runs N times (in turn, so drift spreads
over all of them), and the JSON line gives each config's median run with all the runs' efficiencies.
Last line, JSON:
  {"configs": [{"model", "rtt_ms", "loss", "mbit", "efficiency", "swarm_tokens_per_s",
   "one_process_tokens_per_s", "boundary_bytes_ratio", "efficiency_runs"}]}
boundary_bytes_ratio: f32 hidden-state bytes per token (d_model * 4) over the bytes that cross one
boundary in one direction per token, as uploaded: the tail's bytes_up / its tokens (the gradient back
across the last boundary, the same shape as the activations forward; wire dtype, zstd framing when the
run uses it, and the safetensors header included), i.e. what the bottleneck, the wire dtype and the codec
save against sending the residual stream.

Choices:
- No validator: a real one runs on another machine, so it would not compete for these cores; the
  orchestrator still samples checks (they lapse unjudged), as it would for a remote validator.
- Swarm tokens/s is tokens_processed (the run status: tokens through the tail, polled every POLL_S) over
  the steady part of the run, from STEADY[0] to STEADY[1] of its final count: process start-up, joining,
  the pipeline filling and, once max_samples are issued, draining are one-off costs a long run does not
  pay per token. The whole span, first completed sample to last, is printed beside it. The one-process
  side likewise skips its first sample (allocations, lazy init). Both count batch_size * seq_len tokens
  per sample.
- Wire: the tiny model sends float32 (tiny_manifest), the compute-bound one ModelConfig's default wire
  (int8 at 32x narrower than d_model), both zstd-framed (train.wire_codec's default), as a real run.
- CPU: every process the swarm started (reaped, start-up included) against the one process's own, per
  token: on a machine whose cores are all busy, efficiency cannot exceed their ratio.
All processes share the machine's cores (2 here): the figures are of that machine, at that load.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from chain_reference import start, train_sample
from proc_cpu import CpuSeries, Window, children_cpu_s, cpu_seconds

from iota_cli.core.manifest import RunManifest, tiny_manifest
from iota_cli.core.modelspec import ModelConfig
from iota_cli.swarm.corpus import default_data
from iota_cli.swarm.link import Link, LinkProxy
from iota_cli.swarm.local import Swarm, SwarmOptions

POLL_S = 0.5  # the status it polls costs the orchestrator CPU the swarm would use
STEADY = (0.1, 0.9)  # the share of the run's tokens between which its rate is taken
PROFILE = re.compile(r"profile: (\{.*\})")
THREADS = 2  # torch threads of the one-process side: the cores the swarm's processes share here
# The compute-bound model: d 512, 6 layers in 2+2+2. One sample (8 x 128 tokens) is ~0.6 s of forward and
# backward per stage on a core, ~0.2 s a forward item and ~0.4 s a backward: the order of the ~0.25 s an item
# of a 1B model's stage takes on a consumer GPU (issue 15), against which a worker's round trips are set.
COMPUTE_MODEL = ModelConfig(
    d_model=512,
    n_layers=6,
    n_heads=8,
    n_kv_heads=4,
    ffn_dim=1408,
    context=128,
    bottleneck_dim=16,  # 32x narrower than d_model in int8 (ModelConfig's default wire): 128x the bytes
    stages=(2, 2, 2),
)
# "compute-256", the compute model of the first measurements: a quarter of the FLOPs per token, so the
# orchestrator's and the workers' per-item costs weigh four times as much against the compute.
SMALLER = replace(COMPUTE_MODEL, d_model=256, n_heads=4, n_kv_heads=2, ffn_dim=704, bottleneck_dim=8)
MODELS = {"compute": COMPUTE_MODEL, "compute-256": SMALLER}
# Sized so the default run stays within a few minutes on 2 cores.
SAMPLES = {"tiny": 240, "compute": 64, "compute-256": 80}
TIMED = ("compute_s", "wait_s", "claim_s", "download_s", "upload_s", "complete_s", "serialize_s")


def manifest(model: str, data: str, samples: int) -> RunManifest:
    m = tiny_manifest(data, max_samples=samples)
    if model == "tiny":
        return m
    # The swarm's own leases and pacing, a bigger model and batch, the default wire (int8, zstd).
    # 16 samples in flight per head: a sample's round trip through the pipeline over a 100 ms link is
    # about 3 s (five hops of upload, complete, claim, download), and the heads must fill it (Little's law).
    # IOTA's cadence (shared/notes/iota.md): a local step every 4 backward passes, a merge once replicas
    # have done about 10 (here every 3 steps, 12 passes); the tiny run's merge every 4 passes is a loopback
    # demo's, which a model whose weights cross home links could not afford.
    train = replace(m.train, seq_len=128, batch_size=8, max_inflight_per_head=16, backward_per_step=4)
    merge = replace(m.merge, wire_dtype="BF16", interval=3)
    return replace(m, name=model, model=MODELS[model], train=train, merge=merge)


@dataclass
class SwarmResult:
    steady: Window | None  # the steady part: tokens/s, and every process's CPU in it
    whole: Window | None  # first completed sample to last
    tokens: int
    profiles: list[dict[str, Any]]  # one per worker: its stage, then its profile line
    cuts: int = 0
    problems: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU-seconds by process, at the run's end
    # The orchestrator's requests by route ("POST /v1/work/claim") and "blob bytes in"/"out".
    traffic: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.steady.tokens_per_s if self.steady else 0.0


def run_swarm(m: RunManifest, link: Link | None, home: Path, timeout_s: float = 600.0) -> SwarmResult:
    """One worker per stage, each behind its own proxy when link is given; wait for the run to end."""
    options = SwarmOptions(
        workers=m.model.n_stages, data=m.data.source, backends=("torch-cpu",), home=home, validate=False
    )
    swarm = Swarm(options=options, home=home, manifest=m)
    children0 = children_cpu_s()
    proxies: list[LinkProxy] = []
    series = CpuSeries({})
    problems: list[str] = []
    status = None
    try:
        swarm.prepare()
        born = time.monotonic()
        assert swarm.orchestrator is not None and swarm.orchestrator.proc is not None
        series.pids["orchestrator"] = swarm.orchestrator.proc.pid
        for w in swarm.workers:
            url = swarm.url
            if link is not None:
                # One proxy (one home line) per worker, seeded apart so they do not cut in lockstep.
                proxy = LinkProxy(("127.0.0.1", swarm.orchestrator.port), replace(link, seed=w.index))
                proxy.start()
                proxies.append(proxy)
                url = proxy.url
            # All stages at once: with one worker per stage nobody is crowded, so nobody is moved.
            w.start(url, swarm.run_id)
            assert w.proc is not None
            series.pids[f"stage {w.stage}"] = w.proc.pid
        deadline = time.monotonic() + timeout_s
        while swarm.any_running() and time.monotonic() < deadline:
            status = swarm.status() or status
            if status is not None:
                series.poll(status.tokens_processed)
            time.sleep(POLL_S)
        if swarm.any_running():
            problems.append(f"the run did not end in {timeout_s:.0f} s")
        traffic = scrape_traffic(swarm.url)  # before the workers stop: the orchestrator is up
        pid = swarm.orchestrator.proc.pid if swarm.orchestrator.proc else 0
        cpu = {"orchestrator": cpu_seconds(pid), "life_s": time.monotonic() - born}
        status = swarm.status() or status
    finally:
        codes = swarm.stop_workers(grace_s=30)
        swarm.stop_server()
        for p in proxies:
            p.close()
    cpu["all"] = children_cpu_s() - children0  # every process it started, reaped by now
    if bad := {i: c for i, c in codes.items() if c != 0}:
        problems.append(f"workers exited with {bad}")
    if status is not None and status.state != "finished":
        problems.append(f"the run ended {status.state}")
    final = status.tokens_processed if status else 0
    if series.polls:  # the final count at the last poll's time: stopping is not the run's
        series.polls.append((series.polls[-1][0], final, series.polls[-1][2]))
    whole = series.between(1, final)
    steady = series.between(int(STEADY[0] * final), int(STEADY[1] * final))
    profiles = []
    for w in swarm.workers:
        log = (w.home / "worker.log").read_text(errors="replace") if (w.home / "worker.log").exists() else ""
        found = PROFILE.findall(log)
        if not found:
            problems.append(f"worker {w.index} logged no profile line")
        profiles.append({"stage": w.stage, **(json.loads(found[-1]) if found else {})})
    cuts = sum(p.cuts for p in proxies)
    return SwarmResult(steady, whole, final, profiles, cuts, problems, cpu, traffic)


def scrape_traffic(url: str) -> dict[str, float]:
    """Requests by route and blob bytes each way, from the orchestrator's /metrics at the run's end."""
    import requests

    out: dict[str, float] = {}
    try:
        text = requests.get(f"{url}/metrics", timeout=10).text
    except requests.RequestException:
        return out
    for line in text.splitlines():
        if m := re.match(
            r'iota_http_requests_total\{code="\d+",method="(\w+)",route="([^"]+)"\} (\S+)', line
        ):
            key = f"{m[1]} {m[2]}"
            out[key] = out.get(key, 0.0) + float(m[3])
        elif m := re.match(r'iota_blob_bytes_total\{direction="(\w+)"\} (\S+)', line):
            out[f"blob bytes {m[1]}"] = float(m[2])
    return out


@dataclass(frozen=True)
class OneProcess:
    tokens_per_s: float
    cpu_ms_per_token: float  # this process's CPU time (all its threads) per token
    runs: tuple[float, ...] = ()  # tokens/s of each run averaged, in order

    @staticmethod
    def mean(*runs: OneProcess) -> OneProcess:
        rates = tuple(r.tokens_per_s for r in runs)
        cpu = sum(r.cpu_ms_per_token for r in runs) / len(runs)
        return OneProcess(sum(rates) / len(rates), cpu, rates)


def one_process(m: RunManifest, samples: int) -> OneProcess:
    """The chain trained in this process on `samples` samples, the first one untimed."""
    import torch

    torch.set_num_threads(THREADS)
    text = b"".join(Path(f).read_bytes() for f in sorted(glob.glob(m.data.source, recursive=True))[:400])
    data = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
    stages = start(m, "torch-cpu")
    rng = np.random.default_rng(0)
    b, t = m.train.batch_size, m.train.seq_len
    t0 = c0 = 0.0
    for i in range(1, samples + 1):
        if i == 2:
            t0, c0 = time.perf_counter(), time.process_time()
        off = int(rng.integers(0, len(data) - b * (t + 1)))
        train_sample(stages, data[off : off + b * (t + 1)].reshape(b, t + 1), work_id=f"w{i}")
        if i % m.train.backward_per_step == 0:
            for s in stages:
                s.step()
    tokens = (samples - 1) * b * t
    return OneProcess(tokens / (time.perf_counter() - t0), 1e3 * (time.process_time() - c0) / tokens)


def report(name: str, m: RunManifest, link: Link, swarm: SwarmResult, alone: OneProcess) -> dict[str, Any]:
    one, one_cpu_ms = alone.tokens_per_s, alone.cpu_ms_per_token
    whole = swarm.whole or Window({}, 0.0, 0)
    # The tail uploads only the gradient across the last boundary, the size of the activations that
    # crossed it forward; the head's uploads also carry its proof of work, which goes to the validator.
    tail = swarm.profiles[-1] if swarm.profiles else {}
    per_token = tail.get("bytes_up", 0) / tail["tokens"] if tail.get("tokens") else 0.0
    ratio = m.model.d_model * 4 / per_token if per_token else 0.0
    eff = swarm.tokens_per_s / one if one else 0.0
    print(
        f"\n{name:8} rtt {link.rtt_ms:5.0f} ms  loss {link.loss:.3f}  mbit {link.mbit or 'inf'}  "
        f"wire {m.model.wire_dtype}: swarm {swarm.tokens_per_s:8.0f} tok/s  one-process {one:8.0f} tok/s  "
        f"efficiency {eff:.3f}  boundary {per_token:.1f} B/token (ratio {ratio:.1f})"
    )
    if len(alone.runs) > 1:
        print(
            "  one process before and after the swarm: "
            + ", ".join(f"{r:.0f}" for r in alone.runs)
            + " tok/s"
        )
    print(
        f"  {swarm.tokens} tokens through the tail in {whole.wall_s:.1f} s ({whole.tokens_per_s:.0f} "
        f"tok/s first to last, efficiency {whole.tokens_per_s / one if one else 0:.3f}); "
        f"connections cut by the proxies: {swarm.cuts}"
    )
    if steady := swarm.steady:
        # Start-up and draining left out: what a long run pays per token, and whether the cores were full.
        print(
            f"  steady part, {steady.wall_s:.1f} s: {steady.cores_busy:.2f} cores busy; CPU-ms per token "
            + ", ".join(f"{k} {steady.ms_per_token(k):.3f}" for k in steady.cpu_s)
            + f"; all {steady.ms_per_token():.3f} (one process {one_cpu_ms:.3f})"
        )
    print(
        "  stage "
        + " ".join(f"{k:>11}" for k in TIMED)
        + f" {'tokens':>8} {'up B/tok':>9} {'down B/tok':>10}"
    )
    for p in swarm.profiles:
        tok = p.get("tokens", 0) or 0
        up = p.get("bytes_up", 0) / tok if tok else 0.0
        down = p.get("bytes_down", 0) / tok if tok else 0.0
        print(
            f"  {p['stage']:5} "
            + " ".join(f"{p.get(k, 0.0):11.2f}" for k in TIMED)
            + f" {tok:8} {up:9.1f} {down:10.1f}"
        )
    cols = ("compute", "step", "merge", "checkpoint", "loop", "process")
    print("  stage CPU-s: " + " ".join(f"{c:>10}" for c in cols) + "  (loop: the loop thread, start-up too)")
    for p in swarm.profiles:
        print(f"  {p['stage']:5}        " + " ".join(f"{p.get(c + '_cpu_s', 0.0):10.2f}" for c in cols))
    if orch := swarm.cpu_s.get("orchestrator"):
        life = swarm.cpu_s["life_s"]
        print(f"  orchestrator: {orch:.1f} CPU-s in its {life:.1f} s ({orch / life:.2f} of a core)")
    if swarm.traffic and swarm.tokens:
        per_item = m.train.batch_size * m.train.seq_len / swarm.tokens  # per sample through the tail
        routes = sorted(((n, k) for k, n in swarm.traffic.items() if not k.startswith("blob")), reverse=True)
        print(
            "  orchestrator requests per sample: "
            + ", ".join(f"{k} {n * per_item:.2f}" for n, k in routes[:8])
        )
        io = {k.split()[-1]: v for k, v in swarm.traffic.items() if k.startswith("blob")}
        print(
            f"  blob bytes through the orchestrator per token: in {io.get('in', 0) / swarm.tokens:.0f}, "
            f"out {io.get('out', 0) / swarm.tokens:.0f}"
        )
    if (every := swarm.cpu_s.get("all")) and swarm.tokens:
        print(
            f"  every process of the swarm: {every:.1f} CPU-s, start-up included "
            f"({1e3 * every / swarm.tokens:.3f} CPU-ms per token; one process: {one_cpu_ms:.3f})"
        )
    for problem in swarm.problems:
        print(f"  problem: {problem}")
    return {
        "model": name,
        "rtt_ms": link.rtt_ms,
        "loss": link.loss,
        "mbit": link.mbit,
        "efficiency": round(eff, 4),
        "swarm_tokens_per_s": round(swarm.tokens_per_s, 1),
        "one_process_tokens_per_s": round(one, 1),
        "boundary_bytes_ratio": round(ratio, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,compute", help="comma-separated: tiny, compute, compute-256")
    ap.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time the proxy adds, ms")
    ap.add_argument("--loss", type=float, default=0.0, help="share of connections the proxy cuts")
    ap.add_argument("--mbit", type=float, default=0.0, help="bandwidth cap per worker, Mbit/s (0: none)")
    ap.add_argument("--samples", type=int, default=0, help="samples per config (default: per model)")
    ap.add_argument("--data", default=default_data(), help="glob of text files")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each config; the JSON gives the median")
    ap.add_argument("--inflight", type=int, default=0, help="samples per head in flight (default: manifest)")
    args = ap.parse_args()
    links = [Link()]
    if args.rtt_ms or args.loss or args.mbit:
        links.append(Link(rtt_ms=args.rtt_ms, loss=args.loss, mbit=args.mbit))
    print(f"cores shared by every process here: {len(os.sched_getaffinity(0))}")
    configs = []
    for name in args.models.split(","):
        samples = args.samples or SAMPLES[name]
        m = manifest(name, args.data, samples)
        if args.inflight:
            m = replace(m, train=replace(m.train, max_inflight_per_head=args.inflight))
        before = one_process(m, samples)
        for link in [link for _ in range(args.repeat) for link in links]:
            home = Path(tempfile.mkdtemp(prefix=f"iota-throughput-{name}-"))
            try:
                result = run_swarm(m, None if link == Link() else link, home)
            finally:
                with contextlib.suppress(OSError):
                    shutil.rmtree(home)
            # The one process is timed again after the swarm, and the swarm is set against the mean: a
            # shared machine's speed drifts by 10-30% over minutes here, which a ratio of two runs taken
            # one after the other reads as efficiency.
            after = one_process(m, samples)
            configs.append(report(name, m, link, result, OneProcess.mean(before, after)))
            before = after
    print(json.dumps({"configs": median_by_config(configs)}))


def median_by_config(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (model, link): the run of median efficiency, with every run's efficiency beside it."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["rtt_ms"], r["loss"], r["mbit"]), []).append(r)
    out = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r["efficiency"])
        out.append({**ranked[(len(ranked) - 1) // 2], "efficiency_runs": [r["efficiency"] for r in group]})
    return out


if __name__ == "__main__":
    main()
