"""``scao-fx bench``: the command-line front end of the benchmark.

It fails loudly and keeps what it did: bad input (an unknown optimizer or ``--scao-opt`` key,
an optimizer that cannot be built, a bad ``--data`` path or device, a corpus too small for the
context) is a one-line error and exit status 2 before any training; every finished run is
written to ``--out`` as it finishes, so an interrupt (Ctrl-C) leaves the files of the completed
runs and exits with status 130 after one line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from . import optimizers as optreg
from .corpus import DEFAULT_CORPUS_BYTES
from .model import PRESETS
from .workload import WORKLOADS

__all__ = [
    "add_arguments", "config_from_args", "configs_from_args", "main", "run_from_args", "QUICK", "EXIT_USAGE",
    "EXIT_INTERRUPTED", "OneLineParser", "UsageError",
]

#: Exit status of bad input (argparse's own), and of an interrupted run (128 + SIGINT).
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: What ``--quick`` changes (the CI smoke run: under a minute on 2 CPU cores).
QUICK = dict(preset="tiny", steps=40, eval_every=10, eval_batches=2, corpus_chars=200_000, sweep_steps=20)
#: SCAO options under ``--quick`` (unless --scao-opt is given): none, since SCAO's default form
#: preconditions from step 2 (``--scao-opt form=seed`` needs its own short warmup and ramp).
QUICK_SCAO: dict = {}


class UsageError(Exception):
    """A command-line error found by argparse (a bad flag or value); :func:`main` prints it as one line."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``PROG: error: MESSAGE``, exit status 2)
    instead of the usage text followed by the message; sub-parsers inherit it."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}")


def _check_name(flag: str, name: str) -> None:
    """``ValueError`` naming ``flag`` unless ``name`` is a registered optimizer or a variant of one."""
    try:
        optreg.get(name)
    except KeyError:
        raise ValueError(f"{flag}: unknown optimizer {name!r}; registered: {', '.join(optreg.REGISTRY)} "
                         f"(or BASE{optreg.VARIANT_SEPARATOR}KEY=VALUE[+KEY=VALUE...], e.g. "
                         f"scao{optreg.VARIANT_SEPARATOR}precond_freq=10)") from None
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _lr_overrides(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--lr expects NAME=VALUE, got {item!r}")
        name, value = item.rsplit("=", 1)  # a variant name holds "=" too
        try:
            lr = float(value)
        except ValueError:
            raise ValueError(f"--lr {item}: the learning rate must be a number, got {value!r}") from None
        if not 0 < lr < float("inf"):
            raise ValueError(f"--lr {item}: the learning rate must be positive and finite")
        out[name.strip()] = lr
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``p``."""
    names = ", ".join(optreg.REGISTRY)
    p.add_argument("--workload", choices=WORKLOADS, default="gpt",
                   help="what is trained: gpt (default: a small GPT from scratch on standard-library text) or finetune "
                        "(the pretrained MiniLM-L6 classifying standard-library docstrings by package, full and LoRA)")
    p.add_argument("--finetune-mode", choices=("both", "full", "lora"), default="both",
                   help="with --workload finetune: full fine-tuning, LoRA (PEFT), or both one after the other into "
                        "--out/full and --out/lora (the default)")
    p.add_argument("--optimizers", "-O", default=None,
                   help=f"comma-separated optimizers (unavailable ones are reported and skipped; default: all for gpt, "
                        f"{','.join(_finetune_optimizers())} for finetune); registered: {names}")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per run (default 500, --quick 40; finetune 150, --quick 6)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every K steps (default 50; finetune 25)")
    p.add_argument("--eval-batches", type=int, default=None, help="validation batches per evaluation (default 8)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model size: tiny (--quick), small (default: 4 layers, d=128, 4 heads, ctx 128, batch 16), "
                        "medium / large (for a GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size (finetune: 16)")
    p.add_argument("--block-size", type=int, default=None,
                   help="override the preset's context length (finetune: the docstrings' token length, 32)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--data", default=None, metavar="PATH", help="train on this text file instead of the stdlib corpus")
    p.add_argument("--corpus-chars", type=int, default=None, help=f"corpus size cap in characters (default {DEFAULT_CORPUS_BYTES:,})")
    p.add_argument("--tokenizer", choices=("char", "byte"), default="char")
    p.add_argument("--seeds", type=int, default=1, help="number of paired seeds (same init and data order per seed)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--lr", action="append", default=[], metavar="NAME=VALUE", help="fix an optimizer's learning rate (repeatable)")
    p.add_argument("--lr-sweep", action="store_true",
                   help="pick each optimizer's learning rate from default_lr x --lr-grid by final validation loss (first seed)")
    p.add_argument("--lr-grid", type=_float_list, default=optreg.LR_GRID,
                   help="multipliers of the default learning rate for --lr-sweep (default %(default)s)")
    p.add_argument("--sweep-steps", type=int, default=None, help="steps per sweep run (default: --steps)")
    p.add_argument("--sweep-only", action="store_true", help="with --lr-sweep: report the sweep and stop (no main runs)")
    p.add_argument("--ablate", action="store_true", help="also run SCAO with each link removed in turn (at SCAO's lr)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                   help="run a seed's optimizers step by step in round robin, so that background load hits all of them "
                        "alike (the default; peak memory is then not measured per optimizer); --no-interleave runs them "
                        "one after another (per-optimizer peak memory, timings exposed to load changes)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--scao-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword argument of scao_fx.scao for 'scao' and the ablations (repeatable), "
                        "e.g. --scao-opt warmup_steps=50 --scao-opt use_int8_ema=false")
    p.add_argument("--muon-adamw-lr", type=float, default=None, metavar="LR",
                   help="learning rate of the AdamW part of 'muon' (embeddings, head, norms, biases; default 1e-3); "
                        "--lr muon=... and --lr-sweep set Muon's own")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default="bench-out", help="output directory (default ./bench-out)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 minute on 2 CPU cores)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list the registered optimizers and whether they run here, then exit")


def _finetune_optimizers() -> tuple[str, ...]:
    from .finetune import FINETUNE_OPTIMIZERS

    return FINETUNE_OPTIMIZERS


def configs_from_args(args: argparse.Namespace) -> list[tuple[object, str]]:
    """The runs one command makes: ``[(BenchConfig, output directory)]``. One for ``gpt`` and for
    ``finetune`` in one mode; ``--finetune-mode both`` gives full then LoRA, in ``--out/full`` and
    ``--out/lora``."""
    import dataclasses

    cfg = config_from_args(args)
    if cfg.workload != "finetune":
        return [(cfg, args.out)]
    modes = ("full", "lora") if getattr(args, "finetune_mode", "both") == "both" else (args.finetune_mode,)
    if len(modes) == 1:
        return [(dataclasses.replace(cfg, finetune_mode=modes[0]), args.out)]
    return [(dataclasses.replace(cfg, finetune_mode=m), str(Path(args.out) / m)) for m in modes]


def config_from_args(args: argparse.Namespace):
    from .runner import BenchConfig

    workload = getattr(args, "workload", "gpt")
    base = dict(QUICK) if args.quick else {}
    if workload == "finetune":
        from . import finetune

        shape = finetune.QUICK if args.quick else finetune.DEFAULTS
        base = dict(steps=shape["steps"], eval_every=shape["eval_every"], sweep_steps=None)
    def pick(name, default):
        value = getattr(args, name)
        return value if value is not None else base.get(name, default)

    from .runner import check_device

    if args.optimizers is None:
        names = _finetune_optimizers() if workload == "finetune" else optreg.DEFAULT_OPTIMIZERS
    else:
        names = tuple(n.strip() for n in args.optimizers.split(",") if n.strip())
    if not names:
        raise ValueError(f"--optimizers: no optimizer named; registered: {', '.join(optreg.REGISTRY)}")
    for n in names:
        _check_name("--optimizers", n)
    if args.data is not None and not Path(args.data).is_file():
        what = "is a directory" if Path(args.data).is_dir() else "does not exist"
        raise ValueError(f"--data {args.data}: {what}; give a UTF-8 text file")
    check_device(args.device)
    scao_options = optreg.parse_options(args.scao_opt, "--scao-opt")
    if scao_options:
        optreg.check_scao_options(scao_options)
    lrs = _lr_overrides(args.lr)
    for n in lrs:
        _check_name("--lr", n)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if workload == "finetune":
        from .finetune import FINETUNE_SCAO

        default_scao = dict(FINETUNE_SCAO)
    else:
        default_scao = dict(QUICK_SCAO) if args.quick else {}
    return BenchConfig(
        preset=pick("preset", "small"),
        steps=pick("steps", 500),
        eval_every=pick("eval_every", 50),
        eval_batches=pick("eval_batches", 8),
        batch_size=args.batch_size,
        block_size=args.block_size,
        device=args.device,
        data=args.data,
        corpus_chars=pick("corpus_chars", DEFAULT_CORPUS_BYTES),
        tokenizer=args.tokenizer,
        seeds=args.seeds,
        seed=args.seed,
        optimizers=names,
        lrs=lrs,
        weight_decay=args.weight_decay,
        scao_options=scao_options if args.scao_opt else default_scao,
        muon_adamw_lr=args.muon_adamw_lr,
        lr_sweep=args.lr_sweep or args.sweep_only,
        sweep_only=args.sweep_only,
        lr_grid=tuple(args.lr_grid),
        sweep_steps=pick("sweep_steps", None),
        ablate=args.ablate,
        interleave=args.interleave,
        threads=args.threads,
        progress=not args.no_progress,
        quick=args.quick,
        workload=workload,
        finetune_mode="full" if getattr(args, "finetune_mode", "both") == "both" else args.finetune_mode,
    )


def _list(device: str) -> int:
    for name, reason in optreg.available(device).items():
        spec = optreg.get(name)
        state = "runs here" if reason is None else f"skipped: {reason}"
        print(f"{name:22s} {spec.kind:9s} lr {spec.default_lr:<8.3g} {state}\n{'':22s} {spec.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scao-fx bench``; returns the process exit code."""
    parser = OneLineParser(prog="scao-fx bench", description=__doc__)
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    return run_from_args(args)


def _plots(results: dict, out: str) -> dict:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no PNG plots (pip install 'scao-fx[bench]')", file=sys.stderr)
        return {}
    from .plots import plot_results

    return plot_results(results, out)


def _load_warning(interleave: bool) -> str | None:
    """A warning when the machine's load exceeds its cores and the runs are not interleaved."""
    if interleave or not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores:
        return None
    return (f"warning: load average {load:.1f} exceeds the {cores} cores: with --no-interleave, timing ratios "
            f"depend on when each optimizer ran; drop --no-interleave (interleaving is the default) for "
            f"trustworthy ratios, and consider --threads 1")


def _error(message: str) -> int:
    print(f"scao-fx bench: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``scao-fx bench`` with parsed ``args``; returns the exit status (0 ok, 1 a baseline or
    SCAO run failed / nothing ran, 2 bad input, 130 interrupted)."""
    if args.list:
        from .runner import BenchError, check_device

        try:
            check_device(args.device)
        except BenchError as exc:
            return _error(str(exc))
        return _list(args.device)
    try:
        jobs = configs_from_args(args)
    except ValueError as exc:  # BenchError is one
        return _error(str(exc))
    from .runner import BenchError

    t0 = time.perf_counter()
    warning = _load_warning(jobs[0][0].interleave)
    if warning:
        print(warning, file=sys.stderr)
    written: dict = {"runs": 0}
    status = 0
    try:
        for cfg, out in jobs:
            if len(jobs) > 1:
                print(f"== {cfg.workload} ({cfg.finetune_mode}) -> {out}", flush=True)
            status = max(status, _run_one(cfg, out, args, t0, written))
    except BenchError as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        n = written["runs"]
        where = (f"the files of the {n} finished run(s) are in {', '.join(written['outs'])}" if n
                 else "no run had finished, nothing written")
        print(f"\nscao-fx bench: interrupted after {time.perf_counter() - t0:.0f} s; {where}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return status


@contextlib.contextmanager
def _interrupt_deferred():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block has finished, then
    raise it: a finished run's files are written whole and counted before the interrupt lands.
    Outside the main thread (where no handler can be set) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def _run_one(cfg, out: str, args: argparse.Namespace, t0: float, written: dict) -> int:
    """One benchmark (one workload and mode) written to ``out``; returns its exit status."""
    from .report import headline, summary_table, sweep_table, write_results
    from .runner import run_benchmark

    mine = {"runs": 0}

    def save(results: dict) -> None:
        with _interrupt_deferred():  # a Ctrl-C now lands after the files are written and counted
            paths = write_results(results, out)
            n = len(results["runs"]) + len(results["sweep"])
            written["runs"] += n - mine["runs"]
            mine["runs"] = n
            written.setdefault("outs", [])
            if out not in written["outs"]:
                written["outs"].append(out)
            mine["paths"] = paths
            if not args.no_plots and (results["runs"] or results["sweep"]):
                paths.update(_plots(results, out))

    results = run_benchmark(cfg, log=lambda msg: print(msg, flush=True), on_update=save)
    save(results)
    paths = mine["paths"]
    if cfg.sweep_only:
        print()
        print(sweep_table(results))
        print(f"wrote {', '.join(sorted(paths))} to {out} ({time.perf_counter() - t0:.0f} s)")
        return 0 if results["sweep"] else 1
    if not results["runs"]:
        print("scao-fx bench: no optimizer could run", file=sys.stderr)
        return 1
    print()
    print(summary_table(results))
    print(headline(results))
    base = results["baseline"]["name"]
    print(f"ratios vs {base} of the same seed; 'steps/time to target' = steps / own training seconds to reach {base}'s "
          f"final validation loss, relative to {base}'s whole run (k/n seeds reached); Δ = paired difference of final "
          f"validation loss")
    if results["skipped"]:
        print("skipped: " + "; ".join(f"{k} ({v})" for k, v in results["skipped"].items()))
    print(f"wrote {', '.join(sorted(paths))} to {out} ({time.perf_counter() - t0:.0f} s)")
    failed = [r for r in results["runs"] if r["status"] == "error" and r["kind"] in ("baseline", "ours")]
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
