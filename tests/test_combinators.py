"""chain, named_chain, identity, masked, partition."""

from __future__ import annotations

import io

import pytest
import torch
import torchopt
from treeutil import assert_tree_close, clone, tensor_leaves, versions

import scao_fx as sf


def tree():
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 2, generator=gen, dtype=torch.float64),
        "b": torch.randn(2, generator=gen, dtype=torch.float64),
        "nested": [torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(2, 2, generator=gen, dtype=torch.float64)],
    }


# ---------------------------------------------------------------- chain / identity


def test_chain_applies_links_left_to_right():
    p, g = tree(), tree()
    # (g * 2) + 1 * p  versus  (g + 1 * p) * 2
    a = sf.chain(sf.scale(2.0), sf.add_decayed_weights(1.0))
    b = sf.chain(sf.add_decayed_weights(1.0), sf.scale(2.0))
    ua, _ = a.update(clone(g), a.init(p), params=p)
    ub, _ = b.update(clone(g), b.init(p), params=p)
    torch.testing.assert_close(ua["w"], 2 * g["w"] + p["w"])
    torch.testing.assert_close(ub["w"], 2 * (g["w"] + p["w"]))


def test_chain_state_is_flat_tuple_like_torchopt():
    p = tree()
    tx = sf.chain(sf.clip_by_global_norm(1.0), sf.chain(sf.scale_by_adam(), sf.scale(-1.0)), sf.identity())
    state = tx.init(p)
    assert isinstance(state, tuple) and len(state) == 3  # nested chain flattened, identity dropped
    assert isinstance(state[1], sf.ScaleByAdamState)
    ref = torchopt.chain(sf.clip_by_global_norm(1.0), sf.scale_by_adam(), sf.scale(-1.0)).init(p)
    assert_tree_close(state, ref)


def test_chain_rejects_non_transforms():
    with pytest.raises(TypeError, match=r"transforms\[1\]"):
        sf.chain(sf.scale(1.0), lambda g: g)


def test_empty_chain_and_identity_pass_updates_through():
    p, g = tree(), tree()
    for tx in (sf.identity(), sf.chain()):
        u, s = tx.update(clone(g), tx.init(p), params=p, inplace=False)
        assert_tree_close(u, g)
    assert isinstance(sf.identity().init(p), sf.EmptyState)


# ---------------------------------------------------------------- named_chain


def test_named_chain_matches_chain_and_keys_state_by_name():
    p, gs = tree(), [tree() for _ in range(3)]
    nc = sf.named_chain(("clip", sf.clip_by_global_norm(0.5)), ("adam", sf.adam(1e-2)))
    ch = sf.chain(sf.clip_by_global_norm(0.5), sf.adam(1e-2))
    sn, sc = nc.init(p), ch.init(p)
    assert isinstance(sn, sf.NamedChainState) and set(sn.states) == {"clip", "adam"}
    for g in gs:
        un, sn = nc.update(clone(g), sn, params=p)
        uc, sc = ch.update(clone(g), sc, params=p)
        assert_tree_close(un, uc)
    assert_tree_close(sn.states["adam"], sc[1:])


def test_named_chain_checkpoint_survives_adding_a_link():
    p, g = tree(), tree()
    old = sf.named_chain(("adam", sf.adam(1e-2)))
    state = old.init(p)
    _, state = old.update(clone(g), state, params=p)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    new = sf.named_chain(("clip", sf.clip_by_global_norm(1e9)), ("adam", sf.adam(1e-2)))
    # Migrating = adding the new link's fresh state under its name.
    migrated = sf.NamedChainState({**loaded.states, "clip": sf.EmptyState()})
    u_new, s_new = new.update(clone(g), migrated, params=p)
    u_old, s_old = old.update(clone(g), state, params=p)
    assert_tree_close(u_new, u_old)
    assert_tree_close(s_new.states["adam"], s_old.states["adam"])


def test_named_chain_state_mismatch_names_both_sides():
    p = tree()
    a = sf.named_chain(("clip", sf.clip_by_global_norm(1.0)), ("adam", sf.adam(1e-2)))
    b = sf.named_chain(("adam", sf.adam(1e-2)))
    with pytest.raises(ValueError, match=r"\['adam', 'clip'\].*\['adam'\]"):
        b.update(tree(), a.init(p), params=p)


def test_named_chain_rejects_bad_names():
    with pytest.raises(ValueError, match="unique"):
        sf.named_chain(("a", sf.identity()), ("a", sf.identity()))
    with pytest.raises(TypeError, match=r"named\[0\]"):
        sf.named_chain(("", sf.identity()))
    with pytest.raises(TypeError, match=r"named\[1\]"):
        sf.named_chain(("a", sf.identity()), ("b", "not a transform"))


# ---------------------------------------------------------------- masked


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("as_callable", [False, True])
def test_masked_touches_selected_leaves_only(inplace, as_callable):
    p, g = tree(), tree()
    mask_tree = {"w": True, "b": False, "nested": [False, True]}
    mask = (lambda params: {"w": True, "b": False, "nested": [False, True]}) if as_callable else mask_tree
    tx = sf.masked(sf.scale_by_adam(), mask)
    state = tx.init(p)
    assert isinstance(state, sf.MaskedState)
    assert len(state.inner_state.mu) == 2  # moments only for the two selected leaves
    before = clone(g)
    u, state = tx.update(g, state, params=p, inplace=inplace)
    torch.testing.assert_close(u["b"], before["b"])
    torch.testing.assert_close(u["nested"][0], before["nested"][0])
    torch.testing.assert_close(u["w"], torch.sign(before["w"]), atol=1e-6, rtol=0)  # Adam step 1 ~ sign
    torch.testing.assert_close(u["nested"][1], torch.sign(before["nested"][1]), atol=1e-6, rtol=0)


def test_masked_inplace_false_mutates_nothing():
    p, g = tree(), tree()
    tx = sf.masked(sf.chain(sf.scale_by_adam(), sf.add_decayed_weights(0.1)), {"w": True, "b": True, "nested": [True, False]})
    state = tx.init(p)
    saved, vers = clone((g, state, p)), versions((g, state, p))
    tx.update(g, state, params=p, inplace=False)
    assert versions((g, state, p)) == vers
    assert_tree_close((g, state, p), saved)


def test_masked_rejects_wrong_mask_structure():
    p = tree()
    tx = sf.masked(sf.scale(2.0), {"w": True, "b": False})  # "nested" missing
    with pytest.raises(ValueError, match="mask"):
        tx.init(p)
    with pytest.raises(TypeError, match="mask"):
        sf.masked(sf.scale(2.0), {"w": 1, "b": 0, "nested": [0, 1]}).init(p)


# ---------------------------------------------------------------- partition


def label_fn(leaf):
    return "matrix" if leaf.ndim >= 2 else "vector"


@pytest.mark.parametrize("inplace", [True, False])
def test_partition_routes_by_callable_and_by_tree(inplace):
    p, gs = tree(), [tree() for _ in range(3)]
    transforms = {"matrix": sf.adam(1e-2), "vector": sf.scale(-0.5)}
    by_fn = sf.partition(transforms, label_fn)
    by_tree = sf.partition(transforms, {"w": "matrix", "b": "vector", "nested": ["vector", "matrix"]})
    adam = sf.adam(1e-2)
    s_fn, s_tree = by_fn.init(p), by_tree.init(p)
    assert isinstance(s_fn, sf.PartitionState) and set(s_fn.inner_states) == {"matrix", "vector"}
    s_adam = adam.init([p["nested"][1], p["w"]])  # tree (optree) order: b, nested[0], nested[1], w
    for g in gs:
        u_fn, s_fn = by_fn.update(clone(g), s_fn, params=p, inplace=inplace)
        u_tree, s_tree = by_tree.update(clone(g), s_tree, params=p, inplace=inplace)
        u_adam, s_adam = adam.update([g["nested"][1].clone(), g["w"].clone()], s_adam, params=[p["nested"][1], p["w"]])
        assert_tree_close(u_fn, u_tree)
        torch.testing.assert_close(u_fn["b"], -0.5 * g["b"])
        torch.testing.assert_close(u_fn["nested"][0], -0.5 * g["nested"][0])
        torch.testing.assert_close(u_fn["w"], u_adam[1])
        torch.testing.assert_close(u_fn["nested"][1], u_adam[0])


def test_partition_passes_none_updates_through():
    p, g = tree(), tree()
    g["b"] = None
    tx = sf.partition({"matrix": sf.adam(1e-2), "vector": sf.adam(1e-2)}, label_fn)
    state = tx.init(p)
    u, state = tx.update(g, state, params=p)
    assert u["b"] is None
    b_moment = state.inner_states["vector"][0].mu[0]  # leaves of "vector": b, nested[0]
    assert torch.equal(b_moment, torch.zeros(2, dtype=torch.float64))
    # Without params a callable cannot label the None leaf: a clear error, not a shifted state.
    with pytest.raises(ValueError, match="params"):
        tx.update(g, state)
    # With a label tree, params are not needed.
    by_tree = sf.partition({"matrix": sf.adam(1e-2), "vector": sf.adam(1e-2)}, {"w": "matrix", "b": "vector", "nested": ["vector", "matrix"]})
    g2 = tree()
    g2["b"] = None
    u2, _ = by_tree.update(g2, by_tree.init(p))
    assert u2["b"] is None
    torch.testing.assert_close(u2["w"], u["w"])


def test_partition_rejects_unknown_label_and_bad_tree():
    p = tree()
    with pytest.raises(ValueError, match="labels"):
        sf.partition({"matrix": sf.identity()}, label_fn).init(p)
    with pytest.raises(ValueError, match="labels"):
        sf.partition({"a": sf.identity()}, {"w": "a", "b": "a"}).init(p)
    with pytest.raises(TypeError, match="transforms"):
        sf.partition({}, label_fn)
    with pytest.raises(TypeError, match=r"transforms\['a'\]"):
        sf.partition({"a": 3}, label_fn)


def test_combinator_states_are_plain_tensors():
    p = tree()
    tx = sf.named_chain(
        ("part", sf.partition({"matrix": sf.adamw(1e-2), "vector": sf.masked(sf.adam(1e-2), lambda leaves: [True] * len(leaves))}, label_fn)),
    )
    state = tx.init(p)
    assert tensor_leaves(state), "expected tensors in the state"
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert_tree_close(torch.load(buf, weights_only=True), state)
