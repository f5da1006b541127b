"""Command groups from the `iota.commands` entry points: found, and a broken one never breaks `iota`."""

from __future__ import annotations

import os
import subprocess
import sys


def iota(*args: str, pythonpath: str = "") -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p),
    }
    return subprocess.run(
        [sys.executable, "-m", "iota_cli", *args], capture_output=True, text=True, timeout=60, env=env
    )


def plugin_dist(root, name: str, target: str) -> None:
    """A minimal installed distribution (just its metadata) whose entry point names target."""
    info = root / f"{name}-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[iota.commands]\n{name} = {target}\n")


def test_the_orchestrator_group_comes_from_its_entry_point():
    from importlib.metadata import entry_points

    from iota_cli.app import COMMANDS_GROUP

    targets = {ep.name: ep.value for ep in entry_points(group=COMMANDS_GROUP)}
    assert targets.get("orchestrator") == "iota_orchestrator.cli:register"
    r = iota("orchestrator", "--help")
    assert r.returncode == 0 and "serve" in r.stdout and "run" in r.stdout, r.stderr


def test_a_broken_plugin_is_skipped_with_a_warning(tmp_path):
    plugin_dist(tmp_path, "broken", "no_such_module_here:register")
    (tmp_path / "raises_plugin.py").write_text("def register(app):\n    raise RuntimeError('boom')\n")
    plugin_dist(tmp_path, "raises", "raises_plugin:register")
    r = iota("--help", pythonpath=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "orchestrator" in r.stdout and "doctor" in r.stdout
    assert "skipping the `broken` commands" in r.stderr and "no_such_module_here" in r.stderr
    assert "skipping the `raises` commands" in r.stderr and "boom" in r.stderr
    assert "Traceback" not in r.stderr
