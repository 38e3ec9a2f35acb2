"""Reliability against torch's per-parameter contract (torch.optim.AdamW's behaviour on the
same input is the reference where it applies), and a property test over dtypes, shapes and
gradient scales: parameters stay finite, or the step is skipped cleanly with parameters and
state untouched."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scao_fx as sf

EAGER = dict(form="seed", warmup_steps=0, blend_steps=0, min_precond_updates=0)


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
    tx = sf.scao(lr=1e-2, betas=(0.9, 0.999), **EAGER, precond_freq=1)  # torch.optim.AdamW's betas
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
    tx = sf.scao(form="seed", lr=1e-2, warmup_steps=1, blend_steps=4, min_precond_updates=0, precond_freq=1)
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


# ---------------------------------------------------------------- the torch.optim facade (issue 14)

# float32_below=0: the small test layers' sides are int8-coded as long ones are (the default keeps sides < 64 float32)
FACADE = {"form": "seed", "betas": (0.9, 0.999), "lr": 1e-2, "warmup_steps": 1, "blend_steps": 1, "min_precond_updates": 1,
          "precond_freq": 2, "k_min": 1, "k_max": 4, "float32_below": 0}


def _layers(*sizes: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in itertools.pairwise(sizes)])


def _set_grads(params, step: int) -> None:
    """Fixed gradients (seeded by the step) for the parameters that require grad: each
    parameter's trajectory then does not depend on whether another one trains."""
    gen = torch.Generator().manual_seed(step)
    for p in params:
        g = torch.randn(p.shape, generator=gen)
        p.grad = g if p.requires_grad else None


def _snapshot(sd):
    """A deep copy of a state dict (tensors cloned), to compare bit for bit later."""
    import copy

    return copy.deepcopy(sd)


def _assert_same(a, b, where="state_dict"):
    """Bit-for-bit equality of two nested state dicts (dtypes included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_rejected_checkpoint_leaves_the_optimizer_exactly_as_before():
    """Item 4: ``load_state_dict`` is atomic. A checkpoint whose *later* group does not fit (a
    shape mismatch in group 1; its group 0 has other hyperparameters and a valid state) is
    rejected and the optimizer is bit-for-bit what it was, hyperparameters included. AdamW,
    side by side, rejects a later group's size mismatch the same way, without changing
    anything."""
    model, other = _layers(6, 5, 4), _layers(6, 5, 3)
    def groups(m):
        return [{"params": list(m[0].parameters())}, {"params": list(m[1].parameters())}]

    opt = sf.SCAO(groups(model), **FACADE)
    donor = sf.SCAO(groups(other), **{**FACADE, "lr": 0.5, "weight_decay": 0.3})
    adamw = torch.optim.AdamW(groups(model), lr=1e-2)
    for step in range(4):
        _set_grads(model.parameters(), step)
        opt.step()
        adamw.step()
        _set_grads(other.parameters(), step)
        donor.step()
    before, before_groups = _snapshot(opt.state_dict()), _snapshot(opt.param_groups)
    bad = donor.state_dict()
    with pytest.raises(ValueError, match=r"transform_state\[1\].*shape|shape.*expected"):
        opt.load_state_dict(bad)
    _assert_same(opt.state_dict(), before)
    for g, h in zip(opt.param_groups, before_groups):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in h.items() if k != "params"}
    # and it still steps exactly like an optimizer that never saw the bad checkpoint
    twin = sf.SCAO(groups(_layers(6, 5, 4)), **FACADE)
    twin.load_state_dict(before)
    _set_grads(model.parameters(), 9)
    _set_grads(twin.param_groups[0]["params"] + twin.param_groups[1]["params"], 9)
    opt.step()
    twin.step()
    _assert_same(opt.state_dict()["transform_state"], twin.state_dict()["transform_state"])
    # AdamW side by side: a later group of another size is rejected and nothing changes
    adamw_before = _snapshot(adamw.state_dict())
    bad_adamw = _snapshot(adamw.state_dict())
    bad_adamw["param_groups"][0]["lr"] = 0.5
    bad_adamw["param_groups"][1]["params"] = bad_adamw["param_groups"][1]["params"][:1]
    with pytest.raises(ValueError):
        adamw.load_state_dict(bad_adamw)
    _assert_same(adamw.state_dict(), adamw_before)


def test_unfrozen_parameter_starts_training_like_adamw_and_the_others_keep_their_state():
    """Item 5: progressive unfreezing. A layer frozen when the state was created and unfrozen
    after N steps trains from the next step (it raised and pointed to add_param_group); the
    other parameters' state and trajectory are exactly those of a run where it stays frozen.
    AdamW, side by side, trains the unfrozen layer from its first gradient: its moments are
    SCAO's (the layer's bias is not preconditioned, so its Adam moments see the same gradients)."""
    n, m = 5, 4

    def run(unfreeze: bool, make):
        model = _layers(6, 5, 4, 3)  # distinct shapes: no shape group gains a member
        for p in model[1].parameters():
            p.requires_grad_(False)
        opt = make(model.parameters())
        for step in range(n + m):
            if step == n and unfreeze:
                for p in model[1].parameters():
                    p.requires_grad_(True)
            _set_grads(model.parameters(), step)
            opt.step()
        return model, opt

    # float32 statistics: int8 ones draw their stochastic rounding from the shape group's
    # position, which the new layer's group shifts (other, equally valid, random numbers)
    scao_model, scao = run(True, lambda ps: sf.SCAO(ps, **FACADE, use_int8_ema=False))
    kept_model, kept = run(False, lambda ps: sf.SCAO(ps, **FACADE, use_int8_ema=False))
    adamw_model, adamw = run(True, lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    frozen_start = _layers(6, 5, 4, 3)[1]
    assert not torch.equal(scao_model[1].weight, frozen_start.weight)  # it trains
    assert not torch.equal(adamw_model[1].weight, frozen_start.weight)
    assert torch.equal(kept_model[1].weight, frozen_start.weight)
    for i in (0, 2):  # the other layers: parameters and their state untouched by the event
        for a, b in zip(scao_model[i].parameters(), kept_model[i].parameters()):
            assert torch.equal(a, b)
    sd, ref = scao.state_dict(), kept.state_dict()
    assert sd["transform_state"][0]["active"] == [0, 1, 2, 3, 4, 5]
    assert ref["transform_state"][0]["active"] == [0, 1, 4, 5]
    for j in (0, 1, 4, 5):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sd["state"][j][k], ref["state"][j][k])
    kron, kron_ref = (
        sf._tree.find_nodes(o.functional_state(0), sf.KroneckerPreconditionState)[0] for o in (scao, kept)
    )
    assert len(kron.groups) == len(kron_ref.groups) + 1  # the new layer's own shape group
    assert int(kron.refreshes) == int(kron_ref.refreshes) and int(kron.refreshes) > 0
    for a, b in zip(_flat([g for g in kron.groups if g.leaves.tolist() != [2]]), _flat(kron_ref.groups)):
        if a.dtype != torch.int64:  # leaf indices are renumbered, statistics are kept bit for bit
            assert torch.equal(a, b)
    bias = 3  # model[1].bias, global index 3
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(sd["state"][bias][k], adamw.state[adamw_model[1].bias][k], rtol=1e-6, atol=0)
    assert float(sd["state"][bias]["step"]) == m  # its own step count, as AdamW's
    assert float(adamw.state[adamw_model[1].bias]["step"]) == m


@pytest.mark.parametrize(
    "key, value",
    [
        ("use_int8_ema", False),
        ("k_max", 2),
        ("preconditioner_enabled", False),
        ("block_size", 16),
        ("float32_below", 64),
        ("max_precond_dim", 4),
        ("grouped", False),
        ("factor_mode", "wide"),
        ("curvature", "sketch"),
        ("skip_nonfinite", False),
    ],
)
def test_state_shaping_change_mid_run_is_a_value_error_naming_the_key(key, value):
    """Item 9: a hyperparameter that shapes the state, changed mid-run, is a ValueError naming
    it (it was a torch kernel error or a chain error at the step); the group keeps its state and
    transform, so setting the value back goes on exactly. (AdamW has no such keys: its only
    state-shaping one, ``amsgrad``, is not supported by SCAO.) Keys that do not shape the state
    (``lr``, ``weight_decay``, ``k_min``, ``rho``) change freely."""
    model = _layers(6, 5, 5, 5)
    opt = sf.SCAO(model.parameters(), **FACADE)
    for step in range(3):
        _set_grads(model.parameters(), step)
        opt.step()
    before = _snapshot(opt.state_dict())
    old = opt.param_groups[0][key]
    opt.param_groups[0][key] = value
    _set_grads(model.parameters(), 3)
    with pytest.raises(ValueError, match=rf"changing '{key}' \({old!r} -> {value!r}\).*shape of the group's optimizer state") as err:
        opt.step()
    assert "Set it back" in str(err.value)
    _assert_same(opt.state_dict()["transform_state"], before["transform_state"])
    opt.param_groups[0][key] = old
    opt.step()
    for free, v in (("weight_decay", 0.5), ("k_min", 2), ("rho", 0.9), ("lr", 1e-3)):
        opt.param_groups[0][free] = v
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_checkpoint_of_other_settings_is_a_value_error_naming_the_leaf():
    """Item 9, the load path: a state built with other settings than the checkpoint's groups
    say (here: saved with float32 statistics, groups edited to int8) is a ValueError, and the
    optimizer is left as it was."""
    model = _layers(6, 5, 5)
    opt = sf.SCAO(model.parameters(), **{**FACADE, "use_int8_ema": False})
    _set_grads(model.parameters(), 0)
    opt.step()
    sd = _snapshot(opt.state_dict())
    sd["param_groups"][0]["use_int8_ema"] = True
    fresh = sf.SCAO(_layers(6, 5, 5).parameters(), **{**FACADE, "lr": 0.123})
    with pytest.raises(ValueError, match=r"transform_state\[0\] leaf .*: saved dtype torch.float32, this optimizer keeps torch.int8"):
        fresh.load_state_dict(sd)
    assert fresh.functional_state(0) is None and fresh.param_groups[0]["lr"] == 0.123


def test_checkpoints_migrate_between_scao_and_adamw():
    """Item 10: ``state_dict()["state"]`` holds torch's per-parameter layout. An SCAO
    checkpoint loaded into ``torch.optim.AdamW`` carries its moments and steps; an AdamW
    checkpoint loaded into ``sf.SCAO`` warm-starts its moments and step counts (and, with SCAO
    still in its warmup, SCAO then steps exactly like the AdamW it came from)."""
    import io

    def roundtrip(sd):
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)

    # SCAO -> AdamW
    model = _layers(6, 5, 4)
    scao = sf.SCAO(model.parameters(), **FACADE)
    for step in range(5):
        _set_grads(model.parameters(), step)
        scao.step()
    sd = roundtrip(scao.state_dict())
    assert sd["version"] == 2 and sorted(sd["state"]) == [0, 1, 2, 3]
    adam_state = sf._tree.find_nodes(scao.functional_state(0), sf.ScaleByAdamState)[0]
    target = _layers(6, 5, 4)
    adamw = torch.optim.AdamW(target.parameters(), lr=1e-2)
    adamw.load_state_dict(sd)
    for i, p in enumerate(target.parameters()):
        assert torch.equal(adamw.state[p]["exp_avg"], adam_state.mu[i])
        assert torch.equal(adamw.state[p]["exp_avg_sq"], adam_state.nu[i])
        assert adamw.state[p]["step"].dtype == torch.float32 and float(adamw.state[p]["step"]) == 5.0
    _set_grads(target.parameters(), 5)
    adamw.step()  # and it trains on from there
    assert all(torch.isfinite(p).all() for p in target.parameters())

    # AdamW -> SCAO: SCAO in its warmup is AdamW, so it continues exactly like the AdamW run
    ref_model = _layers(6, 5, 4)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.05)
    for step in range(6):
        _set_grads(ref_model.parameters(), step)
        ref.step()
    saved = roundtrip(ref.state_dict())
    warm_model = _layers(6, 5, 4)
    warm_model.load_state_dict(ref_model.state_dict())
    warm = sf.SCAO(warm_model.parameters(), form="seed", lr=1.0, warmup_steps=100)
    warm.load_state_dict(saved)
    assert warm.param_groups[0]["lr"] == 1e-2 and warm.param_groups[0]["weight_decay"] == 0.05
    mine = warm.state_dict()["state"]
    for i, p in enumerate(ref_model.parameters()):
        assert torch.equal(mine[i]["exp_avg"], ref.state[p]["exp_avg"])
        assert torch.equal(mine[i]["exp_avg_sq"], ref.state[p]["exp_avg_sq"])
        assert float(mine[i]["step"]) == 6.0
    for step in range(6, 10):
        _set_grads(ref_model.parameters(), step)
        _set_grads(warm_model.parameters(), step)
        ref.step()
        warm.step()
    for a, b in zip(ref_model.parameters(), warm_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
