"""What `iota status` reports: local checkpoints (headers only), the worker's live file, and the
orchestrator's view of us. `Watch` is `iota status --watch`'s source: the live file at every refresh,
the orchestrator only every REMOTE_EVERY_S (a contributor's terminal must not load a swarm's server)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from iota_cli.config.settings import Paths


def local_checkpoints(data_dir: Path) -> list[dict[str, Any]]:
    """The newest checkpoint of every (run, stage) under the data dir."""
    from iota_cli.train.checkpoint import CheckpointStore

    out = []
    root = data_dir / "checkpoints"
    for stage_dir in sorted(root.glob("*/stage-*")) if root.exists() else []:
        info = CheckpointStore(stage_dir).latest_info()
        if info is None:
            continue
        st = info.state
        out.append(
            {
                "run_id": st.run_id,
                "stage": st.stage,
                "step": st.step,
                "epoch": st.epoch,
                "backward_passes": st.backward_passes,
                "tokens": st.tokens,
                "credits_seen": st.credits_seen,
                "backend": st.backend,
                "path": str(info.path),
                "saved": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.saved_at)),
            }
        )
    return out


def remote_view(url: str) -> dict[str, Any] | None:
    """GET /v1/contributors/me with the configured token; an {"error": ...} when that fails."""
    if not url:
        return None
    from iota_cli.config.credentials import CredentialsError, resolve_token
    from iota_cli.train.api import SwarmApi
    from iota_cli.train.errors import ClientError

    try:
        token = resolve_token(None, orchestrator=url).token
    except CredentialsError as e:
        return {"error": f"not logged in: {str(e).split('.')[0]}"}
    try:
        # `iota status` answers within seconds: no long waits for an orchestrator that is down.
        with SwarmApi.connect(url, token, retries=0, max_wait_s=3.0) as api:
            return api.me(timeout=(2.0, 5.0)).model_dump(mode="json")
    except ClientError as e:
        return {"error": str(e)}


def gather(paths: Paths, orchestrator_url: str) -> dict[str, Any]:
    from iota_cli.headless import livefile

    return {
        "orchestrator_url": orchestrator_url,
        "orchestrator": remote_view(orchestrator_url),
        "checkpoints": local_checkpoints(paths.data_dir),
        "live": livefile.read(paths.data_dir / livefile.NAME),
        "data_dir": str(paths.data_dir),
    }


REMOTE_EVERY_S = 5.0


def run_view(url: str, run_id: str) -> dict[str, Any] | None:
    """The run's loss and state as the orchestrator reports them (a head or body computes no loss)."""
    from iota_cli.train.api import SwarmApi
    from iota_cli.train.errors import ClientError

    try:
        with SwarmApi.connect(url, retries=0, max_wait_s=3.0) as api:
            st = api.run_status(run_id, timeout=(2.0, 5.0))
    except ClientError as e:
        return {"error": str(e)}
    return {"run_id": st.run_id, "state": st.state, "last_loss": st.last_loss, "tokens": st.tokens_processed}


class Watch:
    """What `iota status --watch` shows, refreshed by view(): local facts always, remote ones when due."""

    def __init__(self, paths: Paths, orchestrator_url: str, clock: Any = time.monotonic) -> None:
        self.paths, self.url, self.clock = paths, orchestrator_url, clock
        self._remote: dict[str, Any] | None = None
        self._run: dict[str, Any] | None = None
        self._fetched: float | None = None

    def view(self) -> dict[str, Any]:
        from iota_cli.headless import livefile

        local = livefile.read(self.paths.data_dir / livefile.NAME)
        now = self.clock()
        if self.url and (self._fetched is None or now - self._fetched >= REMOTE_EVERY_S):
            self._fetched = now
            self._remote = remote_view(self.url)
            a = (self._remote or {}).get("assignment") or {}
            run_id = (local or {}).get("run_id") or a.get("run_id")
            self._run = run_view(self.url, run_id) if run_id else None
        return merged(local, self._remote, self._run, self.url)


def merged(
    local: dict[str, Any] | None, remote: dict[str, Any] | None, run: dict[str, Any] | None, url: str
) -> dict[str, Any]:
    """One contributor's facts: the worker's own where it wrote them, the orchestrator's otherwise."""
    me = remote if remote and not remote.get("error") else {}
    a = me.get("assignment") or {}
    ok_run = run if run and not run.get("error") else {}
    loss, loss_of = (local or {}).get("loss"), "this worker"
    if loss is None and ok_run.get("last_loss") is not None:
        loss, loss_of = ok_run["last_loss"], "the run"
    return {
        "worker": local,
        "running": bool(local and local["running"]),
        "stage": (local or {}).get("stage", a.get("stage")),
        "kind": (local or {}).get("kind"),
        "run_id": (local or {}).get("run_id") or a.get("run_id"),
        "step": (local or {}).get("step"),
        "tokens_per_s": (local or {}).get("tokens_per_s"),
        "loss": loss,
        "loss_of": loss_of if loss is not None else None,
        "credits": me.get("credits", (local or {}).get("credits")),
        "state": (local or {}).get("state"),
        "state_since": (local or {}).get("state_since"),
        "orchestrator_url": url,
        "orchestrator": remote,
        "run": run,
    }
