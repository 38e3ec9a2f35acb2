"""torch.func.vmap over a stack of parameter trees: an ensemble trained at once."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap
from treeutil import assert_tree_close

import scao_fx as sf

MEMBERS, STEPS = 4, 15


def make_members():
    torch.manual_seed(0)
    return [
        torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        for _ in range(MEMBERS)
    ]


TRANSFORMS = {
    "adamw": lambda: sf.adamw(1e-2, weight_decay=0.1),
    "clip+adamw+schedule": lambda: sf.chain(
        sf.clip_by_global_norm(0.5), sf.adamw(sf.schedules.warmup_cosine_decay(1e-2, 5, 50), weight_decay=0.1)
    ),
    "partition+masked": lambda: sf.partition(
        # partition hands each transform the flat list of its leaves: decay the first matrix only.
        {"m": sf.adamw(1e-2, mask=lambda leaves: [i == 0 for i in range(len(leaves))]), "v": sf.adam(2e-2)},
        lambda p: "m" if p.ndim >= 2 else "v",
    ),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_vmap_ensemble_equals_members_trained_alone(name):
    members = make_members()
    base = members[0]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    # Each member gets its own targets (in_dims=0), the inputs are shared (None).
    ys = torch.randn(MEMBERS, 32, 1, generator=gen, dtype=torch.float64)
    tx = TRANSFORMS[name]()

    def loss(p, x, y):
        return torch.nn.functional.mse_loss(functional_call(base, p, (x,)), y)

    def step(p, s, x, y):
        updates, s = tx.update(grad(loss)(p, x, y), s, params=p, inplace=False)
        return sf.apply_updates(p, updates, inplace=False), s

    stacked, _ = stack_module_state(members)
    stacked = {k: v.detach() for k, v in stacked.items()}
    state = vmap(tx.init)(stacked)
    for _ in range(STEPS):
        stacked, state = vmap(step, in_dims=(0, 0, None, 0))(stacked, state, x, ys)

    for i, member in enumerate(members):
        p = {k: v.detach().clone() for k, v in member.named_parameters()}
        s = tx.init(p)
        for _ in range(STEPS):
            p, s = step(p, s, x, ys[i])
        assert_tree_close({k: v[i] for k, v in stacked.items()}, p, rtol=1e-12, atol=1e-14, msg=f"member {i}")
        start = dict(member.named_parameters())
        assert any((p[k] - start[k]).abs().max() > 1e-3 for k in p), "training must move the parameters"
