"""Adversarial end to end: an honest swarm of real `iota join` processes and one misbehaving contributor.

Issue 11's promise, case by case (malformed safetensors headers, non-finite activations, non-finite
gradients, a non-finite loss, hoarded claims, a claim-and-abandon loop): no honest worker crashes or
restarts, no item is tried more than N times (the orchestrator's retry limit) and every chain ends,
the server never answers the cheater with a 5xx, and the honest swarm's tokens/s stays within 20% of
the same swarm without the cheater, measured in this module (one clean run shared by every case).

The honest swarm is small: a real orchestrator process, one torch-cpu worker per stage (3 stages) and
SAMPLES samples. The cheater (tests/cheaters.py) runs in the test process as its own contributor,
pinned to its stage. After each run the orchestrator's SQLite database is read for what happened to
every work item. Run one case while developing (each takes the clean run plus its own, about 1.5 min):
    timeout 900 .venv/bin/python -m pytest -q -x -p no:cacheprovider tests/test_adversarial_e2e.py -k hoard
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from cheaters import MALFORMED, Abandoner, Cheater, Hoarder, Poisoner, malformed_headers, non_finite, zeros

from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.protocol import RunStatus
from iota_cli.swarm.corpus import default_data
from iota_cli.swarm.local import Swarm, SwarmOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SAMPLES = 150  # about 20 s of training for the clean swarm on two cores
# A claimed item's deadline, shortened from the tiny run's 30 s so that an item held hostage costs
# seconds, not the whole run. 3 s: at 4 s, two hostage items cost 25% of a clean swarm that now runs the
# 150 samples in 17 s; an honest item, claimed at most two ahead, still takes well under 1 s.
WORK_TIMEOUT_S = 3.0
TOLERANCE = 0.2  # the honest swarm may lose at most this share of its clean tokens/s
NOISE = 0.15  # a shortfall within this much more is measured again beside a fresh clean run
HEAD, BODY, TAIL = 0, 1, 2
POLL_S = 0.5
# Names the orchestrator may give its retry limit (tries of one item before its chain is dropped).
RETRY_LIMIT_NAMES = ("MAX_TRIES", "MAX_ATTEMPTS", "MAX_FAILURES", "RETRY_LIMIT", "MAX_ITEM_FAILURES")
DEFAULT_RETRY_LIMIT = 3


def retry_limit() -> tuple[int, str]:
    """N: how many tries an item gets, the orchestrator's own constant where it has one, else 3."""
    import iota_orchestrator

    for info in pkgutil.iter_modules(iota_orchestrator.__path__):
        module = importlib.import_module(f"iota_orchestrator.{info.name}")
        for name in RETRY_LIMIT_NAMES:
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, f"iota_orchestrator.{info.name}.{name}"
    return DEFAULT_RETRY_LIMIT, "default (no retry limit found in iota_orchestrator)"


MAX_TRIES, MAX_TRIES_SOURCE = retry_limit()

CheaterFactory = Callable[[str, str], Cheater]  # (orchestrator URL, run id) -> a joined cheater


@dataclass
class Run:
    """What one swarm run left behind: its honest throughput, the database's story, and what went wrong."""

    label: str
    tps: float  # honest tokens through the tail per second, from the honest workers' joining to settling
    all_tps: float  # every tail result over the same window (the status's tokens_processed, a cheater's too)
    elapsed_s: float  # from starting the swarm to the run settling (or the deadline)
    settled: bool  # every sample issued and every chain ended
    honest_tail: int
    samples: dict[str, int]  # chain state -> count
    max_tries: int
    over_limit: list[tuple[int, int, str, int]]  # (sample, stage, kind, tries) beyond MAX_TRIES
    max_active: int  # most chains in flight at once, as the status showed
    poisoned: dict[str, int]  # state -> count of chains a cheater's accepted bad result went into
    non_finite_losses: int
    cheater: Cheater | None = None
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        c = self.cheater
        cheat = f"; cheater events {dict(c.events)}, replies {dict(c.replies)}" if c else ""
        return (
            f"[{self.label}] honest {self.tps:.0f} tokens/s (all {self.all_tps:.0f}), "
            f"{self.honest_tail} honest tail results, settled={self.settled} in {self.elapsed_s:.0f} s, "
            f"chains {self.samples}, max tries {self.max_tries} (N={MAX_TRIES}: {MAX_TRIES_SOURCE}), "
            f"max in flight {self.max_active}{cheat}"
        )

    def verdict(self, baseline: Run | None) -> list[str]:
        """Everything the issue promises that this run broke (empty: all kept)."""
        out = list(self.problems)
        if not self.settled:
            out.append(f"the run did not settle: chains still in flight at the deadline ({self.samples})")
        if self.over_limit:
            worst = sorted(self.over_limit, key=lambda r: -r[3])[:5]
            out.append(f"{len(self.over_limit)} items tried more than N={MAX_TRIES} times, e.g. {worst}")
        if set(self.poisoned) - {"dropped"}:
            out.append(f"chains fed a cheater's bad result did not all end dropped: {self.poisoned}")
        if self.non_finite_losses:
            out.append(f"{self.non_finite_losses} non-finite losses were recorded")
        if self.cheater is not None and (errors := self.cheater.server_errors()):
            out.append(f"the server answered the cheater with 5xx: {errors}")
        if baseline is not None and self.tps < (1 - TOLERANCE) * baseline.tps:
            out.append(
                f"honest throughput {self.tps:.0f} tokens/s is below {1 - TOLERANCE:.0%} of the clean "
                f"swarm's {baseline.tps:.0f} ({self.tps / baseline.tps:.0%})"
            )
        return out

    def ratio(self, baseline: Run) -> float:
        return self.tps / baseline.tps


# --- running a swarm -------------------------------------------------------------------------------------


def make_swarm(home: Path) -> Swarm:
    options = SwarmOptions(workers=3, backends=("torch-cpu",), data=default_data(), home=home)
    m = tiny_manifest(options.data)
    train = replace(m.train, max_samples=SAMPLES, work_timeout_s=WORK_TIMEOUT_S)
    return Swarm(options=options, home=home, manifest=replace(m, train=train))


def wait_for_honest_workers(swarm: Swarm, timeout: float = 120.0) -> None:
    """Until every honest worker holds its stage, so a cheater joining later cannot take one's place."""
    honest = {w.contributor_id: w.stage for w in swarm.workers}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = swarm.status()
        placed = {ws.contributor_id: s.stage for s in status.stages for ws in s.workers} if status else {}
        if all(placed.get(cid) == stage for cid, stage in honest.items()):
            return
        if not all(w.running() for w in swarm.workers):
            raise AssertionError(f"an honest worker exited while joining: {tail_of_logs(swarm)}")
        time.sleep(POLL_S)
    raise AssertionError(f"the honest workers did not all join in {timeout:.0f} s: {tail_of_logs(swarm)}")


def tail_of_logs(swarm: Swarm) -> str:
    return "\n".join(f"--- worker {w.index}\n{read(w.home / 'worker.log')[-1500:]}" for w in swarm.workers)


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Watch:
    """What watching a run saw: whether it settled, the most chains in flight, and what went wrong."""

    settled: bool = False
    max_active: int = 0
    elapsed_s: float = 0.0
    window: tuple[float, float] = (0.0, 0.0)  # (honest workers joined, watching stopped), time.time()
    problems: list[str] = field(default_factory=list)

    def look(self, swarm: Swarm, status: RunStatus) -> None:
        active = status.samples_issued - status.samples_completed - status.samples_dropped
        self.max_active = max(self.max_active, active)
        self.settled = status.samples_issued >= SAMPLES and active == 0
        placed = {ws.contributor_id: s.stage for s in status.stages for ws in s.workers}
        if moved := [w.index for w in swarm.workers if placed.get(w.contributor_id, w.stage) != w.stage]:
            self.problems.append(f"honest workers {moved} were moved off their stage")


def drive(home: Path, label: str, factory: CheaterFactory | None, deadline_s: float) -> Run:
    """Start the honest swarm (and the cheater once it has joined); watch until the run settles."""
    swarm, cheater, seen = make_swarm(home), None, Watch()
    try:
        swarm.start()
        wait_for_honest_workers(swarm)
        joined_at = time.time()  # the server's clock too: the window of tokens/s opens here
        cheater = factory(swarm.url, swarm.run_id).start() if factory else None
        while time.monotonic() < swarm.started + deadline_s and not seen.settled and not seen.problems:
            if status := swarm.status():
                seen.look(swarm, status)
            if dead := [(w.index, w.proc.returncode) for w in swarm.workers if w.proc and not w.running()]:
                seen.problems.append(f"honest workers exited during the run (index, code): {dead}")
            time.sleep(POLL_S)
        seen.elapsed_s, seen.window = time.monotonic() - swarm.started, (joined_at, time.time())
    finally:
        if cheater is not None:
            cheater.close()
        orchestrator = swarm.orchestrator.proc if swarm.orchestrator else None
        orchestrator_alive = orchestrator is not None and orchestrator.poll() is None
        codes = swarm.stop_workers(grace_s=30)
        swarm.stop_server()
    if not orchestrator_alive:
        seen.problems.append("the orchestrator process died")
    if any(code != 0 for code in codes.values()):
        seen.problems.append(f"honest workers did not exit 0 at the end: {codes}")
    logs = {f"worker {w.index} (stage {w.stage})": w.home / "worker.log" for w in swarm.workers}
    for who, path in {**logs, "the orchestrator": swarm.home / "orchestrator.log"}.items():
        if "Traceback" in (text := read(path)):
            at = text.index("Traceback")
            seen.problems.append(f"{who} logged a traceback:\n{text[max(0, at - 300) : at + 1500]}")
    if cheater is not None and cheater.errors:
        raise AssertionError(f"the cheater itself failed (a harness bug): {cheater.errors[:3]}")
    run = from_database(swarm, label, seen, cheater)
    print(run.summary())
    return run


# --- reading the orchestrator's database -----------------------------------------------------------------


def from_database(swarm: Swarm, label: str, seen: Watch, cheater: Cheater | None) -> Run:
    """The run's story from the orchestrator's SQLite file: tail results by worker, tries, chain ends."""
    path = swarm.home / "orchestrator" / "orchestrator.sqlite3"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        honest = {w.contributor_id for w in swarm.workers}
        per_sample = swarm.manifest.train.batch_size * swarm.manifest.train.seq_len
        tail_done = [
            worker
            for (worker,) in db.execute(
                "SELECT worker FROM work WHERE stage = ? AND kind = 'forward' AND state = 'done'",
                (swarm.manifest.model.n_stages - 1,),
            )
        ]
        honest_tail = sum(1 for worker in tail_done if worker in honest)
        chains = dict(db.execute("SELECT state, count(*) FROM chains GROUP BY state").fetchall())
        last_end = db.execute("SELECT max(finished) FROM chains").fetchone()[0]
        # A settled run ends with its last chain; one that did not settle, when we stopped watching.
        end = last_end if seen.settled and last_end else seen.window[1]
        seconds = max(end - seen.window[0], 1e-6)
        tries = db.execute(
            "SELECT sample_id, stage, kind, count(*) FROM work GROUP BY sample_id, stage, kind"
        ).fetchall()
        poisoned: dict[str, int] = {}
        if cheater is not None and cheater.accepted:
            ids = [int(wid[1:]) for wid, _ in cheater.accepted]
            marks = ",".join("?" * len(ids))
            poisoned = dict(
                db.execute(
                    "SELECT c.state, count(DISTINCT c.sample_id) FROM chains c JOIN work w"
                    " ON w.run_id = c.run_id AND w.sample_id = c.sample_id"
                    f" WHERE w.id IN ({marks}) GROUP BY c.state",
                    ids,
                ).fetchall()
            )
        losses = [row[0] for row in db.execute("SELECT loss FROM losses").fetchall()]
    finally:
        db.close()
    return Run(
        label=label,
        tps=honest_tail * per_sample / seconds,
        all_tps=len(tail_done) * per_sample / seconds,
        elapsed_s=seen.elapsed_s,
        settled=seen.settled,
        honest_tail=honest_tail,
        samples=chains,
        max_tries=max((n for *_, n in tries), default=0),
        over_limit=[(s, st, k, n) for s, st, k, n in tries if n > MAX_TRIES],
        max_active=seen.max_active,
        poisoned=poisoned,
        non_finite_losses=sum(1 for x in losses if x is None or not math.isfinite(x)),
        cheater=cheater,
        problems=seen.problems,
    )


# --- the clean swarm and the cases ---------------------------------------------------------------------


class Clean:
    """The same swarm without a cheater: the yardstick of every case, run once for the module.

    The two cores are shared, so a clean run a few minutes old can be off by some 15%: a case that
    falls short by less than NOISE more is compared again with a clean run taken just after it, and if
    it still does, played once more beside that clean run (play). A cheater that really costs the swarm
    more than TOLERANCE fails both tries.
    """

    def __init__(self, homes: pytest.TempPathFactory) -> None:
        self.homes = homes
        self.runs: list[Run] = []
        self.measure()

    @property
    def latest(self) -> Run:
        return self.runs[-1]

    def measure(self) -> Run:
        run = drive(self.homes.mktemp("clean"), "clean", None, deadline_s=300)
        problems = run.verdict(None)
        assert not problems, "the clean swarm itself failed:\n" + "\n".join(problems)
        assert run.honest_tail == SAMPLES and run.tps > 0, run.summary()
        self.runs.append(run)
        return run

    def in_doubt(self, run: Run) -> bool:
        """Short of the tolerance by no more than the noise, against the latest clean run."""
        return 1 - TOLERANCE - NOISE <= run.ratio(self.latest) < 1 - TOLERANCE

    def judge(self, run: Run) -> list[str]:
        """What the case broke, its throughput held against the clean run nearest in time."""
        return run.verdict(self.latest)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Clean:
    return Clean(tmp_path_factory)


def play(clean: Clean, home: Path, label: str, factory: CheaterFactory) -> Run:
    """Run the swarm with this cheater, giving it twice the clean swarm's time (and 30 s) to settle; in
    doubt (Clean), measure the clean swarm again, and then the case again: the faster try is judged."""
    run = drive(home, label, factory, deadline_s=2 * clean.latest.elapsed_s + 30)
    if not clean.in_doubt(run):
        return run
    clean.measure()
    if clean.in_doubt(run):
        again = drive(home.with_name(home.name + "-again"), label, factory, 2 * clean.latest.elapsed_s + 30)
        print(f"played again: {again.summary()}")
        run = max(run, again, key=lambda r: r.ratio(clean.latest))
    return run


def check(run: Run, clean: Clean, *extra: str) -> None:
    problems = clean.judge(run) + list(extra)
    report = [run.summary(), *(f"clean: {c.summary()}" for c in clean.runs), *problems]
    assert not problems, "\n".join(report)


def cheated(run: Run) -> Cheater:
    """The run's cheater, once it is clear it got to play (else the case proves nothing)."""
    assert run.cheater is not None and run.cheater.events["items claimed"] > 0, run.summary()
    return run.cheater


def test_malformed_safetensors_headers_are_refused_and_cost_the_swarm_little(clean, tmp_path):
    """A body cheater completes items with headers that break the format (right sha256, zero data)."""

    def factory(url: str, run_id: str) -> Cheater:
        return Poisoner(url, run_id, BODY, malformed_headers).join()

    run = play(clean, tmp_path, "malformed headers", factory)
    c = cheated(run)
    tried = set(c.tried) | {e.split(": ", 1)[1] for e in c.events if e.startswith("upload refused: ")}
    # The server benches a contributor whose results it refuses, so the cheater may not get to send every
    # variant here; each one is refused on its own in tests/test_orchestrator_fuzz.py and test_tensors.py.
    refused = c.replies.get(("complete", 422), 0) + sum(e.startswith("upload refused: ") for e in c.events)
    problems = (
        []
        if tried and refused >= len(tried & set(MALFORMED))
        else [f"variants sent {tried}, refused {refused}"]
    )
    check(run, clean, *problems)


def test_non_finite_activations_from_the_head_are_dropped(clean, tmp_path):
    """A head cheater completes its forwards with NaN/Inf activations in a valid container."""

    def factory(url: str, run_id: str) -> Cheater:
        return Poisoner(url, run_id, HEAD, non_finite).join()

    run = play(clean, tmp_path, "non-finite activations", factory)
    cheated(run)
    check(run, clean)


def test_non_finite_gradients_from_the_tail_are_dropped(clean, tmp_path):
    """A tail cheater reports a plausible loss but uploads NaN/Inf gradients for the body."""

    def factory(url: str, run_id: str) -> Cheater:
        return Poisoner(url, run_id, TAIL, non_finite).join()

    run = play(clean, tmp_path, "non-finite gradients", factory)
    cheated(run)
    check(run, clean)


def test_a_non_finite_loss_is_refused_with_a_4xx(clean, tmp_path):
    """A tail cheater uploads a valid gradient and reports NaN/Infinity/1e999 as raw JSON literals."""

    def factory(url: str, run_id: str) -> Cheater:
        return Poisoner(url, run_id, TAIL, zeros, loss_literal=True).join()

    run = play(clean, tmp_path, "non-finite loss", factory)
    c = cheated(run)
    taken = [label for _, label in c.accepted]
    check(run, clean, *([f"completes with a non-finite loss were accepted: {taken}"] if taken else []))


def test_hoarded_claims_do_not_stall_the_swarm(clean, tmp_path):
    """A body cheater holds every item it gets with 4 long-polling claims and never completes one."""

    def factory(url: str, run_id: str) -> Cheater:
        return Hoarder(url, run_id, BODY).join()

    run = play(clean, tmp_path, "hoarded claims", factory)
    cheated(run)
    check(run, clean)


def test_a_claim_and_abandon_loop_keeps_the_in_flight_cap(clean, tmp_path):
    """A head cheater claims and gives back in a loop; the queue must not grow past the in-flight caps."""

    def factory(url: str, run_id: str) -> Cheater:
        return Abandoner(url, run_id, HEAD).join()

    run = play(clean, tmp_path, "claim and abandon", factory)
    cheated(run)
    # Two heads, the honest one and the cheater, each with its own cap on samples in flight.
    cap = 2 * tiny_manifest(default_data()).train.max_inflight_per_head
    over = [f"{run.max_active} chains were in flight at once, over the two caps' {cap}"]
    check(run, clean, *(over if run.max_active > cap else []))
