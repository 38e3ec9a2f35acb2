"""SCAO end to end: scao_precondition / scao compositions, warmup == AdamW, loss-scale invariance,
ablations, Kronecker-ill-conditioned least squares, a real-data classification task, int8
curvature fidelity, compiled steps, grouping, checkpoints and argument validation."""

from __future__ import annotations

import io
import os
import sysconfig

import pytest
import torch
from least_squares import kron_lsq_problem, steps_to_reach
from scaoref import cosine, rel_err
from treeutil import assert_tree_close, chain_state, clone, structure, tensor_leaves

import scao_fx as sf
from scao_fx.presets import SCAO_DEFAULTS


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These are small problems on a shared 2-core machine: intra-op threads only add contention
    (measured 15x slower with 2 threads under load). The previous setting is restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- problems


def mlp_problem(seed=0, loss_scale=1.0):
    """A small tanh MLP regression: (params, loss)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 12, generator=g)
    y = torch.randn(64, 5, generator=g)
    params = {
        "w1": torch.randn(16, 12, generator=g) / 12**0.5,
        "b1": torch.zeros(16),
        "w2": torch.randn(5, 16, generator=g) / 4,
        "b2": torch.zeros(5),
    }

    def loss(p):
        h = torch.tanh(x @ p["w1"].T + p["b1"])
        return loss_scale * ((h @ p["w2"].T + p["b2"] - y) ** 2).mean()

    return params, loss


def train(tx, params, loss, steps, *, record=False):
    """Full-batch training from a copy of ``params`` (apply_updates works in place); returns
    (params, state, per-step losses after each update)."""
    params = clone(params)
    state = tx.init(params)
    losses = []
    for _ in range(steps):
        grads = torch.func.grad(loss)(params)
        updates, state = tx.update(grads, state, params=params)
        params = sf.apply_updates(params, updates)
        if record:
            losses.append(float(loss(params)))
    return params, state, losses


def fast_scao_kwargs(**kw):
    """A short schedule: warmup 10, ramp 10, refresh every 5 steps."""
    base = dict(form="seed", rho=0.95, warmup_steps=10, blend_steps=10, min_precond_updates=0, precond_freq=5,
                epsilon_sparse=0.05, k_min=2, k_max=8, basis_storage="float32")
    base.update(kw)
    return base


# --------------------------------------------------------------------------- composition


@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
def test_scao_is_chain_of_scao_precondition_and_adamw(moments):
    params, loss = mlp_problem()
    kw = fast_scao_kwargs()
    a, sa, _ = train(sf.scao(1e-2, weight_decay=0.05, moments=moments, **kw), params, loss, 30)
    if moments == "float32":
        adamw = sf.adamw(1e-2, betas=SCAO_DEFAULTS["betas"], weight_decay=0.05)  # sf.scao's betas
    else:  # the default: AdamW's moments stored in bfloat16
        adam = sf.quantize_state(sf.scale_by_adam(*SCAO_DEFAULTS["betas"]), sf.bf16_adam_codecs())
        adamw = sf.chain(adam, sf.add_decayed_weights(0.05), sf.scale_by_learning_rate(1e-2))
    b, sb, _ = train(sf.chain(sf.scao_precondition(**kw), adamw), params, loss, 30)
    assert_tree_close(a, b)
    assert isinstance(sa, sf.ApplyIfFiniteState) and int(sa.skipped) == 0
    assert_tree_close(sa.inner_state, sb)
    bare = sf.scao(1e-2, weight_decay=0.05, skip_nonfinite=False, moments=moments, **kw)
    c, sc, _ = train(bare, params, loss, 30)
    assert_tree_close(c, b)
    assert_tree_close(sc, sb)
    if moments == SCAO_DEFAULTS["moments"]:  # what sf.scao builds when moments is not given
        assert structure(sf.scao(1e-2, weight_decay=0.05, **kw).init(params)) == structure(sa)


def test_scao_precondition_is_built_from_the_named_parts():
    params, loss = mlp_problem(1)
    by_hand = sf.chain(
        sf.blend_ramp(
            sf.kronecker_precondition(
                curvature=sf.curvature_ema(0.95, codec=sf.int8_blockwise(32),
                                           float32_below=SCAO_DEFAULTS["float32_below"]),
                rank=sf.spectral_mass_rank(0.05, 2, 8),
                precond_freq=5,
                complement="mean_tail",
                graft="frobenius",
            ),
            warmup_steps=10,
            blend_steps=10,
            min_precond_updates=0,
        ),
        sf.adamw(1e-2),
    )
    alias = sf.chain(sf.scao_precondition(**fast_scao_kwargs()), sf.adamw(1e-2))
    a, sa, _ = train(by_hand, params, loss, 30)
    b, sb, _ = train(alias, params, loss, 30)
    assert_tree_close(a, b)
    assert_tree_close(sa, sb)


@pytest.mark.parametrize("warmup,min_updates", [(15, 0), (5, 12)])
def test_warmup_equals_adamw_exactly(warmup, min_updates):
    torch.manual_seed(0)
    params = {"w": torch.randn(6, 5), "conv": torch.randn(4, 3, 2, 2), "b": torch.randn(5), "s": torch.randn(()),
              "frozen": None, "w2": torch.randn(6, 5)}
    kw = dict(rho=0.9, warmup_steps=warmup, min_precond_updates=min_updates, blend_steps=5, precond_freq=3, k_min=2, k_max=4)
    scao = sf.chain(sf.scao_precondition(**kw), sf.adamw(3e-2, weight_decay=0.1))
    adamw = sf.adamw(3e-2, weight_decay=0.1)
    s1, s2 = scao.init(params), adamw.init(params)
    p1, p2 = clone(params), clone(params)
    warm = max(warmup, min_updates)
    for t in range(1, warm + 3):
        g = {k: (None if v is None else torch.randn_like(v)) for k, v in params.items()}
        u1, s1 = scao.update(clone(g), s1, params=p1)
        u2, s2 = adamw.update(clone(g), s2, params=p2)
        p1, p2 = sf.apply_updates(p1, u1), sf.apply_updates(p2, u2)
        if t <= warm:
            for k in params:
                if params[k] is None:
                    assert u1[k] is None and u2[k] is None
                else:
                    assert torch.equal(u1[k], u2[k]), (t, k)
                    assert torch.equal(p1[k], p2[k]), (t, k)
            assert_tree_close(tuple(s1[1:]), tuple(s2), msg=f"adam state at step {t}")
        else:  # the ramp has started: matrix leaves differ, vectors/scalars stay plain Adam
            assert not torch.equal(u1["w"], u2["w"])
    # Curvature and refreshes ran during warmup.
    assert int(s1[0].inner_state.refreshes) == (warm + 2) // 3


# --------------------------------------------------------------------------- scale invariance

# Both runs do identical arithmetic up to float32 rounding of the scaled loss (1e-2 and 1e2 are
# not powers of two, so every gradient differs from the unscaled one by ~6e-8 relative).
# Adam (eps=1e-16, negligible), the Frobenius graft, the relative Tikhonov term, the debiased
# EMA and the block-wise int8 codec are all exactly scale-equivariant, so nothing amplifies
# these differences except float32 eigh (eigenvector perturbation ~ eps * spread of the
# spectrum / gap) over 12 refreshes, plus, with int8, the rare stochastic-rounding decision that
# flips when x / scale lands within rounding of the hash threshold: measured max relative
# parameter difference 6.8e-7 (fp32 codec) and 5.8e-7 .. 1.7e-6 (int8, exact eigh / warm-started
# subspace solver) after 60 steps. The tolerance 2e-5 keeps >10x headroom for other BLAS builds
# and solvers and is still 4 orders of magnitude
# below what a scale-dependent constant does (graft="none": 0.28 at 1e-2, 0.76 at 1e2).
SCALE_RTOL = 2e-5


def _scale_run(loss_scale, int8, graft="frobenius", steps=60):
    params, loss = mlp_problem(0, loss_scale)
    tx = sf.scao(1e-2, eps=1e-16, weight_decay=0.01, use_int8_ema=int8, graft=graft, **fast_scao_kwargs())
    p, state, _ = train(tx, params, loss, steps)
    return p, state


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_loss_scale_invariance(int8):
    base, state = _scale_run(1.0, int8)
    assert int(chain_state(state)[0].inner_state.refreshes) == 12
    for s in (1e-2, 1e2):
        p, _ = _scale_run(s, int8)
        for k in base:
            assert rel_err(p[k], base[k]) < SCALE_RTOL, (s, k, rel_err(p[k], base[k]))


@pytest.mark.xfail(
    strict=True,
    reason=(
        "SPEC CONFLICT (reported): with graft='none', P(G) = L^-1/4 G R^-1/4 is homogeneous of degree 0 "
        "in G (P(sG) = P(G)) while the raw gradient is degree 1, so the blend ramp b P(G) + (1-b) G "
        "and Adam's moments carried over from warmup depend on the loss scale (measured relative "
        "parameter difference 0.28 at loss x1e-2, 0.76 at x1e2). Only the Frobenius graft is "
        "loss-scale invariant; tau-capping (||P|| <= tau ||G||) is scale-dependent for the same reason."
    ),
)
def test_loss_scale_invariance_without_graft():
    base, _ = _scale_run(1.0, False, graft="none")
    p, _ = _scale_run(1e-2, False, graft="none")
    for k in base:
        assert rel_err(p[k], base[k]) < SCALE_RTOL


# --------------------------------------------------------------------------- ablations


def _ablation_chain(removed: str, lr=0.3, freq=10):
    curv = sf.curvature_ema(0.99, codec=sf.fp32_codec() if removed == "int8" else sf.int8_blockwise(64))
    rank = sf.full_rank() if removed == "adaptive_rank" else sf.spectral_mass_rank(0.05, 4, 16)
    kron = sf.kronecker_precondition(
        curvature=curv,
        rank=rank,
        precond_freq=freq,
        complement="none" if removed == "complement" else "mean_tail",
    )
    if removed == "scao_precondition":
        return sf.adamw(lr, weight_decay=0.0)
    pre = kron if removed == "blend_ramp" else sf.blend_ramp(kron, warmup_steps=20, blend_steps=10)
    return sf.chain(pre, sf.adamw(lr, weight_decay=0.0))


ABLATIONS = ["none", "blend_ramp", "int8", "adaptive_rank", "complement", "scao_precondition"]


@pytest.fixture(scope="module")
def ablation_runs():
    params, loss = kron_lsq_problem(16, 12, seed=1)
    init = float(loss(params))
    out = {name: train(_ablation_chain(name), params, loss, 200, record=True) for name in ABLATIONS}
    return init, out, params, loss


@pytest.mark.parametrize("removed", ABLATIONS)
def test_ablation_runs_and_converges(removed, ablation_runs):
    init, runs, _, _ = ablation_runs
    _, state, losses = runs[removed]
    assert all(torch.isfinite(torch.tensor(losses)))
    # Converges: final loss / initial loss measured 1.7e-4 (full chain), 3.2e-5 (no ramp), 1.5e-4
    # (fp32), 7.9e-5 (full rank), 3.7e-3 (no complement: the projection plateaus, the known flaw of
    # the README formula), 1.4e-4 (AdamW); and still going down (or flat) over the second half.
    assert losses[-1] < 1e-2 * init, (removed, losses[-1] / init)
    assert losses[-1] <= 1.01 * losses[99], (removed, losses[-1], losses[99])


def test_ablation_removing_scao_precondition_is_exactly_adamw(ablation_runs):
    _, runs, params, loss = ablation_runs
    p, _, _ = train(sf.adamw(0.3, weight_decay=0.0), params, loss, 200)
    assert torch.equal(runs["scao_precondition"][0]["w"], p["w"])


def test_ablation_without_blend_ramp_is_hard_switch_at_first_refresh():
    params, loss = kron_lsq_problem(16, 12, seed=1)
    a, _, la = train(_ablation_chain("blend_ramp", freq=10), params, loss, 9, record=True)
    b, _, lb = train(sf.adamw(0.3, weight_decay=0.0), params, loss, 9, record=True)
    assert torch.equal(a["w"], b["w"])  # A = I (and graft 1) before the first refresh
    a, _, _ = train(_ablation_chain("blend_ramp", freq=10), params, loss, 10)
    b, _, _ = train(sf.adamw(0.3, weight_decay=0.0), params, loss, 10)
    assert rel_err(a["w"], b["w"]) > 1e-3  # step 10 is preconditioned at full weight


def test_ablations_really_change_the_run(ablation_runs):
    _, runs, _, _ = ablation_runs
    full = runs["none"][0]["w"]
    for name in ABLATIONS[1:]:
        assert rel_err(runs[name][0]["w"], full) > 1e-4, name
    ranks = runs["none"][1][0].inner_state.groups[0].left.rank
    assert 4 <= int(ranks[0]) < 12  # the adaptive rank truncates on this problem
    assert int(runs["adaptive_rank"][1][0].inner_state.groups[0].left.rank[0]) == 16


# --------------------------------------------------------------------------- Kronecker least squares


def test_kronecker_ill_conditioned_least_squares_fewer_steps():
    """SCAO reaches AdamW's final loss in clearly fewer steps (each at its best lr of a small grid).

    Measured (m=32, n=24, condition 1e3 per side, 500 steps): AdamW best final loss 1.42e-3 at
    lr 0.3 (0.1: 2.6e-3, 1.0: 3.6e-3); SCAO (fp32 curvature) reaches it at step 119 at lr 0.3
    (ratio 0.24; final 1.75e-4), SCAO with int8 curvature at step 207 (ratio 0.41).
    """
    params, loss = kron_lsq_problem(32, 24, cond=1e3, seed=0)
    steps, grid = 500, (0.1, 0.3, 1.0)
    adam_final = min(train(sf.adam(lr), params, loss, steps, record=True)[2][-1] for lr in grid)

    def scao_steps(int8):
        best = None
        for lr in grid:
            pre = sf.scao_precondition(rho=0.99, warmup_steps=20, blend_steps=10, precond_freq=10,
                                       min_precond_updates=0, use_int8_ema=int8, epsilon_sparse=0.05, k_max=128,
                                       float32_below=0)  # int8 on these short sides too
            hit = steps_to_reach(train(sf.chain(pre, sf.adam(lr)), params, loss, steps, record=True)[2], adam_final)
            if hit is not None and (best is None or hit < best):
                best = hit
        return best

    fp32_steps = scao_steps(False)
    assert fp32_steps is not None and fp32_steps <= 0.4 * steps, fp32_steps
    int8_steps = scao_steps(True)
    assert int8_steps is not None and int8_steps <= 0.6 * steps, int8_steps


def test_kronecker_least_squares_default_form_within_a_third_of_adamws_steps():
    """The default form at lr 0.1 reaches AdamW's best final loss (lr grid 0.1, 0.3, 1.0) within
    0.35 of the steps. Its 32- and 24-long sides are under ``float32_below`` (64), so their factors,
    bases and rotations are float32. Measured (seed 0): step 87 of 500 (0.174); with
    ``float32_below=0`` (int8 statistics, bf16 bases and rotations) step 146 (148 with float32
    rotations, 138 with the earlier power refresh). docs/examples/least_squares.py has the
    3-seed table against SOAP and Muon."""
    params, loss = kron_lsq_problem(32, 24, cond=1e3, seed=0)
    steps = 500
    adam_final = min(train(sf.adam(lr), params, loss, steps, record=True)[2][-1] for lr in (0.1, 0.3, 1.0))
    for kw in ({}, {"float32_below": 0}):
        hit = steps_to_reach(train(sf.scao(0.1, weight_decay=0.0, **kw), params, loss, steps, record=True)[2],
                             adam_final)
        assert hit is not None and hit <= 0.35 * steps, (kw, hit)


# --------------------------------------------------------------------------- real-data classification

STDLIB_PACKAGES = ["asyncio", "email", "xml", "unittest", "multiprocessing", "http", "logging", "importlib"]


def stdlib_source_dataset(chunk=128, per_class=1200, features=96):
    """Real data shipped with every Python: 128-byte chunks of standard-library package sources,
    labelled by package (8 classes), as standardised log-counts of hashed byte bigrams.

    Chunks are spread evenly over each package's concatenated ``.py`` files (sorted paths);
    every 4th chunk is held out.
    """
    root = sysconfig.get_paths()["stdlib"]
    xs, ys = [], []
    for label, pkg in enumerate(STDLIB_PACKAGES):
        files = sorted(
            os.path.join(r, f) for r, _, fs in os.walk(os.path.join(root, pkg)) for f in fs if f.endswith(".py")
        )
        data = b"".join(open(f, "rb").read() for f in files)
        n = min(per_class, len(data) // chunk)
        stride = len(data) // chunk // n
        for i in range(n):
            b = torch.frombuffer(bytearray(data[i * stride * chunk : (i * stride + 1) * chunk]), dtype=torch.uint8).long()
            xs.append(torch.bincount((b[:-1] * 31 + b[1:] * 7) % features, minlength=features).float())
            ys.append(label)
    x, y = torch.log1p(torch.stack(xs)), torch.tensor(ys)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    held = torch.arange(len(y)) % 4 == 0
    return x[~held], y[~held], x[held], y[held]


def test_real_data_classification_not_worse_than_adamw():
    """Stdlib-source package classification, MLP 96-32-8, 200 full-batch steps, lr grid (0.01, 0.03, 0.1).

    Measured: AdamW best final train loss 0.538 (lr 0.03), SCAO 0.522 (lr 0.03); held-out
    accuracy 0.46 / 0.45 (chance 0.125; the held-out loss overfits for both).
    """
    xtr, ytr, xva, yva = stdlib_source_dataset()
    assert len(ytr) > 4000 and int(ytr.max()) == 7
    g = torch.Generator().manual_seed(0)
    params = {"w1": torch.randn(32, 96, generator=g) / 96**0.5, "b1": torch.zeros(32),
              "w2": torch.randn(8, 32, generator=g) / 32**0.5, "b2": torch.zeros(8)}

    def logits(p, x):
        return torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]

    def loss(p):
        return torch.nn.functional.cross_entropy(logits(p, xtr), ytr)

    def best(make):
        runs = [train(make(lr), params, loss, 200) for lr in (0.01, 0.03, 0.1)]
        p = min((r[0] for r in runs), key=lambda q: float(loss(q)))
        return float(loss(p)), float((logits(p, xva).argmax(1) == yva).float().mean())

    adam_loss, adam_acc = best(lambda lr: sf.adamw(lr, weight_decay=0.0))
    scao_loss, scao_acc = best(lambda lr: sf.scao(lr, form="seed", weight_decay=0.0, rho=0.99, warmup_steps=20, blend_steps=10,
                                                  precond_freq=10, min_precond_updates=0))
    assert scao_loss <= 1.01 * adam_loss, (scao_loss, adam_loss)
    assert scao_acc >= adam_acc - 0.03 and scao_acc > 0.35, (scao_acc, adam_acc)


# --------------------------------------------------------------------------- int8 fidelity


def _fidelity(m, n, steps, rho, rank, scales, seed=0):
    """Feed G = scale * (Q sqrt(logspace(0,-3,m))) @ randn(m, n) for ``steps`` steps, one leaf per
    scale (stacked in one group: one pass for all scales, and each scale gets its own stochastic
    rounding stream), refresh at the last step; int8_blockwise() (block 32) vs fp32 curvature storage."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    mix = (q * torch.logspace(0, -3, m, dtype=torch.float64).sqrt()).float()

    def tx(codec):
        return sf.kronecker_precondition(curvature=sf.curvature_ema(rho, codec=codec), rank=rank,
                                         precond_freq=steps, graft="none")

    params = {f"s{i}": torch.zeros(m, n) for i in range(len(scales))}
    t8, t32 = tx(sf.int8_blockwise()), tx(sf.fp32_codec())
    s8, s32 = t8.init(params), t32.init(params)
    for _ in range(steps):
        base = mix @ torch.randn(m, n, generator=g)
        grads = {f"s{i}": s * base for i, s in enumerate(scales)}
        u8, s8 = t8.update(grads, s8)
        u32, s32 = t32.update(grads, s32)
    r8, r32 = s8.groups[0].left.rank, s32.groups[0].left.rank
    return {
        s: (cosine(u8[f"s{i}"], u32[f"s{i}"]), rel_err(u8[f"s{i}"], u32[f"s{i}"]), int(r8[i]), int(r32[i]))
        for i, s in enumerate(scales)
    }


def test_int8_fidelity_small():
    """Fast variant: 64 x 64 factor, 100 EMA updates at rho 0.99.

    Measured: cosine >= 0.9994, relative error 2.8-3.5 %, rank 28 vs 28 at every scale.
    """
    res = _fidelity(64, 16, 100, 0.99, sf.spectral_mass_rank(0.05, 4, 32), (1e-4, 1.0, 1e4))
    for s, (cos, rel, k8, k32) in res.items():
        assert cos >= 0.999, (s, cos)
        assert rel <= 0.045, (s, rel)
        assert abs(k8 - k32) <= 0.15 * k32, (s, k8, k32)


FIDELITY_SCALES = (1e-4, 1e-2, 1.0, 1e2, 1e4)


@pytest.fixture(scope="module")
def fidelity_256():
    # The setup: 256 x 256 factor, 300 EMA updates, rho 0.999, spectral_mass_rank(0.05, 8, 128).
    return _fidelity(256, 64, 300, 0.999, sf.spectral_mass_rank(0.05, 8, 128), FIDELITY_SCALES)


@pytest.mark.slow
def test_int8_fidelity_256_cosine_and_rank(fidelity_256):
    """Measured (block 32): cosine 0.9984-0.9986, rank 112 vs 110 (fp32)."""
    for s, (cos, _rel, k8, k32) in fidelity_256.items():
        assert cos >= 0.998, (s, cos)
        assert abs(k8 - k32) <= 0.15 * k32, (s, k8, k32)


@pytest.mark.slow
def test_int8_fidelity_256_relative_error(fidelity_256):
    """Measured with the default block of 32: 5.64, 5.49, 5.35, 5.38, 5.33 % (block 64 gave 5.5-6.2 %,
    which is why the default is 32)."""
    for s, (_cos, rel, _k8, _k32) in fidelity_256.items():
        assert rel <= 0.06, (s, rel)


@pytest.mark.slow
def test_int8_fidelity_256_error_bound_observed(fidelity_256):
    """Regression guard a little below the target, at the observed level (mean 5.44 %)."""
    rels = [r[1] for r in fidelity_256.values()]
    assert sum(rels) / len(rels) <= 0.0575, rels


# --------------------------------------------------------------------------- compile


def _compile_setup():
    torch.manual_seed(0)
    params = {"w": torch.randn(8, 6), "w2": torch.randn(8, 6), "b": torch.randn(6), "tall": torch.randn(12, 3)}
    # int8 curvature (the default), refresh every 4 steps, ramp from step 2 to 5.
    tx = sf.scao(1e-2, form="seed", warmup_steps=2, blend_steps=3, min_precond_updates=0, precond_freq=4, rho=0.9,
                 epsilon_sparse=0.05, k_min=2, k_max=4, max_precond_dim=10, basis_storage="float32")
    grads = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(9)]
    state = tx.init(params)
    for g in grads[:2]:
        _, state = tx.update(clone(g), state, params=params, inplace=False)
    return tx, params, grads, state


def _check_compiled(backend, rtol, atol):
    tx, params, grads, state = _compile_setup()

    def step(g, s, p):
        return tx.update(g, s, params=p, inplace=False)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    eager_state = state
    # steps 3 (ramp), 4 (refresh), 5, 6, 7 (non-refresh), 8 (refresh): one graph for all of them
    # (error_on_recompile: the schedule never becomes a Python branch on a step value).
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(2, 8):
            c_up, c_state = compiled(clone(grads[t]), clone(eager_state), params)
            e_up, eager_state = step(clone(grads[t]), eager_state, params)
            assert_tree_close(c_up, e_up, rtol=rtol, atol=atol, msg=f"updates at step {t + 1}")
            assert_tree_close(c_state, eager_state, rtol=rtol, atol=atol, msg=f"state at step {t + 1}")
    assert int(chain_state(eager_state)[0].inner_state.refreshes) == 2


def test_compiled_step_fullgraph_matches_eager():
    """fullgraph=True: no graph break, hence no .item() / float(tensor) / data-dependent Python
    branch in the step (refresh steps go through torch.cond); aot_eager runs the traced graph."""
    _check_compiled("aot_eager", 0.0, 0.0)


@pytest.mark.slow
def test_compiled_step_inductor_matches_eager():
    # inductor fuses and reorders float arithmetic: agreement to float32 rounding.
    _check_compiled("inductor", 1e-5, 1e-6)


# --------------------------------------------------------------------------- grouping


def test_grouped_equals_per_leaf_training():
    torch.manual_seed(3)
    params = {f"l{i}": torch.randn(10, 8) for i in range(4)}
    params.update({"odd": torch.randn(8, 10), "bias": torch.randn(8)})
    targets = {k: torch.randn_like(v) for k, v in params.items()}

    def loss(p):
        return sum(((torch.tanh(p[k]) - targets[k]) ** 2).sum() for k in p)

    kw = fast_scao_kwargs(use_int8_ema=False)
    a, sa, _ = train(sf.scao(3e-2, grouped=True, **kw), params, loss, 40)
    b, sb, _ = train(sf.scao(3e-2, grouped=False, **kw), params, loss, 40)
    assert len(chain_state(sa)[0].inner_state.groups) == 2 and len(chain_state(sb)[0].inner_state.groups) == 5
    for k in params:
        assert rel_err(a[k], b[k]) < 1e-5, k
    assert rel_err(a["l0"], params["l0"]) > 1e-2


# --------------------------------------------------------------------------- checkpoints


def test_weights_only_checkpoint_round_trip_is_bit_identical():
    params, loss = mlp_problem(2)
    tx = sf.scao(1e-2, **fast_scao_kwargs(float32_below=0))  # int8 curvature on the small MLP's sides too
    params, state, _ = train(tx, params, loss, 23)  # past warmup, mid-way between refreshes
    buf = io.BytesIO()
    torch.save({"params": params, "state": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert_tree_close(loaded["state"], state)
    assert any(t.dtype == torch.int8 for t in tensor_leaves(loaded["state"]))

    def cont(p, s):
        for _ in range(12):  # crosses refreshes at steps 25, 30, 35
            g = torch.func.grad(loss)(p)
            u, s = tx.update(g, s, params=p)
            p = sf.apply_updates(p, u)
        return p, s

    p1, s1 = cont(clone(params), clone(state))
    p2, s2 = cont(loaded["params"], loaded["state"])
    assert_tree_close(p1, p2)
    assert_tree_close(s1, s2)


def test_state_structure_and_dtypes_stable_across_phases():
    """Warmup, ramp, refresh and plain steps all return a state of the same structure, dtypes,
    shapes and devices (int8 codes stay int8), and the counters are CPU int64."""
    params, loss = mlp_problem(4)
    tx = sf.scao(1e-2, **fast_scao_kwargs(float32_below=0))  # int8 codes on the small MLP's sides too
    state = tx.init(params)
    sig = [(t.dtype, t.shape, t.device) for t in tensor_leaves(state)]
    spec = structure(state)
    p = clone(params)
    for _ in range(26):
        u, state = tx.update(torch.func.grad(loss)(p), state, params=p)
        p = sf.apply_updates(p, u)
        assert structure(state) == spec
        assert [(t.dtype, t.shape, t.device) for t in tensor_leaves(state)] == sig
    kron = chain_state(state)[0].inner_state
    assert kron.count.dtype == torch.int64 and kron.count.device.type == "cpu"
    assert {t.dtype for t in tensor_leaves(kron.groups)} >= {torch.int8, torch.float32, torch.int64}


def test_inplace_and_out_of_place_steps_agree_and_inputs_untouched():
    params, loss = mlp_problem(5)
    tx = sf.scao(1e-2, **fast_scao_kwargs())
    s_in, s_out = tx.init(params), tx.init(params)
    p_in, p_out = clone(params), clone(params)
    for _ in range(22):
        g = torch.func.grad(loss)(p_out)
        g_keep, s_keep, p_keep = clone(g), clone(s_out), clone(p_out)
        u_out, s_out_new = tx.update(g, s_out, params=p_out, inplace=False)
        assert_tree_close(g, g_keep, msg="inplace=False changed the updates")
        assert_tree_close(s_out, s_keep, msg="inplace=False changed the state")
        assert_tree_close(p_out, p_keep, msg="inplace=False changed the params")
        u_in, s_in = tx.update(clone(g), s_in, params=p_in, inplace=True)
        assert_tree_close(u_in, u_out)
        s_out = s_out_new
        p_out = sf.apply_updates(p_out, u_out, inplace=False)
        p_in = sf.apply_updates(p_in, u_in)
    assert_tree_close(p_in, p_out)
    assert_tree_close(s_in, s_out)


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"rho": 1.0}, ValueError, "rho"),
        ({"k_min": 0}, ValueError, "k_min"),
        ({"k_min": 16, "k_max": 8}, ValueError, "k_max"),
        ({"precond_freq": 0}, ValueError, "precond_freq"),
        ({"complement": "foo"}, ValueError, "complement"),
        ({"graft": "bar"}, ValueError, "graft"),
        ({"tau": -1.0}, ValueError, "tau"),
        ({"block_size": 4}, ValueError, "block_size"),
        ({"epsilon_sparse": 1.0}, ValueError, "epsilon"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"blend_shape": "step"}, ValueError, "shape"),
        ({"use_int8_ema": "yes"}, TypeError, "use_int8_ema"),
        ({"epsilon_sparse": 0.1, "rank_eps": 0.2}, ValueError, "rank_eps"),
    ],
)
def test_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        sf.scao_precondition(**kwargs)
    with pytest.raises(exc, match=name):
        sf.scao(1e-3, **kwargs)


def test_bad_adam_arguments_and_wrong_tree():
    with pytest.raises(ValueError, match="lr"):
        sf.scao(-1.0)
    with pytest.raises(ValueError, match="betas"):
        sf.scao(1e-3, betas=(1.0, 0.999))
    tx = sf.scao(1e-3)
    params = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    state = tx.init(params)
    with pytest.raises(ValueError):
        tx.update({"w": torch.zeros(4, 3), "v": torch.zeros(5, 2), "b": torch.zeros(3)}, state, params=params)
    with pytest.raises(ValueError):
        tx.update({"w": torch.zeros(4, 3)}, state, params=params)
