"""The reference orchestrator: one process that coordinates a swarm of `iota join` workers.

Run it with `iota orchestrator serve` (or `python -m iota_orchestrator`). Needs the [orchestrator] extra
(fastapi, uvicorn, sqlalchemy, numpy); the contributor side never imports this package.
"""

from iota_cli import __version__

__all__ = ["__version__"]
