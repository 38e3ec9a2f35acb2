"""blend_ramp: exact raw gradient during warmup, linear / cosine ramp, hard switch."""

from __future__ import annotations

import math

import pytest
import torch
from treeutil import clone

import scao_fx as sf
from scao_fx.base import EmptyState, GradientTransformation


def _expected_b(t, warmup, blend, min_updates=0, shape="linear"):
    start = max(warmup, min_updates)
    if t <= start:
        return 0.0
    if blend == 0:
        return 1.0
    x = min(1.0, (t - start) / blend)
    return x if shape == "linear" else 0.5 * (1 - math.cos(math.pi * x))


@pytest.mark.parametrize("shape", ["linear", "cosine"])
@pytest.mark.parametrize("warmup,blend,min_updates", [(3, 4, 0), (2, 5, 4), (0, 3, 0), (3, 0, 0)])
def test_blend_weights_by_step(shape, warmup, blend, min_updates):
    # inner = scale(3): P(G) = 3 G, so g_eff = G (1 + 2 b) and b is read off the output.
    tx = sf.blend_ramp(sf.scale(3.0), warmup_steps=warmup, blend_steps=blend, shape=shape, min_precond_updates=min_updates)
    params = {"w": torch.zeros(5)}
    state = tx.init(params)
    g = torch.tensor([1.0, -2.0, 0.5, 4.0, -0.25])
    for t in range(1, 13):
        out, state = tx.update({"w": g.clone()}, state, params=params)
        b = _expected_b(t, warmup, blend, min_updates, shape)
        if b == 0.0:
            assert torch.equal(out["w"], g), t
        else:
            torch.testing.assert_close(out["w"], g * (1 + 2 * b), rtol=1e-6, atol=0)
        assert float(sf.blend_factor(torch.tensor(t), max(warmup, min_updates), blend, shape)) == pytest.approx(b, abs=1e-7)


def test_warmup_output_is_exactly_raw_even_if_inner_is_nan():
    """b = 0 selects the raw gradient with where(), not 0 * P(G) (which would turn NaN into NaN)."""
    def nan_update(updates, state, *, params=None, inplace=True):
        return {k: torch.full_like(v, float("nan")) for k, v in updates.items()}, state

    nan_inner = GradientTransformation(lambda params: EmptyState(), nan_update)
    tx = sf.blend_ramp(nan_inner, warmup_steps=3, blend_steps=2)
    state = tx.init({"w": torch.zeros(3)})
    g = torch.tensor([1.0, 2.0, 3.0])
    for _ in range(3):
        out, state = tx.update({"w": g.clone()}, state)
        assert torch.equal(out["w"], g)
    out, state = tx.update({"w": g.clone()}, state)
    assert torch.isnan(out["w"]).all()


def test_inner_runs_during_warmup():
    inner = sf.kronecker_precondition(curvature=sf.curvature_ema(0.9, codec=sf.fp32_codec()), precond_freq=2)
    tx = sf.blend_ramp(inner, warmup_steps=5, blend_steps=2)
    params = {"w": torch.zeros(4, 3)}
    state = tx.init(params)
    for _t in range(1, 5):
        out, state = tx.update({"w": torch.randn(4, 3)}, state)
    assert int(state.count) == 4
    assert int(state.inner_state.count) == 4 and int(state.inner_state.refreshes) == 2


def test_inplace_flag_semantics_and_none_leaves():
    tx = sf.blend_ramp(sf.scale(2.0), warmup_steps=0, blend_steps=2)
    params = {"w": torch.zeros(3), "skip": None}
    g = {"w": torch.tensor([1.0, 2.0, 3.0]), "skip": None}
    state = tx.init(params)
    keep = clone(g)
    out, state_a = tx.update(g, state, inplace=False)
    assert torch.equal(g["w"], keep["w"]) and out["skip"] is None
    torch.testing.assert_close(out["w"], keep["w"] * 1.5)
    out2, _ = tx.update(g, state, inplace=True)
    torch.testing.assert_close(out2["w"], keep["w"] * 1.5)
    assert torch.equal(out2["w"], out["w"])


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"blend_steps": -1}, ValueError, "blend_steps"),
        ({"min_precond_updates": -1}, ValueError, "min_precond_updates"),
        ({"shape": "step"}, ValueError, "shape"),
        ({"warmup_steps": 1.5}, TypeError, "warmup_steps"),
    ],
)
def test_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        sf.blend_ramp(sf.identity(), **kwargs)
    with pytest.raises(TypeError, match="inner"):
        sf.blend_ramp(lambda g: g)
