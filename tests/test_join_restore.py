"""Resume or resync on start: the checkpoint wins unless the swarm has merged past it.

A real orchestrator process serves the weights; the stage runs on torch-cpu in this process.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from iota_cli import output
from iota_cli.core.backend import get_factory
from iota_cli.core.manifest import tiny_manifest
from iota_cli.core.protocol import Assignment, AssignmentRequest, RegisterRequest
from iota_cli.swarm.corpus import write_corpus
from iota_cli.swarm.orchestrator import OrchestratorProcess
from iota_cli.train.api import SwarmApi
from iota_cli.train.checkpoint import CheckpointStore, manifest_fingerprint
from iota_cli.train.join import JoinError, restore

ADMIN = "admin-for-restore-tests"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("restore")
    manifest = tiny_manifest(str(write_corpus(base / "text")))
    with OrchestratorProcess(base / "orch", admin_token=ADMIN) as orch:
        with SwarmApi.connect(orch.url, ADMIN) as admin:
            run_id = admin.create_run(manifest).run_id
            token = admin.register(RegisterRequest(name="w", backend="torch-cpu")).token
        with SwarmApi.connect(orch.url, token, stop=threading.Event()) as api:
            yield api, api.assignment(AssignmentRequest(run_id=run_id, stage=1, backend="torch-cpu"))


def stage(assignment: Assignment):
    m = assignment.manifest
    return get_factory("torch-cpu").create(m.model, assignment.stage, m.optim, seed=123)


def test_fresh_start_takes_the_swarms_weights(setup, tmp_path):
    api, assignment = setup
    backend = stage(assignment)
    state = restore(backend, assignment, CheckpointStore(tmp_path / "ck"), api, tmp_path / "cache", "c1", "t")
    assert (state.step, state.epoch, state.stage) == (0, assignment.epoch, 1)
    swarm = stage(assignment)  # seed 123 differs from the run's seed: only a real download makes them equal
    assert backend.weights() != swarm.weights()
    restore(swarm, assignment, CheckpointStore(tmp_path / "other"), api, tmp_path / "cache", "c1", "t")
    assert backend.weights() == swarm.weights()


def test_checkpoint_wins_until_the_swarm_merges_past_it(setup, tmp_path):
    api, assignment = setup
    manifest = assignment.manifest
    store = CheckpointStore(tmp_path / "ck")
    backend = stage(assignment)
    state = restore(backend, assignment, store, api, tmp_path / "cache", "c1", "t")
    trained = stage(assignment)
    trained.load(backend.weights())
    saved = trained.weights()
    # A checkpoint at step 7 whose weights differ from the swarm's (as after local training).
    first = next(iter(saved))
    t = saved[first]
    saved[first] = type(t)(t.dtype, t.shape, bytes(len(t.data)))
    store.save(
        replace(state, step=7, fingerprint=manifest_fingerprint(manifest)), saved, trained.optimizer_state()
    )

    same_epoch = stage(assignment)
    resumed = restore(same_epoch, assignment, store, api, tmp_path / "cache", "c1", "t")
    assert resumed.step == 7 and same_epoch.weights()[first] == saved[first]

    moved_on = assignment.model_copy(update={"epoch": assignment.epoch + 1})
    synced = stage(assignment)
    after = restore(synced, moved_on, store, api, tmp_path / "cache", "c1", "t")
    assert after.step == 7, "local counters continue"
    assert after.epoch == assignment.epoch + 1
    assert synced.weights()[first] != saved[first], "the swarm's weights replace the stale checkpoint's"


def test_weights_that_fail_verification_end_the_join_with_a_clear_error(setup, tmp_path):
    api, assignment = setup
    lying = assignment.weights.model_copy(update={"sha256": "0" * 64})  # as a damaged blob store would serve
    broken = assignment.model_copy(update={"weights": lying})
    with pytest.raises(JoinError, match="weights for stage 1 are unusable") as e:
        restore(
            stage(assignment), broken, CheckpointStore(tmp_path / "ck"), api, tmp_path / "cache", "c1", "t"
        )
    assert e.value.code == output.EXIT_UNAVAILABLE
    assert not list((tmp_path / "c").rglob("*.safetensors")), "nothing unverified stays in the cache"
