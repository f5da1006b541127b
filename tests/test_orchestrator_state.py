"""The orchestrator's State: the event loop never waits for the database lock, wakeups cross threads,
and the reaper collects finished chains' blobs in a few statements."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from inprocess_orchestrator import InProcessOrchestrator
from iota_orchestrator import db
from iota_orchestrator.reaper import collect_garbage
from iota_orchestrator.state import ServerConfig, open_state
from iota_orchestrator.wakeups import Wakeups
from sqlalchemy import func, insert, select


def test_a_thread_holding_the_lock_delays_database_requests_not_the_loop(tmp_path):
    with InProcessOrchestrator(tmp_path / "orch", admin_token="t", tick_s=3600) as orch:
        assert orch.state is not None
        held, release = threading.Event(), threading.Event()

        def long_tick() -> None:  # what a slow reaper tick does to everyone else
            with orch.state.tx():
                held.set()
                release.wait(10)

        threading.Thread(target=long_tick, daemon=True).start()
        assert held.wait(5)
        with ThreadPoolExecutor(1) as pool:
            # A write (reads take no write lock on PostgreSQL: State.read)
            write = pool.submit(requests.post, orch.url + "/v1/contributors", json={"name": "w"}, timeout=30)
            time.sleep(0.3)  # the request is waiting for the lock by now
            t0 = time.monotonic()
            assert requests.get(orch.url + "/v1/health", timeout=5).status_code == 200
            assert time.monotonic() - t0 < 1.0, "the event loop waited for the database lock"
            assert not write.done()
            release.set()
            assert write.result(10).status_code == 201


def test_the_loop_may_not_take_the_lock_outside_with_db(tmp_path):
    state = open_state(ServerConfig(tmp_path / "data")).state

    async def main() -> None:
        state.attach(asyncio.get_running_loop())
        with pytest.raises(RuntimeError, match="event loop"), state.tx():
            pass
        count = select(func.count()).select_from(db.runs)
        assert await state.in_tx(lambda conn: conn.execute(count).scalar_one()) == 0

    asyncio.run(main())
    state.close()


def test_a_notify_from_another_thread_wakes_the_loop():
    async def main() -> None:
        wake = Wakeups()
        wake.loop = asyncio.get_running_loop()
        ev = wake.register(["stage", "worker"])
        threading.Thread(target=wake.notify, args=(["stage"],)).start()
        await asyncio.wait_for(ev.wait(), 5)
        wake.unregister(["stage", "worker"], ev)
        assert not wake.waiters

    asyncio.run(main())


def test_garbage_collection_deletes_only_finished_chains_blobs(tmp_path):
    state = open_state(ServerConfig(tmp_path / "data")).state
    C, W = db.chains, db.work
    chains = {0: "done", 1: "dropped", 2: "active"}
    with state.tx() as conn:
        for sample, chain_state in chains.items():
            tokens = f"runs/r/tokens/{sample}.bin"
            conn.execute(
                insert(C).values(
                    run_id="r",
                    sample_id=sample,
                    data_index=sample,
                    tokens_key=tokens,
                    tokens_sha="0" * 64,
                    tokens_size=1,
                    state=chain_state,
                    created=0.0,
                    gc=False,
                )
            )
            for stage in range(2):
                out = f"runs/r/act/{sample}/{stage}.bin"
                row = {"run_id": "r", "sample_id": sample, "stage": stage, "kind": "forward"}
                conn.execute(insert(W).values(**row, state="done", output_key=out, created=0.0))
            conn.execute(
                insert(W).values(
                    run_id="r", sample_id=sample, stage=0, kind="backward", state="done", created=0.0
                )
            )
            for key in (tokens, f"runs/r/act/{sample}/0.bin", f"runs/r/act/{sample}/1.bin"):
                state.blobs.write(key, b"x")
                conn.execute(
                    insert(db.blobs).values(key=key, sha256="0" * 64, size=1, created=0.0, sealed=True)
                )
    assert collect_garbage(state) == 2
    assert collect_garbage(state) == 0
    for sample in chains:
        kept = sample == 2
        assert state.blobs.exists(f"runs/r/tokens/{sample}.bin") == kept
        assert state.blobs.exists(f"runs/r/act/{sample}/1.bin") == kept
    with state.tx() as conn:
        assert sorted(conn.execute(select(db.blobs.c.key)).scalars()) == [
            "runs/r/act/2/0.bin",
            "runs/r/act/2/1.bin",
            "runs/r/tokens/2.bin",
        ]
        assert {r.sample_id: r.gc for r in conn.execute(select(C.c.sample_id, C.c.gc))} == {
            0: True,
            1: True,
            2: False,
        }
    state.close()
