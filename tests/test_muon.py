"""sf.muon and its links: parity with torch.optim.Muon (+ torch.optim.AdamW on the rest), the
Newton-Schulz math, and the functional contract."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad
from treeutil import assert_tree_close, clone, versions

import scao_fx as sf
from scao_fx.precond.orthogonal import newton_schulz, shape_scale

STEPS = 100
#: Non-square both ways, a square one, and two leaves of one shape.
SHAPES = {"tall": (12, 5), "wide": (5, 12), "square": (6, 6), "tall2": (12, 5)}


def matrix_params():
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(*s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}


def matrix_loss(p):
    # Non-quadratic, couples each matrix's rows and columns.
    return sum(torch.sin(v @ v.T).sum() + 0.1 * (v**2).sum() for v in p.values())


def run_ours(tx, params, loss, steps=STEPS):
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(grad(loss)(params), state, params=params)
        params = sf.apply_updates(params, updates)
    return params


def run_torch(opts_for, params, loss, steps=STEPS):
    tp = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opts = opts_for(tp)
    for _ in range(steps):
        for o in opts:
            o.zero_grad()
        loss(tp).backward()
        for o in opts:
            o.step()
    return {k: v.detach() for k, v in tp.items()}


def max_rel_err(a, b):
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
def test_matches_torch_muon_float64(adjust_lr_fn, nesterov):
    lr, wd, mom = 0.02, 0.1, 0.9
    p0 = matrix_params()
    ours = run_ours(sf.muon(lr, wd, mom, nesterov, adjust_lr_fn=adjust_lr_fn), clone(p0), matrix_loss)
    ref = run_torch(
        lambda tp: [torch.optim.Muon(list(tp.values()), lr=lr, weight_decay=wd, momentum=mom, nesterov=nesterov,
                                     adjust_lr_fn=adjust_lr_fn)],
        p0, matrix_loss,
    )
    assert max_rel_err(ref, p0) > 0.1, "parameters must have moved for the comparison to mean anything"
    assert max_rel_err(ours, ref) < 1e-6


def test_grouped_is_close_to_per_leaf():
    """Batched bf16 products may round differently now and then: close, not bitwise."""
    p0 = matrix_params()
    a = run_ours(sf.muon(0.02, grouped=True), clone(p0), matrix_loss, steps=20)
    b = run_ours(sf.muon(0.02, grouped=False), clone(p0), matrix_loss, steps=20)
    assert max_rel_err(a, b) < 2e-2


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    ).double()


def test_recipe_matches_torch_muon_plus_adamw_float64():
    model = make_model()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 6, generator=gen, dtype=torch.float64), torch.randn(32, 2, generator=gen, dtype=torch.float64))
               for _ in range(STEPS)]
    p0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    kw = dict(lr=0.02, weight_decay=0.05, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    akw = dict(lr=3e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.01)

    def loss_at(p, x, y):
        return torch.nn.functional.mse_loss(functional_call(model, p, (x,)), y)

    tx = sf.muon(**kw, adamw_lr=akw["lr"], adamw_betas=akw["betas"], adamw_eps=akw["eps"],
                 adamw_weight_decay=akw["weight_decay"])
    params, state = clone(p0), tx.init(p0)
    for x, y in batches:
        updates, state = tx.update(grad(loss_at)(params, x, y), state, params=params)
        params = sf.apply_updates(params, updates)

    ref = make_model()
    mats = [p for p in ref.parameters() if p.ndim == 2]
    rest = [p for p in ref.parameters() if p.ndim != 2]
    opts = [torch.optim.Muon(mats, **kw), torch.optim.AdamW(rest, **akw, foreach=False)]
    for x, y in batches:
        for o in opts:
            o.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        for o in opts:
            o.step()
    expected = {k: v.detach() for k, v in ref.named_parameters()}
    assert max_rel_err(expected, p0) > 1e-2
    assert max_rel_err(params, expected) < 1e-6
    # Both halves really ran: the vectors moved too.
    assert max(((expected[k] - p0[k]).norm() / p0[k].norm()).item() for k in p0 if p0[k].ndim == 1) > 1e-2


# ------------------------------------------------------------------ the math


def test_cubic_newton_schulz_converges_to_the_polar_factor():
    gen = torch.Generator().manual_seed(3)
    for shape in [(7, 4), (4, 7), (5, 5)]:
        g = torch.randn(*shape, generator=gen, dtype=torch.float64)
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        # The cubic iteration is slow for small singular values: 60 steps reach float64 rounding.
        x = newton_schulz(g, steps=60, coefficients=(1.5, -0.5, 0.0), dtype=None)
        torch.testing.assert_close(x, u @ vh, rtol=0, atol=1e-10)


def test_quintic_singular_values_land_near_one_and_batched_matches_loop():
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(3, 9, 20, generator=gen, dtype=torch.float32)
    x = newton_schulz(g, dtype=torch.float32)
    s = torch.linalg.svdvals(x)
    assert s.min() > 0.6 and s.max() < 1.25, s
    loop = torch.stack([newton_schulz(m, dtype=torch.float32) for m in g])
    torch.testing.assert_close(x, loop, rtol=1e-5, atol=1e-5)
    assert x.shape == g.shape and newton_schulz(g).dtype == torch.bfloat16
    # The singular vectors are kept: X = U S' V^T with G's U and V, so U^T X V is diagonal.
    u, _, vh = torch.linalg.svd(g[0], full_matrices=False)
    d = u.T @ x[0] @ vh.T
    assert (d - torch.diag(d.diagonal())).abs().max() < 1e-4 and d.diagonal().min() > 0.6


def test_zero_matrix_stays_zero():
    assert torch.equal(newton_schulz(torch.zeros(3, 4)), torch.zeros(3, 4, dtype=torch.bfloat16))


def test_shape_scale_rules():
    assert shape_scale(512, 128) == 2.0 and shape_scale(128, 512) == 1.0
    assert shape_scale(128, 512, "match_rms_adamw") == pytest.approx(0.2 * 512**0.5)
    assert shape_scale(3, 7, "none") == 1.0
    with pytest.raises(ValueError, match="rule"):
        shape_scale(3, 4, "rms")


def test_newton_schulz_link_flattens_trailing_dims_and_passes_vectors():
    tx = sf.scale_by_newton_schulz(adjust_lr="original")
    g = {"conv": torch.randn(8, 2, 3, 3), "b": torch.randn(8), "none": None}
    u, _ = tx.update(clone(g), tx.init(g))
    assert u["none"] is None and torch.equal(u["b"], g["b"])
    expected = newton_schulz(g["conv"].reshape(8, 18)).to(torch.float32).reshape(8, 2, 3, 3)
    torch.testing.assert_close(u["conv"], expected, rtol=0, atol=0)
    tall, _ = tx.update({"w": g["conv"].reshape(8, 18).T.contiguous()}, tx.init(None))  # 18 x 8: factor 1.5
    torch.testing.assert_close(tall["w"], expected.reshape(8, 18).T * 1.5, rtol=0, atol=0)


def test_momentum_link_is_torch_muon_momentum():
    gs = [torch.randn(4, 3, dtype=torch.float64) for _ in range(5)]
    for nesterov in (False, True):
        tx = sf.scale_by_momentum(0.9, nesterov)
        state, buf = tx.init({"w": gs[0]}), torch.zeros(4, 3, dtype=torch.float64)
        for g in gs:
            u, state = tx.update({"w": g.clone()}, state)
            buf = 0.9 * buf + 0.1 * g
            want = 0.1 * g + 0.9 * buf if nesterov else buf
            torch.testing.assert_close(u["w"], want, rtol=1e-14, atol=0)


# ------------------------------------------------------------------ the contract


def test_inplace_false_leaves_inputs_untouched_and_agrees_with_inplace():
    p0 = matrix_params()
    p0["b"] = torch.randn(5, dtype=torch.float64)
    gs = [{k: torch.randn_like(v) for k, v in p0.items()} for _ in range(4)]
    tx = sf.muon(0.02, nesterov=True)
    results = {}
    for inplace in (False, True):
        params, state = clone(p0), tx.init(p0)
        for g in gs:
            inputs = (g, state, params)
            before, vers = clone(inputs), versions(inputs)
            updates, new_state = tx.update(clone(g) if inplace else g, state, params=params, inplace=inplace)
            if not inplace:
                assert versions(inputs) == vers
                assert_tree_close(inputs, before, msg="inplace=False changed an input")
            params, state = sf.apply_updates(params, updates, inplace=inplace), new_state
        results[inplace] = (params, state)
    assert_tree_close(results[False], results[True], msg="inplace=False vs True")


def test_muon_mask_routes_leaves_and_rejects_vectors():
    params = {"embed": torch.randn(20, 4), "w": torch.randn(4, 4), "b": torch.zeros(4)}
    tx = sf.muon(0.02, muon_mask={"embed": False, "w": True, "b": False})
    state = tx.init(params)
    assert [m.shape for m in state.inner_states["muon"][0].mu] == [(4, 4)]
    assert [m.shape for m in state.inner_states["adamw"][0].mu] == [(4,), (20, 4)]  # tree order
    by_leaf = sf.muon(0.02, muon_mask=lambda p: p.ndim == 2 and p.shape[0] != 20)
    assert [m.shape for m in by_leaf.init(params).inner_states["muon"][0].mu] == [(4, 4)]
    with pytest.raises(ValueError, match="muon_mask selects parameter leaf .* shape \\(4,\\)"):
        sf.muon(muon_mask={"embed": True, "w": True, "b": True}).init(params)
    with pytest.raises(TypeError, match="muon_mask.*bool"):
        sf.muon(muon_mask=lambda p: "yes").init(params)


def test_weight_decay_is_applied_before_the_update_as_torch():
    # One step from W with a zero gradient: NS(0) = 0, so W moves by the decay alone.
    w = torch.randn(4, 6, dtype=torch.float64)
    tx = sf.muon(0.1, weight_decay=0.5)
    u, _ = tx.update({"w": torch.zeros_like(w)}, tx.init({"w": w}), params={"w": w})
    torch.testing.assert_close(sf.apply_updates({"w": w.clone()}, u)["w"], w * (1 - 0.1 * 0.5), rtol=1e-15, atol=0)


def test_schedule_lr_and_float32_and_bf16_params():
    for dtype in (torch.float32, torch.bfloat16):
        params = {"w": torch.randn(6, 4).to(dtype), "b": torch.zeros(4, dtype=dtype)}
        tx = sf.muon(sf.schedules.cosine_decay(0.02, 10))
        state = tx.init(params)
        for _ in range(3):
            g = {k: torch.randn_like(v) for k, v in params.items()}
            updates, state = tx.update(g, state, params=params)
            params = sf.apply_updates(params, updates)
        assert all(v.dtype == dtype and torch.isfinite(v.float()).all() for v in params.values())
        assert state.inner_states["muon"][0].mu[0].dtype == torch.float32


def test_state_bytes_one_moment_on_matrices():
    params = {"w": torch.zeros(64, 32), "b": torch.zeros(32)}
    state = sf.muon().init(params)
    assert sf.state_bytes(state.inner_states["muon"]) == 64 * 32 * 4  # one fp32 moment, no counter
    assert sf.state_bytes(state.inner_states["adamw"]) == 32 * 8 + 8  # AdamW: two moments + a counter


def test_under_vmap_each_member_matches_its_own_run():
    """torch.func.vmap over a stack of parameter trees (an ensemble): each member follows the run
    it would have alone (batched bf16 products may round an entry differently: close, not equal)."""
    gen = torch.Generator().manual_seed(5)
    stacked = {"w": torch.randn(3, 6, 4, generator=gen, dtype=torch.float64),
               "b": torch.randn(3, 4, generator=gen, dtype=torch.float64)}
    tx = sf.muon(0.02, weight_decay=0.1)

    def loss(p):
        return torch.sin(p["w"] @ p["w"].T).sum() + (p["b"] ** 2).sum()

    def step(p, s):
        updates, s = tx.update(grad(loss)(p), s, params=p, inplace=False)
        return sf.apply_updates(p, updates, inplace=False), s

    p, state = clone(stacked), torch.func.vmap(tx.init)(stacked)
    for _ in range(10):
        p, state = torch.func.vmap(step)(p, state)
    for i in range(3):
        start = {k: v[i].clone() for k, v in stacked.items()}
        alone = run_ours(tx, clone(start), loss, steps=10)
        assert max_rel_err(alone, start) > 0.1
        assert max_rel_err({k: v[i] for k, v in p.items()}, alone) < 1e-2
