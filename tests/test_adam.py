"""scale_by_adam and add_decayed_weights."""

from __future__ import annotations

import math

import pytest
import torch
from treeutil import assert_tree_close, clone, update_memory_rise, versions

import scao_fx as sf
from scao_fx import _treemath
from scao_fx.transforms.adam import moment_dtype_for


def reference_adam(grads, b1, b2, eps, eps_root=0.0):
    """Adam directions written out plainly with Python floats for the bias corrections."""
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        out.append(m_hat / (torch.sqrt(v_hat + eps_root) + eps))
    return out


@pytest.mark.parametrize("eps_root", [0.0, 1e-6])
@pytest.mark.parametrize("inplace", [True, False])
def test_scale_by_adam_matches_formula(eps_root, inplace):
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 3, generator=gen, dtype=torch.float64) * (i + 1) for i in range(6)]
    b1, b2, eps = 0.8, 0.95, 1e-3
    expected = reference_adam(grads, b1, b2, eps, eps_root)
    tx = sf.scale_by_adam(b1, b2, eps, eps_root)
    state = tx.init({"x": grads[0]})
    for t, (g, e) in enumerate(zip(grads, expected), start=1):
        u, state = tx.update({"x": g.clone()}, state, inplace=inplace)
        torch.testing.assert_close(u["x"], e, rtol=1e-13, atol=0)
        assert int(state.count["x"]) == t
    m_ref = sum((1 - b1) * b1 ** (len(grads) - i) * g for i, g in enumerate(grads, start=1))
    torch.testing.assert_close(state.mu["x"], m_ref, rtol=1e-13, atol=1e-15)


def test_first_step_is_sign_of_gradient():
    g = torch.tensor([3.0, -0.5, 1e-3])
    tx = sf.scale_by_adam(eps=0.0)
    u, _ = tx.update([g.clone()], tx.init([g]))
    torch.testing.assert_close(u[0], torch.sign(g))


def test_bias_correction_at_parameter_precision():
    # After 3000 steps at b2 = 0.9999 the correction 1 - b2**t is computed in float64 for
    # float64 moments; a float32 correction would be off by ~1e-5 relative.
    g = torch.ones(2, dtype=torch.float64)
    b2 = 0.9999
    tx = sf.scale_by_adam(b1=0.0, b2=b2, eps=0.0)
    state = sf.ScaleByAdamState(mu=[torch.zeros(2, dtype=torch.float64)], nu=[torch.zeros(2, dtype=torch.float64)], count=torch.tensor(2999))
    v_prev = 1 - b2**2999  # nu after 2999 unit gradients
    state = state._replace(nu=[torch.full((2,), v_prev, dtype=torch.float64)])
    u, state = tx.update([g.clone()], state)
    # nu_t = 1 - b2**t exactly, so the bias-corrected update is 1 to float64 rounding.
    torch.testing.assert_close(u[0], torch.ones(2, dtype=torch.float64), rtol=1e-12, atol=0)


def test_moment_dtypes():
    params = {"bf": torch.zeros(3, dtype=torch.bfloat16), "f64": torch.zeros(3, dtype=torch.float64), "f32": torch.zeros(2)}
    state = sf.scale_by_adam().init(params)
    assert state.mu["bf"].dtype == torch.float32 and state.nu["bf"].dtype == torch.float32
    assert state.mu["f64"].dtype == torch.float64
    assert all(c.dtype == torch.int64 and c.ndim == 0 and c.device.type == "cpu" for c in state.count.values())
    s16 = sf.scale_by_adam(moment_dtype=torch.bfloat16).init(params)
    assert s16.mu["f32"].dtype == torch.bfloat16
    assert moment_dtype_for(torch.float16) == torch.float32


def test_bfloat16_updates_come_back_in_bfloat16():
    g = {"w": torch.randn(4, 4).to(torch.bfloat16)}
    tx = sf.scale_by_adam()
    for inplace in (True, False):
        u, state = tx.update(clone(g), tx.init(g), inplace=inplace)
        assert u["w"].dtype == torch.bfloat16
        assert state.mu["w"].dtype == torch.float32


def test_none_gradient_leaves_state_untouched():
    params = {"a": torch.ones(2), "b": torch.ones(3)}
    tx = sf.scale_by_adam()
    state = tx.init(params)
    _, state = tx.update({"a": torch.ones(2), "b": torch.ones(3)}, state)
    mu_b, nu_b, mu_a = state.mu["b"].clone(), state.nu["b"].clone(), state.mu["a"].clone()
    u, state = tx.update({"a": torch.ones(2), "b": None}, state)
    assert u["b"] is None
    assert torch.equal(state.mu["b"], mu_b) and torch.equal(state.nu["b"], nu_b)
    assert not torch.equal(state.mu["a"], mu_a)


def test_mismatched_state_raises():
    tx = sf.scale_by_adam()
    state = tx.init({"a": torch.ones(2)})
    with pytest.raises(ValueError, match="init"):
        tx.update({"a": torch.ones(2), "b": torch.ones(2)}, state)


def test_step_counter_saturates():
    tx = sf.scale_by_adam()
    top = torch.iinfo(torch.int64).max
    state = tx.init([torch.ones(1), torch.ones(2)])._replace(count=[torch.tensor(top), torch.tensor(top - 1)])
    _, state = tx.update([torch.ones(1), torch.ones(2)], state)
    assert [int(c) for c in state.count] == [top, top]
    legacy = tx.init([torch.ones(1)])._replace(count=torch.tensor(top))  # one counter for the tree
    _, legacy = tx.update([torch.ones(1)], legacy)
    assert int(legacy.count) == top


def test_step_counts_are_per_leaf_like_torch_adamw():
    """A parameter without a gradient on some steps is bias-corrected with its own step count,
    as torch.optim.AdamW counts ``step`` per parameter: after 200 steps in which one parameter
    had a gradient only every other step, both match AdamW to rounding."""
    torch.manual_seed(0)
    a = torch.randn(3, 4, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    ref = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.01)
    tx = sf.adamw(lr=1e-2, weight_decay=0.01)
    params = [a.clone(), b.clone()]
    state = tx.init(params)
    gen = torch.Generator().manual_seed(1)
    for t in range(200):
        ga, gb = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
        gb = gb if t % 2 == 0 else None
        ref[0].grad, ref[1].grad = ga.clone(), None if gb is None else gb.clone()
        opt.step()
        updates, state = tx.update([ga, gb], state, params=params)
        params = sf.apply_updates(params, updates)
    adam = [s for s in state if isinstance(s, sf.ScaleByAdamState)][0]
    assert [int(c) for c in adam.count] == [200, 100]
    assert [int(opt.state[p]["step"]) for p in ref] == [200, 100]
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q.detach(), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- add_decayed_weights


@pytest.mark.parametrize("inplace", [True, False])
def test_add_decayed_weights(inplace):
    p = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    g = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    tx = sf.add_decayed_weights(0.3)
    g_in, saved = clone(g), clone((g, p))
    vers = versions((g_in, p))
    u, s = tx.update(g_in, tx.init(p), params=p, inplace=inplace)
    assert isinstance(s, sf.EmptyState)
    assert_tree_close(u, {k: g[k] + 0.3 * p[k] for k in p}, rtol=1e-6, atol=1e-7)
    assert_tree_close(p, saved[1])
    if inplace:
        assert u["w"] is g_in["w"]
    else:
        assert versions((g_in, p)) == vers
        assert_tree_close(g_in, saved[0])


def test_add_decayed_weights_mask_and_zero():
    p = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    g = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    masked = sf.add_decayed_weights(0.5, mask=lambda q: {k: v.ndim >= 2 for k, v in q.items()})
    u, _ = masked.update(clone(g), masked.init(p), params=p)
    torch.testing.assert_close(u["w"], g["w"] + 0.5 * p["w"])
    torch.testing.assert_close(u["b"], g["b"])
    zero = sf.add_decayed_weights(0.0)
    u, _ = zero.update(clone(g), zero.init(p))  # no params needed when there is no decay
    assert_tree_close(u, g)


def test_add_decayed_weights_needs_params():
    tx = sf.add_decayed_weights(0.1)
    with pytest.raises(ValueError, match="params"):
        tx.update({"w": torch.ones(2)}, tx.init({"w": torch.ones(2)}))


def test_decay_keeps_update_dtype_with_bf16_params():
    p = {"w": torch.ones(2, dtype=torch.bfloat16)}
    g = {"w": torch.zeros(2, dtype=torch.float32)}
    u, _ = sf.add_decayed_weights(0.25).update(g, sf.EmptyState(), params=p, inplace=False)
    assert u["w"].dtype == torch.float32
    torch.testing.assert_close(u["w"], torch.full((2,), 0.25))


def test_adam_bias_corrections_use_python_floats_for_reference_sanity():
    # The reference above is itself checked against a closed form: constant gradient c gives
    # m_hat = c and v_hat = c^2 at every step, hence an update of c / (|c| + eps).
    c = 0.37
    out = reference_adam([torch.full((1,), c, dtype=torch.float64)] * 4, 0.9, 0.999, 1e-8)
    for u in out:
        assert math.isclose(u.item(), c / (abs(c) + 1e-8), rel_tol=1e-12)


def test_denominators_are_computed_a_chunk_of_leaves_at_a_time(monkeypatch):
    """The multi-tensor path computes Adam's denominators a chunk of leaves at a time: the same
    bits whatever the chunk, and the step's temporaries are the directions plus one chunk (5
    bytes per parameter here, 8 when every denominator was alive at once)."""
    import scao_fx.transforms.adam as adam_module

    gen = torch.Generator().manual_seed(0)
    params = {f"w{i}": torch.randn(64, 64, generator=gen) for i in range(8)}
    grads = [{k: torch.randn(64, 64, generator=gen) for k in params} for _ in range(3)]
    runs = {}
    for chunk in (adam_module.DENOMINATOR_CHUNK, 1, 2 * 4096):  # (the last one stays set)
        monkeypatch.setattr(adam_module, "DENOMINATOR_CHUNK", chunk)
        tx, p = sf.adamw(1e-2, weight_decay=0.1), clone(params)
        state = tx.init(p)
        for g in grads:
            u, state = tx.update(clone(g), state, params=p)
            p = sf.apply_updates(p, u)
        runs[chunk] = p
    assert_tree_close(runs[1], runs[adam_module.DENOMINATOR_CHUNK])
    assert_tree_close(runs[2 * 4096], runs[adam_module.DENOMINATOR_CHUNK])
    assert _treemath.chunks_by_size([torch.zeros(3), torch.zeros(5), torch.zeros(9), torch.zeros(1)], 8) == [[0, 1], [2], [3]]
    rise = update_memory_rise(sf.adamw(1e-2), params, grads)  # chunks of two leaves: a quarter of the tree
    assert 4.5 < rise < 5.5, rise


# ---------------------------------------------------------------- factored second moment


def test_factored_shape_rule():
    from scao_fx.transforms.adam import FACTORED_MIN_DIM, factored_shape

    assert FACTORED_MIN_DIM == 128
    assert factored_shape((128, 300)) == (128, 300)
    assert factored_shape((127, 300)) is None
    assert factored_shape((300,)) is None and factored_shape(()) is None
    assert factored_shape((8, 4, 5), min_dim=4) == (8, 20)  # viewed as (shape[0], prod(shape[1:]))
    assert factored_shape((8, 4, 5), min_dim=9) is None


def test_factored_second_moment_is_exact_for_a_rank_one_second_moment():
    """With g^2 = a b^T, the row and column means give back V exactly: b1 = 0, eps = 0 then makes
    every direction sign(g) (|u| = 1) when the same g repeats, as full Adam's would be."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1, torch.rand(5, generator=gen, dtype=torch.float64) + 0.1
    g = torch.outer(a, b).sqrt() * torch.where(torch.rand(6, 5, generator=gen) < 0.5, -1.0, 1.0).double()
    tx = sf.scale_by_adam(0.0, 0.9, 0.0, factored=True, factored_min_dim=2)
    state = tx.init({"w": g})
    assert state.nu["w"].shape == (11,)
    for _ in range(3):  # the bias-corrected estimate is g^2 itself at every step
        u, state = tx.update({"w": g.clone()}, state)
        torch.testing.assert_close(u["w"], g.sign(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("inplace", [True, False])
def test_factored_adam_matches_the_formula(inplace):
    """Three steps against the factored estimate written out: r, c the EMAs of the row and column
    means of g^2, v = max(r c^T / mean(r), (1 - b2) g^2) / (1 - b2^t); vectors and small matrices
    keep full Adam."""
    gen = torch.Generator().manual_seed(1)
    b1, b2, eps = 0.8, 0.9, 1e-3
    grads = [{"w": torch.randn(4, 3, 2, generator=gen, dtype=torch.float64), "v": torch.randn(5, generator=gen, dtype=torch.float64),
              "s": torch.randn(2, 7, generator=gen, dtype=torch.float64)} for _ in range(3)]
    tx = sf.scale_by_adam(b1, b2, eps, factored=True, factored_min_dim=3)
    state = tx.init(grads[0])
    assert state.nu["w"].shape == (4 + 6,) and state.nu["v"].shape == (5,) and state.nu["s"].shape == (2, 7)
    m = torch.zeros(4, 6, dtype=torch.float64)
    r, c = torch.zeros(4, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    full = reference_adam([g["s"] for g in grads], b1, b2, eps)
    for t, g in enumerate(grads, start=1):
        u, state = tx.update(clone(g), state, inplace=inplace)
        gw = g["w"].reshape(4, 6)
        m = b1 * m + (1 - b1) * gw
        r = b2 * r + (1 - b2) * (gw**2).mean(1)
        c = b2 * c + (1 - b2) * (gw**2).mean(0)
        v = torch.maximum(torch.outer(r, c) / r.mean(), (1 - b2) * gw**2) / (1 - b2**t)
        want = (m / (1 - b1**t)) / (v.sqrt() + eps)
        torch.testing.assert_close(u["w"], want.reshape(4, 3, 2), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(u["s"], full[t - 1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.nu["w"], torch.cat([r, c]), rtol=1e-12, atol=1e-12)


def test_factored_adam_leaves_the_state_passed_in_untouched_out_of_place():
    gen = torch.Generator().manual_seed(2)
    g = {"w": torch.randn(4, 5, generator=gen)}
    tx = sf.scale_by_adam(factored=True, factored_min_dim=2)
    state = tx.init(g)
    _, state = tx.update(clone(g), state)
    snapshot = clone(state)
    _, new = tx.update(clone(g), state, inplace=False)
    assert_tree_close(state, snapshot, rtol=0, atol=0)
    assert not torch.equal(new.nu["w"], state.nu["w"])


def test_factored_adam_zero_gradients_give_zero_not_nan():
    tx = sf.scale_by_adam(eps=0.0, factored=True, factored_min_dim=2)
    state = tx.init({"w": torch.zeros(3, 4)})
    u, state = tx.update({"w": torch.zeros(3, 4)}, state)
    assert torch.equal(u["w"], torch.zeros(3, 4))


@pytest.mark.parametrize("kernel", ["foreach", "loop", "fused"])
def test_factored_adam_mixes_with_every_kernel_for_the_other_leaves(kernel):
    """The full second moments of the other leaves run the chosen kernel; the result equals
    running those leaves alone."""
    gen = torch.Generator().manual_seed(3)
    p = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(5, generator=gen), "q": torch.randn(2, 3, generator=gen)}
    mixed = sf.scale_by_adam(kernel=kernel, factored=True, factored_min_dim=4)
    plain = sf.scale_by_adam(kernel=kernel)
    s_mixed, s_plain = mixed.init(p), plain.init({"b": p["b"], "q": p["q"]})
    for _ in range(3):
        g = {k: torch.randn(v.shape, generator=gen) for k, v in p.items()}
        u, s_mixed = mixed.update(clone(g), s_mixed)
        w, s_plain = plain.update({"b": g["b"].clone(), "q": g["q"].clone()}, s_plain)
        assert torch.equal(u["b"], w["b"]) and torch.equal(u["q"], w["q"])
        assert u["w"].shape == (6, 5) and torch.isfinite(u["w"]).all()


def test_factored_second_moment_is_float32_with_bfloat16_moments():
    tx = sf.scale_by_adam(moment_dtype=torch.bfloat16, factored=True, factored_min_dim=2)
    state = tx.init({"w": torch.zeros(4, 6, dtype=torch.bfloat16)})
    assert state.mu["w"].dtype == torch.bfloat16 and state.nu["w"].dtype == torch.float32
    u, _ = tx.update({"w": torch.ones(4, 6, dtype=torch.bfloat16)}, state)
    assert u["w"].dtype == torch.bfloat16


def test_factored_arguments_are_validated():
    with pytest.raises(TypeError, match="factored must be a bool"):
        sf.scale_by_adam(factored=1)
    with pytest.raises(ValueError, match="factored_min_dim"):
        sf.scale_by_adam(factored=True, factored_min_dim=0)
    tx = sf.scale_by_adam()
    state = tx.init({"w": torch.zeros(4, 6)})
    bad = state._replace(nu={"w": torch.zeros(7)})
    with pytest.raises(ValueError, match="second moment of leaf 0 has shape"):
        tx.update({"w": torch.ones(4, 6)}, bad)


def test_factored_estimate_is_floored_so_no_entry_outsteps_adam():
    """A spike in an otherwise small row and column: the rank-one fit underestimates its second
    moment by orders of magnitude, the floor (1 - b2) g^2 keeps its step within Adam's bound
    (|u| <= 1 at the first step with b1 = 0, as Adam's sign-like first step)."""
    from scao_fx.transforms.adam import factored_estimate

    g = torch.full((8, 6), 1e-3, dtype=torch.float64)
    g[:4, :3] = 1.0
    g[7, 5] = 0.5  # large against its row and column means
    v = torch.cat([(g**2).mean(1), (g**2).mean(0)])
    assert float((g**2)[7, 5] / factored_estimate(v, 8)[7, 5]) > 40  # the fit alone: a ~7x step
    tx = sf.scale_by_adam(0.0, 0.95, 0.0, factored=True, factored_min_dim=2)
    u, _ = tx.update({"w": g.clone()}, tx.init({"w": g}))
    assert float(u["w"].abs().max()) <= 1.0 + 1e-12
    assert float(u["w"][7, 5]) == pytest.approx(1.0)
