"""What `iota status` reports: local checkpoints (headers only) and the orchestrator's view of us."""

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
    return {
        "orchestrator_url": orchestrator_url,
        "orchestrator": remote_view(orchestrator_url),
        "checkpoints": local_checkpoints(paths.data_dir),
        "data_dir": str(paths.data_dir),
    }
