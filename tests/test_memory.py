"""Optimizer-state memory accounting (scao_fx.memory)."""

from __future__ import annotations

import math

import pytest
import torch

import scao_fx as sf


def test_state_bytes_adamw_exact():
    params = {"w": torch.zeros(10, 7), "b": torch.zeros(7)}
    st = sf.adamw(1e-3).init(params)
    # mu and nu in float32 (4 bytes) for 77 entries each, plus one int64 step counter per leaf.
    assert sf.state_bytes(st) == 2 * 4 * 77 + 2 * 8


def test_state_bytes_counts_shared_storage_once():
    t = torch.zeros(100)
    assert sf.state_bytes((t, t[:10], t)) == 400
    assert sf.state_bytes((t, torch.zeros(100))) == 800


def test_memory_report_adamw_per_leaf_and_bf16_moments_fp32():
    params = {"w": torch.zeros(16, 8, dtype=torch.bfloat16), "b": torch.zeros(8, dtype=torch.bfloat16)}
    rep = sf.memory_report(sf.adamw(1e-3).init(params), params)
    # fp32 statistics for bf16 params, and each leaf's int64 step counter
    assert rep["per_leaf"] == {"w": 16 * 8 * 8 + 8, "b": 8 * 8 + 8}
    assert rep["num_params"] == 136
    assert rep["unattributed_bytes"] == 0
    assert rep["bytes_per_param"] == pytest.approx((136 * 8 + 16) / 136)


def scao_matrix_bytes(m: int, n: int, block: int = 32, k_max: int = 128, batch: int = 1) -> int:
    """The documented formula for one two-sided leaf, written independently of the library."""

    def side(d: int) -> int:
        cap = min(d, k_max)
        codes = d * d
        scales = 4 * math.ceil(d * d / block)
        diag = 4 * d
        basis = 4 * d * cap
        coef = 4 * cap
        tail, rank, fallbacks = 4, 8, 8
        return codes + scales + diag + basis + coef + tail + rank + fallbacks

    return batch * (side(m) + side(n))


def test_memory_report_scao_matches_documented_formula():
    params = {"w": torch.zeros(96, 40), "v": torch.zeros(96, 40), "b": torch.zeros(40)}
    st = sf.scao(1e-3, k_max=32).init(params)
    rep = sf.memory_report(st, params)
    adam = 8 * 96 * 40 + 8  # two fp32 moments and the leaf's step counter
    # Two same-shape leaves share one stacked group; each is charged half of it.
    assert rep["per_leaf"]["w"] == adam + scao_matrix_bytes(96, 40, k_max=32)
    assert rep["per_leaf"]["v"] == rep["per_leaf"]["w"]
    assert rep["per_leaf"]["b"] == 8 * 40 + 8
    assert rep["total_bytes"] == sum(rep["per_leaf"].values()) + rep["unattributed_bytes"]
    assert 0 < rep["unattributed_bytes"] < 100  # counters and the blend weight only


def test_int8_curvature_costs_about_a_quarter_of_fp32():
    params = {"w": torch.zeros(128, 128)}
    fp32 = sf.memory_report(sf.scao(use_int8_ema=False, k_max=8).init(params), params)["per_leaf"]["w"]
    int8 = sf.memory_report(sf.scao(use_int8_ema=True, k_max=8).init(params), params)["per_leaf"]["w"]
    adam = 8 * 128 * 128 + 8
    ratio = (int8 - adam) / (fp32 - adam)
    # codes + block scales (1 + 4/32 bytes) against 4 bytes per entry, plus the shared float32
    # diagonal and bases: 0.329 measured
    assert 0.28 < ratio < 0.34, ratio


def test_max_precond_dim_bounds_the_factor_cost():
    params = {"w": torch.zeros(2048, 64)}
    big = sf.memory_report(sf.scao().init(params), params)["bytes_per_param"]
    one_sided = sf.memory_report(sf.scao(max_precond_dim=1024).init(params), params)["bytes_per_param"]
    assert big > 24  # the 2048 x 2048 left factor dominates
    assert one_sided < 9  # only the 64 x 64 right factor is kept
