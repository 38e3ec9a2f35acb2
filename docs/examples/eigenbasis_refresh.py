"""What the eigenbasis form does with Adam's first moment at a refresh: "rotate" vs "keep".

A least-squares problem (256 x 12 inputs, ill-conditioned in a random basis: singular values
1 to 10^1.5; a 12 x 6 weight and a bias), 150 full-batch steps of
``chain(kronecker_eigenbasis(scale_by_adam(0.9, 0.95), curvature_ema(0.95, fp32), rank, precond_freq=10,
moment_at_refresh=mode), scale_by_learning_rate(lr))``; prints the final loss (it starts at 2131).

    python docs/examples/eigenbasis_refresh.py
"""

import torch
from torch.func import grad

import scao_fx as sf


def regression():
    gen = torch.Generator().manual_seed(3)
    q = torch.linalg.qr(torch.randn(12, 12, generator=gen))[0]
    x = torch.randn(256, 12, generator=gen) @ q @ torch.diag(torch.logspace(0, 1.5, 12)) @ q.T
    y = x @ torch.randn(12, 6, generator=gen)
    return (lambda p: ((x @ p["w"] + p["b"] - y) ** 2).mean()), {"w": torch.zeros(12, 6), "b": torch.zeros(6)}


def final_loss(tx, steps=150):
    loss, params = regression()
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(grad(loss)(params), state, params=params, inplace=False)
        params = sf.apply_updates(params, updates, inplace=False)
    return loss(params).item()


def main():
    print("| lr | rank | rotate | keep |")
    print("|---|---|---|---|")
    for lr in (3e-2, 1e-1):
        for rank, name in ((sf.full_rank(), "full"), (sf.fixed_rank(4), "fixed 4 (+ complement)")):
            row = []
            for mode in ("rotate", "keep"):
                tx = sf.chain(
                    sf.kronecker_eigenbasis(sf.scale_by_adam(0.9, 0.95), curvature=sf.curvature_ema(0.95, sf.fp32_codec()),
                                            rank=rank, precond_freq=10, moment_at_refresh=mode),
                    sf.scale_by_learning_rate(lr),
                )
                row.append(f"{final_loss(tx):.4g}")
            print(f"| {lr} | {name} | {row[0]} | {row[1]} |")


if __name__ == "__main__":
    main()
