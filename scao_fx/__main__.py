"""Command-line entry point: ``scao-fx`` / ``python -m scao_fx``.

Sub-commands:

* ``bench``: the side-by-side optimizer benchmark on real text (see docs/benchmarks.md);
* ``bench-kernels``: micro-benchmarks of the fused kernels (``scao_fx.bench.kernels``).
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main"]


def _bench_kernels(argv: list[str]) -> int:
    try:
        module = importlib.import_module("scao_fx.bench.kernels")
    except ModuleNotFoundError as exc:
        if exc.name not in ("scao_fx.bench.kernels", "scao_fx.kernels"):
            raise
        print("scao-fx bench-kernels: the kernel benchmark (scao_fx.bench.kernels) is not part of this "
              "installation yet", file=sys.stderr)
        return 2
    entry = getattr(module, "main", None)
    if entry is None:
        print("scao-fx bench-kernels: scao_fx.bench.kernels has no main(argv)", file=sys.stderr)
        return 2
    rc = entry(argv)
    return int(rc or 0)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen sub-command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from .bench import cli as bench_cli

    # argparse's own errors (a bad flag or value) are one line and exit status 2, like the benchmark's
    parser = bench_cli.OneLineParser(prog="scao-fx", description="scao-fx command-line tools")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{bench,bench-kernels}")

    bench = sub.add_parser(
        "bench", help="train a small GPT on standard-library text with each optimizer and compare them",
        description="Side-by-side optimizer benchmark: validation loss, speed, memory (see docs/benchmarks.md).",
    )
    bench_cli.add_arguments(bench)
    sub.add_parser("bench-kernels", help="micro-benchmark the fused kernels (arguments are passed through)",
                   add_help=False)
    if argv and argv[0] == "bench-kernels":  # pass everything after it through untouched
        return _bench_kernels(argv[1:])
    try:
        args = parser.parse_args(argv)
    except bench_cli.UsageError as exc:
        print(exc, file=sys.stderr)
        return bench_cli.EXIT_USAGE
    if args.version or args.command is None:
        from . import __version__

        print(f"scao-fx {__version__}")
        if args.command is None and not args.version:
            parser.print_help()
        return 0
    return bench_cli.run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
