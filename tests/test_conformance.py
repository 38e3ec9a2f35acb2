"""Conformance battery: every optimizer alias of the library passes every check here.

To register an optimizer, append an :class:`OptimizerEntry` to ``OPTIMIZERS``:

* ``factory(lr)`` builds the alias with test-friendly hyperparameters (small warmups, frequent
  refreshes, ...);
* ``links(lr)`` builds the same optimizer as the list of its links (the transforms the alias
  chains), which the battery applies one after the other by hand;
* the remaining fields have defaults that suit Adam-like optimizers; an entry can raise its step
  budgets, change its learning rates, or loosen a tolerance (say why in ``note``).

Every check is parametrized over the registry, so a new entry gets all of them.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Callable, Sequence

import pytest
import torch
from torch.func import grad
from treeutil import (
    assert_no_shared_storage,
    assert_tree_close,
    chain_state,
    clone,
    leaves,
    signature,
    tensor_leaves,
    versions,
)

import scao_fx as sf
from scao_fx.presets import SCAO_DEFAULTS


@dataclasses.dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer under test. Tolerances are ``(rtol, atol)`` pairs."""

    name: str
    factory: Callable[[float], sf.GradientTransformation]
    links: Callable[[float], Sequence[sf.GradientTransformation]]
    # Convergence on the quadratic: final loss <= quadratic_tol * initial loss.
    quadratic_lr: float = 0.1
    quadratic_steps: int = 300
    quadratic_tol: float = 1e-6
    # Convergence on 2-D Rosenbrock from (-1.5, 2): loss <= rosenbrock_tol, |x - (1, 1)| <= rosenbrock_dist.
    rosenbrock_lr: float = 0.05
    rosenbrock_steps: int = 2000
    rosenbrock_tol: float = 1e-3
    rosenbrock_dist: float = 3e-2
    # Steps run by the structural checks (dtype, state stability, inplace, chain equality, checkpoint).
    short_steps: int = 5
    # alias vs. hand-applied links, and inplace=True vs inplace=False: exact unless loosened.
    equality_tol: tuple[float, float] = (0.0, 0.0)
    # torch.compile(fullgraph=True) vs eager, float32 (inductor fuses and reorders arithmetic).
    compile_tol: tuple[float, float] = (1e-5, 1e-6)
    note: str = ""


#: SCAO with short phases, so a few steps cover warmup, ramp and several refreshes.
# the seed form, adaptive rank (up to 2), float32 bases
# (float32 moments here: the default's bfloat16 moments are the "scao-default" entry's)
SCAO_TEST_KW = dict(form="seed", warmup_steps=2, blend_steps=3, min_precond_updates=0, precond_freq=2, epsilon_sparse=0.05,
                    k_min=1, k_max=2, rho=0.9, basis_storage="float32")



def scao_links(lr):
    """The links of ``sf.scao(lr, (0.9, 0.999), weight_decay=1e-4, moments="float32", **SCAO_TEST_KW)``, applied one by one."""
    return [sf.scao_precondition(**SCAO_TEST_KW), sf.scale_by_adam(), sf.add_decayed_weights(1e-4), sf.scale_by_learning_rate(lr)]


OPTIMIZERS: list[OptimizerEntry] = [
    OptimizerEntry(
        name="adam",
        factory=lambda lr: sf.adam(lr, betas=(0.9, 0.999), eps=1e-8),
        links=lambda lr: [sf.scale_by_adam(0.9, 0.999, 1e-8), sf.add_decayed_weights(0.0), sf.scale_by_learning_rate(lr)],
    ),
    OptimizerEntry(
        name="adamw",
        factory=lambda lr: sf.adamw(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4),
        links=lambda lr: [sf.scale_by_adam(0.9, 0.999, 1e-8), sf.add_decayed_weights(1e-4), sf.scale_by_learning_rate(lr)],
    ),
    OptimizerEntry(
        name="adamw-schedule",
        factory=lambda lr: sf.adamw(sf.schedules.warmup_cosine_decay(lr, 10, 5000, init=lr / 10), weight_decay=1e-4),
        links=lambda lr: [
            sf.scale_by_adam(),
            sf.add_decayed_weights(1e-4),
            sf.scale_by_learning_rate(sf.schedules.warmup_cosine_decay(lr, 10, 5000, init=lr / 10)),
        ],
    ),
    OptimizerEntry(
        name="scao",
        factory=lambda lr: sf.scao(lr, (0.9, 0.999), weight_decay=1e-4, moments="float32", **SCAO_TEST_KW),
        links=scao_links,
        # The blend and the Kronecker products run in float32 whatever the parameter dtype.
        compile_tol=(1e-4, 1e-6),
        note="short warmup/ramp and frequent refreshes so the battery exercises preconditioning",
    ),
    OptimizerEntry(
        name="scao-deferred-guard",
        factory=lambda lr: sf.scao(lr, (0.9, 0.999), weight_decay=1e-4, host_sync=False, moments="float32", **SCAO_TEST_KW),
        links=scao_links,
        compile_tol=(1e-4, 1e-6),
        note="the guard's accelerator path (out-of-place chain, torch.where selection), run on the CPU",
    ),
    OptimizerEntry(
        name="scao-fp32-fullrank",
        factory=lambda lr: sf.chain(
            sf.blend_ramp(
                sf.kronecker_precondition(
                    curvature=sf.curvature_ema(0.95, codec=sf.fp32_codec()), rank=sf.full_rank(), precond_freq=3
                ),
                warmup_steps=2,
                blend_steps=0,
            ),
            sf.adamw(lr, weight_decay=1e-4),
        ),
        links=lambda lr: [
            sf.blend_ramp(
                sf.kronecker_precondition(
                    curvature=sf.curvature_ema(0.95, codec=sf.fp32_codec()), rank=sf.full_rank(), precond_freq=3
                ),
                warmup_steps=2,
                blend_steps=0,
            ),
            sf.scale_by_adam(),
            sf.add_decayed_weights(1e-4),
            sf.scale_by_learning_rate(lr),
        ],
        compile_tol=(1e-4, 1e-6),
        note="the ablation without int8 and without rank truncation, hard switch",
    ),
    OptimizerEntry(
        name="soap",
        factory=lambda lr: sf.soap(lr, betas=(0.9, 0.999), weight_decay=1e-4, precond_freq=2, shampoo_beta=0.95),
        links=lambda lr: [
            sf.kronecker_eigenbasis(
                sf.scale_by_adam(0.9, 0.999), curvature=sf.curvature_ema(0.95, codec=sf.fp32_codec()),
                rank=sf.full_rank(), precond_freq=2, max_precond_dim=10000, eigensolver="power", skip_first=True,
            ),
            sf.add_decayed_weights(1e-4),
            sf.scale_by_learning_rate(lr),
        ],
        compile_tol=(1e-4, 1e-6),
        note="Adam in the eigenbases of full-rank fp32 factors, power-iteration refresh every 2 steps, step 1 zero",
    ),
    OptimizerEntry(
        name="scao-default",
        factory=lambda lr: sf.scao(lr, weight_decay=1e-4, precond_freq=2, rho=0.9),
        links=lambda lr: [
            sf.kronecker_eigenbasis(
                sf.scale_by_adam(*SCAO_DEFAULTS["betas"], factored=True),
                curvature=sf.curvature_ema(0.9, basis_dtype=torch.bfloat16, float32_below=SCAO_DEFAULTS["float32_below"]),
                rank=sf.full_rank(), precond_freq=2, eigensolver="eigh", skip_first=True,
                rotation_precision=SCAO_DEFAULTS["rotation_precision"], max_precond_dim=SCAO_DEFAULTS["max_precond_dim"],
                leafwise_inner=True, moment_codecs=sf.bf16_adam_codecs(),
            ),
            sf.add_decayed_weights(1e-4),
            sf.scale_by_learning_rate(lr),
        ],
        # beta2 = 0.95 leaves a noise floor at a constant learning rate: quadratic 2.8e-5 of the
        # start, Rosenbrock 2.0e-3 (with betas (0.9, 0.999): 1.7e-7 and 1.0e-7)
        quadratic_tol=1e-4,
        rosenbrock_tol=5e-3,
        compile_tol=(1e-4, 1e-6),
        note="SCAO's defaults: Adam in the eigenbases of int8 factors, bfloat16 bases, rotations and moments, every "
             "direction, step 1 zero (the test matrices' sides are under float32_below and their moments under 4096 entries: "
             "float32 factors, bases, rotations and moments; their sides under 128: a full second moment)",
    ),
    OptimizerEntry(
        name="scao-eigenbasis",
        factory=lambda lr: sf.scao(lr, (0.9, 0.999), weight_decay=1e-4, form="eigenbasis", precond_freq=2,
                                   epsilon_sparse=0.05, k_min=1, k_max=2, rho=0.9, basis_storage="float32",
                                   float32_below=0, skip_first=False, moments="float32"),
        links=lambda lr: [
            sf.kronecker_eigenbasis(
                sf.scale_by_adam(), curvature=sf.curvature_ema(0.9), rank=sf.spectral_mass_rank(0.05, 1, 2),
                precond_freq=2,
            ),
            sf.add_decayed_weights(1e-4),
            sf.scale_by_learning_rate(lr),
        ],
        compile_tol=(1e-4, 1e-6),
        note="int8 factors, adaptive rank 1-2 (the complement in use), refreshed every 2 steps",
    ),
]

def adam_factored_links(lr):
    """Adam with Adafactor's factored second moment on every matrix (the test leaves are small, so
    ``factored_min_dim=2``), as the links of a chain."""
    return [sf.scale_by_adam(factored=True, factored_min_dim=2), sf.add_decayed_weights(1e-4), sf.scale_by_learning_rate(lr)]


def eigenbasis_factored_links(lr):
    """``sf.scao(second_moment="factored", moments="int8")``'s links with ``factored_min_dim=2``:
    the rotated cores' second moments factored, the moments stored in int8 (the test leaves are
    under 4096 entries: float32 in fact)."""
    return [
        sf.kronecker_eigenbasis(
            sf.scale_by_adam(*SCAO_DEFAULTS["betas"], factored=True, factored_min_dim=2),
            curvature=sf.curvature_ema(0.9, basis_dtype=torch.bfloat16), rank=sf.full_rank(), precond_freq=2,
            eigensolver="eigh", skip_first=True, leafwise_inner=True,
            moment_codecs=sf.int8_adam_codecs(),
        ),
        sf.add_decayed_weights(1e-4),
        sf.scale_by_learning_rate(lr),
    ]


OPTIMIZERS += [
    OptimizerEntry(
        name="adam-factored",
        factory=lambda lr: sf.chain(*adam_factored_links(lr)),
        links=adam_factored_links,
        note="the quadratic's curvature is rank one (logspace reshaped), which the factored estimate models exactly",
    ),
    OptimizerEntry(
        name="scao-eigenbasis-factored",
        factory=lambda lr: sf.chain(*eigenbasis_factored_links(lr)),
        links=eigenbasis_factored_links,
        quadratic_tol=1e-4,
        rosenbrock_tol=5e-3,
        compile_tol=(1e-4, 1e-6),
        note="as scao-default (beta2 = 0.95's noise floor), with the factored second moment",
    ),
]


def muon_links(lr):
    """The links of ``sf.muon(lr, weight_decay=1e-4)`` as masked links applied one by one (AdamW's
    links first: the alias's ``PartitionState`` lists its labels sorted, "adamw" before "muon")."""
    def is_matrix(p):
        return {k: v.ndim >= 2 for k, v in p.items()}

    def is_vector(p):
        return {k: v.ndim < 2 for k, v in p.items()}

    return [
        sf.masked(sf.scale_by_adam(), is_vector),
        sf.add_decayed_weights(1e-4, mask=is_vector),
        sf.masked(sf.scale_by_learning_rate(lr), is_vector),
        sf.masked(sf.scale_by_momentum(0.95, nesterov=True), is_matrix),
        sf.masked(sf.scale_by_newton_schulz(), is_matrix),
        sf.add_decayed_weights(1e-4, mask=is_matrix),
        sf.masked(sf.scale_by_learning_rate(lr), is_matrix),
    ]


OPTIMIZERS.append(
    OptimizerEntry(
        name="muon",
        factory=lambda lr: sf.muon(lr, weight_decay=1e-4),
        links=muon_links,
        quadratic_lr=0.02,
        quadratic_steps=300,
        quadratic_tol=1e-3,
        # The orthogonalisation runs in bfloat16 (as torch.optim.Muon): inductor's kernels round
        # some entries one bf16 ulp apart, amplified by five iterations; 1e-3 is a tenth of the
        # per-entry step size at lr = 1e-2.
        compile_tol=(2e-2, 1e-3),
        note="orthogonalised steps have a fixed size (lr per singular direction, bf16): a constant "
        "learning rate stalls at a loss set by lr, not at 1e-6",
    )
)

ENTRIES = pytest.mark.parametrize("entry", OPTIMIZERS, ids=[e.name for e in OPTIMIZERS])


# ---------------------------------------------------------------- problems and loops


def quadratic_problem(dtype=torch.float64):
    """An ill-conditioned separable quadratic over a dict with a matrix and a vector leaf."""
    gen = torch.Generator().manual_seed(0)
    curv = {"w": torch.logspace(0, 1, 12, dtype=dtype).reshape(4, 3), "b": torch.linspace(1, 10, 3, dtype=dtype)}
    target = {"w": torch.randn(4, 3, generator=gen, dtype=dtype), "b": torch.randn(3, generator=gen, dtype=dtype)}

    def loss(p):
        return sum((curv[k] * (p[k] - target[k]) ** 2).sum() for k in ("w", "b"))

    params = {"w": torch.zeros(4, 3, dtype=dtype), "b": torch.zeros(3, dtype=dtype)}
    return loss, params


def rosenbrock(p):
    x = p["xy"]
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def run(tx, params, loss, steps, *, inplace=True):
    state = tx.init(params)
    for _ in range(steps):
        g = grad(loss)(params)
        updates, state = tx.update(g, state, params=params, inplace=inplace)
        params = sf.apply_updates(params, updates, inplace=inplace)
    return params, state


def grads_sequence(params, n, seed=1):
    """``n`` deterministic pseudo-gradient trees shaped like ``params``."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {k: torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.dtype) for k, v in params.items()}
        for _ in range(n)
    ]


def small_params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(2)
    return {
        "w": torch.randn(5, 4, generator=gen, dtype=torch.float64).to(dtype),
        "b": torch.randn(4, generator=gen, dtype=torch.float64).to(dtype),
        "s": torch.randn((), generator=gen, dtype=torch.float64).to(dtype),
    }


def step_by_links(links, states, g, params, inplace):
    new_states = []
    for link, s in zip(links, states):
        g, s = link.update(g, s, params=params, inplace=inplace)
        new_states.append(s)
    return g, new_states


# ---------------------------------------------------------------- checks


@ENTRIES
def test_converges_on_quadratic(entry):
    loss, params = quadratic_problem()
    start = loss(params).item()
    params, _ = run(entry.factory(entry.quadratic_lr), params, loss, entry.quadratic_steps)
    assert loss(params).item() <= entry.quadratic_tol * start


@ENTRIES
def test_converges_on_rosenbrock(entry):
    params = {"xy": torch.tensor([-1.5, 2.0], dtype=torch.float64)}
    params, _ = run(entry.factory(entry.rosenbrock_lr), params, rosenbrock, entry.rosenbrock_steps)
    assert rosenbrock(params).item() <= entry.rosenbrock_tol
    assert (params["xy"] - 1).abs().max().item() <= entry.rosenbrock_dist


@ENTRIES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_param_dtype_preserved_and_state_stable(entry, dtype):
    params = small_params(dtype)
    tx = entry.factory(1e-2)
    state = tx.init(params)
    sig0 = signature(state)
    for g in grads_sequence(params, entry.short_steps):
        updates, state = tx.update(g, state, params=params)
        assert signature(updates) == signature(params), "updates must have the params' shapes and dtypes"
        assert signature(state) == sig0, "state structure/dtypes/shapes changed across steps"
        params = sf.apply_updates(params, updates)
        assert all(p.dtype == dtype for p in tensor_leaves(params))
    assert all(torch.isfinite(p.float()).all() for p in tensor_leaves(params))


@ENTRIES
def test_inplace_true_and_false_agree(entry):
    params0 = small_params(torch.float32)
    gs = grads_sequence(params0, entry.short_steps)
    tx = entry.factory(1e-2)
    results = {}
    for inplace in (True, False):
        params, state = clone(params0), tx.init(params0)
        ups = []
        for g in gs:
            updates, state = tx.update(clone(g), state, params=params, inplace=inplace)
            ups.append(clone(updates))
            params = sf.apply_updates(params, updates, inplace=inplace)
        results[inplace] = (ups, state, params)
    rtol, atol = entry.equality_tol
    assert_tree_close(results[False], results[True], rtol=rtol, atol=atol, msg="inplace=False vs True")


@ENTRIES
def test_inplace_false_mutates_nothing(entry):
    params = small_params(torch.float32)
    tx = entry.factory(1e-2)
    gs = grads_sequence(params, entry.short_steps)
    state = tx.init(params)
    for g in gs:
        before = clone((g, state, params))
        vers = versions((g, state, params))
        updates, new_state = tx.update(g, state, params=params, inplace=False)
        assert versions((g, state, params)) == vers, "an input tensor was written in place"
        assert_tree_close((g, state, params), before, msg="inputs changed by inplace=False")
        new_params = sf.apply_updates(params, updates, inplace=False)
        assert_tree_close(params, before[2], msg="apply_updates(inplace=False) changed params")
        state, params = new_state, new_params


@ENTRIES
@pytest.mark.parametrize("inplace", [True, False])
def test_updates_never_alias_state(entry, inplace):
    params = small_params(torch.float32)
    tx = entry.factory(1e-2)
    state = tx.init(params)
    for g in grads_sequence(params, entry.short_steps):
        updates, state = tx.update(g, state, params=params, inplace=inplace)
        assert_no_shared_storage(updates, state, msg="returned updates alias state")
        assert_no_shared_storage(updates, params, msg="returned updates alias params")
        # A later in-place link (torchopt's, for instance) scribbling on the updates must not
        # reach the state.
        saved = clone(state)
        for u in tensor_leaves(updates):
            u.mul_(1e3)
        assert_tree_close(state, saved, msg="writing into updates changed the state")


@ENTRIES
def test_none_leaves_pass_through(entry):
    params = small_params(torch.float32)
    params["frozen"] = torch.ones(3)  # the only leaf of shape (3,)
    tx = entry.factory(1e-2)
    state = tx.init(params)
    gs = grads_sequence(params, entry.short_steps + 1)
    # One ordinary step first, so that the frozen leaf's state is not trivially zero.
    updates, state = tx.update(gs[0], state, params=params)
    params = sf.apply_updates(params, updates)
    frozen_param, before = params["frozen"].clone(), clone(state)
    for g in gs[1:]:
        g["frozen"] = None
        updates, state = tx.update(g, state, params=params)
        assert updates["frozen"] is None
        params = sf.apply_updates(params, updates)
    assert torch.equal(params["frozen"], frozen_param)
    moved, checked = 0, 0
    for old, now in zip(tensor_leaves(before), tensor_leaves(state)):
        if now.shape == (3,):
            checked += 1
            assert torch.equal(now, old), "state of a leaf without gradient changed"
        else:
            moved += not torch.equal(now, old)
    assert checked > 0, "no state entry shaped like the frozen leaf"
    assert moved > 0, "the state of the leaves with gradients never changed"


@ENTRIES
@pytest.mark.parametrize("inplace", [True, False])
def test_alias_equals_its_links_applied_by_hand(entry, inplace):
    params = small_params(torch.float64)
    alias, links = entry.factory(1e-2), list(entry.links(1e-2))
    a_state, a_params = alias.init(params), clone(params)
    l_states, l_params = [link.init(params) for link in links], clone(params)
    rtol, atol = entry.equality_tol
    for g in grads_sequence(params, entry.short_steps):
        a_up, a_state = alias.update(clone(g), a_state, params=a_params, inplace=inplace)
        l_up, l_states = step_by_links(links, l_states, clone(g), l_params, inplace)
        assert_tree_close(a_up, l_up, rtol=rtol, atol=atol, msg="alias vs links: updates")
        a_params = sf.apply_updates(a_params, a_up, inplace=inplace)
        l_params = sf.apply_updates(l_params, l_up, inplace=inplace)
    # apply_if_finite (around the scao alias) adds skip counters but never changes the chain's state
    assert_tree_close(
        leaves(chain_state(a_state)), leaves(tuple(l_states)), rtol=rtol, atol=atol, msg="alias vs links: state"
    )


@ENTRIES
def test_compiled_update_matches_eager(entry):
    params = small_params(torch.float32)
    tx = entry.factory(1e-2)
    state = tx.init(params)
    gs = grads_sequence(params, 2)
    # Move past the first step so that the compiled step sees a non-trivial state.
    _, state = tx.update(clone(gs[0]), state, params=params, inplace=False)

    def step(g, s, p):
        return tx.update(g, s, params=p, inplace=False)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    c_up, c_state = compiled(clone(gs[1]), clone(state), clone(params))
    e_up, e_state = step(clone(gs[1]), clone(state), clone(params))
    rtol, atol = entry.compile_tol
    assert_tree_close(c_up, e_up, rtol=rtol, atol=atol, msg="compiled vs eager updates")
    assert_tree_close(c_state, e_state, rtol=rtol, atol=atol, msg="compiled vs eager state")


@ENTRIES
def test_checkpoint_roundtrip_weights_only(entry):
    params = small_params(torch.float32)
    tx = entry.factory(1e-2)
    gs = grads_sequence(params, 2 * entry.short_steps)
    state = tx.init(params)
    for g in gs[: entry.short_steps]:
        updates, state = tx.update(g, state, params=params)
        params = sf.apply_updates(params, updates)
    buf = io.BytesIO()
    torch.save({"state": state, "params": params}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert_tree_close(loaded["state"], state, msg="state after torch.load")
    assert type(loaded["state"]) is type(state)
    assert [type(x) for x in leaves(loaded["state"])] == [type(x) for x in leaves(state)]
    # Resuming from the loaded state gives exactly the uninterrupted run.
    p_a, s_a = params, state
    p_b, s_b = loaded["params"], loaded["state"]
    for g in gs[entry.short_steps :]:
        u_a, s_a = tx.update(clone(g), s_a, params=p_a)
        p_a = sf.apply_updates(p_a, u_a)
        u_b, s_b = tx.update(clone(g), s_b, params=p_b)
        p_b = sf.apply_updates(p_b, u_b)
    assert_tree_close(p_b, p_a, msg="resumed run differs")


def test_registry_is_well_formed():
    names = [e.name for e in OPTIMIZERS]
    assert len(names) == len(set(names)), "duplicate registry names"
    # Every optimizer alias exported by the library is registered.
    for alias in ("adam", "adamw", "muon", "soap", "scao-eigenbasis"):
        assert alias in names
