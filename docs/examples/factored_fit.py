"""How well a factored (rank-one) second moment fits Adam's full one in SCAO's eigenbasis.

Trains the benchmark's GPT (the ``small`` preset on the built-in corpus, seed 0) with SCAO's
default form and Adam's full float32 moments (``second_moment="full"``), and at the chosen
steps reads the full second moment
:math:`V` of every rotated matrix that ``second_moment="factored"`` would factor (both sides at
least 128). For each it prints

* the share of :math:`V`'s energy in its top singular value (1.0: :math:`V` is rank one, which
  the factored estimate reproduces exactly);
* the 1st / 50th / 99th percentiles of :math:`V / \\hat V`, with Adafactor's estimate
  :math:`\\hat V = r c^\\top / \\mathrm{mean}(r)` from :math:`V`'s row and column means
  (``scao_fx.transforms.adam.factored_estimate``); a ratio of 4 means the factored step of that
  entry is twice Adam's;
* the RMS of Adam's direction :math:`m / (\\sqrt{V} + \\epsilon)` and of the factored one
  :math:`m / (\\sqrt{\\hat V} + \\epsilon)` (bias corrections cancel in the comparison).

The estimate is read without the floor ``scale_by_adam(factored=True)`` applies, :math:`\\max(\\hat
V, (1-\\beta_2) g_t^2)`, which needs the step's gradient: the tails printed here are what that
floor is for.

Run: ``python docs/examples/factored_fit.py --steps 50,200`` (about a minute on one CPU core).
"""

from __future__ import annotations

import argparse

import optree
import torch

import scao_fx as sf
from scao_fx._tree import find_nodes
from scao_fx.bench.runner import BenchConfig
from scao_fx.bench.workload import make_workload
from scao_fx.transforms.adam import FACTORED_MIN_DIM, factored_estimate, factored_from_full


def fit_rows(mu: torch.Tensor, nu: torch.Tensor) -> dict:
    """The fit of the factored estimate to the full second moment ``nu`` of one core."""
    vhat = factored_estimate(factored_from_full(nu), nu.shape[0])
    s = torch.linalg.svdvals(nu)
    ratio = (nu / vhat.clamp_min(torch.finfo(nu.dtype).tiny)).flatten()
    sample = ratio[torch.randperm(ratio.numel(), generator=torch.Generator().manual_seed(0))[:100_000]]
    q = torch.quantile(sample, torch.tensor([0.01, 0.5, 0.99])).tolist()
    return {
        "rank_one_share": float(s[0] ** 2 / (s**2).sum()),
        "ratio_q01": q[0], "ratio_q50": q[1], "ratio_q99": q[2],
        "rms_full": float((mu / (nu.sqrt() + 1e-8)).pow(2).mean().sqrt()),
        "rms_factored": float((mu / (vhat.sqrt() + 1e-8)).pow(2).mean().sqrt()),
    }


def measure(steps: list[int], seed: int = 0) -> list[tuple[int, tuple, dict]]:
    """``(step, core shape, fit_rows(...))`` for every factorable rotated matrix at each step."""
    torch.set_num_threads(1)
    workload = make_workload(BenchConfig(), torch.device("cpu"))
    model = workload.build_model(seed)
    opt = sf.SCAO(model.parameters(), moments="float32", second_moment="full")
    batches = workload.batches(seed)
    out = []
    for step in range(1, max(steps) + 1):
        opt.zero_grad()
        workload.loss(model, next(batches)).backward()
        opt.step()
        if step not in steps:
            continue
        node = next(n for n in find_nodes(opt.functional_state(0), sf.ScaleByAdamState) if isinstance(n.mu, tuple))
        cores_mu, cores_nu = optree.tree_leaves(node.mu[1]), optree.tree_leaves(node.nu[1])
        for mu, nu in zip(cores_mu, cores_nu):
            if nu.ndim == 2 and min(nu.shape) >= FACTORED_MIN_DIM:
                out.append((step, tuple(nu.shape), fit_rows(mu, nu)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="50,200", help="comma-separated steps to read the moments at")
    args = parser.parse_args(argv)
    steps = sorted({int(s) for s in args.steps.split(",")})
    if not steps or steps[0] < 2:
        parser.error("--steps: give steps >= 2 (step 1 only builds the bases)")
    print("| step | core | top singular value's share | V / V_hat: 1st / 50th / 99th pct | RMS of m/sqrt(V): full / factored |")
    print("|---|---|---|---|---|")
    for step, shape, r in measure(steps):
        print(f"| {step} | {shape[0]} x {shape[1]} | {r['rank_one_share']:.3f} | {r['ratio_q01']:.2f} / "
              f"{r['ratio_q50']:.2f} / {r['ratio_q99']:.2f} | {r['rms_full']:.3f} / {r['rms_factored']:.3f} |")


if __name__ == "__main__":
    main()
