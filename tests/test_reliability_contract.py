"""Reliability against torch's per-parameter contract (torch.optim.AdamW's behaviour on the
same input is the reference where it applies), and a property test over dtypes, shapes and
gradient scales: parameters stay finite, or the step is skipped cleanly with parameters and
state untouched."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scao_fx as sf

EAGER = dict(warmup_steps=0, blend_steps=0, min_precond_updates=0)


def _flat(tree):
    return [t for t in sf._tree.flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _concentrating_fp16_gradients(steps: int = 12):
    """Gradients whose preconditioned form concentrates a Frobenius norm above float16's range
    into one entry: the history never moves e_0, so the full-rank preconditioner amplifies the
    last gradients' (0, 0) entry by the Tikhonov floor's -1/4 power on both sides."""
    gen = torch.Generator().manual_seed(0)
    for i in range(steps):
        if i < steps - 2:
            g = 1000 * torch.randn(64, 64, generator=gen)
        else:
            g = 1100 * torch.sign(torch.randn(64, 64, generator=gen))
        g[0, :] = 0
        g[:, 0] = 0
        if i >= steps - 2:
            g[0, 0] = 4000
        yield g.half()


def test_fp16_leaf_stays_finite_when_the_preconditioned_gradient_exceeds_fp16():
    """Item 2: the float32 preconditioned gradient of a float16 leaf is clipped to float16's
    range on the way back (it used to become inf, then NaN parameters). (No AdamW side here:
    torch.optim.AdamW keeps float16 moments for float16 parameters, and with gradients of 1000
    its second moment overflows; scao_fx keeps float32 moments.)"""
    params = {"w": torch.zeros(64, 64, dtype=torch.float16)}
    tx = sf.scao(lr=1e-3, use_int8_ema=False, rho=0.9, precond_freq=5, epsilon_sparse=0.0, **EAGER)
    pre = sf.scao_precondition(use_int8_ema=False, rho=0.9, precond_freq=5, epsilon_sparse=0.0, **EAGER)
    state, pre_state = tx.init(params), pre.init(params)
    peak = 0.0
    for g in _concentrating_fp16_gradients():
        pre_out, pre_state = pre.update({"w": g}, pre_state, params=params)
        peak = max(peak, float(pre_out["w"].float().abs().max()))
        updates, state = tx.update({"w": g}, state, params=params)
        params = sf.apply_updates(params, updates)
    assert peak == torch.finfo(torch.float16).max  # the case really reaches the clip
    assert torch.isfinite(params["w"]).all() and int(state.skipped) == 0


@pytest.mark.parametrize("shape", [(0, 10), (10, 0), (4, 0, 3, 3), (0,)])
def test_empty_leaves_step_like_adamw(shape):
    """Item 6: empty matrices pass through every link (the inf-norm over an empty dim raised)."""
    params = {"w": torch.zeros(shape), "b": torch.ones(3)}
    tx = sf.scao(lr=1e-2, **EAGER, precond_freq=1)
    state = tx.init(params)
    w = torch.nn.Parameter(torch.zeros(shape))
    b = torch.nn.Parameter(torch.ones(3))
    ref = torch.optim.AdamW([w, b], lr=1e-2)
    for step in range(3):
        grads = {"w": torch.zeros(shape), "b": torch.full((3,), 0.5 + step)}
        updates, state = tx.update(grads, state, params=params)
        params = sf.apply_updates(params, updates)
        w.grad, b.grad = grads["w"].clone(), grads["b"].clone()
        ref.step()
    assert params["w"].shape == shape
    torch.testing.assert_close(params["b"], b.detach(), rtol=1e-6, atol=1e-7)  # 1-d: AdamW's arithmetic


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("build", [sf.adamw, sf.adam, sf.scao], ids=["adamw", "adam", "scao"])
def test_tensor_learning_rates_are_validated_like_floats(build, bad):
    """Item 7: ``lr=torch.tensor(-1.0)`` (nan, inf) is rejected as ``lr=-1.0`` is."""
    with pytest.raises(ValueError, match="lr"):
        build(lr=bad)
    with pytest.raises(ValueError, match="lr must be in"):
        build(lr=torch.tensor(bad))
    build(lr=torch.tensor(0.0))  # the boundary is accepted
    with pytest.raises(ValueError, match="lr"):
        sf.scale_by_learning_rate(torch.tensor(bad))


# --------------------------------------------------------------------------- property test

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SHAPES = [(0, 5), (5, 0), (1, 7), (7, 1), (6, 5), (3, 4, 2), (2, 3, 2, 2), (70, 3), (5,), ()]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(DTYPES),
    shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3),
    log_scale=st.sampled_from([-30, -8, -4, 0, 2, 4, 8, 19, 30]),
    seed=st.integers(0, 2**16),
)
def test_parameters_stay_finite_or_the_step_is_skipped_cleanly(dtype, shapes, log_scale, seed):
    """Over leaf dtypes, shapes (empty, 1 x n, n x 1, 3-d/4-d, above ``max_precond_dim`` = 64)
    and gradient scales 1e-30..1e30: after each step either every parameter is finite, or the
    step was skipped with parameters and optimizer state bit-identical to before."""
    gen = torch.Generator().manual_seed(seed)
    params = {f"p{i}": torch.randn(s, generator=gen).to(dtype) for i, s in enumerate(shapes)}
    tx = sf.scao(lr=1e-2, max_precond_dim=64, precond_freq=2, use_int8_ema=seed % 2 == 0, **EAGER)
    state = tx.init(params)
    scale = 10.0 ** log_scale
    for _ in range(4):
        grads = {k: (torch.randn(v.shape, generator=gen) * scale).to(dtype) for k, v in params.items()}
        finite_in = all(torch.isfinite(g).all() for g in grads.values())
        before_p = [t.clone() for t in params.values()]
        before_s = [t.clone() for t in _flat(state)]
        skipped = int(state.skipped)
        updates, state = tx.update(grads, state, params=params)
        params = sf.apply_updates(params, updates)
        if int(state.skipped) > skipped:
            for a, b in zip(before_p, params.values()):
                assert torch.equal(a, b)
            inner_before = before_s[: len(_flat(state.inner_state))]
            for a, b in zip(inner_before, _flat(state.inner_state)):
                assert a.dtype == b.dtype and torch.equal(a, b)
        else:
            assert finite_in  # a non-finite input must be skipped
            for name, p in params.items():
                assert torch.isfinite(p).all(), (name, dtype, p.shape, scale)


@pytest.mark.parametrize("build", [sf.adamw, sf.scao, sf.scao_precondition], ids=["adamw", "scao", "scao_precondition"])
def test_sparse_gradients_raise_a_type_error_naming_the_leaf(build):
    """Item 12: a sparse gradient in the functional API is a TypeError naming the leaf (it failed
    deep inside a norm or a lerp)."""
    params = {"a": torch.zeros(3), "w": torch.zeros(5, 3)}
    tx = build()
    state = tx.init(params)
    grads = {"a": torch.ones(3), "w": torch.eye(5, 3).to_sparse()}
    with pytest.raises(TypeError, match=r"leaf 1 is a torch.sparse_coo tensor of shape \(5, 3\)"):
        tx.update(grads, state, params=params)


def test_loaded_hyperparameter_tensors_are_copies_like_torch():
    """Item 11: after ``b.load_state_dict(a.state_dict())`` a tensor hyperparameter is b's own
    (a scheduler on ``a`` does not change ``b``), as with torch.optim.AdamW."""
    for make in (lambda ps: sf.SCAO(ps, lr=torch.tensor(1e-3)), lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-3))):
        a = make([torch.nn.Parameter(torch.zeros(2, 2))])
        b = make([torch.nn.Parameter(torch.zeros(2, 2))])
        b.load_state_dict(a.state_dict())
        a.param_groups[0]["lr"].fill_(0.5)
        assert float(b.param_groups[0]["lr"]) == pytest.approx(1e-3), type(a).__name__


def test_stride_zero_gradients_pass_the_blend_ramp():
    """Item 8: torch.func.grad of a parameter used through a scaled ``.sum()`` is an expanded
    (stride-0) tensor; the ramp's in-place write into it crashed at the first ramp step."""
    params = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    tx = sf.scao(lr=1e-2, warmup_steps=1, blend_steps=4, min_precond_updates=0, precond_freq=1)
    state = tx.init(params)

    def loss(p):
        return 2.0 * p["w"].sum() + (p["b"] ** 2).sum()

    for _ in range(6):
        grads = torch.func.grad(loss)(params)
        assert grads["w"].stride() == (0, 0)  # the case the test is about
        updates, state = tx.update(grads, state, params=params)
        params = sf.apply_updates(params, updates, inplace=False)
    assert all(torch.isfinite(v).all() for v in params.values())
    assert not torch.equal(params["w"], torch.zeros(4, 3))
