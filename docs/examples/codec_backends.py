"""The CPU codec's two backends side by side: the eager reference against its compiled form.

    python docs/examples/codec_backends.py [--threads 1] [--repeats 15] [--stacks 14x16384 8x262144 ...]

For each stack of statistics ``ROWSxN`` (e.g. ``8x262144``: eight 512 x 512 factors) it times one
``scao_fx.kernels.int8_ema_update`` (decode, EMA, stochastic re-encode, in place: what every
statistics update costs) and one stochastic bfloat16 rounding (what ``moments="bfloat16"``
costs per moment tensor) with ``backend="reference"`` and ``backend="compiled"``, and the EMA
update of the reference taken whole (``reference.CHUNKED_FROM`` raised past the stack: the
reference before it went through large stacks in cache-sized chunks), interleaved,
median of ``--repeats`` calls after five warm-up calls (the first compiled call compiles), checks
that all three give the same bits, and prints a table with the backend the automatic
choice picks for that size, then how long the process's first compiled call of each took (the
one-time compile: run with an empty ``TORCHINDUCTOR_CACHE_DIR`` for a cold cache). Writes
nothing.
"""

from __future__ import annotations

import argparse
import time

import torch
from adam_kernels import time_it  # docs/examples: the median of timed calls after warm-up calls

from scao_fx import kernels
from scao_fx.kernels import _compiled, reference

#: The benchmark GPT's factor stacks (128-, 384- and 512-long sides) and the fine-tuning
#: workload's MLP factors (12 of 1536 x 1536).
DEFAULT_STACKS = ("14x16384", "4x147456", "8x262144", "12x2359296")


def _whole(call):
    """``call()`` with the reference's EMA update taking every stack whole (no chunks)."""
    chunked_from, reference.CHUNKED_FROM = reference.CHUNKED_FROM, 1 << 62
    try:
        return call()
    finally:
        reference.CHUNKED_FROM = chunked_from


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per backend (default 15)")
    ap.add_argument("--stacks", nargs="+", default=list(DEFAULT_STACKS), metavar="ROWSxN",
                    help="stacks to time, rows x entries per row (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        raise SystemExit("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    rows_out = []
    first: dict[str, list[float]] = {"ema": [], "bf16": []}
    print("| stack | entries | automatic | EMA update, reference ms | whole-stack reference ms | compiled ms "
          "| bf16 rounding, reference ms | compiled ms |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.stacks:
        try:
            rows, n = (int(v) for v in spec.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--stacks takes ROWSxN, e.g. 8x262144; got {spec!r}") from None
        gen = torch.Generator().manual_seed(0)
        update = torch.randn(rows, n, generator=gen)
        seed = torch.tensor(3)
        state = {b: kernels.quantize_blockwise(update, 32, backend="reference") for b in ("reference", "whole", "compiled")}
        ema = {b: (lambda b=b: kernels.int8_ema_update(*state[b], update, 0.95, block_size=32, seed=seed,
                                                       out=state[b], backend=b))
               for b in ("reference", "compiled")}
        ema["whole"] = lambda: _whole(lambda: kernels.int8_ema_update(*state["whole"], update, 0.95, block_size=32,
                                                                      seed=seed, out=state["whole"], backend="reference"))
        rounding = {"reference": lambda: reference.bf16_stochastic(update, seed),
                    "compiled": lambda: _compiled.bf16_stochastic(update, seed)}
        ms = {}
        for key, fns in (("ema", ema), ("bf16", rounding)):
            fns["reference"]()  # the same number of EMA steps on every state
            if key == "ema":
                fns["whole"]()
            t0 = time.perf_counter()  # the process's first compiled call of each compiles it
            fns["compiled"]()
            first[key].append(time.perf_counter() - t0)
        for b in ("reference", "whole", "compiled"):  # interleaved: one after another on the same box
            ms["ema", b] = time_it(ema[b], args.repeats) * 1e3
            if b in rounding:
                ms["bf16", b] = time_it(rounding[b], args.repeats) * 1e3
        same = all(torch.equal(x, y) for b in ("whole", "compiled") for x, y in zip(state["reference"], state[b]))
        same = same and torch.equal(rounding["reference"]().view(torch.int16), rounding["compiled"]().view(torch.int16))
        if not same:
            raise SystemExit(f"{spec}: the whole-stack or compiled bits differ from the reference's")
        auto = kernels.backend(update)
        print(f"| {rows} x {n} | {rows * n:,} | {auto} | {ms['ema', 'reference']:.2f} | {ms['ema', 'whole']:.2f} "
              f"| {ms['ema', 'compiled']:.2f} "
              f"| {ms['bf16', 'reference']:.2f} | {ms['bf16', 'compiled']:.2f} |")
        rows_out.append({"stack": spec, "automatic": auto, **{f"{k}_{b}_ms": v for (k, b), v in ms.items()}})
    print(f"first compiled call (compiling included): EMA update {first['ema'][0]:.1f} s, "
          f"bf16 rounding {first['bf16'][0]:.1f} s (an empty TORCHINDUCTOR_CACHE_DIR gives the cold-cache cost)")
    return rows_out


if __name__ == "__main__":
    main()
