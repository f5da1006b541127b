"""The architecture, held for every module (not a sample) by reading each file's imports, lazy ones too.

- the core (`iota_cli/core`) is the bottom layer: it imports nothing else of ours and no ML framework,
  server, HTTP or CLI library;
- the contributor package (`iota_cli`) never imports the server (`iota_orchestrator`) or a framework;
- only the backends import torch or mlx, each its own; backends and the server use only the core of
  `iota_cli`;
- no module is over 400 lines, and no function in `iota_cli/commands` over 60 (the CLI only parses, calls the
  core and prints).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "iota_cli": ROOT / "iota_cli",
    "iota_torch": ROOT / "backends" / "iota_torch",
    "iota_mlx": ROOT / "backends" / "iota_mlx",
    "iota_orchestrator": ROOT / "orchestrator" / "iota_orchestrator",
}
FRAMEWORKS = {"torch", "mlx"}
SERVER_STACK = {"fastapi", "uvicorn", "sqlalchemy", "starlette", "iota_orchestrator"}
# The server package's `iota orchestrator` command group is a CLI plug-in: it may use the CLI's own layer.
PLUGIN_CLI_USES = (
    "iota_cli.core",
    "iota_cli.__",
    "iota_cli.output",
    "iota_cli.config",
    "iota_cli.train.client",
    "iota_cli.train.errors",
    "iota_cli.train.api",
    "iota_cli.validate",  # `iota orchestrator validate`: the validator is a client of the API, like the rest
)
PLUGIN_CLI = {"iota_orchestrator.cli", "iota_orchestrator.cli_runs", "iota_orchestrator.cli_shared"}
NOT_IN_CORE = FRAMEWORKS | SERVER_STACK | {"requests", "urllib3", "typer", "keyring", "tqdm", "platformdirs"}


def modules() -> list[tuple[str, Path]]:
    out = []
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((".".join((package, *parts)), path))
    return out


def imports(name: str, path: Path) -> set[str]:
    """Every module name this file imports, anywhere in it (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def top(module: str) -> str:
    return module.split(".", 1)[0]


ALL = modules()


def test_every_package_has_modules():
    assert {top(name) for name, _ in ALL} == set(PACKAGES)
    assert len(ALL) > 60, "the walk found the tree"


@pytest.mark.parametrize("name, path", ALL, ids=[name for name, _ in ALL])
def test_import_boundaries(name: str, path: Path):
    found = imports(name, path)
    roots = {top(m) for m in found}
    ours = {m for m in found if top(m) == "iota_cli"}
    if name.startswith("iota_cli.core"):
        assert not roots & NOT_IN_CORE, f"the core imports {sorted(roots & NOT_IN_CORE)}"
        outside = {m for m in ours if m != "iota_cli" and not m.startswith(("iota_cli.core", "iota_cli.__"))}
        assert not outside, f"the core imports the layers above it: {sorted(outside)}"
    if top(name) == "iota_cli":
        banned = FRAMEWORKS | {"iota_orchestrator", "iota_torch", "iota_mlx"} | SERVER_STACK
        assert not roots & banned, f"the contributor package imports {sorted(roots & banned)}"
    if top(name) in ("iota_torch", "iota_mlx"):
        other = FRAMEWORKS - {top(name).removeprefix("iota_")}
        assert not roots & (other | SERVER_STACK), f"{name} imports {sorted(roots & (other | SERVER_STACK))}"
    else:
        assert not roots & FRAMEWORKS, f"only backends import ML frameworks; {name}: {roots & FRAMEWORKS}"
    if top(name) in ("iota_torch", "iota_mlx", "iota_orchestrator"):
        allowed = PLUGIN_CLI_USES if name in PLUGIN_CLI else ("iota_cli.core", "iota_cli.__")
        beyond = {m for m in ours if m != "iota_cli" and not m.startswith(allowed)}
        assert not beyond, f"{name} uses iota_cli beyond {allowed}: {sorted(beyond)}"


@pytest.mark.parametrize("name, path", ALL, ids=[name for name, _ in ALL])
def test_modules_stay_small(name: str, path: Path):
    lines = len(path.read_text().splitlines())
    assert lines <= 400, f"{name} has {lines} lines; split it by concept"


def test_commands_only_parse_call_and_print():
    long = []
    for path in sorted((PACKAGES["iota_cli"] / "commands").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > 60:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert not long, f"command functions over 60 lines: {long}"
