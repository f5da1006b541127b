"""The worker's small parts on their own: the watchdog's view of the pipeline threads, saved forwards, drops.

    .venv/bin/python -m pytest tests/test_worker_parts.py -q

The threads themselves run against a real orchestrator in tests/test_worker.py and the swarm tests.
"""

from __future__ import annotations

import threading
import time

from iota_cli.core.protocol import WorkItem
from iota_cli.train.errors import ApiError
from iota_cli.train.pipeline import Liveness, dropped
from iota_cli.train.saved import SavedForwards


def test_liveness_is_quiet_until_a_call_hangs_and_a_retry_report_revives_it():
    live = Liveness()
    assert live.stalled_for() == 0.0  # no call in progress: nothing can be hung
    inside, release = threading.Event(), threading.Event()
    touched = threading.Event()

    def call() -> None:
        with live.call():
            inside.set()
            touched.wait(5)
            live.touch()  # the client reports a retry from this thread
            release.wait(5)

    t = threading.Thread(target=call)
    t.start()
    inside.wait(5)
    time.sleep(0.3)
    assert live.stalled_for() >= 0.3
    touched.set()
    time.sleep(0.05)
    assert live.stalled_for() < 0.3
    release.set()
    t.join(5)
    assert live.stalled_for() == 0.0
    live.touch()  # outside a call it records nothing
    assert live.stalled_for() == 0.0


def test_saved_forwards_are_freed_when_their_chain_drops_expires_or_the_worker_stops():
    freed: list[str] = []
    saved = SavedForwards(freed.append, horizon_s=3600.0)
    for key, sample in (("a", 1), ("b", 2), ("c", 3)):
        saved.add(key, sample)
    saved.used("c")  # its backward ran: the backend dropped it itself
    assert freed == [] and len(saved) == 2
    saved.drop([2, 99])
    assert freed == ["b"] and len(saved) == 1
    saved.horizon_s = 0.0
    saved.expire()
    assert freed == ["b", "a"] and len(saved) == 0
    saved.add("d", 4)  # adding expires the old first (horizon 0: everything before it)
    saved.clear()
    assert freed[-1] == "d" and len(saved) == 0


def test_dropped_is_only_what_the_orchestrator_no_longer_wants():
    item = WorkItem(work_id="w1", kind="forward", stage=0, sample_id=1, deadline_s=1.0)
    assert all(dropped(item, ApiError(s, "gone")) for s in (404, 409, 410))
    assert not dropped(item, ApiError(422, "bad request"))
    assert not dropped(item, ValueError("x")) and not dropped(item, None)
