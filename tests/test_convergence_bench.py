"""bench/convergence.py's parts: the held-out split, the training stream, the merge it simulates, the byte
accounting and the choice of the default; then a tiny end-to-end run through the real stack (slow).

    timeout 600 .venv/bin/python -m pytest -q -x -p no:cacheprovider tests/test_convergence_bench.py
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from iota_cli.core.backend import StageBackend
from iota_cli.core.flat import FlatLayout
from iota_cli.core.manifest import TINY_MODEL, MergeConfig
from iota_cli.core.modelspec import ModelConfig
from iota_cli.core.outer import momentum_at
from iota_cli.swarm.corpus import write_corpus

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import convergence as cv  # noqa: E402
import convergence_sim as sim  # noqa: E402
import heldout  # noqa: E402

TINY = ModelConfig.from_dict({**TINY_MODEL.to_dict(), "wire_dtype": "float32"})
PLAN = sim.Plan(model=TINY, batch=4, seq=32, global_batch=16, steps=4, eval_batches=2)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Ten packages of two files each; every package's text is its own letter, so each byte says where
    it came from."""
    root = tmp_path / "corpus"
    for i in range(10):
        letter = "abcdefghij"[i]
        for j in range(2):
            write(root / f"pkg{i}" / f"m{j}.py", (letter * 63 + "\n") * 40)
    return root


def letters(files: list[Path]) -> set[str]:
    return {f.read_text()[0] for f in files}


def test_split_holds_out_whole_packages_deterministically(corpus):
    split = heldout.split_corpus(str(corpus))
    assert split.heldout and split.train
    assert not set(split.heldout) & set(split.train)
    assert len(split.heldout) + len(split.train) == 20
    held_dirs = {f.parent for f in split.heldout}
    assert all(f.parent not in held_dirs for f in split.train), "a package is held out whole"
    assert 0.1 <= split.bytes(split.heldout) / (split.bytes(split.heldout) + split.bytes(split.train)) < 0.3
    assert heldout.split_corpus(str(corpus)) == split


def test_split_of_one_directory_holds_out_files(tmp_path):
    for i in range(20):
        write(tmp_path / "flat" / f"mod{i:02d}.py", f"x = {i}\n" * 50)
    split = heldout.split_corpus(str(tmp_path / "flat" / "*.py"))
    assert split.root == tmp_path / "flat"
    assert 2 <= len(split.heldout) <= 4 and len(split.train) == 20 - len(split.heldout)


def test_training_stream_never_reads_held_out_text(corpus, tmp_path):
    split = heldout.split_corpus(str(corpus))
    tree = heldout.link_tree(split, tmp_path / "train")
    m = PLAN.manifest(str(tree), 1, MergeConfig())
    stream = heldout.TrainStream(m, str(tree))
    seen = set()
    for k in range(stream.layout.n_samples):
        seen |= {chr(b) for b in np.unique(stream.sample(k)) if b < 256}
    assert seen - {"\n"} == letters(list(split.train))
    assert not seen & letters(list(split.heldout))
    held = heldout.heldout_batches(split.heldout, 3, PLAN.batch, PLAN.seq)
    assert [b.shape for b in held] == [(PLAN.batch, PLAN.seq + 1)] * 3
    assert {chr(b) for h in held for b in np.unique(h) if b < 256} - {"\n"} <= letters(list(split.heldout))


def test_round_bytes_per_replica_stay_constant_in_replicas():
    n = FlatLayout.of(TINY, 1).size
    assert cv.round_bytes(n, 1, "diloco", "BF16") == 0
    for strategy in ("diloco", "average", "sync"):
        for wire in ("BF16", "F32"):
            # O(1) in R: what a replica owns shrinks as 2/R while what it fetches grows as (R-2)/R.
            figures = [cv.round_bytes(n, r, strategy, wire) for r in (2, 4, 8, 64, 1024)]
            assert max(figures) <= 4 * (4 * n), (strategy, wire, figures)
            assert max(figures) <= 1.4 * min(figures), (strategy, wire, figures)
            assert min(figures) >= 2 * 2 * n, "at least its own update up and the merged values down"
    assert cv.round_bytes(n, 4, "diloco", "F32") > cv.round_bytes(n, 4, "diloco", "BF16")


def replicas_with(weights: list[float]) -> tuple[list[StageBackend], FlatLayout, np.ndarray]:
    """Stage-1 replicas of TINY whose every parameter is shifted by the given amount from the init."""
    layout = FlatLayout.of(TINY, 1)
    out, base = [], None
    for shift in weights:
        stage = sim.start(PLAN.manifest("", 1, MergeConfig()), "torch-cpu")[1]
        base = layout.flatten(stage.weights())
        stage.load(layout.unflatten(base + np.float32(shift)))
        out.append(stage)
    assert base is not None
    return out, layout, base


def test_merge_round_average_is_the_mean_and_diloco_the_outer_step():
    reps, layout, base = replicas_with([-0.01, -0.03, -0.05])
    avg = MergeConfig(strategy="average", wire_dtype="F32")
    st = sim.StageMerge(layout, base.copy())
    sim.merge_round(avg, st, reps, work=1.0)
    for r in reps:
        np.testing.assert_allclose(layout.flatten(r.weights()), base - 0.03, atol=1e-6)
    assert st.epoch == 1 and st.momentum is None

    reps, layout, base = replicas_with([-0.01, -0.03, -0.05])
    dil = MergeConfig(strategy="diloco", wire_dtype="F32")
    st = sim.StageMerge(layout, base.copy())
    sim.merge_round(dil, st, reps, work=2.0)
    mu = momentum_at(dil, 0)
    want = base - dil.outer_lr * (0.03 + mu * 0.03)  # pseudo-gradient +0.03, momentum starts at it
    for r in reps:
        np.testing.assert_allclose(layout.flatten(r.weights()), want, atol=1e-6)
    np.testing.assert_allclose(st.momentum, 0.03, atol=1e-7)


def test_sync_is_data_parallel_and_stays_with_the_reference(corpus, tmp_path):
    bench = cv.Bench(PLAN, str(corpus), tmp_path)
    ref = sim.reference(PLAN, bench.stream)
    merge = MergeConfig(strategy="average", wire_dtype="F32")
    sync, rounds = sim.simulate(PLAN, bench.stream, sim.Config("sync", 2, 1), merge)
    assert rounds == PLAN.steps
    for s in range(TINY.n_stages):
        layout = FlatLayout.of(TINY, s)
        np.testing.assert_allclose(layout.flatten(sync[s]), layout.flatten(ref[s]), atol=2e-5)
    diloco, rounds = sim.simulate(PLAN, bench.stream, sim.Config("diloco", 2, 3), MergeConfig())
    assert rounds == 2, "every 3 steps, and the run's last"
    assert not np.allclose(FlatLayout.of(TINY, 0).flatten(diloco[0]), FlatLayout.of(TINY, 0).flatten(ref[0]))


@pytest.mark.slow
def test_the_sweep_in_two_processes_gives_what_one_does(corpus, tmp_path):
    configs = [sim.Config("sync", 2, 1), sim.Config("average", 4, 2)]
    one, two = cv.Bench(PLAN, str(corpus), tmp_path), cv.Bench(PLAN, str(corpus), tmp_path)
    one.run_sweep(configs, jobs=1)
    two.run_sweep(configs, jobs=2)
    assert two.reference_loss == pytest.approx(one.reference_loss, rel=1e-4)
    assert [r.config for r in two.results] == configs
    for a, b in zip(one.results, two.results, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-4) and b.ratio == pytest.approx(a.ratio, rel=1e-4)
        assert b.merge_bytes_per_token == a.merge_bytes_per_token > 0


def result(strategy: str, replicas: int, interval: int, ratio: float) -> cv.Result:
    return cv.Result(sim.Config(strategy, replicas, interval), ratio, ratio, 0.0, 0.0)


def test_the_default_is_the_best_at_four_replicas_among_those_that_hold_at_two():
    rows = [
        result("sync", 2, 1, 1.0),
        result("sync", 4, 1, 1.0),
        result("diloco", 2, 10, 1.01),
        result("diloco", 4, 10, 1.02),
        result("average", 2, 10, 1.05),  # best at R=4 but misses at R=2
        result("average", 4, 10, 1.00),
        result("diloco", 2, 30, 1.02),
        result("diloco", 4, 30, 1.025),
    ]
    pick, why = cv.choose_default(rows)
    assert (pick.strategy, pick.interval) == ("diloco", 10)
    assert "R=4" in why
    rows = [result("average", 2, 10, 1.2), result("average", 4, 10, 1.3), result("diloco", 2, 10, 1.1)]
    pick, _ = cv.choose_default(rows + [result("diloco", 4, 10, 1.4)])
    assert (pick.strategy, pick.interval) == ("average", 10), "none holds: the lowest worst ratio"


@pytest.fixture
def words(tmp_path: Path) -> Path:
    """Ten packages of files of the same words, so held-out text is like what training reads."""
    root = tmp_path / "words"
    for i in range(10):
        write_corpus(root / f"pkg{i}", files=2, words=3000, seed=i)
    return root


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_bench_through_the_real_stack(words, tmp_path):
    """A few steps of the whole bench: reference, then a merge at R = 2 through real orchestrator and
    `iota join` processes, evaluated on held-out packages; the report is well-formed. (R = 4 is twelve
    processes on two cores: the bench itself runs it; tests/test_merge_e2e.py holds the stack's merges.)"""
    env_plan = replace(PLAN, steps=40)  # long enough that every worker joins before the end
    bench = cv.Bench(env_plan, str(words), tmp_path)
    bench.run_reference()
    for r in (2,):
        out = bench.run_real(sim.Config("average", r, 5))
        assert out.config.real_stack
        assert np.isfinite(out.loss) and out.loss < 1.5 * bench.reference_loss
        assert out.merge_bytes_per_token > 0
    assert not bench.problems, bench.problems
    line = json.dumps(bench.report("average"))
    parsed = json.loads(line)
    assert [c["replicas"] for c in parsed["configs"]] == [2]
    assert set(parsed["configs"][0]) == {
        "strategy",
        "replicas",
        "interval",
        "real_stack",
        "loss",
        "ratio",
        "merge_bytes_per_token",
    }
