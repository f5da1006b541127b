"""`iota backends`: lists what is installed, whether it runs here, and what auto would pick."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from iota_cli.app import app
from iota_cli.core import backend as bk


def invoke(*args):
    return CliRunner().invoke(app, ["backends", *args], prog_name="iota")


def test_json_lists_every_registered_backend_with_a_verdict():
    r = invoke("--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    rows = {b["name"]: b for b in d["backends"]}
    assert {"torch-cpu", "torch-cuda", "torch-mps", "mlx", "mlx-cpu"} <= set(rows)
    assert all(b["detail"] for b in rows.values())  # a version, or why not
    assert d["auto"] == bk.detect_auto_choice()
    assert d["auto_available"] == (d["auto"] is not None and rows[d["auto"]]["available"])


def test_human_output_says_why_not_and_what_auto_does(monkeypatch):
    monkeypatch.setattr(bk, "detect_auto_choice", lambda: None)  # a machine with no GPU
    r = invoke()
    assert r.exit_code == 0, r.output
    assert "AVAILABLE" in r.stdout and "torch-cpu" in r.stdout
    assert "auto: none" in r.stdout and "--backend torch-cpu" in r.stdout
    monkeypatch.setattr(bk, "detect_auto_choice", lambda: "torch-cuda")  # NVIDIA driver, CPU-only torch
    r = invoke()
    ok = {i.name: i.available for i in bk.list_backends()}["torch-cuda"]
    assert ("auto: torch-cuda" in r.stdout) and (("not available" in r.stdout) != ok)
