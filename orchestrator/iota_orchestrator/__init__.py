"""The reference orchestrator: one process that coordinates a swarm of `iota join` workers.

Run it with `iota orchestrator serve` (the group comes from `iota_orchestrator.cli` through the
`iota.commands` entry point). Needs the [orchestrator] extra (fastapi, uvicorn, sqlalchemy, numpy); the
contributor side never imports this package.
"""

from iota_cli import __version__

__all__ = ["__version__"]
