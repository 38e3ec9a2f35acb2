"""curvature_ema: the debiased EMA equals its closed form (fp32 exact, int8 within tolerance)."""

from __future__ import annotations

import pytest
import torch
from scaoref import F64, ema_closed_form, rel_err

import scao_fx as sf


def _grams(d, steps, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = scale * torch.randn(d, d + 3, generator=g)
        out.append(x @ x.T)
    return out


def _accumulate(curv, grams, *, inplace=False, batch=1):
    d = grams[0].shape[-1]
    stat = curv.init(batch, d)
    for t, x in enumerate(grams, start=1):
        stat = curv.accumulate(stat, x.expand(batch, d, d), seed=t, inplace=inplace)
    return stat


@pytest.mark.parametrize("rho,steps", [(0.5, 6), (0.9, 25), (0.999, 25)])
def test_fp32_debiased_ema_equals_closed_form(rho, steps):
    grams = _grams(7, steps)
    curv = sf.curvature_ema(rho, codec=sf.fp32_codec())
    stat = _accumulate(curv, grams)
    got = curv.factor(stat, torch.tensor(steps), 7)[0]
    ref = ema_closed_form(grams, rho)
    # float32 EMA arithmetic over 25 steps; the debias divisor (1 - rho^t) is computed in float64.
    assert rel_err(got, ref) < 2e-6
    # Without the debias the estimate would be off by 1 - rho^T (detectable for every rho here).
    assert rel_err(got * (1 - rho**steps), ref) > 1e-3


def test_first_step_is_exact_gram():
    """EMA started at zero, debiased: after one step the factor is exactly G G^T."""
    grams = _grams(5, 1, seed=1)
    curv = sf.curvature_ema(0.999, codec=sf.fp32_codec())
    got = curv.factor(_accumulate(curv, grams), torch.tensor(1), 5)[0]
    torch.testing.assert_close(got, grams[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_int8_debiased_ema_close_to_closed_form(scale):
    grams = _grams(32, 60, seed=2, scale=scale)
    curv = sf.curvature_ema(0.9, codec=sf.int8_blockwise(64))
    got = curv.factor(_accumulate(curv, grams), torch.tensor(60), 32)[0]
    ref = ema_closed_form(grams, 0.9)
    # int8 with 64-entry blocks re-quantized at every step, the diagonal kept in fp32:
    # measured 0.28 % relative Frobenius error at every scale (scale-free codec).
    err = rel_err(got, ref)
    assert err < 1e-2
    # The diagonal is float32 and exact up to float rounding.
    torch.testing.assert_close(torch.diagonal(got).double(), torch.diagonal(ref), rtol=1e-5, atol=0)
    # The result is symmetric.
    assert torch.equal(got, got.T)


def test_int8_storage_dtypes_and_sizes():
    curv = sf.curvature_ema(0.99, codec=sf.int8_blockwise(64))
    stat = curv.init(3, 20)
    assert stat.offdiag.data.dtype == torch.int8 and stat.offdiag.data.shape == (3, 400)
    assert stat.offdiag.scale.shape == (3, 7)  # ceil(400 / 64)
    assert stat.diag.dtype == torch.float32 and stat.diag.shape == (3, 20)
    stat = _accumulate(curv, _grams(20, 3), batch=3)
    assert stat.offdiag.data.dtype == torch.int8 and stat.offdiag.scale.dtype == torch.float32
    assert curv.state_bytes(20) == pytest.approx(400 * (1 + 4 / 64) + 80)
    assert sf.curvature_ema(0.9, codec=sf.fp32_codec()).state_bytes(20) == 400 * 4 + 80


def test_inplace_and_out_of_place_agree():
    grams = _grams(6, 10, seed=3)
    for codec in (sf.fp32_codec(), sf.int8_blockwise(8)):
        curv = sf.curvature_ema(0.9, codec=codec)
        a = curv.factor(_accumulate(curv, grams, inplace=False), torch.tensor(10), 6)
        b = curv.factor(_accumulate(curv, grams, inplace=True), torch.tensor(10), 6)
        assert torch.equal(a, b)


def test_out_of_place_does_not_touch_input_stat():
    curv = sf.curvature_ema(0.9, codec=sf.int8_blockwise(8))
    stat = _accumulate(curv, _grams(6, 2, seed=4))
    before = [t.clone() for t in (stat.offdiag.data, stat.offdiag.scale, stat.diag)]
    curv.accumulate(stat, _grams(6, 1, seed=5)[0][None], seed=3, inplace=False)
    assert all(torch.equal(a, b) for a, b in zip(before, (stat.offdiag.data, stat.offdiag.scale, stat.diag)))


def test_batched_factors_independent():
    grams_a, grams_b = _grams(5, 8, seed=6), _grams(5, 8, seed=7)
    curv = sf.curvature_ema(0.9, codec=sf.fp32_codec())
    stat = curv.init(2, 5)
    for t, (a, b) in enumerate(zip(grams_a, grams_b), start=1):
        stat = curv.accumulate(stat, torch.stack([a, b]), seed=t)
    got = curv.factor(stat, torch.tensor(8), 5)
    assert rel_err(got[0], ema_closed_form(grams_a, 0.9)) < 2e-6
    assert rel_err(got[1], ema_closed_form(grams_b, 0.9)) < 2e-6


def test_bf16_codec_close():
    grams = _grams(8, 20, seed=8)
    curv = sf.curvature_ema(0.9, codec=sf.bf16_codec())
    stat = _accumulate(curv, grams)
    assert stat.offdiag.data.dtype == torch.bfloat16
    assert rel_err(curv.factor(stat, torch.tensor(20), 8)[0], ema_closed_form(grams, 0.9)) < 2e-2


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"rho": 1.0}, ValueError, "rho"),
        ({"rho": -0.1}, ValueError, "rho"),
        ({"rho": float("nan")}, ValueError, "rho"),
        ({"codec": "int8"}, TypeError, "codec"),
        ({"float32_below": -1}, ValueError, "float32_below"),
        ({"float32_below": 1.5}, TypeError, "float32_below"),
    ],
)
def test_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        sf.curvature_ema(**kwargs)


def test_sides_shorter_than_float32_below_are_stored_exactly():
    """A side shorter than ``float32_below`` keeps a float32 factor (bit-identical to the float32
    codec's) and a float32 basis; from that length on the codec and ``basis_dtype`` apply."""
    from scao_fx.precond.kron import init_side

    curv = sf.curvature_ema(0.9, basis_dtype=torch.bfloat16, float32_below=8)
    exact = sf.curvature_ema(0.9, codec=sf.fp32_codec())
    assert curv.exact(7) and not curv.exact(8)
    for d, data, basis in ((7, torch.float32, torch.float32), (8, torch.int8, torch.bfloat16)):
        grams = _grams(d, 5, seed=d)
        stat, ref = curv.init(1, d), exact.init(1, d)
        for i, g in enumerate(grams):
            stat = curv.accumulate(stat, g[None], seed=i)
            ref = exact.accumulate(ref, g[None], seed=i)
        assert stat.offdiag.data.dtype == data
        assert init_side(curv, sf.full_rank(), 1, d).basis.dtype == basis
        if d == 7:
            assert torch.equal(curv.factor(stat, torch.tensor(5), d), exact.factor(ref, torch.tensor(5), d))
            assert curv.state_bytes(d) == 4 * d * d + 4 * d
        else:
            assert curv.state_bytes(d) == d * d + 4 * (d * d // 32) + 4 * d
    assert sf.curvature_ema().float32_below == 0  # the building block compresses every side unless told


def test_rho_zero_is_last_gram():
    grams = _grams(4, 3, seed=9)
    curv = sf.curvature_ema(0.0, codec=sf.fp32_codec())
    got = curv.factor(_accumulate(curv, grams), torch.tensor(3), 4)[0]
    torch.testing.assert_close(got.double(), grams[-1].to(F64), rtol=1e-6, atol=1e-6)
