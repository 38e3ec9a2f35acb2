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


def scao_matrix_bytes(m: int, n: int, block: int = 32, k_max: int = 128, batch: int = 1, float32_below: int = 64) -> int:
    """The documented formula for one two-sided leaf, written independently of the library
    (a side shorter than ``float32_below`` stores its factor in float32, without scales)."""

    def side(d: int) -> int:
        cap = min(d, k_max)
        exact = d < float32_below
        codes = 4 * d * d if exact else d * d
        scales = 0 if exact else 4 * math.ceil(d * d / block)
        diag = 4 * d
        basis = 4 * d * cap
        coef = 4 * cap
        tail, rank, fallbacks = 4, 8, 8
        return codes + scales + diag + basis + coef + tail + rank + fallbacks

    return batch * (side(m) + side(n))


def test_memory_report_scao_matches_documented_formula():
    params = {"w": torch.zeros(96, 40), "v": torch.zeros(96, 40), "b": torch.zeros(40)}
    st = sf.scao(1e-3, form="seed", epsilon_sparse=0.05, k_max=32, basis_storage="float32").init(params)
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
    kw = dict(form="seed", epsilon_sparse=0.05, k_max=8, basis_storage="float32", moments="float32")
    fp32 = sf.memory_report(sf.scao(use_int8_ema=False, **kw).init(params), params)["per_leaf"]["w"]
    int8 = sf.memory_report(sf.scao(use_int8_ema=True, **kw).init(params), params)["per_leaf"]["w"]
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


def test_meta_tensors_count_as_the_bytes_they_would_take():
    shapes = {"w": (300, 40), "v": (300, 40), "b": (40,)}
    for make in (lambda: sf.adamw(), lambda: sf.scao(k_max=16), lambda: sf.scao(form="seed", moments="int8")):
        reps = {}
        for device in ("cpu", "meta"):
            params = {k: torch.empty(s, device=device) for k, s in shapes.items()}
            reps[device] = sf.memory_report(make().init(params), params)
        assert reps["meta"]["per_leaf"] == reps["cpu"]["per_leaf"]
        # the non-finite guard keeps a few more counters for a non-CPU device (deferred flag)
        assert 0 <= reps["meta"]["total_bytes"] - reps["cpu"]["total_bytes"] < 128
    t = torch.empty(100, device="meta")
    assert sf.state_bytes((t, t[:10], torch.empty(100, device="meta"))) == 800


def gpt2_small_meta() -> dict:
    """GPT-2 small's parameter shapes (124.4M parameters; linear weights as (out, in)) on the
    meta device: nothing is allocated."""
    d, f, vocab, ctx = 768, 3072, 50257, 1024
    shapes = {"wte": (vocab, d), "wpe": (ctx, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(12):
        for name, (o, n) in {"attn.c_attn": (3 * d, d), "attn.c_proj": (d, d), "mlp.c_fc": (f, d),
                             "mlp.c_proj": (d, f)}.items():
            shapes[f"h{i}.{name}.weight"], shapes[f"h{i}.{name}.bias"] = (o, n), (o,)
        for ln in ("ln_1", "ln_2"):
            shapes[f"h{i}.{ln}.weight"], shapes[f"h{i}.{ln}.bias"] = (d,), (d,)
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


# bytes/param measured by memory_report on GPT-2 small's shapes (see docs/memory.md). The seed
# rows pin the seed form at its earlier defaults (adaptive rank up to 128, float32 bases, float32
# moments).
SEED = dict(form="seed", epsilon_sparse=0.05, k_max=128, basis_storage="float32", moments="float32")
SEED_SKETCH = dict(form="seed", epsilon_sparse=0.05, k_max=128, moments="float32")  # (a sketch: basis as sketch_storage)
GPT2_SMALL_BYTES_PER_PARAM = {
    "default": ({}, 2.96),
    "default, moments=int8": (dict(moments="int8"), 2.02),
    "default, moments=float32": (dict(moments="float32"), 4.96),
    "default, float32 bases": (dict(basis_storage="float32"), 3.56),
    "default, full second moment": (dict(second_moment="full"), 4.95),
    "default, full second moment, moments=int8": (dict(second_moment="full", moments="int8"), 3.08),
    "default, full second moment, moments=float32": (dict(second_moment="full", moments="float32"), 8.95),
    "default, full second moment, float32 bases": (dict(second_moment="full", basis_storage="float32"), 5.56),
    "default, full second moment, sketch r64 int8, moments=int8": (
        dict(second_moment="full", curvature="sketch", sketch_rank=64, sketch_storage="int8", moments="int8"), 2.38),
    "default, max_precond_dim=4096": (dict(max_precond_dim=4096), 10.25),
    "default, max_precond_dim=4096, moments=int8": (dict(max_precond_dim=4096, moments="int8"), 9.32),
    "default, full second moment, max_precond_dim=4096, moments=float32": (
        dict(second_moment="full", max_precond_dim=4096, moments="float32"), 16.24),
    "seed": (SEED, 8.54),
    "seed, moments=int8": (dict(SEED, moments="int8"), 2.67),
    "seed, max_precond_dim=4096": (dict(SEED, max_precond_dim=4096), 11.59),
    "seed, sketch r128 bf16": (dict(SEED_SKETCH, curvature="sketch"), 8.23),
    "seed, sketch r64 int8, moments=int8": (dict(SEED_SKETCH, curvature="sketch", sketch_rank=64, sketch_storage="int8",
                                                 moments="int8"), 2.22),
}


@pytest.mark.parametrize("config", list(GPT2_SMALL_BYTES_PER_PARAM))
def test_gpt2_small_bytes_per_param(config):
    """The memory issue's targets: <= 9.0 bytes/param by default, <= 2.5 with 8-bit moments.
    The default (the eigenbasis form: int8 statistics, bfloat16 bases and first moments, the
    rotated matrices' second moments factored, every direction of every side up to
    max_precond_dim=2048) meets the first (2.96; sf.soap with sides up to 4096: 29.08), and with
    8-bit moments the second (2.02). With Adam's full second moment (the default until
    2026-12-07: 4.95) 8-bit moments miss the second (3.08). Of the seed form's configurations
    (float32 moments), the default limit and the bf16 sketch meet the first; the int8 sketch of
    rank 64 with moments="int8" meets the second in both forms."""
    kw, want = GPT2_SMALL_BYTES_PER_PARAM[config]
    params = gpt2_small_meta()
    rep = sf.memory_report(sf.scao(**kw).init(params), params)
    assert rep["num_params"] == 124_439_808
    assert rep["bytes_per_param"] == pytest.approx(want, abs=0.005)
    target = 2.5 if kw.get("moments") == "int8" else 9.0
    meets = {"default", "default, moments=int8", "default, moments=float32", "default, float32 bases",
             "default, full second moment", "default, full second moment, moments=float32",
             "default, full second moment, float32 bases", "default, full second moment, sketch r64 int8, moments=int8",
             "seed", "seed, sketch r128 bf16", "seed, sketch r64 int8, moments=int8"}
    assert (rep["bytes_per_param"] <= target) == (config in meets)
    if config == "default":
        soap = sf.memory_report(sf.soap(max_precond_dim=4096).init(params), params)
        assert soap["bytes_per_param"] == pytest.approx(29.08, abs=0.005)


def test_memory_table_formulas_match_memory_report():
    import memory_table  # docs/examples (on the path: tests/conftest.py)

    memory_table.check_formulas()
    rows = {(r["model"], r["regime"], r["method"]): r for r in memory_table.rows()}
    assert len(rows) == 3 * 2 * len(memory_table.METHODS)
    adamw = rows[("Llama-3.2-1B", "full", "AdamW (fp32 moments)")]
    assert adamw["params"] == 1_235_814_400 and adamw["bytes_per_param"] == 8.0
    assert rows[("GPT-2 small", "full", "scao seed, sketch r64 int8, moments=int8")]["bytes_per_param"] <= 2.5
