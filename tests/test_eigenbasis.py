"""The eigenbasis form: kronecker_eigenbasis, sf.soap and sf.scao(form="eigenbasis")."""

from __future__ import annotations

import io

import pytest
import torch
from torch.func import grad
from treeutil import assert_tree_close, clone, eigenbasis_state, update_memory_rise, versions

import scao_fx as sf
from scao_fx.precond.eigenbasis import (
    change_basis,
    change_basis_second_moment,
    kept_basis,
    project_complement,
    rotate,
    rotate_back,
)
from scao_fx.precond.kron import init_side
from scao_fx.presets import SCAO_DEFAULTS


def power_reference(f, q):
    """One power-iteration refresh as documented in kronecker_eigenbasis, in float64: the factor
    with the relative Tikhonov term (1e-4 of its mean eigenvalue), shifted by a multiple of its
    largest Rayleigh quotient, times the old basis; QR of the columns in decreasing Rayleigh order,
    signs fixed (R's diagonal positive), each column back at its old position."""
    d = f.shape[-1]
    f = f + 1e-4 * torch.trace(f) / d * torch.eye(d, dtype=f.dtype)
    ray = torch.einsum("ij,ik,kj->j", q, f, q)
    shift = min(32 * d * torch.finfo(torch.float32).eps, 0.1) * ray.abs().max()
    order = torch.argsort(ray, descending=True)
    qq, r = torch.linalg.qr((f @ q + shift * q)[:, order])
    qq = qq * torch.sign(torch.diagonal(r))
    out = torch.empty_like(q)
    out[:, order] = qq
    return out


def soap_reference(params, grads, *, lr, b1, b2, eps, wd, rho, freq, skip_first=True, solver="power", stat_freq=1):
    """SOAP in float64, written from the algorithm: factor EMAs, bases from the factors, a step
    rotated with the bases of the last refresh, the bases refreshed after the step at step 1 (a
    full eigh) and every ``freq`` steps (``solver``: one warm-started power iteration with the
    columns kept in place, or a full eigh sorted by eigenvalue), Adam's first moment in the
    original coordinates (projected at every step), the second in the eigenbasis (carried over a
    refresh, by position), decoupled weight decay; the factors accumulate at step 1 and every
    ``stat_freq`` steps. ``skip_first``: step 1 has no Adam step (its
    update is the weight decay alone) and Adam's count starts at step 2; otherwise step 1 is
    Adam in the original coordinates (identity bases). Vectors: plain Adam."""
    p = {k: v.double().clone() for k, v in params.items()}
    st: dict = {}
    for t, g in enumerate(grads, 1):
        k_adam = t - 1 if skip_first else t
        bc1, bc2 = 1 - b1**max(k_adam, 1), 1 - b2**max(k_adam, 1)
        for k, G in g.items():
            G = G.double()
            s = st.setdefault(k, {"mu": torch.zeros_like(G), "nu": torch.zeros_like(G)})
            if k_adam > 0:
                s["mu"] = b1 * s["mu"] + (1 - b1) * G
            u = torch.zeros_like(G)
            if G.dim() == 2:
                m, n = G.shape
                if t == 1 or t % stat_freq == 0:
                    s["L"] = rho * s.get("L", torch.zeros(m, m, dtype=G.dtype)) + (1 - rho) * G @ G.T
                    s["R"] = rho * s.get("R", torch.zeros(n, n, dtype=G.dtype)) + (1 - rho) * G.T @ G
                ql = s.get("QL", torch.eye(m, dtype=G.dtype))
                qr = s.get("QR", torch.eye(n, dtype=G.dtype))
                if k_adam > 0:
                    s["nu"] = b2 * s["nu"] + (1 - b2) * (ql.T @ G @ qr) ** 2
                    u = ql @ ((ql.T @ s["mu"] @ qr) / bc1 / ((s["nu"] / bc2).sqrt() + eps)) @ qr.T
                if t == 1 or solver == "eigh" and t % freq == 0:
                    s["QL"] = torch.linalg.eigh(s["L"])[1].flip(-1)
                    s["QR"] = torch.linalg.eigh(s["R"])[1].flip(-1)
                elif t % freq == 0:
                    s["QL"], s["QR"] = power_reference(s["L"], ql), power_reference(s["R"], qr)
            elif k_adam > 0:
                s["nu"] = b2 * s["nu"] + (1 - b2) * G**2
                u = (s["mu"] / bc1) / ((s["nu"] / bc2).sqrt() + eps)
            p[k] = p[k] - lr * (u + wd * p[k])
    return p


def problem(seed=0, steps=25, shapes=None):
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes or {"a": (5, 5), "b": (4, 4), "c": (3,), "d": (5, 5)}
    params = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    grads = [{k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()} for _ in range(steps)]
    return params, grads


def run(tx, params, grads, dtype, *, inplace=True):
    p = {k: v.to(dtype).clone() for k, v in params.items()}
    state = tx.init(p)
    for g in grads:
        u, state = tx.update({k: v.to(dtype) for k, v in g.items()}, state, params=p, inplace=inplace)
        p = sf.apply_updates(p, u, inplace=inplace)
    return p, state


def adam_state(state):
    """The ScaleByAdamState inside a kronecker_eigenbasis state."""
    return state.inner_state


# ---------------------------------------------------------------- the pure rotations


def test_rotations_with_identity_bases_are_exact():
    g = torch.randn(3, 4, 5)
    eye_l, eye_r = torch.eye(4).expand(3, 4, 4), torch.eye(5).expand(3, 5, 5)
    assert torch.equal(rotate(g, eye_l, eye_r), g)
    assert torch.equal(rotate_back(g, eye_l, eye_r), g)
    assert torch.equal(rotate(g, None, None), g)
    assert torch.equal(project_complement(g, eye_l, eye_r), torch.zeros_like(g))


def test_core_and_complement_split_the_gradient_orthogonally():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(2, 6, 6, generator=gen, dtype=torch.float64))[0][..., :2]
    v = torch.linalg.qr(torch.randn(2, 5, 5, generator=gen, dtype=torch.float64))[0][..., :3]
    core = rotate(g, u, v)
    kept = rotate_back(core, u, v)
    comp = project_complement(g, u, v)
    torch.testing.assert_close(kept + comp, g)
    assert (kept * comp).sum(dim=(-2, -1)).abs().max() < 1e-12  # orthogonal parts
    assert comp.norm() > 0.5 * g.norm()  # a rank-2 x rank-3 subspace keeps little of a random G
    torch.testing.assert_close(project_complement(comp, u, v), comp)  # a projection


def test_change_basis_equals_projecting_the_original_coordinates():
    gen = torch.Generator().manual_seed(2)
    q = lambda d: torch.linalg.qr(torch.randn(1, d, d, generator=gen, dtype=torch.float64))[0]
    ul, ur, nl, nr = q(4), q(3), q(4), q(3)
    mu = torch.randn(1, 4, 3, generator=gen, dtype=torch.float64)
    original = rotate_back(mu, ul, ur)
    torch.testing.assert_close(change_basis(mu, ul, ur, nl, nr), rotate(original, nl, nr))


@pytest.mark.parametrize("m, n, k_left, k_right", [(3, 12, 3, 12), (12, 3, 12, 3), (10, 10, 4, 10), (12, 5, 2, 5)])
def test_change_basis_is_the_product_of_the_overlaps(m, n, k_left, k_right):
    """Wide, tall, square and truncated shapes, one side or both: U_new^T U_old C V_old^T V_new."""
    gen = torch.Generator().manual_seed(m * 100 + n)
    q = lambda d, k: torch.linalg.qr(torch.randn(2, d, d, generator=gen, dtype=torch.float64))[0][..., :k]
    ul, ur, nl, nr = q(m, k_left), q(n, k_right), q(m, k_left), q(n, k_right)
    mu = torch.randn(2, k_left, k_right, generator=gen, dtype=torch.float64)
    want = nl.transpose(-1, -2) @ ul @ mu @ ur.transpose(-1, -2) @ nr
    torch.testing.assert_close(change_basis(mu, ul, ur, nl, nr), want)
    torch.testing.assert_close(change_basis(mu, ul, None, nl, None), nl.transpose(-1, -2) @ ul @ mu)
    torch.testing.assert_close(change_basis(mu, None, ur, None, nr), mu @ ur.transpose(-1, -2) @ nr)


def test_kept_basis_masks_past_the_rank_and_is_the_identity_before_a_refresh():
    side = init_side(sf.curvature_ema(), sf.fixed_rank(2), batch=2, dim=3)
    assert torch.equal(kept_basis(side), torch.eye(3, 2).expand(2, 3, 2))
    basis = torch.linalg.qr(torch.randn(2, 3, 3))[0][..., :2]
    side = side._replace(basis=basis, rank=torch.tensor([1, 2]))
    kept = kept_basis(side)
    assert torch.equal(kept[0, :, 1], torch.zeros(3)) and torch.equal(kept[0, :, 0], basis[0, :, 0])
    assert torch.equal(kept[1], basis[1])


# ---------------------------------------------------------------- the link


def test_identity_basis_gives_exactly_the_inner_transform():
    # Step 1 runs before any refresh: the identity basis, so exactly scale_by_adam on every leaf;
    # a leaf with no gradient at step 1 keeps the identity basis until the next refresh.
    params, grads = problem(steps=3)
    params = {k: v.float() for k, v in params.items()}
    tx = sf.kronecker_eigenbasis(sf.scale_by_adam(0.9, 0.95), precond_freq=10)
    adam = sf.scale_by_adam(0.9, 0.95)
    s, a = tx.init(params), adam.init(params)
    g1 = {k: v.float() for k, v in grads[0].items()}
    u, s = tx.update(clone(g1), s)
    ua, a = adam.update(clone(g1), a)
    for k in params:
        assert torch.equal(u[k], ua[k]), k
    # a fresh link: leaf "a" absent at step 1, so its basis is still the identity at step 2
    # (Adam's step count is shared by the tree, as in scale_by_adam alone with the same None leaf)
    s, a = tx.init(params), adam.init(params)
    g1 = dict(g1, a=None)
    u, s = tx.update(clone(g1), s)
    _, a = adam.update(clone(g1), a)
    assert u["a"] is None
    g2 = {k: v.float() for k, v in grads[1].items()}
    u, s = tx.update(clone(g2), s)
    ua, _ = adam.update(clone(g2), a)
    assert torch.equal(u["a"], ua["a"])
    assert not torch.allclose(u["b"], ua["b"])  # leaf "b" was refreshed at step 1: rotated


@pytest.mark.parametrize("variant", [dict(), dict(skip_first=False, solver="eigh"), dict(skip_first=False),
                                     dict(solver="eigh")], ids=["power-skip", "eigh-adam-first", "power-adam-first",
                                                                "eigh-skip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_soap_matches_the_float64_reference(dtype, variant):
    params, grads = problem()
    hp = dict(lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, wd=0.01, rho=0.95, freq=4)
    ref = soap_reference(params, grads, **hp, **variant)
    kw = dict(skip_first=variant.get("skip_first", True), eigensolver=variant.get("solver", "power"))
    tx = sf.soap(1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, precond_freq=4, **kw)
    got, _ = run(tx, params, grads, dtype)
    for k in params:
        moved = (ref[k] - params[k]).abs().max()
        assert moved > 0.05
        # the bases are float32 eigenvectors: agreement to float32 rounding of the displacement
        assert (got[k].double() - ref[k]).abs().max() <= 2e-5 * moved, k


@pytest.mark.parametrize("stat_freq", [2, 3])
def test_stat_freq_matches_the_float64_reference(stat_freq):
    params, grads = problem()
    ref = soap_reference(params, grads, lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, wd=0.0, rho=0.95, freq=6,
                         solver="eigh", stat_freq=stat_freq)
    every = soap_reference(params, grads, lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, wd=0.0, rho=0.95, freq=6,
                           solver="eigh")
    tx = sf.chain(
        sf.kronecker_eigenbasis(sf.scale_by_adam(0.9, 0.95), curvature=sf.curvature_ema(0.95, sf.fp32_codec()),
                                rank=sf.full_rank(), precond_freq=6, stat_freq=stat_freq, eigensolver="eigh",
                                skip_first=True),
        sf.scale_by_learning_rate(1e-2),
    )
    got, _ = run(tx, params, grads, torch.float64)
    for k in params:
        moved = (ref[k] - params[k]).abs().max()
        # the bases are float32 eigenvectors: agreement to float32 rounding of the displacement
        assert (got[k] - ref[k]).abs().max() <= 2e-5 * moved, k
    assert (every["a"] - ref["a"]).abs().max() > 1e-3 * (ref["a"] - params["a"]).abs().max()  # a different schedule


def test_stat_freq_skips_the_statistics_and_debiases_by_their_count():
    """Between accumulations the statistics are left exactly as they were; a constant gradient's
    factor reads back as G G^T at every step (debiased by the number of accumulations, not steps)."""
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    curv = sf.curvature_ema(0.9, sf.fp32_codec())
    tx = sf.kronecker_eigenbasis(curvature=curv, precond_freq=4, stat_freq=4)
    state = tx.init({"w": g})
    stat = state.groups[0].left.stat
    for t in range(1, 10):
        _, state = tx.update({"w": g.clone()}, state, inplace=False)
        new = state.groups[0].left.stat
        changed = not torch.equal(new.diag, stat.diag)
        assert changed == (t == 1 or t % 4 == 0), t
        stat = new
        updates = torch.tensor(1 + t // 4)
        torch.testing.assert_close(curv.factor(stat, updates, 6)[0], (g @ g.T).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("rotation_precision", "moment_at_refresh"),
                         [("float32", "rotate"), ("bfloat16", "rotate"), ("float32", "project")])
def test_stat_freq_compiled_update_matches_eager(rotation_precision, moment_at_refresh):
    params, grads = problem(steps=5, shapes={"w": (5, 4), "b": (4,)})
    tx = sf.kronecker_eigenbasis(curvature=sf.curvature_ema(0.9, sf.fp32_codec()), precond_freq=2, stat_freq=2,
                                 rotation_precision=rotation_precision, moment_at_refresh=moment_at_refresh)
    p = {k: v.float() for k, v in params.items()}
    eager_state = tx.init(p)
    compiled_state = tx.init(p)
    step = torch.compile(lambda g, s: tx.update(g, s, inplace=False), backend="eager", fullgraph=True)
    for g in grads:
        g = {k: v.float() for k, v in g.items()}
        ue, eager_state = tx.update(clone(g), eager_state, inplace=False)
        uc, compiled_state = step(clone(g), compiled_state)
        assert_tree_close(uc, ue, rtol=0, atol=0)
    assert_tree_close(compiled_state, eager_state, rtol=0, atol=0)


def test_soap_keep_ablation_departs_from_the_reference():
    params, grads = problem()
    ref = soap_reference(params, grads, lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, wd=0.0, rho=0.95, freq=4,
                         skip_first=False, solver="eigh")
    tx = sf.chain(
        sf.kronecker_eigenbasis(sf.scale_by_adam(0.9, 0.95), curvature=sf.curvature_ema(0.95, sf.fp32_codec()),
                                rank=sf.full_rank(), precond_freq=4, moment_at_refresh="keep"),
        sf.scale_by_learning_rate(1e-2),
    )
    got, _ = run(tx, params, grads, torch.float64)
    assert (got["a"] - ref["a"]).abs().max() > 1e-4


def test_change_basis_second_moment_is_the_mean_square_of_uncorrelated_coordinates():
    """Exact check: coordinates C with independent zero-mean entries of variances nu, carried to
    new bases as C' = P C Q, have E[C'^2] = (P∘P) nu (Q∘Q), the function's result."""
    gen = torch.Generator().manual_seed(4)
    q = lambda d: torch.linalg.qr(torch.randn(1, d, d, generator=gen, dtype=torch.float64))[0]
    ul, ur, nl, nr = q(4), q(3), q(4), q(3)
    nu = torch.rand(1, 4, 3, generator=gen, dtype=torch.float64)
    p, qq = (nl.mT @ ul)[0], (ur.mT @ nr)[0]
    # vec(P C Q) = (Q^T kron P) vec(C) (column-major vec): its covariance's diagonal
    a = torch.kron(qq.T.contiguous(), p.contiguous())
    var = (a * a) @ nu[0].T.reshape(-1)
    torch.testing.assert_close(change_basis_second_moment(nu, ul, ur, nl, nr)[0], var.reshape(3, 4).T)
    # unmoved bases carry nu unchanged; a permutation permutes it; the total is kept (full bases)
    torch.testing.assert_close(change_basis_second_moment(nu, ul, ur, ul, ur), nu)
    swap = torch.eye(4, dtype=torch.float64)[[2, 0, 3, 1]][None]
    torch.testing.assert_close(change_basis_second_moment(nu, torch.eye(4, dtype=torch.float64)[None], None, swap, None),
                               swap.mT @ nu)
    torch.testing.assert_close(change_basis_second_moment(nu, ul, ur, nl, nr).sum(), nu.sum())


@pytest.mark.parametrize("mode", ["rotate", "project"])
def test_refresh_rotates_the_first_moment_and_carries_the_second(mode):
    params, grads = problem(steps=4, shapes={"w": (5, 4)})
    params = {k: v.float() for k, v in params.items()}
    b1 = 0.9
    mk = lambda mode: sf.kronecker_eigenbasis(sf.scale_by_adam(b1, 0.95), curvature=sf.curvature_ema(0.95, sf.fp32_codec()),
                                              rank=sf.full_rank(), precond_freq=3, moment_at_refresh=mode)
    rot, keep = mk(mode), mk("keep")
    sr, sk = rot.init(params), keep.init(params)
    for t, g in enumerate(grads, 1):
        g = {k: v.float() for k, v in g.items()}
        before = clone(sr)
        _, sr = rot.update(clone(g), sr)
        _, sk = keep.update(clone(g), sk)
        if t in (1, 3):  # refresh steps: the update used the old bases, then mu moved to the new ones
            old = tuple(kept_basis(s) for s in (before.groups[0].left, before.groups[0].right))
            new = tuple(kept_basis(s) for s in (sr.groups[0].left, sr.groups[0].right))
            assert not torch.allclose(old[0], new[0])
            torch.testing.assert_close(
                adam_state(sr).mu[1][0], change_basis(adam_state(sk).mu[1][0][None], *old, *new)[0], rtol=1e-5, atol=1e-6
            )
            if mode == "rotate":  # carried, by position
                assert torch.equal(adam_state(sr).nu[1][0], adam_state(sk).nu[1][0])
            else:  # projected: the mean squares of the old coordinates in the new ones
                torch.testing.assert_close(adam_state(sr).nu[1][0], change_basis_second_moment(
                    adam_state(sk).nu[1][0][None], *old, *new)[0], rtol=1e-5, atol=1e-9)
                assert not torch.allclose(adam_state(sr).nu[1][0], adam_state(sk).nu[1][0])
            sk = sk._replace(inner_state=clone(adam_state(sr)))  # continue both from the same state
        else:
            assert torch.equal(adam_state(sr).mu[1][0], adam_state(sk).mu[1][0])


def scao_eig(**kw):
    base = dict(form="eigenbasis", k_min=1, k_max=2, precond_freq=3, rho=0.9, weight_decay=0.0)
    return sf.scao(**{**base, **kw})


def regression(rotated=False):
    gen = torch.Generator().manual_seed(3)
    if rotated:  # ill-conditioned in a basis that is not the coordinate axes
        q = torch.linalg.qr(torch.randn(12, 12, generator=gen))[0]
        x = torch.randn(256, 12, generator=gen) @ q @ torch.diag(torch.logspace(0, 1.5, 12)) @ q.T
    else:
        x = torch.randn(256, 12, generator=gen) @ torch.diag(torch.logspace(0, 1, 12))
    w_true = torch.randn(12, 6, generator=gen)
    y = x @ w_true

    def loss(p):
        return ((x @ p["w"] + p["b"] - y) ** 2).mean()

    return loss, {"w": torch.zeros(12, 6), "b": torch.zeros(6)}


def train(tx, steps=150, rotated=False):
    loss, params = regression(rotated)
    state = tx.init(params)
    for _ in range(steps):
        g = grad(loss)(params)  # the torch.func loop
        u, state = tx.update(g, state, params=params, inplace=False)
        params = sf.apply_updates(params, u, inplace=False)
    return loss(params).item(), state


@pytest.mark.parametrize("use_int8_ema", [True, False])
def test_scao_eigenbasis_adaptive_rank_and_int8_train(use_int8_ema):
    loss, params = regression()
    start = loss(params).item()
    final, state = train(scao_eig(lr=5e-2, use_int8_ema=use_int8_ema, float32_below=0))  # compress the small sides
    assert final < 1e-2 * start
    inner = eigenbasis_state(state)  # apply_if_finite -> chain -> kronecker_eigenbasis
    group = inner.groups[0]
    assert group.left.stat.offdiag.data.dtype == (torch.int8 if use_int8_ema else torch.float32)
    # the adaptive rank kept fewer directions than the sides' lengths: the complement is in use
    assert int(group.left.rank.max()) <= 2 and int(group.right.rank.max()) <= 2
    assert inner.inner_state.mu[2][0] is not None and inner.inner_state.mu[2][0].abs().sum() > 0


def test_complement_directions_are_updated_not_dropped():
    # A gradient wholly outside the kept subspace still moves the parameter, with Adam's gain.
    tx = sf.kronecker_eigenbasis(sf.scale_by_adam(), curvature=sf.curvature_ema(0.9, sf.fp32_codec()),
                                 rank=sf.fixed_rank(1), precond_freq=1)
    params = {"w": torch.zeros(4, 4)}
    s = tx.init(params)
    g = torch.zeros(4, 4)
    g[0, 0] = 1.0
    _, s = tx.update({"w": g.clone()}, s)  # refresh: kept directions e0 (x) e0
    g2 = torch.zeros(4, 4)
    g2[2, 3] = 1e-3  # in the complement
    u, s = tx.update({"w": g2.clone()}, s)
    assert u["w"][2, 3].abs() > 0.5  # Adam normalises it: no arbitrary gain, not dropped
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2, 3] = mask[0, 0] = False  # (0, 0): the kept direction, moved by the first step's momentum
    assert u["w"][mask].abs().max() < 1e-6


def test_eigenbasis_beats_adamw_when_the_curvature_is_not_axis_aligned():
    # 150 steps at lr 0.1 (measured: AdamW 4.1, soap 1.7, scao eigenbasis k_max=12 0.007)
    adamw, _ = train(sf.adamw(0.1, weight_decay=0.0), rotated=True)
    soap, _ = train(sf.soap(0.1, weight_decay=0.0, precond_freq=3), rotated=True)
    eig, _ = train(scao_eig(lr=0.1, k_max=12), rotated=True)
    assert soap < 0.5 * adamw and eig < 0.5 * adamw


def test_inplace_false_leaves_inputs_untouched_and_agrees_with_inplace():
    params, grads = problem(steps=6, shapes={"w": (6, 5), "v": (6, 5), "b": (5,)})
    params = {k: v.float() for k, v in params.items()}
    tx = scao_eig()
    results = {}
    for inplace in (False, True):
        p, s = clone(params), tx.init(params)
        ups = []
        for g in grads:
            g = {k: v.float() for k, v in g.items()}
            if not inplace:
                before, vers = clone((g, s, p)), versions((g, s, p))
            u, s_new = tx.update(g, s, params=p, inplace=inplace)
            if not inplace:
                assert versions((g, s, p)) == vers
                assert_tree_close((g, s, p), before, msg="inputs changed by inplace=False")
            ups.append(clone(u))
            p, s = sf.apply_updates(p, u, inplace=inplace), s_new
        results[inplace] = (ups, s)
    assert_tree_close(results[False], results[True], rtol=0, atol=0)


def test_state_is_plain_tensors_and_resumes_bit_exactly_after_weights_only_load():
    params, grads = problem(steps=12, shapes={"w": (6, 5), "b": (5,)})
    params = {k: v.float() for k, v in params.items()}
    for tx in (scao_eig(), sf.soap(1e-2, precond_freq=3)):
        p, s = clone(params), tx.init(params)
        for g in grads[:5]:
            u, s = tx.update({k: v.float() for k, v in g.items()}, s, params=p)
            p = sf.apply_updates(p, u)
        buf = io.BytesIO()
        torch.save({"s": s, "p": p}, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        pa, sa, pb, sb = p, s, loaded["p"], loaded["s"]
        for g in grads[5:]:
            ua, sa = tx.update({k: v.float() for k, v in g.items()}, sa, params=pa)
            pa = sf.apply_updates(pa, ua)
            ub, sb = tx.update({k: v.float() for k, v in g.items()}, sb, params=pb)
            pb = sf.apply_updates(pb, ub)
        for k in pa:
            assert torch.equal(pa[k], pb[k])


def test_one_sided_above_max_precond_dim():
    tx = sf.kronecker_eigenbasis(precond_freq=2, max_precond_dim=4, rank=sf.full_rank())
    params = {"w": torch.zeros(3, 8)}
    s = tx.init(params)
    g = s.groups[0]
    assert g.left is not None and g.right is None
    assert s.inner_state.mu[1][0].shape == (3, 8)  # rotated on the left only
    for _ in range(3):
        u, s = tx.update({"w": torch.randn(3, 8)}, s)
    assert u["w"].shape == (3, 8) and torch.isfinite(u["w"]).all()


def test_grouped_equals_per_leaf():
    params, grads = problem(steps=7, shapes={"w": (6, 5), "v": (6, 5), "b": (5,)})
    out = {}
    for grouped in (True, False):
        tx = sf.kronecker_eigenbasis(sf.scale_by_adam(), curvature=sf.curvature_ema(0.9, sf.fp32_codec()),
                                     rank=sf.spectral_mass_rank(0.1, 1, 3), precond_freq=2, grouped=grouped)
        out[grouped], _ = run(sf.chain(tx, sf.scale_by_learning_rate(1e-2)), params, grads, torch.float32)
    assert_tree_close(out[True], out[False], rtol=1e-5, atol=1e-6)


def test_facade_form_keyword():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    opt = sf.SCAO(model.parameters(), lr=1e-2, form="eigenbasis", k_min=1, k_max=4, precond_freq=2)
    assert opt.param_groups[0]["form"] == "eigenbasis"
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    sd = opt.state_dict()
    opt2 = sf.SCAO(model.parameters(), lr=1e-2, form="eigenbasis", k_min=1, k_max=4, precond_freq=2)
    opt2.load_state_dict(sd)


def test_bad_arguments():
    with pytest.raises(ValueError, match="moment_at_refresh"):
        sf.kronecker_eigenbasis(moment_at_refresh="projected")
    with pytest.raises(TypeError, match="inner"):
        sf.kronecker_eigenbasis("adam")
    with pytest.raises(ValueError, match="form"):
        sf.scao(form="soap")
    with pytest.raises(ValueError, match="moment_at_refresh must be one of"):
        sf.scao(moment_at_refresh="projected")
    with pytest.raises(ValueError, match="moment_at_refresh applies to form='eigenbasis'"):
        sf.scao(form="seed", moment_at_refresh="project")
    with pytest.raises(ValueError, match="warmup_steps applies to form='seed' only"):
        sf.scao(form="eigenbasis", warmup_steps=5)
    with pytest.raises(ValueError, match="sf.scao"):
        sf.scao_precondition(form="eigenbasis")
    with pytest.raises(ValueError, match="shampoo_beta"):
        sf.soap(shampoo_beta=1.0)
    with pytest.raises(ValueError, match="full_rank"):
        sf.kronecker_eigenbasis(eigensolver="power", rank=sf.fixed_rank(2))
    with pytest.raises(ValueError, match="eigensolver"):
        sf.soap(eigensolver="subspace")
    with pytest.raises(TypeError, match="skip_first"):
        sf.soap(skip_first=1)
    with pytest.raises(ValueError, match="stat_freq"):
        sf.kronecker_eigenbasis(stat_freq=0)
    with pytest.raises(ValueError, match="stat_freq"):
        sf.SCAO([torch.nn.Parameter(torch.zeros(2, 2))], stat_freq=0)


def test_soap_final_loss_is_comparable_to_heavyball_soap():
    # A loose peer check, not parity: HeavyBall's SOAP differs in its eigensolver (QR power
    # iteration), its first step, bias correction and more. Measured on this problem (150 steps,
    # betas (0.9, 0.95), refresh every 2 steps): lr 0.03: sf 0.64, HeavyBall 0.21, AdamW 21.0;
    # lr 0.1: sf 0.011, HeavyBall 0.031, AdamW 4.1 (from 2131).
    heavyball = pytest.importorskip("heavyball")
    pytest.importorskip("heavyball.utils").compile_mode = None  # eager, as in the benchmark registry
    for lr in (3e-2, 1e-1):
        loss, params = regression(rotated=True)
        ps = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
        opt = heavyball.SOAP(list(ps.values()), lr=lr, betas=(0.9, 0.95), weight_decay=0.0,
                             precondition_frequency=2, use_precond_schedule=False)
        for _ in range(150):
            opt.zero_grad()
            loss(ps).backward()
            opt.step()
        theirs = loss(ps).item()
        ours, _ = train(sf.soap(lr, betas=(0.9, 0.95), weight_decay=0.0, precond_freq=2), rotated=True)
        adamw, _ = train(sf.adamw(lr, weight_decay=0.0), rotated=True)
        assert ours < 0.2 * adamw and theirs < 0.2 * adamw
        assert 0.1 < ours / theirs < 10.0


def test_soap_steps_agree_with_heavyball_soap_on_a_square_matrix(monkeypatch):
    # Where the two algorithms coincide: one full-rank square matrix (no null space in the
    # factors, whose eigenbasis would be arbitrary in either implementation), no weight decay,
    # HeavyBall's defaults (betas 0.9/0.95, shampoo_beta 0.95, refresh every 2 steps). Step 1
    # is zero in both. Knowingly different details that stay below the tolerance: HeavyBall's
    # eps is a floor on sqrt(v) (ours is added), its power iteration lifts the factor by a
    # slightly different multiple of the top eigenvalue, and ours adds the relative Tikhonov
    # term. Measured: about 4e-5 relative per step over 30 steps.
    heavyball = pytest.importorskip("heavyball")
    monkeypatch.setattr(pytest.importorskip("heavyball.utils"), "compile_mode", None)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, 6, generator=gen) for _ in range(30)]
    p = torch.nn.Parameter(torch.zeros(6, 6))
    opt = heavyball.SOAP([p], lr=1.0, betas=(0.9, 0.95), shampoo_beta=0.95, weight_decay=0.0,
                         precondition_frequency=2)
    tx = sf.soap(1.0, betas=(0.9, 0.95), shampoo_beta=0.95, weight_decay=0.0, precond_freq=2)
    params = {"w": torch.zeros(6, 6)}
    state = tx.init(params)
    for t, g in enumerate(grads, 1):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        theirs = p.detach() - before
        u, state = tx.update({"w": g.clone()}, state, params=params)
        if t == 1:
            assert theirs.abs().max() == 0 and u["w"].abs().max() == 0
            continue
        assert (u["w"] - theirs).norm() <= 1e-3 * theirs.norm(), t


def test_skip_first_only_initialises_the_bases_at_step_1():
    params, grads = problem(steps=2, shapes={"w": (5, 4), "b": (3,)})
    params = {k: v.float() for k, v in params.items()}
    tx = sf.kronecker_eigenbasis(sf.scale_by_adam(0.9, 0.95), curvature=sf.curvature_ema(0.95, sf.fp32_codec()),
                                 rank=sf.full_rank(), precond_freq=3, skip_first=True)
    state = tx.init(params)
    g1 = {k: v.float() for k, v in grads[0].items()}
    u, state = tx.update(clone(g1), state)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in u.values())
    counts = [c for c in torch.utils._pytree.tree_leaves(adam_state(state).count) if c is not None]
    assert counts and all(int(c) == 0 for c in counts) and int(state.refreshes) == 1
    assert_tree_close(adam_state(state).mu, adam_state(tx.init(params)).mu)
    # step 2 is Adam's first step (a sign) in the eigenbasis of step 1's factors
    g2 = {k: v.float() for k, v in grads[1].items()}
    u, state = tx.update(clone(g2), state)
    ql, qr = (kept_basis(s)[0] for s in (state.groups[0].left, state.groups[0].right))
    torch.testing.assert_close(ql.T @ u["w"] @ qr, torch.sign(ql.T @ g2["w"] @ qr), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(u["b"], torch.sign(g2["b"]), rtol=1e-4, atol=1e-4)


def test_scao_full_rank_eigenbasis_is_soap_with_its_statistics():
    # epsilon_sparse=0 with k_max=None is full_rank(): with float32 statistics, bases and
    # rotations, the power refresh and skip_first, sf.scao's eigenbasis form is sf.soap step for
    # step (same chain, same parts).
    kw = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01, precond_freq=3)
    scao = sf.scao(form="eigenbasis", rho=0.95, epsilon_sparse=0.0, k_max=None, eigensolver="power",
                   skip_first=True, use_int8_ema=False, basis_storage="float32", rotation_precision="float32",
                   moments="float32", skip_nonfinite=False, **kw)
    soap = sf.soap(shampoo_beta=0.95, max_precond_dim=4096, **kw)
    params, grads = problem(steps=12)
    params = {k: v.float() for k, v in params.items()}
    grads = [{k: v.float() for k, v in g.items()} for g in grads]
    outs = []
    for tx in (scao, soap):
        p, state = clone(params), tx.init(params)
        for g in grads:
            u, state = tx.update(clone(g), state, params=p)
            p = sf.apply_updates(p, u)
        outs.append(p)
    assert_tree_close(outs[0], outs[1], rtol=0, atol=0)
    group = scao.init(params)[0].groups[0]
    assert group.left.basis.shape[-1] == 5  # every direction kept, no complement


def test_scao_rank_keywords():
    assert sf.spectral_mass_rank(0.1, 2, None).capacity(300) == 300
    with pytest.raises(ValueError, match="skip_first applies to form='eigenbasis' only"):
        sf.scao(form="seed", skip_first=not SCAO_DEFAULTS["skip_first"])
    with pytest.raises(ValueError, match="full_rank"):  # power needs every direction
        sf.scao(form="eigenbasis", eigensolver="power", epsilon_sparse=0.05, k_max=8)
    with pytest.raises(ValueError, match="eigensolver"):  # the seed form has no power refresh
        sf.scao(form="seed", eigensolver="power", epsilon_sparse=0.0, k_max=None)


def test_bfloat16_basis_storage_halves_the_bases_and_trains():
    fp32 = scao_eig(lr=5e-2, epsilon_sparse=0.0, k_max=None, eigensolver="power", skip_first=True,
                    basis_storage="float32", float32_below=0)
    bf16 = scao_eig(lr=5e-2, epsilon_sparse=0.0, k_max=None, eigensolver="power", skip_first=True,
                    float32_below=0)  # the default storage, also on the small test matrix's sides
    loss, params = regression(rotated=True)
    start = loss(params).item()
    (f32_loss, f32_state), (b16_loss, b16_state) = train(fp32, rotated=True), train(bf16, rotated=True)
    side = eigenbasis_state(b16_state).groups[0].left
    assert side.basis.dtype == torch.bfloat16 and eigenbasis_state(f32_state).groups[0].left.basis.dtype == torch.float32
    # the stored basis is orthonormal to bfloat16's precision, and training is as good
    q = side.basis[0].float()
    assert (q.T @ q - torch.eye(q.shape[1])).abs().max() < 2e-2
    assert b16_loss < 1e-2 * start and b16_loss < 2 * f32_loss + 1e-6
    with pytest.raises(ValueError, match="basis_storage"):
        sf.scao(curvature="sketch", basis_storage="float32")
    with pytest.raises(ValueError, match="basis_dtype"):
        sf.curvature_ema(0.9, basis_dtype=torch.float16)


def _stats_and_bases(state):
    """Every tensor of the Kronecker groups' sides (statistics, bases, ranks...) of a facade state."""
    return [x for x in sf._tree.flatten(eigenbasis_state(state).groups)[0] if isinstance(x, torch.Tensor)]


def test_bfloat16_rotations_round_only_the_products_and_train():
    """``rotation_precision="bfloat16"``: the rotations are bfloat16 products, and nothing else
    changes: statistics and bases stay bit-identical to the float32 run, the inner state stays
    float32, each step's update is the float32 one up to the products' rounding, and training is
    as good. A truncated rank (a complement) rotates in float32: bit-identical."""
    params, grads = problem(steps=8, shapes={"w": (6, 5), "v": (6, 5), "b": (5,)})
    full = dict(epsilon_sparse=0.0, k_max=None, lr=1e-2)
    runs = {}
    for prec in ("float32", "bfloat16"):
        tx = scao_eig(**full, rotation_precision=prec, float32_below=0, moments="float32")  # (the sides are short)
        p = {k: v.float() for k, v in params.items()}
        state, updates = tx.init(p), []
        for g in grads:
            u, state = tx.update({k: v.float() for k, v in g.items()}, state, params=p, inplace=False)
            updates.append(u)
        runs[prec] = (updates, state)
    (u32, s32), (u16, s16) = runs["float32"], runs["bfloat16"]
    for a, b in zip(_stats_and_bases(s32), _stats_and_bases(s16)):
        assert torch.equal(a, b)
    assert all(x.dtype == torch.float32 for x in sf._tree.flatten(eigenbasis_state(s16).inner_state.mu)[0]
               if isinstance(x, torch.Tensor))
    assert torch.equal(u32[0]["w"], u16[0]["w"])  # step 1 only accumulates (skip_first): zero
    for step, (a, b) in enumerate(zip(u32[1:], u16[1:]), 2):
        x, y = a["w"].flatten(), b["w"].flatten()
        assert float(torch.nn.functional.cosine_similarity(x, y, dim=0)) > 0.99, step
        assert torch.equal(a["b"], b["b"])  # a vector is not rotated
    assert not all(torch.equal(a["w"], b["w"]) for a, b in zip(u32, u16))  # bfloat16 products were used

    # the rotation itself: the bfloat16 product of the rounded operands, accumulated in float32
    from scao_fx.transforms.eigenbasis import _in_precision

    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))[None]
    q6, q5 = (torch.linalg.qr(torch.randn(d, d))[0][None].bfloat16() for d in (6, 5))
    assert torch.equal(_in_precision(rotate, x, (q6, q5)), rotate(x.bfloat16(), q6, q5).float())

    truncated = [scao_eig(rotation_precision=prec) for prec in ("float32", "bfloat16")]  # k_max=2: a complement
    (p32, _), (p16, _) = (run(tx, params, grads, torch.float32) for tx in truncated)
    assert_tree_close(p16, p32, rtol=0, atol=0)

    loss, params0 = regression(rotated=True)
    start = loss(params0).item()
    f32, _ = train(scao_eig(**{**full, "lr": 5e-2}), rotated=True)
    b16, _ = train(scao_eig(**{**full, "lr": 5e-2}, rotation_precision="bfloat16"), rotated=True)
    assert b16 < 1e-2 * start and b16 < 2 * f32 + 1e-6
    with pytest.raises(ValueError, match="rotation_precision must be one of"):
        sf.scao(rotation_precision="float16")
    with pytest.raises(ValueError, match="rotation_precision applies to form='eigenbasis'"):
        sf.scao(form="seed", rotation_precision="float32")  # the seed form requires the default


def test_stored_moments_are_turned_decoded_at_a_refresh():
    """``moment_codecs``: the link stores Adam's moments encoded between steps and decodes them
    for the step and for a refresh, so with a lossless codec the run equals the plain link bit
    for bit, refreshes included, while the state holds the encoded cores (a small vector stays
    float32)."""
    params, grads = problem(steps=8, shapes={"w": (72, 64), "b": (64,)})
    params = {k: v.float() for k, v in params.items()}
    grads = [{k: v.float() for k, v in g.items()} for g in grads]

    def link(**kw):
        return sf.kronecker_eigenbasis(sf.scale_by_adam(0.9, 0.95), curvature=sf.curvature_ema(0.95, sf.fp32_codec()),
                                       rank=sf.full_rank(), precond_freq=3, **kw)

    codecs = sf.ScaleByAdamState(sf.fp32_codec(), sf.fp32_codec(), None)
    for leafwise, inplace in ((False, True), (True, True), (True, False)):
        plain, stored = link(), link(moment_codecs=codecs, leafwise_inner=leafwise)
        sp, ss = plain.init(params), stored.init(params)
        for g in grads:
            up, sp = plain.update(clone(g), sp, inplace=inplace)
            us, ss = stored.update(clone(g), ss, inplace=inplace)
            assert_tree_close(us, up, rtol=0, atol=0)
        mu = ss.inner_state.mu
        assert isinstance(mu[1][0], sf.EncodedTensor) and isinstance(mu[0]["b"], torch.Tensor)  # the core; b is small
        torch.testing.assert_close(sf.fp32_codec().decode(mu[1][0]).view(72, 64), adam_state(sp).mu[1][0],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("moment_at_refresh", ["rotate", "project"])
@pytest.mark.parametrize("codecs", ["bf16", "int8"])
def test_stored_moments_give_the_same_bits_a_group_at_a_time(codecs, moment_at_refresh):
    """With bfloat16 or 8-bit moments the stochastic rounding draws on the link's step count,
    not on how often Adam is called: a group at a time (``leafwise_inner``) and one call over
    the whole tree give the same bits, in place or not; the moments stay encoded."""
    shapes = {"a": (64, 72), "b": (64, 72), "c": (80, 64), "v": (4096,), "u": (8,), "s": (3, 3)}
    params, grads = problem(steps=7, shapes=shapes)
    params = {k: v.float() for k, v in params.items()}
    grads = [{k: v.float() for k, v in g.items()} for g in grads]
    make = sf.bf16_adam_codecs if codecs == "bf16" else sf.int8_adam_codecs
    for inplace in (True, False):
        outs = {}
        for lw in (False, True):
            tx = sf.kronecker_eigenbasis(sf.scale_by_adam(), curvature=sf.curvature_ema(0.9), precond_freq=3,
                                         skip_first=True, moment_at_refresh=moment_at_refresh, leafwise_inner=lw,
                                         moment_codecs=make())
            outs[lw] = run(tx, params, grads, torch.float32, inplace=inplace)
        assert_tree_close(outs[True][0], outs[False][0], rtol=0, atol=0)
        assert_tree_close(outs[True][1], outs[False][1], rtol=0, atol=0)
        mu = outs[True][1].inner_state.mu
        assert isinstance(mu[1][0], sf.EncodedTensor) and isinstance(mu[0]["v"], sf.EncodedTensor)
        assert isinstance(mu[0]["u"], torch.Tensor) and isinstance(mu[1][-1], torch.Tensor)  # small: float32


def test_stored_moments_are_checked():
    """``moment_codecs`` must be a ScaleByAdamState of codecs over an Adam inner transform."""
    with pytest.raises(TypeError, match="moment_codecs must be None or a ScaleByAdamState"):
        sf.kronecker_eigenbasis(moment_codecs=sf.bf16_codec())
    with pytest.raises(TypeError, match="moment_codecs"):
        sf.kronecker_eigenbasis(moment_codecs=sf.ScaleByAdamState(sf.bf16_codec(), "int8", None))
    tx = sf.kronecker_eigenbasis(sf.scale_by_momentum(0.9), moment_codecs=sf.bf16_adam_codecs())
    with pytest.raises(ValueError, match="no ScaleByAdamState"):
        tx.init({"w": torch.zeros(8, 8)})


def test_stored_moments_are_decoded_a_group_at_a_time(monkeypatch):
    """The step decodes only the group it updates: bfloat16 moments add about one group's
    float32 moments to the step's rise (4 groups: 2 bytes per parameter), not the whole tree's
    plus a second copy of the codes (what wrapping the link in ``quantize_state`` costs)."""
    import scao_fx.transforms.adam as adam_module

    gen = torch.Generator().manual_seed(0)
    shapes = {f"{n}{i}": s for n, s in (("a", (512, 8)), ("b", (8, 512)), ("c", (256, 16)), ("d", (16, 256)))
              for i in range(2)}
    params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    grads = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(5)]

    def link(**kw):
        return sf.kronecker_eigenbasis(sf.scale_by_adam(), curvature=sf.curvature_ema(0.9, sf.fp32_codec()),
                                       rank=sf.full_rank(), precond_freq=5, max_precond_dim=16, leafwise_inner=True,
                                       **kw)

    monkeypatch.setattr(adam_module, "DENOMINATOR_CHUNK", 2 * 4096)
    plain = update_memory_rise(link(), params, grads[:3])
    stored = [update_memory_rise(link(moment_codecs=sf.bf16_adam_codecs()), params, grads[:s]) for s in (3, 5)]
    wrapped = update_memory_rise(sf.quantize_state(
        link(), sf.KroneckerEigenbasisState(None, None, None, sf.bf16_adam_codecs())), params, grads[:3])
    assert all(rise < plain + 2.5 for rise in stored), (plain, stored)  # was plain + 10.6
    assert wrapped > plain + 8, (plain, wrapped)


def test_default_keeps_short_sides_exact_and_rotates_their_matrices_in_float32():
    """SCAO's default (``float32_below=64``): a 40 x 100 matrix keeps its 40-side factor and basis
    in float32 and is rotated in float32 (its updates are bit-identical to
    ``rotation_precision="float32"``'s), while its 100-side stays int8 / bfloat16; a 64 x 100
    matrix is compressed on both sides and rotated in bfloat16."""
    gen = torch.Generator().manual_seed(11)
    params = {"a": torch.randn(40, 100, generator=gen), "b": torch.randn(64, 100, generator=gen)}
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(7)]
    runs = {}
    for prec in ("float32", "bfloat16"):
        tx = sf.scao(1e-2, rotation_precision=prec, precond_freq=3)
        state, ups = tx.init(params), []
        for g in grads:
            u, state = tx.update(g, state, params=params, inplace=False)
            ups.append(u)
        runs[prec] = ups, state
    (u32, _), (u16, s16) = runs["float32"], runs["bfloat16"]
    groups = {tuple(int(i) for i in g.leaves): g for g in eigenbasis_state(s16).groups}
    a, b = groups[(0,)], groups[(1,)]
    assert a.left.stat.offdiag.data.dtype == torch.float32 and a.left.basis.dtype == torch.float32
    assert a.right.stat.offdiag.data.dtype == torch.int8 and a.right.basis.dtype == torch.bfloat16
    assert b.left.stat.offdiag.data.dtype == torch.int8 and b.left.basis.dtype == torch.bfloat16
    assert all(torch.equal(x["a"], y["a"]) for x, y in zip(u32, u16))
    assert not all(torch.equal(x["b"], y["b"]) for x, y in zip(u32, u16))
    with pytest.raises(ValueError, match="float32_below"):
        sf.scao(curvature="sketch", float32_below=32)
    sf.scao(curvature="sketch", float32_below=0)  # 0 (nothing kept exact) is what a sketch does


def test_ordinary_step_keeps_about_two_trees_of_temporaries(monkeypatch):
    """Between the rotations a step holds the rotated gradients and Adam's directions (two
    trees of float32) plus one chunk of denominators: the stacked gradients, the rotated
    gradients and each group's rotated updates are dropped as soon as they are read, and a
    refresh turns the first moments in place, a group at a time (16 and 22 bytes per parameter
    here, ordinary and refresh step, before; about 9 now). Only the short sides are rotated, so
    the factors are small beside the parameters."""
    import scao_fx.transforms.adam as adam_module

    monkeypatch.setattr(adam_module, "DENOMINATOR_CHUNK", 2 * 4096)
    gen = torch.Generator().manual_seed(0)
    shapes = {**{f"a{i}": (512, 8) for i in range(4)}, **{f"b{i}": (8, 512) for i in range(4)}}
    params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    grads = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(5)]
    tx = sf.kronecker_eigenbasis(sf.scale_by_adam(), curvature=sf.curvature_ema(0.9, sf.fp32_codec()),
                                 rank=sf.full_rank(), precond_freq=5, max_precond_dim=16)
    for steps in (3, 5):  # an ordinary step, a refresh
        rise = update_memory_rise(tx, params, grads[:steps])
        assert 8.0 < rise < 9.5, (steps, rise)
    # a leafwise inner runs a group at a time: one group's directions (half the tree here)
    # instead of the whole tree's
    tx = sf.kronecker_eigenbasis(sf.scale_by_adam(), curvature=sf.curvature_ema(0.9, sf.fp32_codec()),
                                 rank=sf.full_rank(), precond_freq=5, max_precond_dim=16, leafwise_inner=True)
    assert 6.5 < update_memory_rise(tx, params, grads[:3]) < 7.5


@pytest.mark.parametrize("moment_at_refresh", ["rotate", "project"])
def test_leafwise_inner_gives_the_same_bits_a_group_at_a_time(moment_at_refresh):
    """``leafwise_inner=True`` calls Adam once for the unrotated leaves and once per group,
    each group's directions rotated back before the next group's are computed: the same
    parameters and state, bit for bit, as one call over the whole tree (several shape groups,
    a vector, an adaptive rank with a complement, refreshes, skip_first, out of place too)."""
    params, grads = problem(steps=9, shapes={"a": (6, 5), "b": (6, 5), "c": (4, 7), "v": (5,), "s": (3, 3)})
    for inplace in (True, False):
        outs = {}
        for lw in (False, True):
            tx = sf.kronecker_eigenbasis(sf.scale_by_adam(), curvature=sf.curvature_ema(0.9),
                                         rank=sf.spectral_mass_rank(0.05, 1, 3), precond_freq=3, skip_first=True,
                                         moment_at_refresh=moment_at_refresh, leafwise_inner=lw)
            outs[lw] = run(tx, params, grads, torch.float32, inplace=inplace)
        assert_tree_close(outs[True][0], outs[False][0])
        assert_tree_close(outs[True][1], outs[False][1])
    # the aliases run Adam a group at a time (sf.scao, sf.soap); an explicit inner does not,
    # unless told (it may not be leafwise: a global norm would see part of the tree)
    with pytest.raises(TypeError, match="leafwise_inner"):
        sf.kronecker_eigenbasis(leafwise_inner="yes")


def test_leafwise_inner_counts_a_legacy_single_adam_counter_once():
    """An Adam state with the legacy single step counter (one tensor for every leaf) would count
    each call: the link then calls Adam once over the whole tree, as without the option."""
    params, grads = problem(steps=4)
    params = {k: v.float() for k, v in params.items()}
    runs = []
    for lw in (False, True):
        tx = sf.kronecker_eigenbasis(sf.scale_by_adam(), curvature=sf.curvature_ema(0.9), precond_freq=2,
                                     leafwise_inner=lw)
        state = tx.init(params)
        state = state._replace(inner_state=state.inner_state._replace(count=sf.base.step_count()))
        p = clone(params)
        for g in grads:
            u, state = tx.update({k: v.float() for k, v in g.items()}, state, params=p)
            p = sf.apply_updates(p, u)
        assert int(state.inner_state.count) == len(grads)
        runs.append(p)
    assert_tree_close(runs[0], runs[1])
