"""apply_if_finite: non-finite steps are skipped for the whole tree, state and params untouched."""

from __future__ import annotations

import io

import pytest
import torch
from treeutil import chain_state, clone, leaves, tensor_leaves

import scao_fx as sf
from scao_fx.transforms import finite as finite_mod

NAN, INF = float("nan"), float("inf")
FAST = dict(form="seed", warmup_steps=2, blend_steps=2, min_precond_updates=0, precond_freq=2, k_min=1, k_max=4)


def params0():
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(6, 5, generator=gen, dtype=torch.float64),
        "v": torch.randn(4, 4, generator=gen, dtype=torch.float64),
        "b": torch.tensor([-0.0, 0.0, 1.5], dtype=torch.float64),  # signed zeros must survive a skip
    }


def grads(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    p = params0()
    return [{k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in p.items()} for _ in range(n)]


def poisoned(g, key="v", value=NAN):
    g = clone(g)
    g[key].view(-1)[min(3, g[key].numel() - 1)] = value
    return g


def run(tx, seq, state=None, params=None):
    params = params0() if params is None else params
    state = tx.init(params) if state is None else state
    for g in seq:
        u, state = tx.update(clone(g), state, params=params)
        params = sf.apply_updates(params, u)
    return params, state


def _bits(x):
    return x.contiguous().view(-1).view(torch.uint8) if x.is_floating_point() else x


def bits_equal(a, b):
    """Same tensor leaves, bit for bit (so -0.0 != 0.0 and NaN == NaN of the same payload)."""
    la, lb = tensor_leaves(a), tensor_leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(_bits(x), _bits(y)) for x, y in zip(la, lb)
    )


# ---------------------------------------------------------------- all_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_all_finite_detects_every_kind(dtype, bad):
    tree = {"a": torch.ones(7, dtype=dtype), "b": [torch.zeros(3, 5, dtype=dtype), None], "c": torch.zeros(0)}
    assert bool(sf.all_finite(tree))
    tree["b"][0][2, 4] = bad
    assert not bool(sf.all_finite(tree))


def test_all_finite_huge_finite_values_and_edge_trees():
    big = {"a": torch.full((1000,), 3e38), "h": torch.full((10,), 6e4, dtype=torch.float16)}
    assert bool(sf.all_finite(big))  # an L2 norm would overflow here; the max norm does not
    assert bool(sf.all_finite({})) and bool(sf.all_finite([None, torch.arange(3)]))


def test_overflow_bound_per_leaf_size_and_dtype():
    x = torch.ones(100)
    bound = sf.square_safe_bound(x)
    assert bound == pytest.approx((torch.finfo(torch.float32).max / 100) ** 0.5)
    assert sf.square_safe_bound(x.double()) == pytest.approx((torch.finfo(torch.float64).max / 100) ** 0.5)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        under = torch.full((100,), min(bound * 0.5, 6e4)).to(dtype)
        assert bool(sf.all_finite([under], overflow_safe=True))
    assert not bool(sf.all_finite([torch.full((100,), bound * 2)], overflow_safe=True))
    assert bool(sf.all_finite([torch.full((100,), bound * 2)]))  # finite, only too large
    assert bool(sf.all_finite([torch.full((100,), 1e100, dtype=torch.float64)], overflow_safe=True))
    assert not bool(sf.all_finite([torch.full((100,), 1e300, dtype=torch.float64)], overflow_safe=True))
    assert not bool(sf.all_finite([torch.tensor([float("nan")], dtype=torch.float16)], overflow_safe=True))


def test_skip_overflow_only_when_asked():
    g = {"w": torch.full((3, 3), 1e30)}
    plain = sf.apply_if_finite(sf.adam(0.1))
    _, s = plain.update(clone(g), plain.init({"w": torch.zeros(3, 3)}))
    assert int(s.skipped) == 0 and torch.isinf(s.inner_state[0].nu["w"]).all()  # Adam's v saturates
    guarded = sf.apply_if_finite(sf.adam(0.1), skip_overflow=True)
    _, s = guarded.update(clone(g), guarded.init({"w": torch.zeros(3, 3)}))
    assert int(s.skipped) == 1 and torch.isfinite(s.inner_state[0].nu["w"]).all()


# ---------------------------------------------------------------- skip semantics


@pytest.mark.parametrize("host_sync", [None, False], ids=["immediate", "deferred"])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_skipped_step_leaves_params_and_state_exactly(host_sync, bad):
    tx = sf.apply_if_finite(sf.scao(1e-2, skip_nonfinite=False, **FAST), host_sync=host_sync)
    seq = grads(5)
    p, state = run(tx, seq)
    before_p, before_state = clone(p), clone(chain_state(state))
    u, state2 = tx.update(poisoned(seq[0], value=bad), state, params=p)
    assert all(torch.equal(x, torch.full_like(x, -0.0)) and torch.signbit(x).all() for x in tensor_leaves(u))
    p2 = sf.apply_updates(p, u)
    assert bits_equal(p2, before_p)  # signed zeros included
    assert bits_equal(chain_state(state2), before_state)  # on the CPU every leaf is on the flag's device
    if host_sync is None:
        assert int(state2.skipped) == 1
    else:  # deferred: the skip is counted when the host reads the flag, at the next update
        assert int(state2.skipped) == 0 and not bool(state2.pending_finite)
    assert sf.skipped_steps(state2) == 1


@pytest.mark.parametrize("host_sync", [None, False], ids=["immediate", "deferred"])
def test_run_with_bad_steps_equals_run_without_them(host_sync):
    """A run with NaN/Inf steps interleaved ends bit-identical to the run that never saw them."""
    seq = grads(12)
    clean = sf.apply_if_finite(sf.scao(1e-2, skip_nonfinite=False, **FAST), host_sync=host_sync)
    p_ref, s_ref = run(clean, seq)
    dirty_seq = list(seq)
    for pos, value in ((1, NAN), (4, INF), (5, -INF), (9, NAN)):  # warmup, ramp, refresh boundaries
        dirty_seq.insert(pos, poisoned(seq[pos], key="w" if pos % 2 else "b", value=value))
    tx = sf.apply_if_finite(sf.scao(1e-2, skip_nonfinite=False, **FAST), host_sync=host_sync)
    p, s = run(tx, dirty_seq)
    assert bits_equal(p, p_ref)
    assert bits_equal(chain_state(s), chain_state(s_ref))
    assert sf.skipped_steps(s) == 4 and int(s.consecutive) == 0


def test_deferred_rollback_of_host_counters(monkeypatch):
    """The accelerator path: host (CPU) leaves of the state are rolled back one update later.

    On a CPU-only machine every leaf is on the flag's device, so the test declares the int64
    counters 'host' leaves; the logic is the one that runs on CUDA."""
    monkeypatch.setattr(finite_mod, "_is_host", lambda leaf, device: isinstance(leaf, torch.Tensor) and leaf.dtype == torch.int64)
    seq = grads(8)
    p_ref, s_ref = run(sf.scao(1e-2, **FAST), seq)
    tx = sf.apply_if_finite(sf.scao(1e-2, skip_nonfinite=False, **FAST), host_sync=False)
    p, s = run(tx, seq[:3])
    p, s = run(tx, [poisoned(seq[3])], s, p)
    assert len(s.rollback) > 0 and not bool(s.pending_finite)
    counts_after_bad = [int(x) for x in tensor_leaves(chain_state(s)) if x.dtype == torch.int64]
    p, s = run(tx, seq[3:], s, p)
    assert bits_equal(p, p_ref) and bits_equal(chain_state(s), chain_state(s_ref))
    assert int(s.skipped) == 1
    assert counts_after_bad != [int(x) for x in tensor_leaves(chain_state(s_ref)) if x.dtype == torch.int64]


def test_checkpoint_between_bad_step_and_next_is_exact(tmp_path):
    seq = grads(8)
    p_ref, s_ref = run(sf.scao(1e-2, **FAST), seq)
    tx = sf.apply_if_finite(sf.scao(1e-2, skip_nonfinite=False, **FAST), host_sync=False)
    p, s = run(tx, seq[:4] + [poisoned(seq[4])])
    torch.save({"p": p, "s": s}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    tx2 = sf.apply_if_finite(sf.scao(1e-2, skip_nonfinite=False, **FAST), host_sync=False)
    p2, s2 = run(tx2, seq[4:], loaded["s"], loaded["p"])
    assert bits_equal(p2, p_ref) and bits_equal(chain_state(s2), chain_state(s_ref))
    assert sf.skipped_steps(s2) == 1


@pytest.mark.parametrize("host_sync", [None, False], ids=["immediate", "deferred"])
def test_consecutive_skips_raise_after_the_limit(host_sync):
    tx = sf.apply_if_finite(sf.adam(0.1), max_consecutive_skips=3, host_sync=host_sync)
    p, s = run(tx, grads(2))
    bad = poisoned(grads(1)[0])
    p, s = run(tx, [bad, bad, grads(1)[0], bad, bad], s, p)  # a good step resets the streak
    assert int(s.consecutive) == (2 if host_sync is None else 1)
    extra = 1 if host_sync is None else 2  # deferred: the third skip is learnt at the next update
    with pytest.raises(sf.NonFiniteGradientError, match="3 consecutive steps.*max_consecutive_skips=3"):
        run(tx, [bad] * extra, s, p)


def test_error_leaves_state_usable():
    tx = sf.apply_if_finite(sf.adam(0.1), max_consecutive_skips=1)
    p, s = run(tx, grads(2))
    snapshot = clone(s)
    with pytest.raises(sf.NonFiniteGradientError):
        tx.update(poisoned(grads(1)[0]), s, params=p)
    assert bits_equal(s, snapshot)
    run(tx, grads(1), s, p)


def test_without_guard_a_nan_poisons_scao_state():
    """Why the guard is on by default: one NaN step ruins every later SCAO update."""
    seq = grads(6)
    bare = sf.scao(1e-2, skip_nonfinite=False, **FAST)
    p, s = run(bare, seq[:3] + [poisoned(seq[3])] + seq[3:])
    assert not all(torch.isfinite(x).all() for x in tensor_leaves(p))
    guarded = sf.scao(1e-2, **FAST)
    p, s = run(guarded, seq[:3] + [poisoned(seq[3])] + seq[3:])
    assert all(torch.isfinite(x).all() for x in tensor_leaves(p)) and sf.skipped_steps(s) == 1


@pytest.mark.parametrize("host_sync", [None, False], ids=["immediate", "deferred"])
def test_none_leaves_and_inplace_false_keep_inputs(host_sync):
    tx = sf.scao(1e-2, host_sync=host_sync, **FAST)
    p = params0()
    s = run(tx, grads(4), params=p)[1]
    for g in (poisoned(grads(1)[0], key="w"), grads(1, seed=5)[0]):
        g["b"] = None
        g_copy, s_copy, p_copy = clone(g), clone(s), clone(p)
        u, s2 = tx.update(g, s, params=p, inplace=False)
        assert u["b"] is None and bits_equal(g, g_copy)
        assert bits_equal(s, s_copy) and bits_equal(p, p_copy)  # the old state is never written
        s = s2


def test_compiled_fullgraph_skip_matches_eager():
    seq = grads(5)
    tx = sf.scao(1e-2, **FAST)
    p = params0()
    s = run(tx, seq[:3], params=clone(p))[1]

    def step(g, state, params):
        return tx.update(g, state, params=params, inplace=False)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    for g in (poisoned(seq[3]), seq[4]):
        cu, cs = compiled(clone(g), clone(s), p)
        eu, es = step(clone(g), s, p)
        assert bits_equal(cu, eu)
        assert bits_equal(chain_state(cs), chain_state(es))
        assert int(cs.skipped) == int(es.skipped) + int(not bool(es.pending_finite))
        s = es


def test_bad_arguments():
    with pytest.raises(TypeError, match="inner must be a GradientTransformation"):
        sf.apply_if_finite(lambda g: g)
    with pytest.raises(ValueError, match=r"max_consecutive_skips must be .*\[1, .*got 0"):
        sf.apply_if_finite(sf.adam(), max_consecutive_skips=0)
    with pytest.raises(TypeError, match="host_sync must be None, True or False"):
        sf.apply_if_finite(sf.adam(), host_sync="yes")
    with pytest.raises(TypeError, match="skip_nonfinite must be a bool"):
        sf.scao(skip_nonfinite=1)
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        sf.scao(max_consecutive_skips=-1)
    tx = sf.apply_if_finite(sf.adam())
    with pytest.raises(TypeError, match="ApplyIfFiniteState"):
        tx.update({"w": torch.ones(2)}, (), params=None)


# ---------------------------------------------------------------- facade


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _step(model, opt, x, y, poison=None):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    if poison is not None:
        dict(model.named_parameters())[poison].grad.view(-1)[0] = NAN
    opt.step()


@pytest.mark.parametrize("host_sync", [None, False], ids=["immediate", "deferred"])
def test_facade_skips_every_group_and_counts(host_sync):
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    ref_model, model = _model(), _model()
    groups = lambda m: [{"params": list(m[0].parameters())}, {"params": list(m[2].parameters()), "lr": 5e-3}]
    ref = sf.SCAO(groups(ref_model), lr=1e-2, host_sync=host_sync, **FAST)
    opt = sf.SCAO(groups(model), lr=1e-2, host_sync=host_sync, **FAST)
    for t in range(8):
        if t == 4:  # NaN only in the second group's weight: both groups skip
            _step(model, opt, x, y, poison="2.weight")
            assert opt.skipped_steps() == 1
        _step(ref_model, ref, x, y)
        _step(model, opt, x, y)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    for g in (0, 1):
        assert bits_equal(chain_state(opt.functional_state(g)), chain_state(ref.functional_state(g)))
    assert opt.skipped_steps() == 1 and ref.skipped_steps() == 0


def test_facade_guard_can_be_turned_off_and_limits_configured():
    model = _model()
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    opt = sf.SCAO(model.parameters(), lr=1e-2, skip_nonfinite=False, **FAST)
    _step(model, opt, x, y, poison="0.weight")
    assert not torch.isfinite(model[0].weight).all()
    model = _model()
    opt = sf.SCAO(model.parameters(), lr=1e-2, max_consecutive_skips=2, **FAST)
    _step(model, opt, x, y, poison="0.weight")
    with pytest.raises(sf.NonFiniteGradientError):
        _step(model, opt, x, y, poison="0.weight")
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        sf.SCAO(model.parameters(), max_consecutive_skips=0)


def test_facade_state_dict_round_trip_keeps_skip_counters():
    model = _model()
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    opt = sf.SCAO(model.parameters(), lr=1e-2, **FAST)
    for t in range(5):
        _step(model, opt, x, y, poison="0.bias" if t == 2 else None)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = sf.SCAO(model.parameters(), lr=1e-2, **FAST)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.skipped_steps() == 1
    assert bits_equal(leaves(opt2.functional_state()), leaves(opt.functional_state()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_deferred_skip_equals_run_without_bad_step():
    dev = torch.device("cuda")
    to = lambda t: {k: v.to(dev) for k, v in t.items()}
    for bad in (NAN, INF):
        x = {"w": torch.ones(5, device=dev)}
        x["w"][2] = bad
        assert not bool(sf.all_finite(x))
    seq = [to(g) for g in grads(10)]
    p_ref, s_ref = run(sf.scao(1e-2, **FAST), seq, params=to(params0()))
    dirty = seq[:3] + [poisoned(seq[3])] + seq[3:6] + [poisoned(seq[6], value=INF)] + seq[6:]
    tx = sf.scao(1e-2, **FAST)
    p, s = run(tx, dirty, params=to(params0()))
    assert len(s.rollback) > 0  # the CPU counters are the host leaves
    assert bits_equal(p, p_ref) and bits_equal(chain_state(s), chain_state(s_ref))
    assert sf.skipped_steps(s) == 2


def test_verdict_argument_overrides_the_guards_own_check():
    tx = sf.apply_if_finite(sf.adam(lr=0.1))
    assert isinstance(tx, sf.FiniteGuard)
    params, g = params0(), grads(1)[0]
    state = tx.init(params)
    # a clean gradient with a bad verdict is skipped; a poisoned one with a good verdict is not
    updates, state = tx.update(clone(g), state, params=params, finite=torch.tensor(False))
    assert all(bool((u == 0).all()) for u in updates.values()) and int(state.skipped) == 1
    updates, state = tx.update(clone(g), state, params=params, finite=torch.tensor(True))
    assert int(state.skipped) == 1 and bool((updates["w"] != 0).any())
    with pytest.raises(TypeError, match="finite must be None or a 0-d bool tensor"):
        tx.update(clone(g), state, params=params, finite=1.0)


@pytest.mark.slow
def test_no_verdict_is_shared_between_optimizers_running_in_threads():
    """A multi-group facade stepping with NaN gradients in one thread and a functional chain
    stepping with clean gradients in another, for thousands of steps: each checks its own
    gradients only (two torch.optim.AdamW never affect each other either)."""
    import threading

    steps = 2000
    gen = torch.Generator().manual_seed(0)
    clean = [torch.randn(4, 4, generator=gen) for _ in range(64)]
    fast = dict(form="seed", lr=1e-3, warmup_steps=2, blend_steps=2, min_precond_updates=0, precond_freq=4, k_min=1, k_max=4)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    opt = sf.SCAO(
        [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 5e-4}],
        max_consecutive_skips=steps, **fast,
    )
    tx = sf.scao(**fast)

    def run_facade(barrier):
        for t in range(steps):
            if t % 50 == 0:
                barrier.wait()
            for i, p in enumerate(model.parameters()):
                p.grad = clean[(t + i) % len(clean)].flatten()[: p.numel()].reshape(p.shape).clone()
            if t % 3 == 0:
                model[0].weight.grad[0, 0] = NAN
            opt.step()

    def run_functional(out, barrier=None):
        params = {"w": torch.ones(4, 4)}
        state = tx.init(params)
        for t in range(steps):
            if barrier is not None and t % 50 == 0:
                barrier.wait()
            updates, state = tx.update({"w": clean[t % len(clean)].clone()}, state, params=params)
            params = sf.apply_updates(params, updates)
        out.update(params=params, skipped=sf.skipped_steps(state))

    reference: dict = {}
    run_functional(reference)  # alone, sequentially

    barrier = threading.Barrier(2)
    functional: dict = {}
    errors: list = []

    def guarded(fn, *args):
        try:
            fn(*args)
        except BaseException as err:  # reported below, never lost in the thread
            errors.append(err)
            barrier.abort()

    threads = [
        threading.Thread(target=guarded, args=(run_facade, barrier)),
        threading.Thread(target=guarded, args=(run_functional, functional, barrier)),
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert opt.skipped_steps() == len(range(0, steps, 3))  # every poisoned step, no clean one
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert functional["skipped"] == 0
    assert torch.equal(functional["params"]["w"], reference["params"]["w"])


@pytest.mark.parametrize("host_sync", [True, False])
def test_guard_never_writes_into_its_input_updates(host_sync):
    """A skipped step returns new -0.0 tensors, even with inplace=True: the input is untouched."""
    tx = sf.apply_if_finite(sf.adam(lr=0.1), host_sync=host_sync)
    params = {"w": torch.ones(3)}
    state = tx.init(params)
    g = torch.tensor([1.0, float("nan"), 2.0])
    updates, state = tx.update({"w": g}, state, params=params, inplace=True)
    assert torch.equal(g[[0, 2]], torch.tensor([1.0, 2.0])) and torch.isnan(g[1])
    assert updates["w"] is not g and torch.equal(updates["w"], torch.full((3,), -0.0))
