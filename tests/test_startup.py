"""`iota --help` must not import heavy libraries (the cold-start budget; timing lives in bench/startup.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "mlx", "requests", "keyring", "tqdm", "numpy", "fastapi", "uvicorn", "sqlalchemy")
# Runs the CLI in a fresh interpreter, then reports which heavy modules it loaded (on stderr).
PROBE = """
import json, sys
from iota_cli.app import main
heavy, sys.argv = json.loads(sys.argv[1]), ["iota", *json.loads(sys.argv[2])]
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["doctor", "--help"],
        ["config", "--help"],
        ["login", "--help"],
        # the orchestrator's group is a plug-in (entry point): loading it must not load the server
        ["orchestrator", "--help"],
        ["orchestrator", "serve", "--help"],
        ["orchestrator", "run", "create", "--help"],
    ],
    ids=" ".join,
)
def test_help_imports_nothing_heavy(args):
    cmd = [sys.executable, "-c", PROBE, json.dumps(HEAVY), json.dumps(args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stderr.strip().splitlines()[-1])
    assert loaded == [], f"`iota {' '.join(args)}` imported {loaded}"
    assert r.stdout.strip(), "printed nothing"
    if args == ["--help"]:
        assert "doctor" in r.stdout and "orchestrator" in r.stdout and "Examples" in r.stdout
