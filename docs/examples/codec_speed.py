"""CPU speed of the int8 codec's reference path: this checkout against an older commit, side by side.

Times ``quantize_blockwise`` (stochastic and nearest) and ``int8_ema_update`` (stochastic, the
curvature EMA) of the reference backend on stacks of Kronecker factors shaped as on the
benchmark GPT (``B x (m*m)``, block 32, the curvature codec's default). The old implementation is
read from ``git show REV:scao_fx/kernels/{_common,reference}.py`` into a private package, so both
run in one process, on the same inputs, taking turns call by call (a change of machine load hits
both). Prints the median thread CPU milliseconds, old / new, and how many codes differ between
the two.

Run: ``python docs/examples/codec_speed.py [--rev 154f565] [--threads 1] [--repeats 15]``
from the repository root (the checkout under test is the ``scao_fx`` imported from there).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from scao_fx.kernels import reference as new_ref  # noqa: E402

SHAPES = ((8, 128), (8, 384), (4, 512))


def load_old(rev: str, tmp: Path):
    """The reference module of commit ``rev`` as a private package ``_old_kernels``."""
    pkg = tmp / "_old_kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("_common.py", "reference.py"):
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:scao_fx/kernels/{name}"],
                             check=True, capture_output=True, text=True).stdout
        (pkg / name).write_text(src)
    sys.path.insert(0, str(tmp))
    return importlib.import_module("_old_kernels.reference")


def side_by_side(fns, repeats: int, warmup: int = 2):
    """Median ms of each callable, called in turns: CPU time of this thread
    (``time.thread_time``, user + system, so time lost to other processes on a shared machine
    is not counted; run with one intra-op thread, the default, so that all work is in this
    thread)."""
    for _ in range(warmup):
        for f in fns:
            f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t = time.thread_time()
            f()
            times[i].append((time.thread_time() - t) * 1e3)
    return [statistics.median(t) for t in times]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", default="154f565", help="the old commit (default: before issue #17)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--block-size", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bs = args.block_size
    with tempfile.TemporaryDirectory() as tmp:
        old_ref = load_old(args.rev, Path(tmp))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), block {bs}, "
              f"old = {args.rev}, new = this checkout; median thread CPU ms of {args.repeats} calls")
        print(f"{'op':<22} {'stack':<14} {'old ms':>8} {'new ms':>8} {'old/new':>8} {'codes differing':>16}")
        for b, m in SHAPES:
            g = torch.Generator().manual_seed(m)
            x = torch.randn(b, m * m, generator=g) * torch.rand(b, 1, generator=g)
            upd = torch.randn(b, m * m, generator=g)
            codes, scales = new_ref.quantize_blockwise(x, bs)
            cases = {
                "quantize stochastic": lambda ref: ref.quantize_blockwise(x, bs, stochastic=True, seed=7),
                "quantize nearest": lambda ref: ref.quantize_blockwise(x, bs),
                "int8_ema_update": lambda ref: ref.int8_ema_update(codes, scales, upd, 0.999,
                                                                   block_size=bs, seed=7),
            }
            for name, case in cases.items():
                t_old, t_new = side_by_side([lambda: case(old_ref), lambda: case(new_ref)],
                                            args.repeats)
                c_old, s_old = case(old_ref)
                c_new, s_new = case(new_ref)
                assert torch.equal(s_old, s_new), "scales differ"
                diff = int((c_old != c_new).sum())
                print(f"{name:<22} {f'{b}x{m}^2':<14} {t_old:8.2f} {t_new:8.2f} "
                      f"{t_old / t_new:8.2f} {diff:>9d} / {c_new.numel()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
