"""Reliability (issue #7): adversarial gradients and hyperparameters, bad arguments, wrong trees,
exact resume at any step, determinism, and no memory growth.

Everything goes through the public API (``sf.scao`` + ``sf.apply_updates``, and the ``sf.SCAO``
facade), so the suite covers whatever the aliases are built from (``apply_if_finite`` included).
State is never indexed by position: invariants are checked on every tensor leaf of the state.

The adversarial parts count the cases they run; ``pytest -s`` prints the totals at the end of
the module (the numbers quoted in ``docs/reliability.md``).
"""

from __future__ import annotations

import collections
import math

import optree
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_optim import save_load, scao_model, train_step
from treeutil import assert_tree_close, clone, signature, tensor_leaves

import scao_fx as sf
from scao_fx._tree import find_nodes
from scao_fx.transforms.adam import ScaleByAdamState

CASES: collections.Counter = collections.Counter()  # adversarial cases run, by kind
STEPS_RUN: collections.Counter = collections.Counter()  # optimizer steps checked, by kind


@pytest.fixture(autouse=True, scope="module")
def _single_thread_and_report():
    """Tiny problems on a shared 2-core machine: one intra-op thread (restored after); print the
    adversarial case counts at the end."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    if CASES:
        total = sum(CASES.values())
        print(f"\n[reliability] adversarial cases: {total} ({dict(CASES)}); steps checked: {sum(STEPS_RUN.values())}")


FAST_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# =============================================================================================
# 1. Adversarial gradients, shapes, dtypes and hyperparameters

#: Leaves of every kind: 0-d, 1-d, matrices (two of equal shape: a stacked group), dims of 1,
#: 3-d and 4-d (viewed as matrices), one side above ``max_precond_dim`` (one-sided), both sides
#: above it (not preconditioned), and a leaf that never gets a gradient.
SHAPES = {
    "scalar": (),
    "vec": (5,),
    "mat_a": (6, 5),
    "mat_b": (6, 5),
    "col": (7, 1),
    "row": (1, 7),
    "cube": (3, 2, 4),
    "conv": (4, 2, 2, 2),
    "long": (3, 12),
    "huge": (12, 10),
    "nograd": (4, 4),
}
#: A short schedule that reaches the preconditioned phase: refresh every 2 steps, ramp over 3.
FAST = dict(
    form="seed", lr=1e-2, rho=0.9, warmup_steps=2, blend_steps=3, min_precond_updates=0, precond_freq=2, k_min=1, k_max=4,
    max_precond_dim=8,
)
ADV_STEPS = 12
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
#: Huge gradients that are still processed: below sf.square_safe_bound of every leaf here
#: (float32 statistics for float32/bfloat16/float16 parameters, float64 ones for float64);
#: float16 gradients themselves stop at 65504 (1e4 * randn).
HUGE = {torch.float64: 1e30, torch.float32: 1e16, torch.bfloat16: 1e16, torch.float16: 1e4}
#: Gradients whose squares overflow the statistics (1e30 is inf in float16): the guard skips them.
OVERFLOW = {torch.float64: 1e200, torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 1e30}
TINY = 1e-30
KINDS = ["random", "zero", "rank1", "tiny", "huge", "alternating", "none"]


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}


def gradient(kind: str, shape, dtype, step: int, seed: int):
    """One adversarial gradient (``None`` for kind ``"none"``)."""
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "zero":
        return torch.zeros(shape, dtype=dtype)
    if kind == "alternating":  # one fixed direction whose sign flips every step
        return (torch.randn(shape, generator=g) * (-1.0) ** step).to(dtype)
    if kind == "rank1" and len(shape) >= 2:
        u, v = torch.randn(shape[0], generator=g), torch.randn(math.prod(shape[1:]), generator=g)
        return torch.outer(u, v).reshape(shape).to(dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1000 + step))
    scale = {"tiny": TINY, "huge": HUGE[dtype], "overflow": OVERFLOW[dtype]}.get(kind, 1.0)
    return (x.double() * scale).to(dtype)


def grads_for(params, kinds, step):
    """Gradients for one step; ``kinds`` maps leaf name -> kind (``"nograd"`` never gets one)."""
    out = {}
    for i, (name, p) in enumerate(params.items()):
        kind = "none" if name == "nograd" else kinds(name, step)
        out[name] = gradient(kind, tuple(p.shape), p.dtype, step, seed=i + 1)
    return out


def assert_finite_and_stable(params, state, ref_params_sig, ref_state_sig, *, where: str):
    """The invariant of every step: finite parameters and state tensors, unchanged signatures."""
    for name, p in params.items():
        assert torch.isfinite(p).all(), f"{where}: parameter {name} not finite"
    paths = optree.tree_paths(state, none_is_leaf=True)
    for path, x in zip(paths, optree.tree_leaves(state, none_is_leaf=True)):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            assert torch.isfinite(x).all(), f"{where}: state leaf {path} ({x.dtype}, {tuple(x.shape)}) not finite"
    assert signature(params) == ref_params_sig, f"{where}: parameter shapes/dtypes changed"
    if ref_state_sig is not None:
        assert signature(state) == ref_state_sig, f"{where}: state structure/shapes/dtypes changed"


def run_functional(kw, dtype, kinds, steps=ADV_STEPS, seed=0):
    """Train ``make_params`` with ``sf.scao(**kw)`` on adversarial gradients, checking every step."""
    params = make_params(dtype, seed)
    tx = sf.scao(**kw)
    state = tx.init(params)
    p_sig, s_sig = signature(params), signature(state)
    for t in range(steps):
        updates, state = tx.update(grads_for(params, kinds, t), state, params=params)
        params = sf.apply_updates(params, updates)
        assert_finite_and_stable(params, state, p_sig, s_sig, where=f"functional step {t + 1}")
    STEPS_RUN["functional"] += steps
    return params, state


def run_facade(kw, dtype, kinds, steps=ADV_STEPS, seed=0):
    """The same through ``sf.SCAO``: gradients written to ``.grad``, ``opt.step()``."""
    params = {k: torch.nn.Parameter(v) for k, v in make_params(dtype, seed).items()}
    opt = sf.SCAO(list(params.items()), **kw)
    p_sig, s_sig = signature(dict(params)), None
    for t in range(steps):
        for name, g in grads_for(params, kinds, t).items():
            params[name].grad = g
        opt.step()
        state = opt.functional_state(0)
        if state is not None and s_sig is None:
            s_sig = signature(state)
        assert_finite_and_stable(dict(params), state, p_sig, s_sig, where=f"facade step {t + 1}")
    STEPS_RUN["facade"] += steps
    return params, opt


RUNNERS = {"functional": run_functional, "facade": run_facade}


def uniform(kind):
    return lambda name, step: kind


def cycling(name, step):
    """Every leaf sees every kind over the run, and every step mixes kinds across leaves."""
    return KINDS[(list(SHAPES).index(name) + step) % len(KINDS)]


@pytest.mark.parametrize("api", RUNNERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS + ["cycling"])
def test_adversarial_gradients_every_dtype(api, dtype, kind):
    """Each gradient kind on every leaf kind, for each parameter dtype, through both APIs."""
    CASES["gradient x dtype"] += 1
    params, state = RUNNERS[api](FAST, dtype, cycling if kind == "cycling" else uniform(kind))
    if api == "facade":
        params, state = dict(params), state.functional_state(0)
    if state is not None:  # None: the facade never stepped (no gradient at all)
        phases = {r["phase"] for r in sf.scao_diagnostics(state, names=list(params)).values()}
        assert "precond" in phases  # the preconditioned phase was really reached


@pytest.mark.parametrize("api", RUNNERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adversarial_overflowing_gradients_are_skipped(api, dtype):
    """Gradients of 1e30 (1e200 for float64): their squares overflow the statistics, so every
    step is skipped: parameters never move, state stays finite, every skip is counted."""
    CASES["gradient x dtype"] += 1
    kw = dict(FAST, max_consecutive_skips=ADV_STEPS + 1)
    params, out = RUNNERS[api](kw, dtype, uniform("overflow"))
    skipped = out.skipped_steps() if api == "facade" else sf.skipped_steps(out)
    assert skipped == ADV_STEPS
    for name, p in make_params(dtype).items():
        assert torch.equal(params[name], p), name


#: Hyperparameters at the edges of their valid ranges (each is merged into FAST).
EDGES = {
    "lr=0": dict(lr=0.0),
    "lr=1": dict(lr=1.0),
    "betas=0": dict(betas=(0.0, 0.0)),
    "betas->1": dict(betas=(1 - 1e-7, 1 - 1e-7)),
    "eps=0": dict(eps=0.0),
    "eps=1e10": dict(eps=1e10),
    "weight_decay=0": dict(weight_decay=0.0),
    "weight_decay=1": dict(weight_decay=1.0),
    "rho=0": dict(rho=0.0),
    "rho->1": dict(rho=1 - 1e-7),
    "precond_freq=1": dict(precond_freq=1),
    "precond_freq>steps": dict(precond_freq=10**6),
    "warmup=0,blend=0": dict(warmup_steps=0, blend_steps=0),
    "warmup>steps": dict(warmup_steps=10**6),
    "min_precond_updates only": dict(warmup_steps=0, min_precond_updates=5),
    "epsilon_sparse=0": dict(epsilon_sparse=0.0),
    "epsilon_sparse->1": dict(epsilon_sparse=1 - 1e-7),
    "k_max=1": dict(k_min=1, k_max=1),
    "k_min=k_max>dims": dict(k_min=64, k_max=64),
    "max_precond_dim=2": dict(max_precond_dim=2),
    "tikhonov=0": dict(tikhonov=0.0),
    "tikhonov=1e6": dict(tikhonov=1e6),
    "block_size=8": dict(block_size=8),
    "fp32 curvature": dict(use_int8_ema=False),
    "complement=kth": dict(complement="kth"),
    "complement=none": dict(complement="none"),
    "graft=none": dict(graft="none"),
    "graft=none,tau tiny": dict(graft="none", tau=1e-12),
    "graft=none,tau=inf": dict(graft="none", tau=math.inf),
    "cosine ramp": dict(blend_shape="cosine"),
    "eigensolver=eigh": dict(eigensolver="eigh"),
    "eigensolver=subspace": dict(eigensolver="subspace"),
    "sides=wide": dict(sides="wide"),
    "grouped=False": dict(grouped=False),
}


@pytest.mark.parametrize("api", RUNNERS)
@pytest.mark.parametrize("edge", EDGES)
def test_adversarial_hyperparameter_edges(api, edge):
    """Each hyperparameter at an edge of its valid range, on mixed adversarial gradients."""
    CASES["hyperparameter edge"] += 1
    RUNNERS[api]({**FAST, **EDGES[edge]}, torch.float32, cycling)


_EDGE_CHOICES = {
    "lr": [1e-2, 0.0, 1.0],
    "betas": [(0.9, 0.999), (0.0, 0.0), (1 - 1e-7, 1 - 1e-7)],
    "eps": [1e-8, 0.0, 1e10],
    "weight_decay": [0.01, 0.0, 1.0],
    "rho": [0.9, 0.0, 1 - 1e-7],
    "precond_freq": [2, 1, 10**6],
    "warmup_steps": [2, 0, 10**6],
    "blend_steps": [3, 0],
    "min_precond_updates": [0, 5],
    "epsilon_sparse": [0.05, 0.0, 1 - 1e-7],
    "k_min,k_max": [(1, 4), (1, 1), (64, 64), (3, 10**6)],
    "max_precond_dim": [8, 2, 10**6],
    "tikhonov": [1e-4, 0.0, 1e6],
    "use_int8_ema": [True, False],
    "block_size": [32, 8],
    "complement": ["mean_tail", "kth", "none"],
    "graft,tau": [("frobenius", None), ("none", None), ("none", 1e-12), ("none", math.inf)],
    "blend_shape": ["linear", "cosine"],
    "eigensolver": ["auto", "eigh", "subspace"],
    "sides": ["both", "wide"],
    "grouped": [True, False],
}


@st.composite
def adversarial_case(draw):
    kw = {"form": "seed"}  # the seed form: the edges below include its own keywords
    for key, values in _EDGE_CHOICES.items():
        value = draw(st.sampled_from(values))
        kw.update(zip(key.split(","), value) if "," in key else [(key, value)])
    dtype = draw(st.sampled_from(DTYPES))
    steps = draw(st.integers(1, 14))
    table = draw(st.lists(st.sampled_from(KINDS), min_size=len(SHAPES) * steps, max_size=len(SHAPES) * steps))
    seed = draw(st.integers(0, 2**16))
    return kw, dtype, steps, table, seed


@pytest.mark.slow
@pytest.mark.parametrize("api", RUNNERS)
@settings(max_examples=60, **FAST_SETTINGS)
@given(case=adversarial_case())
def test_adversarial_random_combinations(api, case):
    """Random combinations: every hyperparameter drawn from its edges, a random dtype, and a
    random gradient kind per leaf and step."""
    kw, dtype, steps, table, seed = case
    names = list(SHAPES)
    CASES["random combination"] += 1
    RUNNERS[api](kw, dtype, lambda name, step: table[step * len(names) + names.index(name)], steps, seed)


def test_gradient_beyond_float32_square_range():
    """Gradients of 1e30 on float32 parameters: their squares (1e60) exceed float32.

    With the guard (default) those steps are skipped and counted (they would otherwise leave
    Adam's float32 second moment at inf for good, as torch.optim.AdamW's is); training then goes
    on from an untouched, finite state. Without it (``skip_nonfinite=False``) the bare chain
    still never produces a NaN or a non-finite parameter, the curvature statistics stay finite
    (an overflowing Gram matrix adds nothing), and only Adam's second moment saturates.
    Regression: before the fix, the preconditioner's float32 norms overflowed and the
    parameters became NaN from the 4th step on."""
    CASES["beyond float32 range"] += 1
    kinds = lambda name, step: "random" if step >= 6 else "huge"  # noqa: E731
    for guarded in (True, False):
        params = make_params(torch.float32)
        tx = sf.scao(**FAST, skip_nonfinite=guarded)
        state = tx.init(params)
        saturated = set()
        for t in range(12):
            grads = grads_for(params, kinds, t)
            if t < 6:
                grads = {k: None if g is None else g * 1e14 for k, g in grads.items()}  # 1e30
            updates, state = tx.update(grads, state, params=params)
            params = sf.apply_updates(params, updates)
            nu_ids = {id(x) for node in find_nodes(state, ScaleByAdamState) for x in tensor_leaves(node.nu)}
            for name, p in params.items():
                assert torch.isfinite(p).all(), f"step {t + 1}: {name}"
            for x in tensor_leaves(state):
                if x.is_floating_point():
                    assert not torch.isnan(x).any(), f"step {t + 1}: NaN in the state"
                    if not torch.isfinite(x).all():
                        assert id(x) in nu_ids, f"step {t + 1}: a non-finite state tensor outside Adam's second moment"
                        saturated.add(id(x))
        if guarded:
            assert not saturated and sf.skipped_steps(state) == 6
        else:
            assert saturated  # the bare chain's limitation is real (documented), not hidden


def test_float64_gradients_far_beyond_float32_range():
    """float64 parameters with gradients of 1e120 (whose float32 cast alone is inf): the
    preconditioner works on power-of-two-normalized gradients, so everything stays finite and
    the preconditioned phase really runs. Regression for NaN parameters at gradient scale 1e30."""
    CASES["float64 1e120"] += 1
    params = make_params(torch.float64)
    tx = sf.scao(**FAST)
    state = tx.init(params)
    p_sig, s_sig = signature(params), signature(state)
    for t in range(ADV_STEPS):
        grads = grads_for(params, uniform("random"), t)
        grads = {k: None if g is None else g * 1e120 for k, g in grads.items()}
        updates, state = tx.update(grads, state, params=params)
        params = sf.apply_updates(params, updates)
        assert_finite_and_stable(params, state, p_sig, s_sig, where=f"step {t + 1}")
    assert sf.scao_diagnostics(state, names=list(params))["mat_a"]["phase"] == "precond"


@pytest.mark.parametrize("inplace", [True, False])
def test_adam_with_eps_zero_gives_zero_not_nan_on_a_zero_coordinate(inplace):
    """Regression: eps=0 (valid) turned a coordinate whose gradients were all zero into 0/0 = NaN.
    Elsewhere the result is still exactly torch.optim.Adam(eps=0)'s."""
    w = torch.tensor([1.0, 2.0, -3.0])
    g = torch.tensor([0.0, 0.5, -1e-3])
    tx = sf.adam(1e-2, eps=0.0)
    u, _ = tx.update({"w": g.clone()}, tx.init({"w": w}), params={"w": w}, inplace=inplace)
    ref = torch.nn.Parameter(w.clone())
    opt = torch.optim.Adam([ref], lr=1e-2, eps=0.0)
    ref.grad = g.clone()
    opt.step()
    assert u["w"][0] == 0
    assert torch.equal((w + u["w"])[1:], ref.detach()[1:])


def test_tau_inf_is_no_cap():
    """Regression: tau=inf (a valid "no cap") gave inf * 0 = NaN for a zero gradient."""
    params = {"w": torch.zeros(4, 3)}
    outs = []
    for tau in (None, math.inf):
        tx = sf.kronecker_precondition(graft="none", tau=tau, precond_freq=1, rank=sf.full_rank())
        state = tx.init(params)
        for g in (torch.zeros(4, 3), torch.randn(4, 3, generator=torch.Generator().manual_seed(0))):
            u, state = tx.update({"w": g}, state)
            outs.append(u["w"])
    assert all(torch.isfinite(o).all() for o in outs)
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


# =============================================================================================
# 2. Bad arguments and wrong trees


def _ps():
    return list(scao_model().parameters())


_KRON = sf.kronecker_precondition
#: constructor name -> [(call with bad arguments, exception, message fragments)]. Every fragment
#: must appear in the message: the argument's name, the value received and the accepted range.
BAD_ARGUMENTS = {
    "adam": [
        (lambda: sf.adam(lr=-1.0), ValueError, ["lr", "-1.0", "[0.0, inf)"]),
        (lambda: sf.adam(lr=math.inf), ValueError, ["lr", "inf", "[0.0, inf)"]),
        (lambda: sf.adam(betas=(0.9, 1.0)), ValueError, ["betas[1]", "1.0", "[0.0, 1.0)"]),
        (lambda: sf.adam(eps=math.nan), ValueError, ["eps", "nan", "[0.0, inf)"]),
        (lambda: sf.adam(moment_dtype="float16"), TypeError, ["moment_dtype", "'float16'", "floating-point torch.dtype"]),
    ],
    "adamw": [
        (lambda: sf.adamw(weight_decay=-0.1), ValueError, ["weight_decay", "-0.1", "[0.0, inf)"]),
        (lambda: sf.adamw(weight_decay=math.inf), ValueError, ["weight_decay", "inf", "[0.0, inf)"]),
        (lambda: sf.adamw(eps_root=-1.0), ValueError, ["eps_root", "-1.0", "[0.0, inf)"]),
    ],
    "scao": [
        (lambda: sf.scao(lr="1e-3"), TypeError, ["lr", "'1e-3'", "real number"]),
        (lambda: sf.scao(moments="float32", moment_dtype=torch.int8), TypeError, ["moment_dtype", "torch.int8", "floating-point torch.dtype"]),
        (lambda: sf.scao(warmup=3), TypeError, ["warmup"]),
        (lambda: sf.scao(moment_dtype=torch.float32), ValueError, ["moments='bfloat16'", "moment_dtype", "moments='float32'"]),
    ],
    "scao_precondition": [
        (lambda: sf.scao_precondition(rho=1.0), ValueError, ["rho", "1.0", "[0.0, 1.0)"]),
        (lambda: sf.scao_precondition(epsilon_sparse=1.5), ValueError, ["epsilon_sparse", "1.5", "[0.0, 1.0)"]),
        (lambda: sf.scao_precondition(rank_eps=-0.1), ValueError, ["rank_eps", "-0.1", "[0.0, 1.0)"]),
        (lambda: sf.scao_precondition(k_min=0), ValueError, ["k_min", "0", "[1, inf]"]),
        (lambda: sf.scao_precondition(k_min=8, k_max=4), ValueError, ["k_max", "4", "[8, inf]"]),
        (lambda: sf.scao_precondition(precond_freq=2.5), TypeError, ["precond_freq", "2.5", "integer"]),
        (lambda: sf.scao_precondition(blend_steps=-1), ValueError, ["blend_steps", "-1", "[0, inf]"]),
        (lambda: sf.scao_precondition(min_precond_updates=-2), ValueError, ["min_precond_updates", "-2", "[0, inf]"]),
        (lambda: sf.scao_precondition(max_precond_dim=1), ValueError, ["max_precond_dim", "1", "[2, inf]"]),
        (lambda: sf.scao_precondition(tau=0.0), ValueError, ["tau", "0.0", "(0.0, inf]"]),
        (lambda: sf.scao_precondition(tikhonov=math.inf), ValueError, ["tikhonov", "inf", "[0.0, inf)"]),
        (lambda: sf.scao_precondition(block_size=4), ValueError, ["block_size", "4", "[8, inf]"]),
        (lambda: sf.scao_precondition(blend_shape="step"), ValueError, ["blend_shape", "'step'", "'linear', 'cosine'"]),
        (lambda: sf.scao_precondition(complement="all"), ValueError, ["complement", "'all'", "'mean_tail'"]),
        (lambda: sf.scao_precondition(graft="l2"), ValueError, ["graft", "'l2'", "'frobenius'"]),
        (lambda: sf.scao_precondition(sides="left"), ValueError, ["sides", "'left'", "'wide'"]),
        (lambda: sf.scao_precondition(eigensolver="qr"), ValueError, ["eigensolver", "'qr'", "'subspace'"]),
        (lambda: sf.scao_precondition(grouped="yes"), TypeError, ["grouped", "'yes'", "bool"]),
        (lambda: sf.scao_precondition(use_int8_ema=1), TypeError, ["use_int8_ema", "1", "bool"]),
    ],
    "SCAO": [
        (lambda: sf.SCAO(_ps(), lr=math.inf), ValueError, ["lr", "inf", "[0, inf)"]),
        (lambda: sf.SCAO(_ps(), lr=-1.0), ValueError, ["lr", "-1.0", "[0, inf)"]),
        (lambda: sf.SCAO(_ps(), betas=(0.9, 2.0)), ValueError, ["betas[1]", "2.0", "[0.0, 1.0)"]),
        (lambda: sf.SCAO(_ps(), k_min=8, k_max=4), ValueError, ["k_max", "4", "[8, inf]"]),
        (lambda: sf.SCAO(_ps(), preconditioner_enabled="no"), TypeError, ["preconditioner_enabled", "'no'", "bool"]),
        (lambda: sf.SCAO(_ps(), factor_mode="diag"), ValueError, ["factor_mode", "'diag'", "'full', 'wide'"]),
        (lambda: sf.SCAO(_ps(), grouped=0), TypeError, ["grouped", "0", "bool"]),
        (lambda: sf.SCAO(_ps(), warmup=3), TypeError, ["warmup"]),
    ],
    "TransformOptimizer": [
        (lambda: sf.TransformOptimizer(_ps(), sf.adamw, {"lr": 1e-3}, missing_grad="skip"), ValueError,
         ["missing_grad", "'skip'", "'none', 'zero'"]),
        (lambda: sf.TransformOptimizer(_ps(), "adamw", {"lr": 1e-3}), TypeError, ["transform_factory", "str"]),
        (lambda: sf.TransformOptimizer(_ps(), sf.adamw, {"lr": math.nan}), ValueError, ["lr", "nan", "[0, inf)"]),
    ],
    "chain": [(lambda: sf.chain(sf.adam(), "adam"), TypeError, ["transforms[1]", "GradientTransformation", "str"])],
    "named_chain": [
        (lambda: sf.named_chain(("a", sf.adam()), ("a", sf.adam())), ValueError, ["names", "'a'", "unique"]),
        (lambda: sf.named_chain(("", sf.adam())), TypeError, ["named[0]", "non-empty str"]),
    ],
    "identity": [(lambda: sf.identity(1), TypeError, ["argument"])],
    "masked": [
        (lambda: sf.masked(sf.adam(), None), TypeError, ["mask", "tree of bools"]),
        (lambda: sf.masked(None, {"w": True}), TypeError, ["inner", "GradientTransformation", "NoneType"]),
    ],
    "partition": [
        (lambda: sf.partition({}, lambda p: "a"), TypeError, ["transforms", "non-empty mapping"]),
        (lambda: sf.partition({"a": 1}, lambda p: "a"), TypeError, ["transforms['a']", "GradientTransformation", "int"]),
    ],
    "scale_by_adam": [
        (lambda: sf.scale_by_adam(b1=1.0), ValueError, ["b1", "1.0", "[0.0, 1.0)"]),
        (lambda: sf.scale_by_adam(b2=-0.5), ValueError, ["b2", "-0.5", "[0.0, 1.0)"]),
        (lambda: sf.scale_by_adam(eps=math.inf), ValueError, ["eps", "inf", "[0.0, inf)"]),
        (lambda: sf.scale_by_adam(moment_dtype=torch.float), None, []),  # accepted
    ],
    "add_decayed_weights": [(lambda: sf.add_decayed_weights(-1.0), ValueError, ["weight_decay", "-1.0", "[0.0, inf)"])],
    "scale": [
        (lambda: sf.scale(math.nan), ValueError, ["step_size", "nan", "(-inf, inf)"]),
        (lambda: sf.scale(math.inf), ValueError, ["step_size", "inf", "(-inf, inf)"]),
    ],
    "scale_by_learning_rate": [
        (lambda: sf.scale_by_learning_rate(-0.1), ValueError, ["lr", "-0.1", "[0.0, inf)"]),
        (lambda: sf.scale_by_learning_rate(torch.ones(2)), ValueError, ["lr", "0-d", "(2,)"]),
    ],
    "clip_by_global_norm": [
        (lambda: sf.clip_by_global_norm(0.0), ValueError, ["max_norm", "0.0", "(0.0, inf]"]),
        (lambda: sf.clip_by_global_norm(math.inf), None, []),  # no clipping: accepted
    ],
    "fp32_codec": [(lambda: sf.fp32_codec(1), TypeError, ["argument"])],
    "bf16_adam_codecs": [(lambda: sf.bf16_adam_codecs(64), TypeError, ["argument"])],
    "bf16_codec": [(lambda: sf.bf16_codec(stochastic="no"), TypeError, ["stochastic", "'no'", "bool"])],
    "int8_blockwise": [
        (lambda: sf.int8_blockwise(4), ValueError, ["block_size", "4", "[8, inf]"]),
        (lambda: sf.int8_blockwise(square_root=1), TypeError, ["square_root", "1", "bool"]),
    ],
    "int8_adam_codecs": [(lambda: sf.int8_adam_codecs(0), ValueError, ["block_size", "0", "[8, inf]"])],
    "quantize_state": [
        (lambda: sf.quantize_state(sf.scale_by_adam(), "int8"), TypeError, ["codec", "'int8'", "Codec"]),
        (lambda: sf.quantize_state(sf.scale_by_adam(), sf.int8_blockwise(), min_size=0), ValueError,
         ["min_size", "0", "[1, inf]"]),
    ],
    "curvature_ema": [
        (lambda: sf.curvature_ema(-0.5), ValueError, ["rho", "-0.5", "[0.0, 1.0)"]),
        (lambda: sf.curvature_ema(0.9, codec="int8"), TypeError, ["codec", "'int8'", "Codec"]),
    ],
    "spectral_mass_rank": [
        (lambda: sf.spectral_mass_rank(1.0), ValueError, ["epsilon", "1.0", "[0.0, 1.0)"]),
        (lambda: sf.spectral_mass_rank(0.05, 4, 2), ValueError, ["k_max", "2", "[4, inf]"]),
    ],
    "full_rank": [(lambda: sf.full_rank(8), TypeError, ["argument"])],
    "fixed_rank": [(lambda: sf.fixed_rank(0), ValueError, ["k", "0", "[1, inf]"])],
    "kronecker_precondition": [
        (lambda: _KRON(curvature=0.9), TypeError, ["curvature", "0.9", "CurvatureEMA"]),
        (lambda: _KRON(rank=8), TypeError, ["rank", "8", "RankRule"]),
        (lambda: _KRON(precond_freq=0), ValueError, ["precond_freq", "0", "[1, inf]"]),
        (lambda: _KRON(tikhonov=-1.0), ValueError, ["tikhonov", "-1.0", "[0.0, inf)"]),
        (lambda: _KRON(grouped=None), TypeError, ["grouped", "None", "bool"]),
    ],
    "blend_ramp": [
        (lambda: sf.blend_ramp(sf.identity(), warmup_steps=-1), ValueError, ["warmup_steps", "-1", "[0, inf]"]),
        (lambda: sf.blend_ramp(sf.identity(), shape="step"), ValueError, ["shape", "'step'", "'linear', 'cosine'"]),
        (lambda: sf.blend_ramp("kron"), TypeError, ["inner", "GradientTransformation", "str"]),
    ],
    "schedules.constant": [(lambda: sf.schedules.constant(-1.0), ValueError, ["value", "-1.0", "[0.0, inf)"])],
    "schedules.linear_warmup": [(lambda: sf.schedules.linear_warmup(math.inf, 10), ValueError, ["peak", "inf", "[0.0, inf)"])],
    "schedules.cosine_decay": [(lambda: sf.schedules.cosine_decay(1.0, 0), ValueError, ["decay_steps", "0", "[1, inf]"])],
    "schedules.warmup_cosine_decay": [
        (lambda: sf.schedules.warmup_cosine_decay(1.0, 10, 5), ValueError, ["decay_steps", "5", "[11, inf]"])
    ],
}
BAD_ARGUMENTS["apply_if_finite"] = [
    (lambda: sf.apply_if_finite(sf.adam(), 0), ValueError, ["max_consecutive_skips", "0", "[1, inf]"]),
    (lambda: sf.apply_if_finite("adam"), TypeError, ["inner", "GradientTransformation", "str"]),
    (lambda: sf.apply_if_finite(sf.adam(), host_sync=1), TypeError, ["host_sync", "None, True or False", "1"]),
    (lambda: sf.apply_if_finite(sf.adam(), skip_overflow="yes"), TypeError, ["skip_overflow", "bool", "'yes'"]),
]
BAD_ARGUMENTS["muon"] = [
    (lambda: sf.muon(lr=-1.0), ValueError, ["lr", "-1.0", "[0.0, inf)"]),
    (lambda: sf.muon(momentum=1.0), ValueError, ["momentum", "1.0", "[0.0, 1.0)"]),
    (lambda: sf.muon(weight_decay=-0.1), ValueError, ["weight_decay", "-0.1", "[0.0, inf)"]),
    (lambda: sf.muon(nesterov=1), TypeError, ["nesterov", "1", "bool"]),
    (lambda: sf.muon(ns_steps=0), ValueError, ["ns_steps", "0", "[1, inf]"]),
    (lambda: sf.muon(ns_coefficients=(1.0, 2.0)), TypeError, ["ns_coefficients", "(1.0, 2.0)", "triple"]),
    (lambda: sf.muon(eps=0.0), ValueError, ["eps", "0.0", "(0.0, inf)"]),
    (lambda: sf.muon(adjust_lr_fn="rms"), ValueError, ["adjust_lr_fn", "'rms'", "'original', 'match_rms_adamw'"]),
    (lambda: sf.muon(adamw_lr=math.nan), ValueError, ["adamw_lr", "nan", "[0.0, inf)"]),
    (lambda: sf.muon(adamw_betas=(0.9, 1.5)), ValueError, ["adamw_betas[1]", "1.5", "[0.0, 1.0)"]),
    (lambda: sf.muon(adamw_weight_decay=-1.0), ValueError, ["adamw_weight_decay", "-1.0", "[0.0, inf)"]),
    (lambda: sf.muon(muon_mask={"w": "yes"}), TypeError, ["muon_mask", "'yes'", "bools"]),
    (lambda: sf.muon(ns_dtype=torch.int8), TypeError, ["ns_dtype", "torch.int8", "floating-point torch.dtype"]),
]
BAD_ARGUMENTS["scale_by_momentum"] = [
    (lambda: sf.scale_by_momentum(-0.1), ValueError, ["beta", "-0.1", "[0.0, 1.0)"]),
    (lambda: sf.scale_by_momentum(0.9, nesterov="yes"), TypeError, ["nesterov", "'yes'", "bool"]),
    (lambda: sf.scale_by_momentum(0.0), None, []),  # no averaging: accepted
]
BAD_ARGUMENTS["scale_by_newton_schulz"] = [
    (lambda: sf.scale_by_newton_schulz(steps=0), ValueError, ["steps", "0", "[1, inf]"]),
    (lambda: sf.scale_by_newton_schulz(coefficients=(1.0, math.inf, 0.0)), ValueError,
     ["coefficients[1]", "inf", "(-inf, inf)"]),
    (lambda: sf.scale_by_newton_schulz(eps=-1e-7), ValueError, ["eps", "-1e-07", "(0.0, inf)"]),
    (lambda: sf.scale_by_newton_schulz(adjust_lr=None), ValueError, ["adjust_lr", "None", "'match_rms_adamw'"]),
    (lambda: sf.scale_by_newton_schulz(grouped=1), TypeError, ["grouped", "1", "bool"]),
    (lambda: sf.scale_by_newton_schulz(dtype=None), None, []),  # iterate in the update's dtype: accepted
]
BAD_ARGUMENTS["curvature_sketch"] = [
    (lambda: sf.curvature_sketch(rank=1), ValueError, ["rank", "1", "[2, inf]"]),
    (lambda: sf.curvature_sketch(rho=1.0), ValueError, ["rho", "1.0"]),
    (lambda: sf.curvature_sketch(codec="int8"), TypeError, ["codec", "Codec", "'int8'"]),
]
BAD_ARGUMENTS["soap"] = [
    (lambda: sf.soap(betas=(0.95, 1.0)), ValueError, ["betas[1]", "1.0", "[0.0, 1.0)"]),
    (lambda: sf.soap(shampoo_beta=1.0), ValueError, ["shampoo_beta", "1.0", "[0.0, 1.0)"]),
    (lambda: sf.soap(precond_freq=0), ValueError, ["precond_freq", "0", "[1, inf]"]),
    (lambda: sf.soap(lr=-1.0), ValueError, ["lr", "-1.0", "[0.0, inf)"]),
]
BAD_ARGUMENTS["kronecker_eigenbasis"] = [
    (lambda: sf.kronecker_eigenbasis("adam"), TypeError, ["inner", "GradientTransformation", "str"]),
    (lambda: sf.kronecker_eigenbasis(moment_at_refresh="projected"), ValueError,
     ["moment_at_refresh", "'projected'", "'rotate', 'project', 'keep'"]),
    (lambda: sf.kronecker_eigenbasis(rank=8), TypeError, ["rank", "8", "RankRule"]),
    (lambda: sf.kronecker_eigenbasis(max_precond_dim=1), ValueError, ["max_precond_dim", "1", "[2, inf]"]),
]
BAD_ARGUMENTS["scao"] += [
    (lambda: sf.scao(form="soap"), ValueError, ["form", "'soap'", "'seed', 'eigenbasis'"]),
    (lambda: sf.scao(form="eigenbasis", warmup_steps=5), ValueError, ["warmup_steps", "5", "form='seed' only"]),
]
BAD_ARGUMENTS["full_tensor_updates"] = [
    (lambda: sf.full_tensor_updates("adam", callable), TypeError, ["inner", "GradientTransformation", "str"]),
    (lambda: sf.full_tensor_updates(sf.adam(), True), TypeError, ["select", "callable", "True"]),
]

#: Public names that build nothing from hyperparameters: functions over data, state and record
#: types, errors, modules.
NOT_CONSTRUCTORS = {
    "apply_updates", "memory_report", "state_bytes", "scao_diagnostics", "summarize_diagnostics", "global_norm",
    "blend_factor", "matrix_shape", "robust_eigh", "all_finite", "square_safe_bound", "skipped_steps", "schedules", "transforms", "precond",
    "assign_owners", "gather_full", "shard_like", "dcp_state_dict",
}


def _public_constructors() -> set[str]:
    names = set()
    for name in sf.__all__:
        obj = getattr(sf, name)
        if name in NOT_CONSTRUCTORS or (isinstance(obj, type) and not issubclass(obj, torch.optim.Optimizer)):
            continue
        names.add(name)
    names |= {f"schedules.{n}" for n in sf.schedules.__all__ if n != "Schedule"}
    return names


def test_every_public_constructor_has_bad_argument_cases():
    missing = _public_constructors() - set(BAD_ARGUMENTS)
    assert not missing, f"public constructors without bad-argument cases in BAD_ARGUMENTS: {sorted(missing)}"


@pytest.mark.parametrize(
    "build, exc, fragments",
    [case for cases in BAD_ARGUMENTS.values() for case in cases],
    ids=[f"{name}-{i}" for name, cases in BAD_ARGUMENTS.items() for i in range(len(cases))],
)
def test_bad_argument_is_rejected_with_a_clear_message(build, exc, fragments):
    if exc is None:  # a boundary value that must be accepted
        build()
        return
    with pytest.raises(exc) as info:
        build()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in the message {message!r}"


_BASE_TREE = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
WRONG_TREES = {
    "extra leaf": {"w": torch.zeros(4, 3), "b": torch.zeros(3), "v": torch.zeros(5, 2)},
    "missing leaf": {"w": torch.zeros(4, 3)},
    "renamed leaf": {"w": torch.zeros(4, 3), "c": torch.zeros(3)},
    "changed shape": {"w": torch.zeros(4, 3), "b": torch.zeros(4)},
    "changed matrix shape": {"w": torch.zeros(3, 4), "b": torch.zeros(3)},
    "list instead of dict": [torch.zeros(3), torch.zeros(4, 3)],
    "missing matrix leaf": {"b": torch.zeros(3)},
}
#: Transforms whose state records the whole tree (Adam moments): every wrong tree is caught.
TREE_AWARE = {
    "adam": lambda: sf.adam(1e-3),
    "adamw": lambda: sf.adamw(1e-3),
    "scao": lambda: sf.scao(1e-3, form="seed", warmup_steps=0, precond_freq=1),
    "scale_by_adam": lambda: sf.scale_by_adam(),
    "quantize_state(scale_by_adam)": lambda: sf.quantize_state(sf.scale_by_adam(), sf.int8_adam_codecs(), min_size=1),
    "chain(clip, adamw)": lambda: sf.chain(sf.clip_by_global_norm(1.0), sf.adamw(1e-3)),
    "named_chain": lambda: sf.named_chain(("clip", sf.clip_by_global_norm(1.0)), ("adam", sf.adam(1e-3))),
    "masked adam": lambda: sf.masked(sf.adam(1e-3), lambda p: optree.tree_map(lambda _: True, p)),
}
#: The preconditioner's state only knows its matrix leaves: changes to those are caught.
MATRIX_AWARE = {
    "scao_precondition": lambda: sf.scao_precondition(warmup_steps=0, precond_freq=1),
    "kronecker_precondition": lambda: sf.kronecker_precondition(),
}


#: masked() hands its inner transform a flat list of the selected leaves: a renamed leaf or a
#: list in place of a dict (same shapes in the same order) is invisible to it.
_INVISIBLE = {("masked adam", "renamed leaf"), ("masked adam", "list instead of dict")}


@pytest.mark.parametrize(
    "name, wrong", [(n, w) for n in TREE_AWARE for w in WRONG_TREES if (n, w) not in _INVISIBLE]
)
def test_wrong_tree_between_init_and_update_raises_clearly(name, wrong):
    """A ValueError that says what differs and asks whether init() saw the same tree (not an
    optree or broadcasting traceback, and never a silent run on misaligned state)."""
    tx = TREE_AWARE[name]()
    state = tx.init(_BASE_TREE)
    tree = clone(WRONG_TREES[wrong])
    with pytest.raises(ValueError, match=r"init\(\)|mask must have the same tree structure"):
        tx.update(tree, state, params=tree)


@pytest.mark.parametrize("wrong", ["extra leaf", "changed matrix shape", "missing matrix leaf"])
@pytest.mark.parametrize("name", MATRIX_AWARE)
def test_wrong_matrix_leaves_raise_clearly_in_the_preconditioner(name, wrong):
    """The preconditioner's state holds tensors only (no tree): it catches every change to the
    matrix leaves it preconditions; vector leaves are the Adam state's business."""
    tx = MATRIX_AWARE[name]()
    state = tx.init(_BASE_TREE)
    with pytest.raises(ValueError, match=r"init\(\)"):
        tx.update(clone(WRONG_TREES[wrong]), state)


# =============================================================================================
# 3. Exact resume at any step

#: Warmup 4 (ramp after >= 2 updates), ramp over 6 (steps 5-10), refresh every 3 steps, the
#: subspace solver (its warm start is part of the state) and int8 curvature (stochastic rounding
#: seeded by the step counter).
RESUME_KW = dict(form="seed", lr=1e-2, rho=0.9, warmup_steps=4, blend_steps=6, min_precond_updates=2, precond_freq=3, k_min=1,
                 k_max=4, eigensolver="subspace")
RESUME_STEPS = 20
#: In warmup, first ramp step, mid-ramp, last ramp step, and right before / at / after refreshes.
CRITICAL_CUTS = [1, 4, 5, 7, 10, 11, 12, 13, 17, 18, 19]


def resume_problem():
    g = torch.Generator().manual_seed(3)
    params = {"w1": torch.randn(8, 6, generator=g) / 3, "w2": torch.randn(8, 6, generator=g) / 3,
              "b": torch.zeros(8), "head": torch.randn(3, 8, generator=g) / 3}
    return params


def resume_grads(params, step):
    """A fresh batch per step (so a resumed run sees the same data); ``w2`` has no gradient
    every fifth step."""
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)

    def loss(p):
        h = torch.tanh(x @ (p["w1"] + p["w2"]).T + p["b"])
        return ((h @ p["head"].T - y) ** 2).mean()

    grads = torch.func.grad(loss)(params)
    if step % 5 == 3:
        grads["w2"] = None
    return grads


def functional_steps(tx, params, state, start, stop):
    for t in range(start, stop):
        updates, state = tx.update(resume_grads(params, t), state, params=params)
        params = sf.apply_updates(params, updates)
    return params, state


@pytest.fixture(scope="module")
def uninterrupted():
    tx = sf.scao(**RESUME_KW)
    params = resume_problem()
    return functional_steps(tx, params, tx.init(params), 0, RESUME_STEPS)


def interrupted_functional(cuts):
    tx = sf.scao(**RESUME_KW)
    params = resume_problem()
    state = tx.init(params)
    done = 0
    for cut in list(cuts) + [RESUME_STEPS]:
        params, state = functional_steps(tx, params, state, done, cut)
        done = cut
        ckpt = save_load({"params": params, "state": state, "step": done})  # torch.load(weights_only=True)
        tx = sf.scao(**RESUME_KW)  # freshly built, nothing carried over but the checkpoint
        params, state, done = ckpt["params"], ckpt["state"], ckpt["step"]
    return params, state


@pytest.mark.parametrize("cut", CRITICAL_CUTS)
def test_functional_resume_at_critical_steps_is_bit_identical(uninterrupted, cut):
    params, state = interrupted_functional([cut])
    assert_tree_close(params, uninterrupted[0], msg=f"params after a cut at {cut}")
    assert_tree_close(state, uninterrupted[1], msg=f"state after a cut at {cut}")


@settings(max_examples=12, **FAST_SETTINGS)
@given(cuts=st.lists(st.integers(1, RESUME_STEPS - 1), min_size=1, max_size=4, unique=True).map(sorted))
def test_functional_resume_at_random_steps_is_bit_identical(uninterrupted, cuts):
    """Interrupted (possibly several times) at random steps: bit-identical to never stopping."""
    params, state = interrupted_functional(cuts)
    assert_tree_close(params, uninterrupted[0], msg=f"cuts {cuts}")
    assert_tree_close(state, uninterrupted[1], msg=f"cuts {cuts}")


def facade_steps(model, opt, start, stop):
    for t in range(start, stop):
        g = torch.Generator().manual_seed(200 + t)
        train_step(model, opt, torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g))


@pytest.fixture(scope="module")
def facade_uninterrupted():
    model = scao_model()
    facade_steps(model, sf.SCAO(model.named_parameters(), **RESUME_KW), 0, RESUME_STEPS)
    return [p.detach().clone() for p in model.parameters()]


@settings(max_examples=10, **FAST_SETTINGS)
@given(cuts=st.lists(st.integers(1, RESUME_STEPS - 1), min_size=1, max_size=3, unique=True).map(sorted))
def test_facade_resume_at_random_steps_is_bit_identical(facade_uninterrupted, cuts):
    """``state_dict`` / ``load_state_dict`` through ``torch.load(weights_only=True)`` into a
    freshly built model and optimizer, at random (and repeated) interruptions (the fixed critical
    cut points are covered by tests/test_optim.py::test_scao_resume_bit_identical)."""
    model = scao_model()
    opt = sf.SCAO(model.named_parameters(), **RESUME_KW)
    done = 0
    for cut in list(cuts) + [RESUME_STEPS]:
        facade_steps(model, opt, done, cut)
        done = cut
        ckpt = save_load({"model": model.state_dict(), "opt": opt.state_dict()})
        model = scao_model(seed=99)
        model.load_state_dict(ckpt["model"])
        opt = sf.SCAO(model.named_parameters(), **RESUME_KW)
        opt.load_state_dict(ckpt["opt"])
    for p, q in zip(model.parameters(), facade_uninterrupted):
        assert torch.equal(p, q), f"cuts {cuts}"


# =============================================================================================
# 4. Determinism and memory


def test_same_seed_same_result_twice():
    """Two runs from the same seed are bit-identical, functional and facade (int8 stochastic
    rounding, subspace refreshes, None leaves included)."""
    runs = []
    for _ in range(2):
        tx = sf.scao(**RESUME_KW)
        params = resume_problem()
        runs.append(functional_steps(tx, params, tx.init(params), 0, RESUME_STEPS))
    assert_tree_close(runs[0], runs[1])
    models = []
    for _ in range(2):
        model = scao_model()
        facade_steps(model, sf.SCAO(model.parameters(), **RESUME_KW), 0, RESUME_STEPS)
        models.append(list(model.parameters()))
    for p, q in zip(*models):
        assert torch.equal(p, q)


LONG_STEPS = 2000


def _sizes(state):
    return sf.state_bytes(state), len(tensor_leaves(state))


@pytest.mark.slow
def test_no_state_growth_over_2000_steps_functional():
    """State bytes and the number of state tensors are constant from the first refresh on."""
    params = {"w": torch.randn(6, 5) / 3, "b": torch.zeros(6), "v": torch.randn(4, 4) / 3}
    x, y = torch.randn(8, 5), torch.randn(8, 6)

    def loss(p):
        return ((torch.tanh(x @ p["w"].T + p["b"]) - y) ** 2).mean() + (p["v"] ** 2).sum()

    tx = sf.scao(form="seed", lr=1e-2, rho=0.9, warmup_steps=10, blend_steps=10, min_precond_updates=0, precond_freq=5, k_min=1,
                 k_max=4)
    state = tx.init(params)
    grad = torch.func.grad(loss)
    sizes = []
    for _ in range(LONG_STEPS):
        updates, state = tx.update(grad(params), state, params=params)
        params = sf.apply_updates(params, updates)
        sizes.append(_sizes(state))
    after_first_refresh = sizes[4:]
    assert len(set(after_first_refresh)) == 1, sorted(set(after_first_refresh))
    assert all(torch.isfinite(p).all() for p in params.values())


@pytest.mark.slow
def test_no_state_growth_over_2000_steps_facade():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    opt = sf.SCAO(model.parameters(), form="seed", lr=1e-2, rho=0.9, warmup_steps=10, blend_steps=10, min_precond_updates=0,
                  precond_freq=5, k_min=1, k_max=4)
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    sizes = []
    for _ in range(LONG_STEPS):
        train_step(model, opt, x, y)
        sizes.append((*_sizes(opt.functional_state(0)), len(opt.state_dict()["transform_state"][0]["leaves"])))
    assert len(set(sizes[4:])) == 1, sorted(set(sizes[4:]))
