"""The committed completion scripts are what the app generates today, and they really complete.

Regenerate after a change with:
    for s in bash zsh fish; do _IOTA_COMPLETE=source_$s iota > completions/iota.$s; done
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = os.path.dirname(sys.executable)
CLI = [sys.executable, "-c", "from iota_cli.app import main; main()"]  # main() names the program "iota"


def run_cli(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_committed_script_is_fresh(shell):
    r = run_cli({"_IOTA_COMPLETE": f"source_{shell}"})
    assert r.returncode == 0, r.stderr
    committed = (ROOT / "completions" / f"iota.{shell}").read_text()
    assert r.stdout == committed, (
        f"completions/iota.{shell} is stale; regenerate it: "
        f"_IOTA_COMPLETE=source_{shell} iota > completions/iota.{shell}"
    )


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_script_completes_commands_and_subcommands():
    script = ROOT / "completions" / "iota.bash"
    probe = f'source "{script}"; COMP_WORDS=(iota config s); COMP_CWORD=2; _iota_completion iota; '
    probe += 'echo "${COMPREPLY[@]}"'
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == ["set", "show"]


@pytest.mark.parametrize(
    ("shell", "env"),
    [
        ("zsh", {"_IOTA_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "iota con"}),
        (
            "fish",
            {
                "_IOTA_COMPLETE": "complete_fish",
                "_TYPER_COMPLETE_FISH_ACTION": "get-args",
                "_TYPER_COMPLETE_ARGS": "iota con",
            },
        ),
    ],
)
def test_zsh_and_fish_callbacks_answer(shell, env):
    """zsh and fish are not installed here: check the script calls back the way the app answers."""
    script = (ROOT / "completions" / f"iota.{shell}").read_text()
    assert env["_IOTA_COMPLETE"] in script and "_TYPER_COMPLETE_ARGS" in script
    r = run_cli(env)
    assert r.returncode == 0 and "config" in r.stdout
