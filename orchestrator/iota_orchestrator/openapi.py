"""Write the API's OpenAPI schema: `python -m iota_orchestrator.openapi [--check] [PATH]`.

The schema lives in docs/openapi.json; a test fails when it is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DEFAULT = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def schema() -> dict[str, Any]:
    from iota_orchestrator.app import create_app

    return create_app().openapi()


def render() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [a for a in argv if not a.startswith("--")]
    path = Path(paths[0]) if paths else DEFAULT
    text = render()
    if check:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is stale: run python -m iota_orchestrator.openapi", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
