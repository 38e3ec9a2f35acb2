"""Kronecker-ill-conditioned least squares: steps to AdamW's final loss, and final losses.

The problem is :math:`\\min_W \\lVert A W B - C\\rVert_F^2` with ``A`` (32 x 32) and ``B``
(24 x 24) of condition number 1e3 each (random orthogonal singular vectors, log-spaced singular
values) and a consistent ``C = A W* B``: its curvature is exactly a Kronecker product, which is
what Shampoo-family preconditioners model and what a diagonal (Adam) does not.

Every optimizer runs full-batch from ``W = 0`` for ``--steps`` steps at each learning rate of
``--lrs`` (no weight decay), on ``--seeds`` problems; each keeps its best learning rate per seed
(smallest final loss). Printed per optimizer, as means over the seeds with the spread:

- the final loss at its best lr, and its ratio to SOAP's (``sf.soap``) on the same seed;
- the steps it needs to reach AdamW's best final loss (its fastest lr), over ``--steps``.

Run: ``python docs/examples/least_squares.py`` (5-10 minutes on a 2-core CPU; a progress
bar of the training runs on stderr, ``--no-progress`` turns it off).
"""

from __future__ import annotations

import argparse
import statistics

import torch

import scao_fx as sf
from scao_fx.bench.progress import Progress


def kron_lsq_problem(m: int = 32, n: int = 24, cond: float = 1e3, seed: int = 0):
    r"""``min_W ||A W B - C||_F^2`` with ``A`` (m x m), ``B`` (n x n) of condition number ``cond``
    (random orthogonal singular vectors, log-spaced singular values) and a consistent
    ``C = A W* B``. Returns ``(params, loss)``."""
    g = torch.Generator().manual_seed(seed)

    def ill(d):
        q1 = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
        q2 = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
        s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64)
        return ((q1 * s) @ q2).float()

    a, b = ill(m), ill(n)
    c = a @ torch.randn(m, n, generator=g) @ b

    def loss(p):
        return ((a @ p["w"] @ b - c) ** 2).sum()

    return {"w": torch.zeros(m, n)}, loss


#: name -> factory ``lr -> GradientTransformation`` (no weight decay anywhere).
OPTIMIZERS = {
    "adamw": lambda lr: sf.adamw(lr, weight_decay=0.0),
    "adamw (0.9, 0.95)": lambda lr: sf.adamw(lr, betas=(0.9, 0.95), weight_decay=0.0),
    "sf.soap": lambda lr: sf.soap(lr, weight_decay=0.0),
    "sf.muon": lambda lr: sf.muon(lr, weight_decay=0.0),
    "scao (default)": lambda lr: sf.scao(lr, weight_decay=0.0),
    "scao, betas (0.95, 0.95)": lambda lr: sf.scao(lr, betas=(0.95, 0.95), weight_decay=0.0),
    # the problem's sides (32, 24) are under float32_below (64): the default keeps them exact;
    # float32_below=0 stores them as a long side is stored (int8 statistics, bfloat16 bases
    # and rotations)
    "scao, float32_below=0": lambda lr: sf.scao(lr, float32_below=0, weight_decay=0.0),
    "scao, float32_below=0, float32 statistics": lambda lr: sf.scao(lr, float32_below=0, use_int8_ema=False,
                                                                     weight_decay=0.0),
    "scao seed form": lambda lr: sf.scao(lr, form="seed", weight_decay=0.0),
}


def losses_of(tx, params, loss, steps: int) -> list[float]:
    """Full-batch training; the loss after each update."""
    params = {k: v.clone() for k, v in params.items()}
    state = tx.init(params)
    out = []
    for _ in range(steps):
        grads = torch.func.grad(loss)(params)
        updates, state = tx.update(grads, state, params=params)
        params = sf.apply_updates(params, updates)
        out.append(float(loss(params)))
    return out


def steps_to_reach(losses: list[float], target: float) -> int | None:
    """First (1-based) step whose loss is <= target, or None."""
    return next((i + 1 for i, v in enumerate(losses) if v <= target), None)


def measure(seeds: int, steps: int, lrs: tuple[float, ...], names=tuple(OPTIMIZERS), progress: bool = False) -> dict:
    """Per optimizer and seed: ``{"final": best final loss, "lr": its lr, "steps": fewest steps
    to AdamW's best final loss (None: not reached)}``. ``progress``: a bar of the training runs
    on stderr (when tqdm is installed)."""
    bar = Progress(progress, seeds * len(names) * len(lrs), "least squares", unit="run")

    def run(name, lr, params, loss):
        out = losses_of(OPTIMIZERS[name](lr), params, loss, steps)
        bar.update(1, optimizer=name, lr=lr)
        return out

    out = {name: [] for name in names}
    for seed in range(seeds):
        params, loss = kron_lsq_problem(seed=seed)
        runs = {name: {lr: run(name, lr, params, loss) for lr in lrs} for name in names}
        target = min(r[-1] for r in runs["adamw"].values())
        for name, by_lr in runs.items():
            lr = min(by_lr, key=lambda k: by_lr[k][-1])
            hits = [h for h in (steps_to_reach(r, target) for r in by_lr.values()) if h is not None]
            out[name].append({"final": by_lr[lr][-1], "lr": lr, "steps": min(hits) if hits else None})
    bar.close()
    return out


def _mean_spread(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3g} ({min(xs):.3g}-{max(xs):.3g})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lrs", default="0.01,0.03,0.1,0.3,1.0", help="comma-separated learning rates")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = ap.parse_args(argv)
    lrs = tuple(float(x) for x in args.lrs.split(","))
    res = measure(args.seeds, args.steps, lrs, progress=not args.no_progress)
    print(f"Kronecker least squares 32 x 24, condition 1e3 per side, {args.steps} steps, lrs {lrs}, "
          f"{args.seeds} seeds (mean (min-max))\n")
    print("| optimizer | best lrs | final loss | final / sf.soap's | steps to AdamW's final / steps |")
    print("|---|---|---|---|---|")
    soap = [r["final"] for r in res["sf.soap"]]
    for name, runs in res.items():
        finals = [r["final"] for r in runs]
        ratios = [f / s for f, s in zip(finals, soap)]
        hits = [r["steps"] for r in runs]
        reach = (_mean_spread([h / args.steps for h in hits]) if all(h is not None for h in hits)
                 else f"not reached on {sum(h is None for h in hits)} seed(s)")
        best_lrs = ", ".join(f"{r['lr']:g}" for r in runs)
        print(f"| {name} | {best_lrs} | {_mean_spread(finals)} | "
              f"{_mean_spread(ratios)} | {reach} |")


if __name__ == "__main__":
    main()
