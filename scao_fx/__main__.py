"""Command-line entry point: ``scao-fx`` / ``python -m scao_fx``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen sub-command."""
    parser = argparse.ArgumentParser(prog="scao-fx", description="scao-fx command-line tools")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    args = parser.parse_args(argv)
    from . import __version__

    print(f"scao-fx {__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
