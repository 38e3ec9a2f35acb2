"""kronecker_precondition against a float64 dense reference (tests/scaoref.py), sides, shapes,
grouping, grafting, tau, fallbacks and argument validation."""

from __future__ import annotations

import optree
import pytest
import torch
from scaoref import F64, cosine, left_factor, precond_matrix, rel_err, right_factor
from treeutil import chain_state, clone

import scao_fx as sf

# float32 eigh on factors with condition number ~1e2-1e3 and a float32 EMA: the -1/4 power
# damps relative eigenvalue errors 4x, so the preconditioned gradient agrees with the float64
# reference to ~1e-6 relative; 2e-5 leaves room for BLAS differences without hiding a wrong formula
# (a wrong c, a missing debias or a missing Tikhonov term each give errors >= 1e-3 here).
RTOL_F32 = 2e-5


def _grads(shape, steps, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(steps)]


def _tx(rank=None, *, rho=0.9, freq=4, complement="mean_tail", graft="none", tikhonov=0.0, **kw):
    # Exact eigendecompositions at every refresh, to compare with the dense reference
    # (the warm-started subspace solver is tested on its own below).
    kw.setdefault("eigensolver", "eigh")
    return sf.kronecker_precondition(
        curvature=sf.curvature_ema(rho, codec=kw.pop("codec", sf.fp32_codec())),
        rank=sf.full_rank() if rank is None else rank,
        precond_freq=freq,
        complement=complement,
        graft=graft,
        tikhonov=tikhonov,
        **kw,
    )


def _run(tx, grads_seq, key="w"):
    """Feed ``grads_seq`` (list of tensors) as leaf ``key``; return (outputs, final state)."""
    params = {key: torch.zeros_like(grads_seq[0])}
    state = tx.init(params)
    outs = []
    for g in grads_seq:
        u, state = tx.update({key: g.clone()}, state, params=params)
        outs.append(u[key])
    return outs, state


def _reference(grads_seq, upto, g, *, rho=0.9, **kw):
    """A_L g A_R with factors from grads_seq[:upto] (float64)."""
    gm = [x.reshape(x.shape[0], -1).to(F64) for x in grads_seq[:upto]]
    al, kl = precond_matrix(left_factor(gm, rho), **kw)
    ar, kr = precond_matrix(right_factor(gm, rho), **kw)
    return al @ g.reshape(g.shape[0], -1).to(F64) @ ar, (kl, kr)


# --------------------------------------------------------------------------- full rank


@pytest.mark.parametrize("tikhonov", [0.0, 0.1])
def test_full_rank_is_inverse_fourth_root(tikhonov):
    gs = _grads((6, 5), 12)
    outs, state = _run(_tx(tikhonov=tikhonov), gs)
    # Refresh at steps 4, 8, 12: the output at 12 uses the factors of all 12 gradients.
    ref, _ = _reference(gs, 12, gs[11], tikhonov=tikhonov)
    assert rel_err(outs[11], ref) < RTOL_F32
    # A non-refresh step (10) uses the bases of the refresh at step 8 on the current gradient.
    ref10, _ = _reference(gs, 8, gs[9], tikhonov=tikhonov)
    assert rel_err(outs[9], ref10) < RTOL_F32
    # Not the factors of step 10 (the test can tell the two apart).
    wrong, _ = _reference(gs, 10, gs[9], tikhonov=tikhonov)
    assert rel_err(outs[9], wrong) > 100 * RTOL_F32
    assert int(state.refreshes) == 3 and int(state.count) == 12
    left = state.groups[0].left
    assert int(left.rank[0]) == 6 and int(state.groups[0].right.rank[0]) == 5


def test_full_rank_matches_explicit_matrix_power():
    """Cross-check the reference itself: A = (L + eps I)^-1/4 with A^4 (L + eps I) = I."""
    gs = _grads((6, 5), 12, seed=3)
    lf = left_factor([g.to(F64) for g in gs], 0.9)
    a, _ = precond_matrix(lf, tikhonov=0.1)
    eps = 0.1 * float(torch.trace(lf)) / 6
    prod = torch.linalg.matrix_power(a, 4) @ (lf + eps * torch.eye(6, dtype=F64))
    torch.testing.assert_close(prod, torch.eye(6, dtype=F64), rtol=0, atol=1e-10)


def test_tikhonov_value_matters():
    """Omitting the Tikhonov term from the reference would be detected."""
    gs = _grads((6, 5), 8, seed=1)
    outs, _ = _run(_tx(tikhonov=0.1), gs)
    without, _ = _reference(gs, 8, gs[7], tikhonov=0.0)
    assert rel_err(outs[7], without) > 1e-2


def test_identity_before_first_refresh():
    gs = _grads((6, 5), 4, seed=2)
    outs, _ = _run(_tx(freq=4), gs)
    for t in range(3):
        assert torch.equal(outs[t], gs[t])
    assert not torch.equal(outs[3], gs[3])


def test_refresh_schedule_every_precond_freq():
    gs = _grads((4, 3), 9)
    tx = _tx(freq=3)
    params = {"w": torch.zeros(4, 3)}
    state = tx.init(params)
    bases = []
    for g in gs:
        _, state = tx.update({"w": g}, state)
        bases.append(state.groups[0].left.basis.clone())
    changed = [t + 1 for t in range(9) if not torch.equal(bases[t], bases[t - 1] if t else torch.zeros_like(bases[0]))]
    assert changed == [3, 6, 9]
    assert int(state.refreshes) == 3


def test_statistics_every_stat_freq_steps():
    """Step 1 and every third step accumulate; the other steps leave the statistics bit for bit
    as they were, and refreshes still come every precond_freq steps."""
    gs = _grads((4, 3), 9)
    tx = sf.kronecker_precondition(precond_freq=3, stat_freq=3, rank=sf.full_rank())
    state = tx.init({"w": torch.zeros(4, 3)})
    accumulated = []
    for t, g in enumerate(gs, 1):
        before = [x.clone() for x in _stats(state)]
        _, state = tx.update({"w": g}, state)
        if any(not torch.equal(a, b) for a, b in zip(before, _stats(state))):
            accumulated.append(t)
    assert accumulated == [1, 3, 6, 9]
    assert int(state.refreshes) == 3


def test_input_updates_not_modified():
    gs = _grads((6, 5), 4)
    tx = _tx(freq=2)
    params = {"w": torch.zeros(6, 5), "b": torch.zeros(5)}
    state = tx.init(params)
    for g in gs:
        upd = {"w": g.clone(), "b": g[0].clone()}
        before = clone(upd)
        _, state = tx.update(upd, state, params=params, inplace=True)
        assert torch.equal(upd["w"], before["w"]) and torch.equal(upd["b"], before["b"])


# --------------------------------------------------------------------------- truncated rank


@pytest.mark.parametrize("complement", ["mean_tail", "kth", "none"])
def test_fixed_rank_identity_plus_low_rank(complement):
    gs = _grads((8, 7), 12, seed=4)
    outs, state = _run(_tx(sf.fixed_rank(3), complement=complement, tikhonov=1e-3), gs)
    ref, (kl, kr) = _reference(gs, 12, gs[11], k=3, complement=complement, tikhonov=1e-3)
    assert (kl, kr) == (3, 3)
    assert rel_err(outs[11], ref) < RTOL_F32
    assert int(state.groups[0].left.rank[0]) == 3
    # The complement gain is stored as c: check it directly for the left side.
    lf = left_factor(gs, 0.9)
    eps = 1e-3 * float(torch.trace(lf)) / 8
    s = torch.linalg.eigvalsh(lf + eps * torch.eye(8, dtype=F64)).flip(0)
    c = {"mean_tail": float(s[3:].mean()) ** -0.25, "kth": float(s[2]) ** -0.25, "none": 0.0}[complement]
    assert float(state.groups[0].left.tail[0]) == pytest.approx(c, rel=1e-5, abs=1e-30)


def test_complement_variants_differ():
    """The three complements give measurably different results (each formula is really tested)."""
    gs = _grads((8, 7), 8, seed=5)
    outs = {c: _run(_tx(sf.fixed_rank(2), complement=c, freq=8), gs)[0][7] for c in ("mean_tail", "kth", "none")}
    assert rel_err(outs["mean_tail"], outs["kth"]) > 1e-2
    assert rel_err(outs["mean_tail"], outs["none"]) > 1e-2
    # "none" is the pure projection: the complement of the top-2 subspaces is dropped.
    gm = [g.to(F64) for g in gs]
    ul = torch.linalg.eigh(left_factor(gm, 0.9))[1][:, -2:]
    ur = torch.linalg.eigh(right_factor(gm, 0.9))[1][:, -2:]
    resid = outs["none"].to(F64) - ul @ ul.T @ outs["none"].to(F64) @ ur @ ur.T
    assert float(resid.norm()) < 1e-5 * float(outs["none"].norm())


def test_spectral_mass_rank_inside_kronecker():
    """Adaptive rank on a factor with a known spectrum: the kept k and P(G) match the reference."""
    torch.manual_seed(6)
    m, n = 16, 12
    q = torch.linalg.qr(torch.randn(m, m, dtype=F64))[0]
    spec = torch.logspace(0, -3, m, dtype=F64).sqrt()
    gs = [((q * spec) @ torch.randn(m, n, dtype=F64)).float() for _ in range(10)]
    rule = (0.05, 2, 10)
    outs, state = _run(_tx(sf.spectral_mass_rank(*rule), freq=10, tikhonov=1e-4), gs)
    ref, (kl, kr) = _reference(gs, 10, gs[9], rank_rule=rule, tikhonov=1e-4)
    assert int(state.groups[0].left.rank[0]) == kl
    assert int(state.groups[0].right.rank[0]) == kr
    assert 2 <= kl < 10  # the rule really truncated
    assert rel_err(outs[9], ref) < 1e-4
    # The basis width is k_max (fixed shape), directions past k masked (coef 0).
    left = state.groups[0].left
    assert left.basis.shape == (1, m, 10)
    assert torch.all(left.coef[0, kl:] == 0) and torch.all(left.coef[0, :kl] != 0)


# --------------------------------------------------------------------------- graft and tau


def test_frobenius_graft_rescales_to_gradient_norm():
    gs = _grads((6, 5), 8, seed=7)
    raw, _ = _run(_tx(sf.fixed_rank(2), freq=4), gs)
    graft, _ = _run(_tx(sf.fixed_rank(2), freq=4, graft="frobenius"), gs)
    for t in range(4, 8):
        assert float(graft[t].norm()) == pytest.approx(float(gs[t].norm()), rel=1e-5)
        assert cosine(graft[t], raw[t]) > 1 - 1e-6
        assert abs(float(raw[t].norm()) / float(gs[t].norm()) - 1) > 1e-2  # grafting did something


def test_tau_caps_norm_ratio():
    gs = [100.0 * g for g in _grads((6, 5), 8, seed=8)]  # small factors -> large P(G)
    gs = [g / 1e4 for g in gs]
    raw, _ = _run(_tx(freq=4), gs)
    ratios = [float(raw[t].norm() / gs[t].norm()) for t in range(4, 8)]
    assert min(ratios) > 2.0
    tau = 0.5 * min(ratios)
    capped, _ = _run(_tx(freq=4, tau=tau), gs)
    for t in range(4, 8):
        assert float(capped[t].norm()) == pytest.approx(tau * float(gs[t].norm()), rel=1e-5)
        assert cosine(capped[t], raw[t]) > 1 - 1e-6
    loose, _ = _run(_tx(freq=4, tau=10 * max(ratios)), gs)
    for t in range(8):
        assert torch.equal(loose[t], raw[t])


def test_preconditioned_gradient_is_loss_scale_invariant_without_graft():
    """P(sG) = P(G) for graft="none" (A_L ~ s^-1/2, A_R ~ s^-1/2): no absolute constant leaks in."""
    gs = _grads((6, 5), 8, seed=9)
    base, _ = _run(_tx(sf.fixed_rank(2), freq=4, tikhonov=1e-4), gs)
    for s in (1e-3, 1e3):
        scaled, _ = _run(_tx(sf.fixed_rank(2), freq=4, tikhonov=1e-4), [s * g for g in gs])
        for t in range(4, 8):
            assert rel_err(scaled[t], base[t]) < 1e-5


# --------------------------------------------------------------------------- sides and shapes


def test_one_sided_when_a_side_exceeds_max_precond_dim():
    gs = _grads((10, 4), 8, seed=10)
    outs, state = _run(_tx(freq=4, max_precond_dim=8), gs)
    grp = state.groups[0]
    assert grp.left is None and grp.right is not None
    gm = [g.to(F64) for g in gs]
    ar, _ = precond_matrix(right_factor(gm, 0.9))
    assert rel_err(outs[7], gs[7].to(F64) @ ar) < RTOL_F32
    # Transposed: only the left side.
    gt = [g.T.contiguous() for g in gs]
    outs_t, state_t = _run(_tx(freq=4, max_precond_dim=8), gt)
    assert state_t.groups[0].right is None
    assert rel_err(outs_t[7], ar @ gt[7].to(F64)) < RTOL_F32


def test_both_sides_too_long_and_small_leaves_pass_through():
    tx = _tx(freq=1, max_precond_dim=4)
    params = {"big": torch.zeros(6, 5), "vec": torch.zeros(7), "scalar": torch.zeros(()), "one": torch.zeros(1, 1),
              "none": None}
    state = tx.init(params)
    assert state.groups == ()
    g = {"big": torch.randn(6, 5), "vec": torch.randn(7), "scalar": torch.randn(()), "one": torch.randn(1, 1), "none": None}
    for _ in range(3):
        out, state = tx.update(clone(g), state, params=params)
        for k in ("big", "vec", "scalar", "one"):
            assert torch.equal(out[k], g[k]), k
        assert out["none"] is None


@pytest.mark.parametrize("shape,sides", [((1, 6), (False, True)), ((6, 1), (True, False)), ((1, 1, 5), (False, True))])
def test_dim_one_sides_are_not_preconditioned(shape, sides):
    gs = _grads(shape, 8, seed=11)
    outs, state = _run(_tx(freq=4), gs)
    grp = state.groups[0]
    assert (grp.left is not None, grp.right is not None) == sides
    m = shape[0]
    gm = [g.reshape(m, -1).to(F64) for g in gs]
    if sides[1]:
        ref = gm[7] @ precond_matrix(right_factor(gm, 0.9))[0]
    else:
        ref = precond_matrix(left_factor(gm, 0.9))[0] @ gm[7]
    assert outs[7].shape == shape
    assert rel_err(outs[7].reshape(m, -1), ref) < RTOL_F32


def test_conv_weight_viewed_as_out_by_in_kh_kw():
    gs4 = _grads((4, 3, 2, 2), 8, seed=12)  # (out, in, kh, kw) -> (4, 12)
    outs4, state = _run(_tx(freq=4), gs4)
    assert state.groups[0].left.basis.shape[1] == 4 and state.groups[0].right.basis.shape[1] == 12
    outs2, _ = _run(_tx(freq=4), [g.reshape(4, 12) for g in gs4])
    for a, b in zip(outs4, outs2):
        assert a.shape == (4, 3, 2, 2)
        assert torch.equal(a.reshape(4, 12), b)
    ref, _ = _reference(gs4, 8, gs4[7])
    assert rel_err(outs4[7].reshape(4, 12), ref) < RTOL_F32


def test_non_float32_leaves_keep_dtype():
    gs = _grads((6, 5), 4, seed=13, dtype=torch.float64)
    outs, _ = _run(_tx(freq=2), gs)
    assert all(o.dtype == torch.float64 for o in outs)
    gb = [g.to(torch.bfloat16) for g in gs]
    outs_b, _ = _run(_tx(freq=2), gb)
    assert all(o.dtype == torch.bfloat16 for o in outs_b)


# --------------------------------------------------------------------------- grouping


def _multi_leaf_run(grouped, steps=12, codec=None):
    torch.manual_seed(14)
    shapes = {"a": (6, 5), "b": (6, 5), "c": (5, 6), "d": (6, 5), "e": (5,), "f": (2, 3, 5)}
    params = {k: torch.zeros(s) for k, s in shapes.items()}
    tx = sf.kronecker_precondition(
        curvature=sf.curvature_ema(0.9, codec=codec or sf.fp32_codec()),
        rank=sf.spectral_mass_rank(0.1, 2, 4),
        precond_freq=3,
        grouped=grouped,
    )
    state = tx.init(params)
    outs = []
    for _ in range(steps):
        g = {k: torch.randn(s) for k, s in shapes.items()}
        u, state = tx.update(g, state, params=params)
        outs.append(u)
    return outs, state


@pytest.mark.parametrize("int8", [False, True])
def test_grouped_equals_per_leaf(int8):
    codec = sf.int8_blockwise(64, stochastic=False) if int8 else None
    og, sg = _multi_leaf_run(True, codec=codec)
    ol, sl = _multi_leaf_run(False, codec=codec)
    # grouped: (6,5) x3 stacked, (5,6), (2,15); per-leaf: one group per matrix leaf
    assert [int(g.leaves.numel()) for g in sg.groups] == [3, 1, 1]
    assert len(sl.groups) == 5
    for ug, ul in zip(og, ol):
        for k in ug:
            torch.testing.assert_close(ug[k], ul[k], rtol=1e-5, atol=1e-6, msg=k)
    # Ranks agree leaf by leaf.
    ranks_g = torch.cat([g.left.rank for g in sg.groups])
    assert torch.equal(ranks_g[:3], torch.cat([g.left.rank for g in sl.groups[:3]]))


def test_wrong_tree_raises():
    tx = _tx()
    state = tx.init({"w": torch.zeros(4, 3)})
    with pytest.raises(ValueError, match="kronecker_precondition"):
        tx.update({"w": torch.zeros(4, 3), "v": torch.zeros(5, 2)}, state)
    with pytest.raises(ValueError, match="kronecker_precondition"):
        tx.update({"w": torch.zeros(4)}, state)


@pytest.mark.parametrize("shape", [(3, 4), (4, 5), (2, 6)])
def test_wrong_leaf_shape_raises_value_error(shape):
    tx = _tx()
    state = tx.init({"w": torch.zeros(4, 3)})
    with pytest.raises(ValueError, match="kronecker_precondition"):
        tx.update({"w": torch.zeros(shape)}, state)


# --------------------------------------------------------------------------- robustness


def test_failed_eigh_keeps_last_good_basis():
    gs = _grads((6, 5), 4, seed=15)
    tx = _tx(freq=2)
    params = {"w": torch.zeros(6, 5)}
    state = tx.init(params)
    for g in gs:
        _, state = tx.update({"w": g}, state)
    good = state.groups[0].left
    # Poison the statistic: the next refresh cannot decompose it.
    bad_stat = good.stat._replace(diag=torch.full_like(good.stat.diag, float("nan")))
    grp = state.groups[0]._replace(left=good._replace(stat=bad_stat))
    state = state._replace(groups=(grp,))
    _, state = tx.update({"w": gs[0]}, state)  # step 5: no refresh
    u, new = tx.update({"w": gs[1]}, state)  # step 6: the left refresh fails, the right one works
    left = new.groups[0].left
    assert torch.equal(left.basis, good.basis) and torch.equal(left.coef, good.coef)
    assert torch.equal(left.tail, good.tail) and torch.equal(left.rank, good.rank)
    assert int(left.fallbacks[0]) == 1 and int(new.groups[0].right.fallbacks[0]) == 0
    assert not torch.equal(new.groups[0].right.basis, state.groups[0].right.basis)
    assert torch.isfinite(u["w"]).all()


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"precond_freq": 0}, ValueError, "precond_freq"),
        ({"precond_freq": 1.5}, TypeError, "precond_freq"),
        ({"complement": "foo"}, ValueError, "complement"),
        ({"graft": "bar"}, ValueError, "graft"),
        ({"tau": -1.0}, ValueError, "tau"),
        ({"tau": 0.0}, ValueError, "tau"),
        ({"tikhonov": -1e-4}, ValueError, "tikhonov"),
        ({"max_precond_dim": 1}, ValueError, "max_precond_dim"),
        ({"curvature": 0.99}, TypeError, "curvature"),
        ({"rank": 8}, TypeError, "rank"),
        ({"gram_precision": "float16"}, ValueError, "gram_precision"),
        ({"stat_freq": 0}, ValueError, "stat_freq"),
        ({"stat_freq": 2.0}, TypeError, "stat_freq"),
    ],
)
def test_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        sf.kronecker_precondition(**kwargs)


# --------------------------------------------------------------------------- gram_precision


def _stats(state):
    """Every tensor of every curvature statistic in a kronecker_precondition state."""
    sides = [side for grp in state.groups for side in (grp.left, grp.right) if side is not None]
    return [x for side in sides for x in optree.tree_leaves(side.stat) if isinstance(x, torch.Tensor)]


def test_bfloat16_gram_rounds_the_gradient_and_on_the_cpu_the_products():
    """gram_precision="bfloat16" rounds the Gram products' inputs (and, on the CPU, their
    bfloat16 products' results): its statistics are those of float32 Grams on the
    bfloat16-rounded gradients to bfloat16's precision (the scale normalisation is a power of
    two, so it commutes with the rounding), while the preconditioned output still uses the exact
    gradient."""
    gs = [g * 3.7 for g in _grads((12, 20), 9, seed=5)]
    rounded = [g.to(torch.bfloat16).float() for g in gs]
    assert any(not torch.equal(a, b) for a, b in zip(gs, rounded))
    out16, s16 = _run(_tx(freq=4, gram_precision="bfloat16"), gs)
    _, s32 = _run(_tx(freq=4), rounded)
    assert len(_stats(s16)) == len(_stats(s32)) > 0
    for a, b in zip(_stats(s16), _stats(s32)):  # int8 codes too: they move by a rounding step at most here and there
        assert a.dtype == b.dtype and (a.numel() == 0 or rel_err(a.float(), b.float()) < 1e-2)
    out32, _ = _run(_tx(freq=4), gs)
    for a, b in zip(out16, out32):  # close to the float32 path, but not the same
        assert rel_err(a, b) < 2e-2
    assert any(not torch.equal(a, b) for a, b in zip(out16, out32))


def test_cpu_bfloat16_gram_is_the_bfloat16_product_widened():
    from scao_fx.precond.kron import gram as _gram

    x = torch.randn(3, 30, 70, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for left in (True, False):
        got = _gram(x, left)
        want = x @ x.transpose(-1, -2) if left else x.transpose(-1, -2) @ x
        assert got.dtype == torch.float32 and torch.equal(got, want.float())
        xf = x.double()
        exact = xf @ xf.transpose(-1, -2) if left else xf.transpose(-1, -2) @ xf
        assert rel_err(got.double(), exact) < 5e-3  # bfloat16 rounding of the result only
        assert torch.equal(_gram(x.float(), left), exact.float()) or rel_err(_gram(x.float(), left).double(), exact) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bfloat16_gram_uses_float32_accumulation():
    from scao_fx.precond.kron import gram as _gram

    x = torch.randn(3, 300, 700, device="cuda").to(torch.bfloat16)
    for left in (True, False):
        got = _gram(x, left)
        xf = x.double()
        want = xf @ xf.transpose(-1, -2) if left else xf.transpose(-1, -2) @ xf
        assert got.dtype == torch.float32
        # float32 accumulation: ~1e-6 relative (a bfloat16 output would be ~4e-3 off)
        assert rel_err(got.double(), want) < 1e-5


# --------------------------------------------------------------------------- subspace eigensolver


def test_subspace_solver_tracks_the_top_eigenpairs():
    """Warm-started orthogonal iteration + Rayleigh-Ritz converges to eigh's top-k subspace."""
    gen = torch.Generator().manual_seed(11)
    q = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=F64))[0]
    spectrum = torch.logspace(0, -4, 40, dtype=F64)
    spectrum[:5] = torch.tensor([100.0, 60.0, 30.0, 20.0, 10.0], dtype=F64)
    factor = (q * spectrum) @ q.T
    basis = torch.zeros(1, 40, 5, dtype=F64)
    for _ in range(30):
        vals, vecs, ok, rest = sf.precond.top_eigenpairs_subspace(factor[None], basis)
        basis = vecs
    assert bool(ok.all())
    torch.testing.assert_close(vals[0], spectrum[:5], rtol=1e-6, atol=0)
    top = q[:, :5]
    assert float((top @ top.T - vecs[0] @ vecs[0].T).norm()) < 1e-5
    # The remaining eigenvalues are summarised by their mean (the trace left over); the Ritz
    # values come from a float32 eigh, hence the tolerance.
    torch.testing.assert_close(rest[0].sum(), spectrum[5:].sum(), rtol=1e-5, atol=0)


def test_auto_solver_matches_eigh_at_first_refresh_and_stays_close():
    gs = _grads((24, 20), 16, seed=9)
    exact, _ = _run(_tx(sf.fixed_rank(4), freq=4, eigensolver="eigh"), gs)
    approx, state = _run(_tx(sf.fixed_rank(4), freq=4, eigensolver="auto"), gs)
    assert rel_err(approx[4], exact[4]) < RTOL_F32  # steps 4..7 use the first (exact) refresh
    assert rel_err(approx[15], exact[15]) < 0.2  # later refreshes: one iteration per refresh
    assert int(state.refreshes) == 4


# --------------------------------------------------------------------------- None updates


@pytest.mark.parametrize("codec", [sf.fp32_codec(), sf.int8_blockwise()], ids=["fp32", "int8"])
def test_none_update_leaves_its_stacked_state_untouched(codec):
    """A leaf without a gradient at a step keeps its statistics and basis; its group mates move on."""
    import copy

    tx = _tx(sf.fixed_rank(2), freq=2, codec=codec)
    params = {"a": torch.zeros(6, 4), "b": torch.zeros(6, 4)}
    state = tx.init(params)
    gs = _grads((6, 4), 6, seed=21)
    for t in range(6):
        before = copy.deepcopy(state)
        upd = {"a": gs[t], "b": None if t in (3, 4) else gs[t] * 0.5}
        out, state = tx.update(upd, state, inplace=True)
        grp, old = state.groups[0], before.groups[0]
        if upd["b"] is None:
            assert out["b"] is None
            for new_t, old_t in zip(sf.transforms.kronecker._pack(grp.left), sf.transforms.kronecker._pack(old.left)):
                if new_t.numel():  # (the fp32 codec's scale is an empty placeholder)
                    assert torch.equal(new_t[1], old_t[1])  # leaf "b" is the second of the stack
            assert not torch.equal(grp.left.stat.diag[0], old.left.stat.diag[0])  # "a" moved on
        else:
            assert out["b"] is not None
    assert int(state.refreshes) == 3


def test_none_update_for_a_whole_group_and_the_chain():
    params = {"w": torch.zeros(5, 3), "b": torch.zeros(3)}
    tx = sf.scao(1e-2, form="seed", warmup_steps=0, min_precond_updates=0, blend_steps=0, precond_freq=1)
    state = tx.init(params)
    updates, state = tx.update({"w": None, "b": torch.ones(3)}, state, params=params)
    assert updates["w"] is None and updates["b"] is not None
    fresh = chain_state(tx.init(params))[0].inner_state.groups[0]
    assert torch.equal(chain_state(state)[0].inner_state.groups[0].left.stat.diag, fresh.left.stat.diag)


def test_solver_failing_from_the_start_keeps_identity_and_never_poisons(monkeypatch):
    """Every eigendecomposition fails (both precisions): the preconditioner stays the identity.

    With the Frobenius graft the identity preconditioner returns the gradient itself, so SCAO
    then runs exactly as AdamW (to rounding of the blend); failures are counted, nothing raises."""

    def failing(x, *args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (simulated)")

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    gs = _grads((6, 5), 12, seed=3)
    fast = dict(form="seed", warmup_steps=2, blend_steps=3, min_precond_updates=0, precond_freq=2, k_min=1, k_max=4)
    scao, adamw = sf.scao(1e-2, **fast), sf.adamw(1e-2)
    p_s = p_a = {"w": torch.ones(6, 5)}
    s_s, s_a = scao.init(p_s), adamw.init(p_a)
    for g in gs:
        u_s, s_s = scao.update({"w": g.clone()}, s_s, params=p_s)
        u_a, s_a = adamw.update({"w": g.clone()}, s_a, params=p_a)
        p_s, p_a = sf.apply_updates(p_s, u_s), sf.apply_updates(p_a, u_a)
        assert torch.isfinite(p_s["w"]).all()
    torch.testing.assert_close(p_s["w"], p_a["w"], rtol=1e-6, atol=1e-7)
    (rec,) = sf.scao_diagnostics(s_s).values()
    assert rec["fallbacks_left"] == rec["fallbacks_right"] == rec["refreshes"] > 0 and rec["rank_left"] == 0
