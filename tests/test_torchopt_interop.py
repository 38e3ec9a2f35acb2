"""Interoperability with torchopt: transforms, chains, states and optimizers cross over."""

from __future__ import annotations

import optree
import pytest
import torch
import torchopt
from torch.func import functional_call, grad
from treeutil import assert_no_shared_storage, assert_tree_close, clone, structure, tensor_leaves

import scao_fx as sf


def problem(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(6, 3, generator=gen, dtype=dtype), "b": torch.randn(3, generator=gen, dtype=dtype)}
    grads = [
        {"w": 3 * torch.randn(6, 3, generator=gen, dtype=dtype), "b": 3 * torch.randn(3, generator=gen, dtype=dtype)}
        for _ in range(6)
    ]
    return params, grads


def run(tx, params, grads, inplace=True):
    params, state = clone(params), tx.init(params)
    ups = []
    for g in grads:
        u, state = tx.update(clone(g), state, params=params, inplace=inplace)
        ups.append(clone(u))
        params = sf.apply_updates(params, u, inplace=inplace)
    return ups, state, params


@pytest.mark.parametrize("inplace", [True, False])
def test_our_transforms_inside_torchopt_chain(inplace):
    params, grads = problem()
    # torchopt's clipping, then our AdamW, inside torchopt.chain ...
    mixed = torchopt.chain(torchopt.clip_grad_norm(1.0), sf.adamw(1e-2, weight_decay=0.1))
    # ... equals the all-scao_fx version (same clipping formula).
    ours = sf.chain(sf.clip_by_global_norm(1.0), sf.adamw(1e-2, weight_decay=0.1))
    m_ups, m_state, m_params = run(mixed, params, grads, inplace)
    o_ups, o_state, o_params = run(ours, params, grads, inplace)
    assert_tree_close(m_ups, o_ups, rtol=1e-12, atol=1e-15)
    assert_tree_close(m_params, o_params, rtol=1e-12, atol=1e-15)
    # The gradients here have norm > 1: clipping acted (without it the first update differs).
    unclipped, _, _ = run(sf.adamw(1e-2, weight_decay=0.1), params, grads[:2], inplace)
    assert not torch.allclose(unclipped[1]["w"], o_ups[1]["w"])


@pytest.mark.parametrize("inplace", [True, False])
def test_torchopt_transforms_inside_our_chain(inplace):
    params, grads = problem()
    lr, wd = 1e-2, 0.1
    # torchopt's Adam moments and weight decay, our clipping and learning rate.
    mixed = sf.chain(
        sf.clip_by_global_norm(2.0),
        torchopt.transform.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        torchopt.transform.add_decayed_weights(wd),
        sf.scale_by_learning_rate(lr),
    )
    ref = sf.chain(sf.clip_by_global_norm(2.0), sf.adamw(lr, weight_decay=wd))
    m_ups, _, m_params = run(mixed, params, grads, inplace)
    r_ups, _, r_params = run(ref, params, grads, inplace)
    # torchopt computes its bias corrections in float32 (1 - 0.999**t to ~3e-5 relative at
    # small t), hence the loose tolerance; a missing or extra link would be off by ~1e-2.
    assert_tree_close(m_ups, r_ups, rtol=1e-4, atol=1e-6)
    assert_tree_close(m_params, r_params, rtol=1e-5, atol=1e-6)


def test_torchopt_alias_in_our_combinators():
    params, grads = problem()
    tx = sf.named_chain(
        ("clip", torchopt.clip_grad_norm(1.0)),
        ("opt", sf.partition({"matrix": torchopt.sgd(0.1), "vector": sf.adam(1e-2)}, lambda p: "matrix" if p.ndim == 2 else "vector")),
    )
    ups, state, _ = run(tx, params, grads)
    # The matrix leaf got SGD (update = -lr * clipped gradient).
    g = clone(grads[-1])
    norm = torch.sqrt(sum((x**2).sum() for x in g.values()))
    expected_w = -0.1 * g["w"] * min(1.0, 1.0 / (norm.item() + 1e-6))
    torch.testing.assert_close(ups[-1]["w"], expected_w)
    assert set(state.states) == {"clip", "opt"}


def test_chain_states_interchangeable():
    """A state built by one library's chain is updated by the other's, with identical results."""
    params, grads = problem()
    links = lambda: (sf.clip_by_global_norm(1.0), sf.scale_by_adam(), torchopt.transform.add_decayed_weights(0.1), sf.scale_by_learning_rate(1e-2))  # noqa: E731
    ours, theirs = sf.chain(*links()), torchopt.chain(*links())
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    assert structure(s_ours) == structure(s_theirs)
    # Alternate the two chains over one state: same as either alone.
    p, state = clone(params), s_theirs
    for i, g in enumerate(grads):
        tx = ours if i % 2 else theirs
        u, state = tx.update(clone(g), state, params=p)
        p = sf.apply_updates(p, u)
    _, ref_state, ref_params = run(ours, params, grads)
    assert_tree_close(p, ref_params)
    assert_tree_close(state, ref_state)


def test_state_trees_handled_by_torchopt_and_optree_tools():
    params, grads = problem()
    tx = sf.chain(sf.clip_by_global_norm(1.0), sf.adamw(1e-2))
    _, state, _ = run(tx, params, grads[:3])
    # torchopt's pytree utilities see our NamedTuple states as ordinary nodes.
    leaves_t = torchopt.pytree.tree_leaves(state)
    leaves_o = optree.tree_leaves(state)
    assert len(leaves_t) == len(leaves_o) == 3 * 2  # mu, nu and the step count for w and b
    doubled = torchopt.pytree.tree_map(lambda x: x * 2, state)
    assert type(doubled[1]) is type(state[1])
    torch.testing.assert_close(doubled[1].mu["w"], 2 * state[1].mu["w"])
    # Our Adam state and torchopt's Adam state carry the same moments after the same steps.
    theirs = torchopt.chain(torchopt.clip_grad_norm(1.0), torchopt.adamw(1e-2))
    _, t_state, _ = run(theirs, params, grads[:3])
    ours_adam = [s for s in state if isinstance(s, sf.ScaleByAdamState)][0]
    # torchopt.adamw nests its own chain and keeps moments as flat lists in optree leaf order.
    theirs_adam = t_state[1][0]
    assert type(theirs_adam).__name__ == "ScaleByAdamState"
    for field in ("mu", "nu"):
        ours_leaves = optree.tree_leaves(getattr(ours_adam, field))
        theirs_leaves = optree.tree_leaves(getattr(theirs_adam, field))
        assert len(ours_leaves) == len(theirs_leaves) == 2
        for a, b in zip(ours_leaves, theirs_leaves):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


def test_torchopt_optimizer_wraps_our_transform():
    """torchopt's object-oriented Optimizer drives our adamw like torch.optim.AdamW."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randn(16, 1, generator=gen, dtype=torch.float64)) for _ in range(30)]
    m1, m2 = model(), model()
    o1 = torchopt.Optimizer(m1.parameters(), sf.adamw(1e-2, weight_decay=0.1))
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=0.1)
    for x, y in batches:
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_torchopt_inplace_link_after_ours_cannot_corrupt_state():
    params, grads = problem()
    # torchopt.clip_grad_norm after our Adam rescales the updates in place.
    tx = torchopt.chain(sf.scale_by_adam(), torchopt.clip_grad_norm(1e-3))
    state = tx.init(params)
    for g in grads:
        u, state = tx.update(clone(g), state, params=params, inplace=True)
        assert_no_shared_storage(u, state)
    ref = sf.scale_by_adam()
    r_state = ref.init(params)
    for g in grads:
        _, r_state = ref.update(clone(g), r_state, params=params, inplace=True)
    assert_tree_close(state[0], r_state)


def test_functional_call_loop_with_torchopt_clip():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1).double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    x, y = torch.randn(64, 3, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    loss = lambda p: torch.nn.functional.mse_loss(functional_call(net, p, (x,)), y)  # noqa: E731
    tx = torchopt.chain(torchopt.clip_grad_norm(1.0), sf.adam(0.05))
    state = tx.init(params)
    first = loss(params).item()
    for _ in range(100):
        u, state = tx.update(grad(loss)(params), state, params=params)
        params = sf.apply_updates(params, u)
    assert loss(params).item() < 0.9 * first
    assert all(t.dtype == torch.float64 for t in tensor_leaves(params))
