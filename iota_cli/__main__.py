"""Run the CLI as `python -m iota_cli ...` (same as the `iota` console script)."""

from iota_cli.app import main

if __name__ == "__main__":
    main()
