"""Compare the optimizer step time of two checkouts of scao-fx side by side, interleaved.

    python docs/examples/compare_step_time.py OLD_CHECKOUT NEW_CHECKOUT [--windows 12] [--steps 20] [--form seed]
        [--precond-freq N] [--model gpt|minilm]

Each checkout runs in its own worker process (``PYTHONPATH=<checkout>``) that builds the same
model-shaped parameters (``--model gpt``, the default: a 4-layer GPT, d_model 128, plus its
embedding and head; ``--model minilm``: the fine-tuning workload's trainable matrices and
vectors in full fine-tuning, 6 layers of width 384 with 1536-wide MLPs, position and token-type
embeddings and an 8-class head), the same fixed gradients and the same ``sf.SCAO`` optimizer
(``--form seed``, the default here: no warmup, preconditioned steps; ``--form eigenbasis``:
SCAO's default form), with ``precond_freq = --steps`` unless ``--precond-freq`` is given (a
divisor of ``--steps``), so every window holds the same number of basis refreshes. The parent then asks the two workers in
turn (A B A B ...) for one window of ``--steps`` optimizer steps each and records the
wall-clock time of each window, so machine-load drift hits both alike; only one worker runs at
a time. It prints the median time per step of each, the ratio NEW / OLD with the spread of the
per-window ratios, and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time
import torch
import scao_fx as sf
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
if sys.argv[4] == "minilm":  # the fine-tuning workload's trainable shapes (word embeddings frozen)
    d = 384
    shapes = [(512, d), (2, d), (d,), (d,)]
    for _ in range(6):
        shapes += [(d, d), (d,)] * 4 + [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]
    shapes += [(8, d), (8,)]
else:
    d, layers, vocab = 128, 4, 256
    shapes = [(vocab, d), (d, d)]  # embedding, head-like
    for _ in range(layers):
        shapes += [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,), (d,)]
params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
grads = [torch.randn(s) * 1e-2 for s in shapes]
form = sys.argv[3]
kw = dict(warmup_steps=0, blend_steps=0, min_precond_updates=0) if form == "seed" else {}
opt = sf.SCAO(params, lr=1e-3, form=form, precond_freq=int(sys.argv[2]), **kw)
def steps(n):
    for _ in range(n):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
steps(2 * int(sys.argv[2]))  # warm up: first refreshes done
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    t0 = time.perf_counter()
    steps(n)
    print(json.dumps(time.perf_counter() - t0), flush=True)
"""


def _start(checkout: str, threads: int, freq: int, form: str = "seed", model: str = "gpt") -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(threads), str(freq), form, model], env=env, cwd=checkout,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"the worker for {checkout} failed to start")
    return proc


def _window(proc: subprocess.Popen, steps: int) -> float:
    proc.stdin.write(f"{steps}\n")
    proc.stdin.flush()
    return float(json.loads(proc.stdout.readline()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--windows", type=int, default=12, help="windows per checkout (default 12)")
    parser.add_argument("--steps", type=int, default=20, help="steps per window = precond_freq (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--form", choices=("seed", "eigenbasis"), default="seed", help="SCAO's form (default seed)")
    parser.add_argument("--precond-freq", type=int, default=None,
                        help="refresh every N steps, a divisor of --steps (default: --steps)")
    parser.add_argument("--model", choices=("gpt", "minilm"), default="gpt",
                        help="parameter shapes: the benchmark GPT (default) or the fine-tuning workload's")
    args = parser.parse_args(argv)
    freq = args.steps if args.precond_freq is None else args.precond_freq
    if freq < 1 or args.steps % freq:
        parser.error(f"--precond-freq must be a positive divisor of --steps ({args.steps}), got {freq}")
    workers = {name: _start(path, args.threads, freq, args.form, args.model)
               for name, path in (("old", args.old), ("new", args.new))}
    times: dict[str, list[float]] = {"old": [], "new": []}
    try:
        for w in range(args.windows):
            order = ("old", "new") if w % 2 == 0 else ("new", "old")
            for name in order:
                times[name].append(_window(workers[name], args.steps) / args.steps)
    finally:
        for proc in workers.values():
            proc.stdin.close()
            proc.wait()
    ratios = sorted(n / o for n, o in zip(times["new"], times["old"]))
    for name in ("old", "new"):
        print(f"{name}: {1e3 * statistics.median(times[name]):.2f} ms/step (median of {args.windows} windows)")
    print(f"new / old: {statistics.median(ratios):.3f} (per-window ratios {ratios[0]:.3f} .. {ratios[-1]:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
