"""The functional training loop: torch.func.grad + functional_call + scao_fx.adamw.

Trains a small MLP on a synthetic regression task and prints the loss as it goes down.
Runs in a few seconds on a CPU:

    python docs/examples/functional_loop.py
"""

from __future__ import annotations

import argparse

import torch
from torch.func import functional_call, grad

import scao_fx as sf


def main(steps: int = 300, seed: int = 0) -> float:
    torch.manual_seed(seed)
    # Synthetic data: y = sin(x @ a) + noise.
    x = torch.randn(512, 8)
    y = torch.sin(x @ torch.randn(8, 1) / 2) + 0.05 * torch.randn(512, 1)

    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(params, xb, yb):
        return torch.nn.functional.mse_loss(functional_call(model, params, (xb,)), yb)

    schedule = sf.schedules.warmup_cosine_decay(peak=1e-2, warmup_steps=20, decay_steps=steps)
    tx = sf.chain(sf.clip_by_global_norm(1.0), sf.adamw(lr=schedule, weight_decay=1e-4))
    state = tx.init(params)

    first = loss = loss_fn(params, x, y).item()
    print(f"step    0  loss {loss:.4f}")
    for step in range(1, steps + 1):
        idx = torch.randint(0, x.shape[0], (64,))
        grads = grad(loss_fn)(params, x[idx], y[idx])
        updates, state = tx.update(grads, state, params=params)
        params = sf.apply_updates(params, updates)
        if step % 50 == 0 or step == steps:
            loss = loss_fn(params, x, y).item()
            print(f"step {step:4d}  loss {loss:.4f}")
    print(f"loss went from {first:.4f} to {loss:.4f}")
    return loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, args.seed)
