"""Rank rules (spectral mass, full, fixed) and robust_eigh."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scaoref import spectral_mass_k

import scao_fx as sf


def _k(rule, vals):
    return int(rule.select(torch.tensor(vals, dtype=torch.float32)))


@pytest.mark.parametrize(
    "vals,epsilon,k_min,k_max,expected",
    [
        ([5.0, 4.0, 0.5, 0.5], 0.1, 1, 4, 2),  # 9/10 reaches 0.9 exactly at k=2
        ([5.0, 4.0, 0.5, 0.5], 0.09, 1, 4, 3),  # needs 9.1: k=3
        ([8.0, 1.0, 1.0], 0.25, 1, 3, 1),  # 8/10 >= 0.75
        ([8.0, 1.0, 1.0], 0.15, 1, 3, 2),  # 0.8 < 0.85 <= 0.9
        ([1.0] * 10, 0.05, 1, 10, 10),  # flat: 9.5 needs all ten
        ([1.0] * 10, 0.35, 1, 10, 7),  # 6.5 -> k=7
        ([1.0, 0.0, 0.0, 0.0], 0.0, 1, 4, 1),  # epsilon=0: the non-zero part
        ([3.0, 2.0, 1.0, 0.0, 0.0], 0.0, 1, 5, 3),
        ([3.0, 2.0, 1.0, 1e-7, 0.0], 0.0, 1, 5, 4),  # epsilon=0 keeps every non-zero direction
        ([5.0, 4.0, 0.5, 0.5], 0.1, 3, 4, 3),  # clamped up to k_min
        ([1.0] * 10, 0.05, 1, 4, 4),  # clamped down to k_max
        ([1.0, 1.0, 1.0], 0.05, 8, 128, 3),  # k_min > dim: capacity (dim) wins
        ([0.0, 0.0, 0.0, 0.0], 0.05, 2, 4, 2),  # all zero: k_min
        ([0.0, 0.0], 0.05, 8, 128, 2),  # all zero, k_min > dim: dim
        ([2.0, 1.0, -0.5, -1.0], 0.2, 1, 4, 2),  # negative round-off eigenvalues count as 0
    ],
)
def test_spectral_mass_rule_on_constructed_spectra(vals, epsilon, k_min, k_max, expected):
    rule = sf.spectral_mass_rank(epsilon, k_min, k_max)
    assert _k(rule, vals) == expected
    assert spectral_mass_k(vals, epsilon, k_min, k_max) == expected  # the test reference agrees


def test_select_is_batched_and_int64():
    rule = sf.spectral_mass_rank(0.1, 1, 4)
    vals = torch.tensor([[5.0, 4.0, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    k = rule.select(vals)
    assert k.dtype == torch.int64 and k.shape == (3,)
    assert k.tolist() == [2, 4, 1]
    assert rule.select(vals.reshape(3, 1, 4)).shape == (3, 1)


@settings(max_examples=60, deadline=None)
@given(
    vals=st.lists(st.floats(0.0, 1e6, allow_nan=False, width=32), min_size=1, max_size=12),
    epsilon=st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.5]),
    k_min=st.integers(1, 6),
    extra=st.integers(0, 8),
)
def test_spectral_mass_rule_matches_loop(vals, epsilon, k_min, extra):
    vals = sorted(vals, reverse=True)
    k_max = k_min + extra
    rule = sf.spectral_mass_rank(epsilon, k_min, k_max)
    expected = spectral_mass_k(vals, epsilon, k_min, k_max)
    got = _k(rule, vals)
    # float32 input, float64 prefix sums in both: a boundary case may still differ by one when the
    # prefix mass equals the target up to float32 rounding of the inputs.
    assert abs(got - expected) <= 1
    # And the rule's defining property holds: k directions hold the mass (unless clamped).
    lam = torch.tensor(vals, dtype=torch.float64)
    total = float(lam.sum())
    cap = min(len(vals), k_max)
    if total > 0 and min(k_min, cap) < got < cap:
        assert float(lam[:got].sum()) >= (1 - epsilon) * total * (1 - 1e-6)
        assert float(lam[: got - 1].sum()) < (1 - epsilon) * total * (1 + 1e-6)


def test_full_and_fixed_rank():
    vals = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert sf.full_rank().select(vals).tolist() == [5]
    assert sf.full_rank().capacity(7) == 7
    assert sf.fixed_rank(3).select(vals).tolist() == [3]
    assert sf.fixed_rank(9).select(vals).tolist() == [5]
    assert sf.fixed_rank(3).capacity(2) == 2
    assert sf.spectral_mass_rank(0.05, 8, 16).capacity(100) == 16
    assert sf.spectral_mass_rank(0.05, 8, 16).capacity(10) == 10


@pytest.mark.parametrize(
    "fn,kwargs,exc,name",
    [
        (sf.spectral_mass_rank, {"k_min": 0}, ValueError, "k_min"),
        (sf.spectral_mass_rank, {"k_min": 8, "k_max": 4}, ValueError, "k_max"),
        (sf.spectral_mass_rank, {"epsilon": 1.0}, ValueError, "epsilon"),
        (sf.spectral_mass_rank, {"epsilon": -0.1}, ValueError, "epsilon"),
        (sf.spectral_mass_rank, {"k_min": 2.5}, TypeError, "k_min"),
        (sf.fixed_rank, {"k": 0}, ValueError, "k"),
    ],
)
def test_bad_arguments(fn, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        fn(**kwargs)


def test_robust_eigh_decreasing_and_reconstructs():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 6, dtype=torch.float64)
    f = (x @ x.transpose(-1, -2)).float()
    vals, vecs, ok = sf.robust_eigh(f)
    assert ok.all() and vals.dtype == torch.float32
    assert torch.all(vals[:, :-1] >= vals[:, 1:])
    rec = vecs @ torch.diag_embed(vals) @ vecs.transpose(-1, -2)
    torch.testing.assert_close(rec, f, rtol=1e-4, atol=1e-4)


def test_robust_eigh_reports_non_finite_factors():
    f = torch.eye(4).repeat(3, 1, 1)
    f[1, 0, 1] = f[1, 1, 0] = float("nan")
    f[2, 2, 2] = float("inf")
    vals, vecs, ok = sf.robust_eigh(f)
    assert ok.tolist() == [True, False, False]
    assert torch.equal(vals[1:], torch.zeros(2, 4)) and torch.equal(vecs[1:], torch.zeros(2, 4, 4))
    assert torch.allclose(vals[0], torch.ones(4))


def _eigh_failing_for(dtypes):
    """A stand-in for torch.linalg.eigh that raises (as LAPACK non-convergence does) for ``dtypes``."""
    real = torch.linalg.eigh

    def eigh(x, *args, **kwargs):
        if x.dtype in dtypes:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (simulated)")
        return real(x, *args, **kwargs)

    return eigh


def test_robust_eigh_non_convergence_retries_in_float64(monkeypatch):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 5)
    f = x @ x.transpose(-1, -2)
    expected = torch.linalg.eigh(f.double())
    monkeypatch.setattr(torch.linalg, "eigh", _eigh_failing_for({torch.float32}))
    vals, vecs, ok = sf.robust_eigh(f)
    assert ok.all() and vals.dtype == torch.float32
    torch.testing.assert_close(vals, expected.eigenvalues.flip(-1).float())
    rec = vecs @ torch.diag_embed(vals) @ vecs.transpose(-1, -2)
    torch.testing.assert_close(rec, f, rtol=1e-4, atol=1e-4)


def test_robust_eigh_never_raises_when_both_precisions_fail(monkeypatch):
    monkeypatch.setattr(torch.linalg, "eigh", _eigh_failing_for({torch.float32, torch.float64}))
    vals, vecs, ok = sf.robust_eigh(torch.eye(3).repeat(2, 1, 1))
    assert not ok.any() and torch.equal(vals, torch.zeros(2, 3)) and torch.equal(vecs, torch.zeros(2, 3, 3))


def test_robust_eigh_uses_float64_where_float32_is_not_finite(monkeypatch):
    real = torch.linalg.eigh

    def eigh(x, *args, **kwargs):  # float32 returns NaN vectors for the second factor only
        vals, vecs = real(x, *args, **kwargs)
        if x.dtype == torch.float32:
            vecs = vecs.clone()
            vecs[1] = float("nan")
        return vals, vecs

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    f = torch.diag_embed(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    vals, vecs, ok = sf.robust_eigh(f)
    assert ok.all() and torch.isfinite(vecs).all()
    assert vals.tolist() == [[3.0, 2.0, 1.0], [6.0, 5.0, 4.0]]
