"""Load on the orchestrator: N simulated workers on loopback, requests/s and latency per endpoint, for
each database and replica count side by side in one run.

Run: .venv/bin/python bench/orchestrator_load.py [--workers 100] [--duration 20] [--sync normal|full]
     [--configs sqlite:1,postgresql:1,postgresql:3] [--item-s 0.25] [--watch]
  --configs: database:replicas; PostgreSQL is a throwaway server from Debian's binaries (tests/pg_server.py)
             and N replicas are `serve --workers N` on one port; the blobs stay in the data dir.
  --item-s:  seconds of simulated compute between a claim and its complete (0: none, the saturating load;
             ITEM_S_1B, 0.25: a stage of a 1B-parameter model on a consumer GPU).
  --watch:   also poll the dashboard's /v1/dashboard every 2 s and scrape /metrics every 15 s.

Each simulated worker does what `iota join` does, with stand-in tensors of the right shapes: register,
assignment, then a loop of claim -> download inputs -> (compute) -> upload result -> complete, a heartbeat
every heartbeat_s (10 s at the default 30 s lease). Claims long-poll (`wait_s`, 2 s like `iota join`), so
`claim` is the time until an item arrived (waiting included), `claim_ready` the same from the moment the
item could be had (its input completed; a head's forward: the request), and `claim_204` a wait that ended
empty; with --claim-wait 0 workers poll instead and pause 0.5-1 s after a 204. The workers are asyncio
tasks over keep-alive connections with a minimal HTTP/1.1 client, so a thousand of them cost little CPU
next to the server (they share its cores here: figures are of this machine at that load). Prints, per
config and endpoint: requests, requests/s, p50 and p99 latency in ms, the server's CPU share (every
replica); last, one JSON line: {"configs": [{"database", "replicas", "workers", "requests_per_s",
"p99_ms": {"complete", "heartbeat", "claim_ready"}, "items_per_s", "errors", "server_cpu_share"}]}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.tensors import RawTensor, encode
from iota_cli.swarm.corpus import write_corpus
from iota_cli.swarm.orchestrator import OrchestratorProcess

# A stage of a 1B-parameter model on a consumer GPU, IOTA's 4 x 800-token item: about 0.25 s of compute
# (issue 15's FLOP estimate); a worker claims and completes about that often, heartbeats every 10 s.
ITEM_S_1B = 0.25
LAT: dict[str, list[float]] = defaultdict(list)
ERRORS: dict[str, int] = defaultdict(int)


class Conn:
    """One keep-alive HTTP/1.1 connection; enough for an API that always sends Content-Length."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict | None = None, name: str = ""
    ):
        for attempt in range(2):
            try:
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
                t0 = time.perf_counter()
                head = [
                    f"{method} {path} HTTP/1.1",
                    f"Host: {self.host}",
                    f"Content-Length: {len(body)}",
                    "X-Iota-Protocol: 1",
                ]
                head += [f"{k}: {v}" for k, v in (headers or {}).items()]
                self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
                await self.writer.drain()
                status = int((await self.reader.readline()).split()[1])
                length, close = 0, False
                while (line := await self.reader.readline()) not in (b"\r\n", b""):
                    k, _, v = line.decode("latin-1").partition(":")
                    k = k.strip().lower()
                    if k == "content-length":
                        length = int(v)
                    elif k == "connection" and "close" in v.lower():
                        close = True
                data = await self.reader.readexactly(length) if length else b""
                if name:
                    LAT[name].append(time.perf_counter() - t0)
                if close:
                    self.close()
                return status, data
            except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
                self.close()
                if attempt:
                    ERRORS[name or path] += 1
                    return 599, b""
        return 599, b""

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


EXISTS: dict[tuple[int, int, str], float] = {}  # (sample, stage, kind) -> when its input was completed


def follows(item: dict, n_stages: int) -> tuple[int, int, str] | None:
    """The item a completed one makes claimable: the next stage's forward, or the backward it returns."""
    s, k, last = item["sample_id"], item["stage"], n_stages - 1
    if item["kind"] == "forward":
        return (s, k + 1, "forward") if k < last else (s, k - 1, "backward")
    return (s, k - 1, "backward") if k > 0 else None


class Worker:
    def __init__(
        self, host: str, port: int, run_id: str, index: int, claim_wait: float, item_s: float = 0.0
    ) -> None:
        # Two connections, as the real worker has: its main loop and its heartbeat thread.
        self.conn, self.beat = Conn(host, port), Conn(host, port)
        self.run_id, self.index, self.claim_wait, self.item_s = run_id, index, claim_wait, item_s
        self.auth: dict[str, str] = {}
        self.items = 0

    async def call(
        self, method: str, path: str, body: object = None, name: str = "", conn: Conn | None = None
    ):
        raw = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json", **self.auth}
        status, data = await (conn or self.conn).request(method, path, raw, headers, name)
        return status, (json.loads(data) if data else None)

    async def start(self) -> None:
        caps = {"backend": "sim", "memory_bytes": 0, "throughput": random.uniform(50, 150)}
        _, reg = await self.call("POST", "/v1/contributors", {"name": f"sim{self.index}", **caps}, "register")
        self.auth = {"Authorization": f"Bearer {reg['token']}"}
        _, a = await self.call("POST", "/v1/assignment", {"run_id": self.run_id, **caps}, "assignment")
        self.a = a
        m = a["manifest"]
        shape = (m["train"]["batch_size"], m["train"]["seq_len"], m["model"]["bottleneck_dim"])
        n = shape[0] * shape[1] * shape[2] * 4
        self.blobs = {k: encode({k: RawTensor("F32", shape, bytes(n))}) for k in ("activations", "grad")}

    async def heartbeats(self, until: float) -> None:
        await asyncio.sleep(random.uniform(0, self.a["heartbeat_s"]))
        while time.monotonic() < until:
            body = {"run_id": self.run_id, "stage": self.a["stage"], "step": self.items // 4, "epoch": 0}
            await self.call("POST", "/v1/heartbeat", body, "heartbeat", self.beat)
            await asyncio.sleep(min(self.a["heartbeat_s"], max(until - time.monotonic(), 0)))

    async def work(self, until: float) -> None:
        last = self.a["n_stages"] - 1
        while time.monotonic() < until:
            t0 = time.perf_counter()
            body = {"run_id": self.run_id, "wait_s": self.claim_wait}
            asked = time.monotonic()
            status, item = await self.call("POST", "/v1/work/claim", body)
            LAT["claim" if status == 200 else "claim_204"].append(time.perf_counter() - t0)
            if status != 200:
                await asyncio.sleep(random.uniform(0.5, 1.0) if not self.claim_wait else 0.0)
                continue
            # From the moment the item could be had (its input completed), not from the request.
            key = (item["sample_id"], item["stage"], item["kind"])
            LAT["claim_ready"].append(time.monotonic() - max(asked, EXISTS.pop(key, asked)))
            if self.item_s:  # the compute a real stage does between its claim and its complete
                await asyncio.sleep(self.item_s * random.uniform(0.8, 1.2))
            for ref in (item.get("tokens"), item.get("input")):
                if ref:
                    await self.conn.request("GET", ref["url"], name="blob_get")
            tail = item["kind"] == "forward" and item["stage"] == last
            body: dict = {"sha256": None, "size": 0, "loss": 3.0 if tail else None}
            if item["upload"]:
                data = self.blobs["activations" if item["kind"] == "forward" and not tail else "grad"]
                sha = hashlib.sha256(data).hexdigest()
                await self.conn.request(
                    "PUT", item["upload"]["url"], data, {"X-Iota-Sha256": sha}, "blob_put"
                )
                body.update(sha256=sha, size=len(data))
            status, _ = await self.call("POST", f"/v1/work/{item['work_id']}/complete", body, "complete")
            self.items += status == 200
            if status == 200 and (nxt := follows(item, last + 1)) is not None:
                EXISTS[nxt] = time.monotonic()


async def watch(host: str, port: int, until: float) -> None:
    """Someone watching: the dashboard's page polls every 2 s, Prometheus scrapes every 15 s."""
    conn, scrape = Conn(host, port), 0.0
    while time.monotonic() < until:
        await conn.request("GET", "/v1/dashboard", name="dashboard")
        if time.monotonic() >= scrape:
            scrape = time.monotonic() + 15.0
            await conn.request("GET", "/metrics", name="metrics")
        await asyncio.sleep(min(2.0, max(until - time.monotonic(), 0)))


async def drive(
    url: str,
    run_id: str,
    n: int,
    duration: float,
    claim_wait: float,
    watching: bool = False,
    item_s: float = 0.0,
) -> dict:
    parts = urlsplit(url)
    workers = [Worker(parts.hostname, parts.port, run_id, i, claim_wait, item_s) for i in range(n)]
    gate = asyncio.Semaphore(50)

    async def start(w: Worker) -> None:
        async with gate:
            await w.start()

    await asyncio.gather(*(start(w) for w in workers))
    for name in ("register", "assignment"):
        LAT.pop(name, None)
    t0 = time.monotonic()
    until = t0 + duration
    tasks = [asyncio.create_task(w.heartbeats(until)) for w in workers]
    tasks += [asyncio.create_task(w.work(until)) for w in workers]
    if watching:
        tasks.append(asyncio.create_task(watch(parts.hostname, parts.port, until)))
    await asyncio.gather(*tasks)
    return {"elapsed": time.monotonic() - t0, "items": sum(w.items for w in workers)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(n: int, res: dict, status: dict) -> dict:
    """Print the table; return the figures the JSON line carries."""
    elapsed = res["elapsed"]
    total = sum(len(v) for v in LAT.values())
    rps, ips = total / elapsed, res["items"] / elapsed
    print(
        f"{n} workers, {elapsed:.1f} s: {rps:.0f} requests/s, {ips:.0f} items/s, "
        f"{status['tokens_processed'] / elapsed:.0f} tokens/s, samples done {status['samples_completed']}, "
        f"errors {dict(ERRORS) or 0}"
    )
    print(f"{'endpoint':12s} {'requests':>9s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    endpoints = {}
    for name in (
        "claim",
        "claim_ready",
        "claim_204",
        "complete",
        "heartbeat",
        "blob_put",
        "blob_get",
        "dashboard",
        "metrics",
    ):
        xs = sorted(LAT.get(name, []))
        if not xs:
            continue
        p50, p99 = statistics.median(xs) * 1e3, xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1e3
        print(f"{name:12s} {len(xs):9d} {len(xs) / elapsed:8.0f} {p50:8.1f} {p99:8.1f}")
        endpoints[name] = {
            "requests_per_s": round(len(xs) / elapsed, 1),
            "p50_ms": round(p50, 2),
            "p99_ms": round(p99, 2),
        }
    return {
        "workers": n,
        "requests_per_s": round(rps, 1),
        "items_per_s": round(ips, 1),
        "tokens_per_s": round(status["tokens_processed"] / elapsed, 1),
        "errors": sum(ERRORS.values()),
        "endpoints": endpoints,
    }


def server_cpu_seconds(orch: OrchestratorProcess) -> float:
    """CPU time of the serving process and its replicas (server.json lists them)."""
    info = json.loads((orch.data_dir / "server.json").read_text())
    return sum(cpu_seconds(pid) for pid in [orch.pid, *info.get("replicas", [])])


def one_config(a: argparse.Namespace, manifest: dict, data: Path, database: str, replicas: int) -> dict:
    """Start an orchestrator on this database with this many replicas, load it, report its figures."""
    import requests

    LAT.clear()
    ERRORS.clear()
    EXISTS.clear()
    extra = ["--register-rate", "0"]  # the simulated workers share one address
    if database != "sqlite":
        extra += ["--database", database, "--workers", str(replicas)]
    orch = OrchestratorProcess(data, admin_token=a.admin_token, sync=a.sync, extra_args=extra).start()
    try:
        r = requests.post(
            f"{orch.url}/v1/runs",
            json={"manifest": manifest},
            headers={"Authorization": f"Bearer {a.admin_token}"},
            timeout=60,
        )
        r.raise_for_status()
        run_id = r.json()["run_id"]
        cpu0 = server_cpu_seconds(orch)
        res = asyncio.run(drive(orch.url, run_id, a.workers, a.duration, a.claim_wait, a.watch, a.item_s))
        used = server_cpu_seconds(orch) - cpu0
        status = requests.get(f"{orch.url}/v1/runs/{run_id}/status", timeout=60).json()
    finally:
        orch.stop()
    kind = "sqlite" if database == "sqlite" else "postgresql"
    print(f"\n{kind}, {replicas} replica(s), item every {a.item_s:g} s a worker:")
    figures = report(a.workers, res, status)
    share = used / res["elapsed"]
    print(f"server CPU: {used:.1f} s over {res['elapsed']:.1f} s ({100 * share:.0f}% of a core)")
    ep = figures["endpoints"]
    return {
        "database": kind,
        "replicas": replicas,
        "workers": a.workers,
        "requests_per_s": figures["requests_per_s"],
        "p99_ms": {k: ep.get(k, {}).get("p99_ms", 0.0) for k in ("complete", "heartbeat", "claim_ready")},
        "items_per_s": figures["items_per_s"],
        "errors": figures["errors"],
        "server_cpu_share": round(share, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=100)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--sync", choices=["normal", "full"], default="normal")
    p.add_argument(
        "--claim-wait", type=float, default=2.0, help="long-poll seconds per claim, as iota join (0: poll)"
    )
    p.add_argument(
        "--item-s",
        type=float,
        default=0.0,
        help=f"seconds of simulated compute per item (0: none, saturate; {ITEM_S_1B:g}: a 1B model's stage)",
    )
    p.add_argument(
        "--configs",
        default="sqlite:1",
        help="database:replicas, comma-separated: sqlite:1, postgresql:1, postgresql:3 (a throwaway "
        "PostgreSQL from Debian's binaries, tests/pg_server.py)",
    )
    p.add_argument("--admin-token", default="bench-admin")
    p.add_argument("--watch", action="store_true", help="poll the dashboard and /metrics during the load")
    a = p.parse_args()
    configs = [(c.split(":")[0], int(c.split(":")[1]) if ":" in c else 1) for c in a.configs.split(",")]
    out = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        corpus = write_corpus(tmp / "text", files=8, words=20000)
        m = tiny_manifest(str(corpus))
        m = replace(
            m,
            # Samples enough in flight that every stage's workers have work (a real swarm's heads fill it).
            train=replace(m.train, lease_s=30.0, work_timeout_s=60.0, max_inflight_per_head=16),
            merge=replace(m.merge, interval=1_000_000),
        )
        pg = None
        for i, (database, replicas) in enumerate(configs):
            url = "sqlite"
            if database == "postgresql":
                if pg is None:
                    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
                    from pg_server import PostgresServer  # the tests' throwaway server

                    pg = stack.enter_context(PostgresServer.start_new())
                url = pg.create_database()
            elif database != "sqlite":
                raise SystemExit(f"unknown database {database!r} (sqlite or postgresql)")
            out.append(one_config(a, m.to_dict(), tmp / f"data{i}", url, replicas))
    print(json.dumps({"configs": out}))


if __name__ == "__main__":
    main()
