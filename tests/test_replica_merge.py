"""The replica's side of a merge round: real Workers against the real in-process orchestrator over HTTP.

Every stage is trained by a real Worker; the tail's replicas wrap their backend in a Recorder
(tests/replica_harness.py), so what they loaded is checked against what they held, with numbers. Fast
stages are FakeStages (DeltaStage moves every weight by a replica's own delta at each step); other tests
train the tail with the real torch-cpu backend, and one merges a torch replica with an MLX one.

    pytest -q tests/test_replica_merge.py
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
from inprocess_orchestrator import InProcessOrchestrator, until
from replica_harness import (
    CONTRIBUTE,
    PART_DONE,
    TAIL,
    at_epoch,
    check_overlap,
    contributions,
    delta,
    first_round_bytes,
    parts_uploaded,
    pipeline,
    published,
    reducing,
    replica,
    started_on_its_own_thread,
)
from sqlalchemy import select

from iota_cli.core.backend import StageBackend
from iota_cli.core.manifest import RunManifest, tiny_manifest
from iota_cli.core.protocol import AssignmentRequest, MergeSlice, RegisterRequest
from iota_cli.swarm.corpus import write_corpus
from iota_cli.train.api import SwarmApi
from iota_cli.train.client import Client
from iota_cli.train.errors import IntegrityError

ADMIN = "admin-for-replica-merge-tests"


@pytest.fixture(scope="module")
def orch(tmp_path_factory) -> Iterator[InProcessOrchestrator]:
    base = tmp_path_factory.mktemp("replica-merge")
    with InProcessOrchestrator(base / "data", ADMIN) as o:
        o.corpus = write_corpus(base / "text", files=2, words=3000)
        yield o


def make_run(orch: InProcessOrchestrator, **merge) -> str:
    m = tiny_manifest(str(orch.corpus))
    # One tail item is one optimizer step; a 3 s lease means a heartbeat a second.
    m = replace(m, train=replace(m.train, lease_s=3.0, backward_per_step=1))
    # diloco unless a test says otherwise: it is the strategy with outer state (momentum) to carry.
    m = replace(
        m, merge=replace(m.merge, **{"strategy": "diloco", "interval": 4, "timeout_s": 20.0, **merge})
    )
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        return admin.create_run(m).run_id


# --- tests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["diloco", "average"])
def test_three_replicas_merge_and_keep_the_steps_they_took_since_contributing(
    orch, tmp_path, caplog, strategy
):
    caplog.set_level(logging.INFO, logger="iota.merge")
    run_id = make_run(orch, strategy=strategy)
    deltas = (1e-3, -2e-3, 5e-4)
    with pipeline(orch, run_id, tmp_path) as crew:
        # Part results wait (503) until every replica has trained on past its snapshot.
        orch.unavailable.add(PART_DONE)
        tails = [replica(orch, run_id, TAIL, tmp_path / f"tail{i}", delta(d)) for i, d in enumerate(deltas)]
        crew.extend(t.start() for t in tails)
        until(reducing(tails[0].worker.api, run_id), 60, "three contributions")
        orch.unavailable.add(CONTRIBUTE)  # no replica can move on without the others (see reducing)
        until(
            lambda: all(t.backend.steps >= t.stats[0].step + 2 for t in tails), 60, "steps past the snapshots"
        )
        until(parts_uploaded(orch, run_id, tails), 60, "every owner's results")
        orch.unavailable.discard(PART_DONE)
        until(lambda: all(t.worker.state.epoch >= 1 for t in tails), 60, "every replica to land epoch 1")
        orch.unavailable.add(PART_DONE)  # no further round completes: epoch 1 stays published
        api, layout = tails[0].worker.api, tails[0].worker.merger.layout
        merged = published(api, run_id, 0, layout)
        for t in tails:
            assert check_overlap(t, merged, atol=1e-6) >= 2, "the steps after the snapshot are kept"
            assert np.array_equal(t.worker.merger.base, merged), "base is the merged weights"
            ck = t.worker.store.load_latest()
            assert ck is not None and ck.state.epoch >= 1
    base0 = tails[0].backend.initial
    assert base0 is not None
    # The merged weights are the outer Nesterov step of the work-weighted mean of the pseudo-gradients
    # (diloco) or base minus that mean (average: the weighted mean of the snapshots), computed here from
    # the snapshots the backends kept (F32 on the wire, so no rounding to model).
    ids = {t.worker.state.contributor_id: t for t in tails}
    rows = contributions(orch, run_id, 0)
    assert [cid for cid, _, _ in rows] == sorted(ids)
    u = [base0.astype(np.float64) - ids[cid].backend.after_step[ids[cid].stats[0].step] for cid, _, _ in rows]
    w = np.array([weight for _, weight, _ in rows])
    clip = np.array([scale for _, _, scale in rows])  # the orchestrator's norm clips (usually 1)
    assert (w > 0).all() and (clip > 0).all() and (clip <= 1).all()
    mean = sum(wi * si * ui for wi, si, ui in zip(w, clip, u, strict=True)) / w.sum()
    cfg = tails[0].worker.manifest.merge
    mu = cfg.momentum_start  # the first round: no warm-up yet, momentum from zeros
    expected = base0 - cfg.outer_lr * (mean + mu * mean) if strategy == "diloco" else base0 - mean
    np.testing.assert_allclose(merged, expected, atol=1e-6, rtol=0)
    for i, cid in enumerate(sorted(ids)):
        s = ids[cid].stats[0]
        want = first_round_bytes(layout.size, 3, i, "F32", momentum=strategy == "diloco")
        assert (s.sent, s.received) == want, (cid, s)
        assert f"merge round 0: sent {s.sent}, received {s.received}" in caplog.text


def test_a_replica_restarted_without_its_snapshot_catches_up_and_the_other_overlaps(orch, tmp_path):
    run_id = make_run(orch)
    with pipeline(orch, run_id, tmp_path) as crew:
        orch.unavailable.add(PART_DONE)  # the round stays in reducing until both sides are set
        a = replica(orch, run_id, TAIL, tmp_path / "a", delta(1e-3))
        b = replica(orch, run_id, TAIL, tmp_path / "b", delta(-1e-3))
        crew.extend([a.start(), b.start()])
        until(reducing(a.worker.api, run_id), 60, "both contributions")
        orch.unavailable.add(CONTRIBUTE)
        # b goes down mid-round (its snapshot and update lost with the process) and comes back at once,
        # resuming its checkpoint at epoch 0: nothing of the round is left in it.
        b.stop()
        b2 = replica(orch, run_id, TAIL, tmp_path / "b", delta(-1e-3), token=b.token)
        assert b2.worker.state.epoch == 0 and b2.worker.state.contributor_id == b.worker.state.contributor_id
        crew.append(b2.start())
        until(lambda: a.backend.steps >= a.stats[0].step + 2, 60, "a to train past its snapshot")
        orch.unavailable.discard(PART_DONE)  # a reduces both partitions (it owns both at R = 2)
        until(lambda: a.worker.state.epoch >= 1 and b2.worker.state.epoch >= 1, 60, "both to reach epoch 1")
        orch.unavailable.add(PART_DONE)
        layout = a.worker.merger.layout
        merged = published(a.worker.api, run_id, 0, layout)
        assert check_overlap(a, merged, atol=1e-6) >= 2
        # b2 never contributed to round 0 in this life: it loads the published weights as they are (it
        # may already have begun round 1, whose contribution waits for CONTRIBUTE to come back).
        assert [s for s in b2.stats if s.epoch < 1] == [] and len(b2.backend.landings) == 1
        np.testing.assert_array_equal(b2.backend.landings[0].loaded, merged)
        assert np.array_equal(b2.worker.merger.base, merged) and b2.worker.merger.epoch == 1
        # ...and from there it merges as any replica does.
        orch.unavailable.difference_update({PART_DONE, CONTRIBUTE})
        until(lambda: b2.worker.state.epoch >= 2, 60, "b2's first merge to land")
        assert b2.stats[0].outcome == "merged" and b2.stats[0].epoch == 1


def test_torch_replicas_merge_in_bf16_and_keep_their_local_progress(orch, tmp_path):
    from iota_torch import cpu_backend

    def torch_tail(m: RunManifest) -> StageBackend:
        return cpu_backend.create(m.model, TAIL, m.optim, seed=m.seed)

    run_id = make_run(orch, wire_dtype="BF16", interval=3)
    with pipeline(orch, run_id, tmp_path) as crew:
        orch.unavailable.add(PART_DONE)
        tails = [replica(orch, run_id, TAIL, tmp_path / f"torch{i}", torch_tail) for i in range(2)]
        crew.extend(t.start() for t in tails)
        until(reducing(tails[0].worker.api, run_id), 120, "two contributions")
        orch.unavailable.add(CONTRIBUTE)
        until(lambda: all(t.backend.steps >= t.stats[0].step + 1 for t in tails), 120, "a step past each")
        orch.unavailable.discard(PART_DONE)
        until(lambda: all(t.worker.state.epoch >= 1 for t in tails), 120, "both to land epoch 1")
        orch.unavailable.add(PART_DONE)
        layout = tails[0].worker.merger.layout
        merged = published(tails[0].worker.api, run_id, 0, layout)
        base0 = tails[0].backend.initial
        assert base0 is not None and not np.allclose(merged, base0), "the merge moved the weights"
        for t in tails:
            assert check_overlap(t, merged, atol=1e-6) >= 1
            assert t.stats[0].sent > 0 and t.stats[0].received > 0


def test_a_range_read_is_verified(orch, tmp_path):
    run_id = make_run(orch)
    with SwarmApi.connect(orch.url, ADMIN) as admin:
        info = admin.run(run_id)
    api = SwarmApi(Client(orch.url, integrity_retries=2))
    me = api.register(RegisterRequest(name="reader", backend="fake"))
    api.client.token = me.token
    ref = api.assignment(AssignmentRequest(run_id=info.run_id, stage=TAIL, backend="fake")).weights
    whole = api.read_slice(MergeSlice(url=ref.url, offset=0, length=ref.size, sha256=ref.sha256))
    piece = whole[100:164]
    sha = hashlib.sha256(piece).hexdigest()
    assert api.read_slice(MergeSlice(url=ref.url, offset=100, length=64, sha256=sha)) == piece
    with pytest.raises(IntegrityError):
        api.read_slice(MergeSlice(url=ref.url, offset=101, length=64, sha256=sha))


def test_the_outer_momentum_a_replica_computed_is_not_downloaded_again(orch, tmp_path):
    run_id = make_run(orch, interval=3)
    with pipeline(orch, run_id, tmp_path) as crew:
        tails = [
            replica(orch, run_id, TAIL, tmp_path / f"m{i}", delta(d)) for i, d in enumerate((1e-3, 2e-3))
        ]
        api = tails[0].worker.api
        orch.unavailable.add(PART_DONE)
        crew.extend(t.start() for t in tails)
        for epoch in (0, 1):  # each owner computes all it owns, and both are in both rounds
            until(reducing(api, run_id, epoch), 60, f"round {epoch}'s contributions")
            orch.unavailable.add(CONTRIBUTE)
            until(parts_uploaded(orch, run_id, tails, epoch), 60, f"round {epoch}'s results")
            orch.unavailable.discard(PART_DONE)
            until(at_epoch(tails, epoch + 1), 60, f"round {epoch} to land")
            orch.unavailable.add(PART_DONE)
            orch.unavailable.discard(CONTRIBUTE)
        n = tails[0].worker.merger.layout.size
        for t in tails:
            first, second = t.stats[:2]
            assert (first.epoch, second.epoch) == (0, 1) and second.outcome == "merged"
            # At R = 2 each replica owns both partitions: it reads the other's F32 update and nothing
            # else, round after round; the epoch-1 momentum is what it computed itself in round 0.
            assert first.received == second.received == 4 * n, (first, second)


def test_a_source_slice_that_fails_its_sha256_is_left_to_the_other_owner(orch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="iota.merge")
    run_id = make_run(orch)
    merge_blobs = ("GET", f"/v1/blobs/runs/{run_id}/merge/s{TAIL}/e0/")
    with pipeline(orch, run_id, tmp_path) as crew:
        orch.unavailable.add(merge_blobs)  # the owners wait to read until the test has damaged one
        a = replica(orch, run_id, TAIL, tmp_path / "a", delta(1e-3))
        b = replica(orch, run_id, TAIL, tmp_path / "b", delta(-1e-3))
        crew.extend([a.start(), b.start()])
        until(reducing(a.worker.api, run_id), 60, "the reducing phase")
        orch.unavailable.add(CONTRIBUTE)
        from iota_orchestrator import rounds

        # Flip a byte of b's update in partition 0, on the orchestrator's disk: a's read of it fails
        # its sha256, while b reduces partition 0 from its own copy in memory.
        cid = b.worker.state.contributor_id
        path = orch.state.blobs.path(rounds.update_key(run_id, TAIL, 0, cid))
        data = bytearray(path.read_bytes())
        data[-1 - 4 * (a.worker.merger.layout.size // 2)] ^= 0x40
        path.write_bytes(bytes(data))
        orch.unavailable.discard(merge_blobs)
        until(lambda: a.worker.state.epoch >= 1 and b.worker.state.epoch >= 1, 60, "both to land epoch 1")
        orch.unavailable.add(PART_DONE)
        merged = published(a.worker.api, run_id, 0, a.worker.merger.layout)
        assert "leaving partition 0" in caplog.text
        # b reduces both partitions; a's partition 1 may come after b has closed the round.
        assert b.stats[0].reduced == 2 and a.stats[0].reduced <= 1
        for r in (a, b):
            assert r.thread is not None and r.thread.is_alive()
            check_overlap(r, merged, atol=1e-6)


def test_bytes_per_replica_per_round_stay_constant_in_the_number_of_replicas(orch, tmp_path, capsys):
    rows = []
    for count in (2, 4, 8):
        run_id = make_run(orch, wire_dtype="BF16")
        with pipeline(orch, run_id, tmp_path / f"r{count}") as crew:
            orch.unavailable.add(PART_DONE)
            # Deltas within what an AdamW step at the run's lr can move (core.bounds, about 3.5e-3 a
            # step): a replica moving further is refused and banned as a merge poisoner.
            tails = [
                replica(orch, run_id, TAIL, tmp_path / f"r{count}" / f"t{i}", delta(3e-4 * (i + 1)))
                for i in range(count)
            ]
            crew.extend(t.start() for t in tails)
            until(parts_uploaded(orch, run_id, tails), 120, f"every owner's results ({count})")
            orch.unavailable.add(CONTRIBUTE)
            orch.unavailable.discard(PART_DONE)
            until(at_epoch(tails, 1), 120, f"a round of {count}")
        n = tails[0].worker.merger.layout.size
        ids = sorted(t.worker.state.contributor_id for t in tails)
        for t in tails:
            s = t.stats[0]
            assert s.outcome == "merged"
            want = first_round_bytes(n, count, ids.index(t.worker.state.contributor_id), "BF16")
            assert (s.sent, s.received) == want
        sent = max(t.stats[0].sent for t in tails)
        received = max(t.stats[0].received for t in tails)
        rows.append((count, n, sent, received))
    with capsys.disabled():
        print("\nreplicas  params  sent/replica  received/replica  total/param (BF16 wire)")
        for count, n, sent, received in rows:
            print(f"{count:8d}  {n:6d}  {sent:12d}  {received:16d}  {(sent + received) / n:11.2f}")
    totals = [sent + received for _, _, sent, received in rows]
    # What one replica moves per round is 3w + 4 bytes a parameter (w = wire bytes) whatever R is.
    assert max(totals) <= 1.1 * min(totals)


def test_a_range_read_copes_with_servers_that_ignore_range_are_busy_or_send_bad_bytes():
    from fake_http import Server, fast_client, sequence, status

    body = bytes(range(256)) * 4

    def whole(h) -> None:  # a server that ignores Range
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def ranged(data: bytes):
        def route(h) -> None:
            first, last = (int(x) for x in h.headers["Range"].removeprefix("bytes=").split("-"))
            piece = data[first : last + 1]
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
            h.send_header("Content-Length", str(len(piece)))
            h.end_headers()
            h.wfile.write(piece)

        return route

    want = body[300:400]
    sha = hashlib.sha256(want).hexdigest()
    server = Server()
    try:
        client = fast_client(server.url, integrity_retries=2)
        server.routes["/a"] = whole
        assert client.read_range("/a", 300, 100, sha) == want
        server.routes["/b"] = sequence(status(503, {"Retry-After": "0"}), ranged(body))
        assert client.read_range("/b", 300, 100, sha) == want and server.count("/b") == 2
        flipped = body[:350] + bytes([body[350] ^ 1]) + body[351:]
        server.routes["/c"] = sequence(ranged(flipped), ranged(body))
        assert client.read_range("/c", 300, 100, sha) == want and server.count("/c") == 2
        server.routes["/d"] = ranged(flipped)
        with pytest.raises(IntegrityError):
            client.read_range("/d", 300, 100, sha)
        assert server.count("/d") == 2, "integrity_retries tries, then it gives up"
        assert server.seen[-1][2]["Range"] == "bytes=300-399"
    finally:
        server.stop()


def test_a_resumed_replica_counts_its_update_from_the_published_weights_not_its_checkpoint(orch, tmp_path):
    run_id = make_run(orch, interval=6)
    with pipeline(orch, run_id, tmp_path) as crew:
        first = replica(orch, run_id, TAIL, tmp_path / "t", delta(1e-3)).start()
        until(lambda: first.backend.steps >= 2, 60, "some local steps")
        first.stop()
        assert first.stats == [] and first.worker.state.epoch == 0
        again = replica(orch, run_id, TAIL, tmp_path / "t", delta(1e-3), token=first.token)
        base0, resumed = first.backend.initial, again.backend.initial
        assert base0 is not None and resumed is not None and not np.allclose(resumed, base0)
        assert again.worker.state.step >= 2 and np.array_equal(again.worker.merger.base, base0)
        crew.append(again.start())
        until(at_epoch([again], 1), 60, "its merge, alone on the stage")
        orch.unavailable.add(PART_DONE)
        merged = published(again.worker.api, run_id, 0, again.worker.merger.layout)
    # Alone, the mean is its own update: base0 - snapshot, with every step since epoch 0 in it.
    s = again.stats[0]
    snapshot = again.backend.after_step[s.step - first.backend.steps]
    cfg = again.worker.manifest.merge
    u = base0.astype(np.float64) - snapshot
    expected = base0 - cfg.outer_lr * (1 + cfg.momentum_start) * u
    np.testing.assert_allclose(merged, expected, atol=1e-6, rtol=0)


def test_a_torch_and_an_mlx_replica_compute_identical_parts_and_merge_into_the_same_weights(orch, tmp_path):
    pytest.importorskip("mlx.core")
    import iota_mlx
    from iota_orchestrator import db
    from iota_torch import cpu_backend

    if not iota_mlx.cpu_backend.available()[0]:
        pytest.skip("mlx-cpu is not available here")
    factories = [
        lambda m: cpu_backend.create(m.model, TAIL, m.optim, seed=m.seed),
        lambda m: iota_mlx.cpu_backend.create(m.model, TAIL, m.optim, seed=m.seed),
    ]
    run_id = make_run(orch, wire_dtype="BF16", interval=3)
    with pipeline(orch, run_id, tmp_path) as crew:
        tails = [
            started_on_its_own_thread(orch, run_id, TAIL, tmp_path / f"x{i}", f)
            for i, f in enumerate(factories)
        ]
        orch.unavailable.add(PART_DONE)
        crew.extend(tails)
        until(parts_uploaded(orch, run_id, tails), 120, "both replicas' results")
        orch.unavailable.add(CONTRIBUTE)
        orch.unavailable.discard(PART_DONE)
        until(at_epoch(tails, 1), 120, "both to land epoch 1")
        orch.unavailable.add(PART_DONE)
        merged = published(tails[0].worker.api, run_id, 0, tails[0].worker.merger.layout)
        for t in tails:
            check_overlap(t, merged, atol=1e-6)
    # At R = 2 both replicas reduce both partitions, from the same bytes: the torch replica's results and
    # the MLX replica's are byte for byte the same (the orchestrator compares the second with the first).
    MP = db.merge_parts
    q = select(MP.c.first_by, MP.c.second_by, MP.c.agreed).where(
        MP.c.run_id == run_id, MP.c.stage == TAIL, MP.c.epoch == 0
    )
    with orch.state.tx() as conn:
        parts = conn.execute(q).all()
    ids = {t.worker.state.contributor_id for t in tails}
    assert len(parts) == 2
    for p in parts:
        assert {p.first_by, p.second_by} == ids and p.agreed is True, p
