"""A merge poisoner for the trust end-to-end test: a replica of a stage that tries to steer its merges.

It joins like an honest replica (registers, pins a stage with AssignmentRequest(stage=...), heartbeats
holding the stage's current epoch) but reports a made-up huge step in every heartbeat (hoping to open
rounds), and whenever a round is offered it uploads a poisoned update:
    scaled   an honest-sized update (lr-sized noise) times 1000
    random   uniform noise in [-1, 1]
    weight   scaled, reported by raw HTTP with an extra JSON field "weight": 1e18 and step 10**12
It never trains, so the orchestrator counts no work for it. It prints one JSON line per thing that
happened ({"event": ..., ...}) and exits when the run finishes, it is refused for good (403), or after
--seconds. Run by tests/cheaters.py's __main__ (a separate process, as a test starts it):

    python tests/cheaters.py merge-scaled URL RUN_ID --stage 1
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from cheaters import Cheater

from iota_cli.core.flat import FlatLayout, update_blob
from iota_cli.core.protocol import Heartbeat, MergeComplete, MergeRound
from iota_cli.train.errors import ApiError, ClientError

KINDS = ("scaled", "random", "weight")
FAKE_STEP = 10**9  # the step every heartbeat claims (and grows): a liar's progress


class MergePoisoner(Cheater):
    """Heartbeats a made-up step and contributes poisoned updates to every round it is offered."""

    def __init__(self, url: str, run_id: str, stage: int, kind: str, name: str = "merge-poisoner") -> None:
        super().__init__(url, run_id, stage, f"{name}-{kind}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        self.kind, self.epoch, self.beats = kind, 0, 0
        self.rng = np.random.default_rng(abs(hash(kind)) % 2**32)
        self.refused = False  # a 403: banned or not admitted to merges

    def say(self, event: str, **what: object) -> None:
        print(json.dumps({"event": event, "kind": self.kind, **what}), flush=True)

    def update(self, size: int) -> np.ndarray:
        if self.kind == "random":
            return self.rng.uniform(-1.0, 1.0, size).astype(np.float32)
        lr = self.manifest.optim.lr
        return (self.rng.normal(0.0, lr, size) * 1000.0).astype(np.float32)

    def beat(self) -> MergeRound | None:
        """One heartbeat claiming a huge step at the stage's current epoch; the round it offers."""
        self.beats += 1
        hb = Heartbeat(
            run_id=self.run_id, stage=self.want_stage, step=FAKE_STEP + self.beats, epoch=self.epoch
        )
        try:
            reply = self.api.heartbeat(hb)
        except ApiError as e:
            self.record("heartbeat", e.status)
            self.refused |= e.status == 403
            return None
        except ClientError:
            self.record("heartbeat", 0)
            return None
        self.record("heartbeat", 200)
        if reply.run_state == "finished":
            self.stop.set()
        self.epoch = reply.epoch  # "holds" the current weights without loading them
        return reply.merge

    def contribute(self, offer: MergeRound) -> None:
        assert offer.upload is not None
        layout = FlatLayout.of(self.manifest.model, self.want_stage)
        blob = update_blob(self.update(layout.size), self.manifest.merge.wire_dtype)
        upload = offer.upload
        sha = self.call("upload", lambda: self.api.upload(upload, blob))
        if sha is None:
            self.say("upload refused", epoch=offer.epoch)
            return
        report = MergeComplete(
            run_id=self.run_id, stage=self.want_stage, epoch=offer.epoch, sha256=str(sha), size=len(blob)
        )
        if self.kind == "weight":
            body = {**report.model_dump(mode="json"), "step": 10**12, "weight": 1e18}
            r = self.raw_post("/v1/merge/complete", json.dumps(body).encode())
            status, detail = r.status_code, r.text[:300]
        else:
            try:
                self.api.contribute(report)
                status, detail = 200, ""
            except ApiError as e:
                status, detail = e.status, e.detail[:300]
        self.record("contribute", status)
        self.refused |= status == 403
        self.say("contributed", epoch=offer.epoch, status=status, detail=detail)

    def run(self, seconds: float) -> None:
        self.say("joined", contributor_id=self.contributor_id, stage=self.want_stage)
        deadline = time.monotonic() + seconds
        assert self.assignment is not None
        while not self.stop.is_set() and not self.refused and time.monotonic() < deadline:
            offer = self.beat()
            if offer is not None and offer.phase == "contribute":
                self.contribute(offer)
            self.stop.wait(min(self.assignment.heartbeat_s, 0.5))
        self.say("done", refused=self.refused, replies={f"{k[0]} {k[1]}": n for k, n in self.replies.items()})


def main(argv: list[str]) -> int:
    """merge-<kind> URL RUN_ID [--stage S] [--seconds T]"""
    kind, url, run_id = argv[0].removeprefix("merge-"), argv[1], argv[2]
    stage = int(argv[argv.index("--stage") + 1]) if "--stage" in argv else 1
    seconds = float(argv[argv.index("--seconds") + 1]) if "--seconds" in argv else 120.0
    cheater = MergePoisoner(url, run_id, stage, kind)
    cheater.join()
    try:
        cheater.run(seconds)
    finally:
        cheater.api.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
