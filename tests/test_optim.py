"""The torch.optim facade: TransformOptimizer (and SCAO further down)."""

from __future__ import annotations

import copy
import io
from typing import NamedTuple

import optree
import pytest
import torch
import torchopt
from treeutil import chain_state

import scao_fx as sf
from scao_fx._tree import find_nodes
from scao_fx.optim import TransformOptimizer

ADAMW_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def adamw_factory(lr, betas, eps, weight_decay):
    return sf.adamw(lr, betas, eps, weight_decay)


def make_adamw(params, **overrides):
    return TransformOptimizer(params, adamw_factory, {**ADAMW_DEFAULTS, **overrides})


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)


def two_groups(model):
    ps = list(model.parameters())
    return [
        {"params": [p for p in ps if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0},
    ]


def data(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g).to(dtype), torch.randn(32, 4, generator=g).to(dtype)


def train_step(model, opt, x, y):
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    return loss.detach()


def max_diff(m1, m2):
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------------------------------------
# Behaves like torch.optim.AdamW


def test_matches_torch_adamw_two_groups_and_lambdalr():
    m1, m2 = mlp(), mlp()
    o1 = torch.optim.AdamW(two_groups(m1), lr=1e-3)
    o2 = make_adamw(two_groups(m2))
    s1 = torch.optim.lr_scheduler.LambdaLR(o1, lambda s: 1.0 / (1.0 + 0.2 * s))
    s2 = torch.optim.lr_scheduler.LambdaLR(o2, lambda s: 1.0 / (1.0 + 0.2 * s))
    x, y = data()
    for _ in range(50):
        for m, o, s in ((m1, o1, s1), (m2, o2, s2)):
            train_step(m, o, x, y)
            s.step()
    assert o2.param_groups[0]["lr"] == o1.param_groups[0]["lr"] < 1e-3 / 5
    assert max_diff(m1, m2) < 1e-6
    # the parameters really moved (the comparison is not vacuous)
    assert max_diff(m1, mlp()) > 1e-3


def test_lr_read_from_group_every_step():
    model = mlp()
    opt = make_adamw(model.parameters())
    x, y = data()
    train_step(model, opt, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = 0.0
    train_step(model, opt, x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.param_groups[0]["lr"] = 1e-2
    train_step(model, opt, x, y)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lr_as_tensor_in_group():
    m1, m2 = mlp(), mlp()
    o1 = make_adamw(m1.parameters(), lr=3e-3)
    o2 = make_adamw(m2.parameters(), lr=torch.tensor(3e-3))
    x, y = data()
    for _ in range(5):
        train_step(m1, o1, x, y)
        train_step(m2, o2, x, y)
    assert max_diff(m1, m2) < 1e-7


def test_other_hyperparameter_change_rebuilds_transform():
    m1, m2 = mlp(), mlp()
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2, weight_decay=0.0)
    o2 = make_adamw(m2.parameters(), lr=1e-2, weight_decay=0.0)
    x, y = data()
    for step in range(10):
        if step == 5:
            for o in (o1, o2):
                o.param_groups[0]["weight_decay"] = 0.5
                o.param_groups[0]["betas"] = (0.8, 0.99)
        train_step(m1, o1, x, y)
        train_step(m2, o2, x, y)
    assert max_diff(m1, m2) < 1e-6


def test_in_place_mutated_hyperparameter_is_seen():
    m1, m2 = mlp(), mlp()
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2, betas=[0.9, 0.999])
    o2 = make_adamw(m2.parameters(), lr=1e-2, betas=[0.9, 0.999])
    x, y = data()
    for step in range(6):
        if step == 3:
            o1.param_groups[0]["betas"] = (0.5, 0.999)
            o2.param_groups[0]["betas"][0] = 0.5  # a list mutated in place
        train_step(m1, o1, x, y)
        train_step(m2, o2, x, y)
    assert max_diff(m1, m2) < 1e-6


def test_grad_never_overwritten():
    model = mlp()
    opt = make_adamw(model.parameters())
    x, y = data()
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    grads = [p.grad for p in model.parameters()]
    copies = [g.clone() for g in grads]
    opt.step()
    for p, g, c in zip(model.parameters(), grads, copies):
        assert p.grad is g
        assert torch.equal(g, c)


def test_params_without_grad_are_skipped():
    model = mlp()
    opt = make_adamw(model.parameters(), weight_decay=0.5)
    x, y = data()
    last = model[2]
    before_w = last.weight.detach().clone()
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    last.weight.grad = None
    opt.step()
    assert torch.equal(last.weight, before_w)  # no decay either
    assert not torch.equal(model[0].weight.detach(), mlp()[0].weight.detach())
    # A group whose parameters all lack gradients is a no-op and creates no state.
    opt2 = make_adamw(mlp().parameters())
    opt2.step()
    assert opt2.functional_state(0) is None


def test_closure_runs_with_grad_and_returns_loss():
    model = mlp()
    opt = make_adamw(model.parameters())
    x, y = data()
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    loss2 = opt.step(closure)
    assert loss2 < loss


def test_zero_grad_inherited():
    model = mlp()
    opt = make_adamw(model.parameters())
    x, y = data()
    ((model(x) - y) ** 2).mean().backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    ((model(x) - y) ** 2).mean().backward()
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_clip_grad_norm_matches_adamw():
    m1, m2 = mlp(), mlp()
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    o2 = make_adamw(m2.parameters(), lr=1e-2)
    x, y = data()
    for _ in range(10):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            (100 * ((m(x) - y) ** 2).mean()).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
            o.step()
    assert max_diff(m1, m2) < 1e-6
    # With a scale-sensitive chain (SGD) the clipped gradient is what the step uses.
    m3 = mlp()
    o3 = TransformOptimizer(m3.parameters(), lambda lr: sf.scale_by_learning_rate(lr), {"lr": 1.0})
    o3.zero_grad()
    (100 * ((m3(x) - y) ** 2).mean()).backward()
    torch.nn.utils.clip_grad_norm_(m3.parameters(), 0.1)
    before = [p.detach().clone() for p in m3.parameters()]
    o3.step()
    moved = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(before, m3.parameters())))
    assert abs(moved.item() - 0.1) < 1e-5


def test_grad_scaler_unscales_and_skips_inf():
    torch.manual_seed(0)
    m1, m2 = mlp(), mlp()
    o1 = make_adamw(m1.parameters(), lr=1e-2)
    o2 = make_adamw(m2.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = data()
    for _ in range(3):
        train_step(m1, o1, x, y)
        o2.zero_grad()
        scaler.scale(((m2(x) - y) ** 2).mean()).backward()
        scaler.step(o2)
        scaler.update()
    assert max_diff(m1, m2) < 1e-6
    # An inf gradient: the step is skipped, parameters and state untouched, scale reduced.
    params_before = [p.detach().clone() for p in m2.parameters()]
    state_before = copy.deepcopy(o2.functional_state(0))
    o2.zero_grad()
    scaler.scale(((m2(x) - y) ** 2).mean()).backward()
    next(m2.parameters()).grad[0, 0] = float("inf")
    scale_before = scaler.get_scale()
    scaler.step(o2)
    scaler.update()
    assert scaler.get_scale() < scale_before
    assert all(torch.equal(a, b) for a, b in zip(params_before, m2.parameters()))
    after = torch.utils._pytree.tree_leaves(o2.functional_state(0))
    for a, b in zip(torch.utils._pytree.tree_leaves(state_before), after):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_statistics(dtype):
    model = mlp(dtype=dtype)
    opt = make_adamw(model.parameters(), lr=1e-2)
    x, y = data(dtype=dtype)
    first = None
    for _ in range(30):
        loss = train_step(model, opt, x, y)
        first = loss if first is None else first
    assert loss < first
    assert all(p.dtype == dtype for p in model.parameters())
    adam_state = opt.functional_state(0)[0]
    assert all(t.dtype == torch.float32 for t in adam_state.mu + adam_state.nu)
    # survives a checkpoint round trip (torch.optim would cast the moments to bf16/fp16)
    opt2 = make_adamw(model.parameters(), lr=1e-2)
    opt2.load_state_dict(save_load(opt.state_dict()))
    st = opt2.functional_state(0)[0]
    assert all(t.dtype == torch.float32 for t in st.mu + st.nu)
    assert all(c.dtype == torch.int64 and c.device.type == "cpu" for c in st.count)


def test_sparse_grad_raises():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = make_adamw(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()


def test_complex_and_integer_params_raise():
    with pytest.raises(TypeError, match="complex"):
        make_adamw([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="floating-point"):
        make_adamw([torch.zeros(3, dtype=torch.int64)])


def test_add_param_group():
    model = mlp()
    head = torch.nn.Linear(4, 2)
    opt = make_adamw(model.parameters(), lr=1e-2)
    x, y = data()
    train_step(model, opt, x, y)
    opt.add_param_group({"params": head.parameters(), "lr": 0.0})
    assert opt.param_groups[1]["weight_decay"] == 0.01 and len(opt.param_groups) == 2
    w0 = head.weight.detach().clone()
    opt.zero_grad()
    head(model(x)).sum().backward()
    opt.step()
    assert torch.equal(head.weight, w0)  # lr 0 for that group
    opt.param_groups[1]["lr"] = 1e-2
    opt.zero_grad()
    head(model(x)).sum().backward()
    opt.step()
    assert not torch.equal(head.weight, w0)
    assert opt.functional_state(1) is not None
    # a failing group is not half-added
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": -1.0})
    assert len(opt.param_groups) == 2


def test_torchopt_chain_runs():
    m1, m2 = mlp(), mlp()
    o1 = TransformOptimizer(m1.parameters(), lambda lr: torchopt.adam(lr=lr), {"lr": 1e-2})
    o2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
    x, y = data()
    for _ in range(10):
        train_step(m1, o1, x, y)
        train_step(m2, o2, x, y)
    assert max_diff(m1, m2) < 1e-5
    # a torchopt state checkpoints through the same plain-tensor state_dict
    m3 = copy.deepcopy(m1)
    o3 = TransformOptimizer(m3.parameters(), lambda lr: torchopt.adam(lr=lr), {"lr": 1e-2})
    o3.load_state_dict(save_load(o1.state_dict()))
    for _ in range(3):
        train_step(m1, o1, x, y)
        train_step(m3, o3, x, y)
    assert max_diff(m1, m3) == 0.0


def test_factory_without_lr_and_custom_keys():
    model = mlp()
    opt = TransformOptimizer(model.parameters(), lambda step: sf.chain(sf.scale(-step)), {"step": 0.1})
    x, y = data()
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    expected = [p.detach() - 0.1 * p.grad for p in model.parameters()]
    opt.step()
    assert all(torch.allclose(a, b) for a, b in zip(expected, model.parameters()))


def test_frozen_params_get_no_state_and_unfreezing_grows_the_state():
    model = mlp()
    model[0].weight.requires_grad_(False)
    opt = make_adamw(model.parameters())
    x, y = data()
    w0 = model[0].weight.detach().clone()
    train_step(model, opt, x, y)
    mu = opt.functional_state(0)[0].mu
    assert len(mu) == 3  # 4 params, one frozen
    assert torch.equal(model[0].weight, w0)
    model[0].weight.requires_grad_(True)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()  # the unfrozen weight trains from this step on
    assert not torch.equal(model[0].weight, w0)
    assert opt.state_dict()["transform_state"][0]["active"] == [0, 1, 2, 3]
    assert len(opt.functional_state(0)[0].mu) == 4


def test_step_hooks_and_scheduler_counting():
    model = mlp()
    opt = make_adamw(model.parameters())
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    x, y = data()
    train_step(model, opt, x, y)
    assert seen == ["pre", "post"]


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_constructor_arguments():
    ps = list(mlp().parameters())
    with pytest.raises(TypeError, match="transform_factory"):
        TransformOptimizer(ps, "adamw", {"lr": 1e-3})
    with pytest.raises(TypeError, match="defaults"):
        TransformOptimizer(ps, adamw_factory, [("lr", 1e-3)])
    with pytest.raises(TypeError, match="GradientTransformation"):
        TransformOptimizer(ps, lambda lr: None, {"lr": 1e-3})
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] must be in \[0, inf\)"):
        make_adamw(ps, lr=-1e-3)
    with pytest.raises(ValueError, match="weight_decay"):
        make_adamw(ps, weight_decay=-1.0)
    with pytest.raises(ValueError, match="reserved"):
        TransformOptimizer(ps, adamw_factory, {"params": 1})
    opt = make_adamw(ps)
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr"):
        opt.step()


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _walk_plain(obj, path="sd"):
    if isinstance(obj, dict):
        assert type(obj) is dict, path
        for k, v in obj.items():
            assert isinstance(k, (str, int)), path
            _walk_plain(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        assert type(obj) in (list, tuple), f"{path}: {type(obj)}"
        for i, v in enumerate(obj):
            _walk_plain(v, f"{path}[{i}]")
    else:
        assert obj is None or type(obj) in (torch.Tensor, str, int, float, bool), f"{path}: {type(obj)}"


def test_state_dict_is_plain_and_loads_weights_only():
    model = mlp()
    opt = make_adamw(two_groups(model))
    x, y = data()
    train_step(model, opt, x, y)
    sd = opt.state_dict()
    _walk_plain(sd)
    loaded = save_load(sd)
    assert loaded["format"] == "scao_fx.TransformOptimizer"
    assert loaded["param_groups"][0]["params"] == [0, 1] and loaded["param_groups"][1]["params"] == [2, 3]


def _run(model, opt, steps, x, y, sched=None):
    for _ in range(steps):
        train_step(model, opt, x, y)
        if sched is not None:
            sched.step()


def test_resume_is_bit_identical():
    x, y = data()
    lam = lambda s: 0.97**s  # noqa: E731
    ref = mlp()
    ref_opt = make_adamw(two_groups(ref), lr=1e-2)
    _run(ref, ref_opt, 20, x, y, torch.optim.lr_scheduler.LambdaLR(ref_opt, lam))

    a = mlp()
    a_opt = make_adamw(two_groups(a), lr=1e-2)
    a_sched = torch.optim.lr_scheduler.LambdaLR(a_opt, lam)
    _run(a, a_opt, 8, x, y, a_sched)
    ckpt = save_load({"model": a.state_dict(), "opt": a_opt.state_dict(), "sched": a_sched.state_dict()})

    b = mlp(seed=123)  # fresh process-like: different init, fresh optimizer
    b.load_state_dict(ckpt["model"])
    b_opt = make_adamw(two_groups(b), lr=1e-2)
    b_sched = torch.optim.lr_scheduler.LambdaLR(b_opt, lam)
    b_opt.load_state_dict(ckpt["opt"])
    b_sched.load_state_dict(ckpt["sched"])
    _run(b, b_opt, 12, x, y, b_sched)
    for p, q in zip(ref.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_load_before_first_step_and_hyperparameters_restored():
    model = mlp()
    opt = make_adamw(model.parameters(), lr=5e-3, weight_decay=0.2)
    sd = save_load(opt.state_dict())
    opt2 = make_adamw(model.parameters())
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 5e-3 and opt2.param_groups[0]["weight_decay"] == 0.2
    assert opt2.functional_state(0) is None


class _ToyQState(NamedTuple):
    codes: list
    scales: list
    count: torch.Tensor


def toy_quantized_momentum(lr):
    """A toy transform whose state mixes int8 codes, float32 scales and an int64 counter."""

    def init(params):
        return _ToyQState(
            [torch.zeros_like(p, dtype=torch.int8) for p in params],
            [torch.ones((), dtype=torch.float32, device=p.device) for p in params],
            torch.zeros((), dtype=torch.int64),
        )

    def update(updates, state, *, params=None, inplace=True):
        codes, scales, out = [], [], []
        for g, c, s in zip(updates, state.codes, state.scales):
            m = 0.9 * c.float() * s / 127 + 0.1 * g.float()
            new_s = m.abs().amax().clamp_min(1e-12)
            codes.append(torch.round(m / new_s * 127).to(torch.int8))
            scales.append(new_s)
            out.append((-lr * m).to(g.dtype))
        return out, _ToyQState(codes, scales, state.count + 1)

    return sf.GradientTransformation(init, update)


def test_load_restores_int8_float32_int64_exactly():
    model = mlp(dtype=torch.bfloat16)
    opt = TransformOptimizer(model.parameters(), toy_quantized_momentum, {"lr": 1e-2})
    x, y = data(dtype=torch.bfloat16)
    _run(model, opt, 3, x, y)
    sd = save_load(opt.state_dict())
    # torch.optim's own loader would cast floating state to the parameter's dtype:
    # make the checkpoint arrive as a GPU loader with map_location would hand it (copies).
    opt2 = TransformOptimizer(model.parameters(), toy_quantized_momentum, {"lr": 1e-2})
    opt2.load_state_dict(sd)
    st, st0 = opt2.functional_state(0), opt.functional_state(0)
    assert all(c.dtype == torch.int8 for c in st.codes)
    assert all(s.dtype == torch.float32 for s in st.scales)
    assert st.count.dtype == torch.int64 and st.count.device.type == "cpu" and int(st.count) == 3
    for a, b in zip(st.codes + st.scales, st0.codes + st0.scales):
        assert torch.equal(a, b)
        assert a.data_ptr() != b.data_ptr()  # loaded state is a copy, not shared
    # continuing both gives identical parameters
    m2 = copy.deepcopy(model)
    opt3 = TransformOptimizer(m2.parameters(), toy_quantized_momentum, {"lr": 1e-2})
    opt3.load_state_dict(sd)
    _run(model, opt, 2, x, y)
    _run(m2, opt3, 2, x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), m2.parameters()))


def test_load_rejects_mismatches():
    model = mlp()
    opt = make_adamw(model.parameters())
    x, y = data()
    train_step(model, opt, x, y)
    sd = opt.state_dict()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_step(model, sgd, x, y)
    with pytest.raises(ValueError, match="only torch.optim.Adam/AdamW checkpoints"):
        opt.load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match="not produced by a scao_fx TransformOptimizer"):
        opt.load_state_dict({"param_groups": sd["param_groups"], "format": "other"})
    with pytest.raises(ValueError, match="param groups"):
        make_adamw(two_groups(model)).load_state_dict(sd)
    with pytest.raises(ValueError, match="parameters"):
        make_adamw(list(model.parameters())[:3]).load_state_dict(sd)
    bad = copy.deepcopy(sd)
    leaves = bad["transform_state"][0]["leaves"]
    first = next(i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor))
    leaves[first] = leaves[first].double()
    with pytest.raises(ValueError, match="dtype"):
        make_adamw(model.parameters()).load_state_dict(bad)
    other = TransformOptimizer(model.parameters(), toy_quantized_momentum, {"lr": 1e-2})
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict(sd)


def test_state_dict_hooks_are_honoured():
    model = mlp()
    opt = make_adamw(model.parameters())
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1 and calls == ["pre"]
    opt.load_state_dict(sd)
    assert calls == ["pre", "load_post"]


# =============================================================================================
# SCAO facade

from scao_fx.optim import COMPAT_KEYWORDS, INERT_KEYWORDS, SCAO  # noqa: E402
from scao_fx.presets import SCAO_DEFAULTS  # noqa: E402

FAST = dict(form="seed", warmup_steps=4, blend_steps=4, precond_freq=3, min_precond_updates=2, k_min=2, k_max=8)


def scao_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12), torch.nn.Tanh(),
                               torch.nn.Linear(12, 4)).to(dtype)


def test_scao_is_an_optimizer_with_the_original_core_signature():
    import inspect

    assert issubclass(SCAO, torch.optim.Optimizer)
    sig = inspect.signature(SCAO)
    expected = dict(lr=5e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, precond_freq=SCAO_DEFAULTS["precond_freq"],
                    epsilon_sparse=0.0, k_min=8, k_max=None, rho=0.95, tau=None, warmup_steps=100, blend_steps=50,
                    min_precond_updates=10, max_precond_dim=2048, use_int8_ema=True)
    for name, default in expected.items():
        assert sig.parameters[name].default == default, name
    assert sf.SCAO is SCAO and sf.TransformOptimizer is TransformOptimizer


def test_scao_equals_functional_chain():
    model = scao_model()
    params = [p.detach().clone() for p in model.parameters()]
    opt = SCAO(model.parameters(), lr=1e-2, **FAST)
    tx = sf.scao(lr=1e-2, **FAST)
    state = tx.init(params)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for _ in range(15):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        updates, state = tx.update(grads, state, params=params)
        params = sf.apply_updates(params, updates)
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)


def test_scao_in_warmup_equals_adamw():
    m1, m2 = scao_model(), scao_model()
    o1 = make_adamw(m1.parameters(), lr=1e-2, weight_decay=0.01, betas=SCAO_DEFAULTS["betas"])
    o2 = SCAO(m2.parameters(), form="seed", lr=1e-2, warmup_steps=20)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for _ in range(20):
        for m, o in ((m1, o1), (m2, o2)):
            train_step(m, o, x, y)
    assert max_diff(m1, m2) == 0.0


def test_scao_trains_and_preconditioning_kicks_in():
    m1, m2 = scao_model(), scao_model()
    o1 = SCAO(m1.parameters(), lr=1e-2, **FAST)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    x, y = torch.randn(64, 8), torch.randn(64, 4)
    losses = []
    for _ in range(40):
        losses.append(train_step(m1, o1, x, y).item())
        train_step(m2, o2, x, y)
    assert losses[-1] < 0.7 * losses[0]
    assert max_diff(m1, m2) > 1e-4  # preconditioning changed the trajectory
    d = o1.diagnostics()
    assert d["0"]["phase"] == "precond" and d["0"]["blend"] == 1.0 and d["0"]["rank_left"] >= 2


def test_scao_per_group_preconditioner_enabled():
    model = scao_model()
    ps = list(model.parameters())
    opt = SCAO([{"params": ps[:2]}, {"params": ps[2:], "preconditioner_enabled": False}], lr=1e-2, **FAST)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    _run(model, opt, 25, x, y)
    adam = chain_state(opt.functional_state(1))[0]  # plain AdamW chain (its moments stored as bfloat16)
    assert isinstance(adam, sf.QuantizedState) and isinstance(adam.inner_state, sf.ScaleByAdamState)
    assert isinstance(chain_state(opt.functional_state(0))[0], sf.BlendRampState)
    d = opt.diagnostics()
    assert d["0"]["phase"] == "precond" and d["2"]["phase"] == "adam" and d["2"]["rank_left"] is None


def test_scao_preconditioner_disabled_equals_adamw():
    m1, m2 = scao_model(), scao_model()
    o1 = SCAO(m1.parameters(), lr=1e-2, preconditioner_enabled=False, **FAST)
    o2 = make_adamw(m2.parameters(), lr=1e-2, betas=SCAO_DEFAULTS["betas"])
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for _ in range(20):
        for m, o in ((m1, o1), (m2, o2)):
            train_step(m, o, x, y)
    assert max_diff(m1, m2) == 0.0


def test_scao_accepts_every_original_keyword_at_neutral_value():
    original = dict(
        use_newton_schulz=False, use_int8_ema=True, async_precond=True, beta3=0.99, sparsity=0.0,
        noise_std_init=0.0, noise_anneal=0.998, noise_relative=False, lars_coeff=0.0, lookahead_k=0,
        lookahead_alpha=0.5, dynamic_sparsity=False, adaptive_warmup=False, warmup_stability_threshold=0.05,
        warmup_patience=5, lazy_precond=False, lazy_delta_threshold=0.1, lazy_max_skip=50, use_gsnr_clip=False,
        gsnr_threshold=0.5, adaptive_rank=False, preconditioner_enabled=True, factor_mode="full",
        curvature_mode="dense", curvature_rank=None, update_rule="adamw", tau=1.0,
    )
    model = scao_model()
    opt = SCAO(model.parameters(), form="seed", **original)  # tau is the seed form's
    x, y = torch.randn(8, 8), torch.randn(8, 4)
    train_step(model, opt, x, y)
    # the eigenbasis form (the default) names the keyword that needs the seed form
    with pytest.raises(ValueError, match="tau applies to form='seed' only"):
        SCAO(model.parameters(), **original)


@pytest.mark.parametrize(
    "name,value",
    [
        ("use_newton_schulz", True),
        ("sparsity", 0.1),
        ("noise_std_init", 0.01),
        ("lars_coeff", 0.001),
        ("lookahead_k", 5),
        ("dynamic_sparsity", True),
        ("adaptive_warmup", True),
        ("lazy_precond", True),
        ("use_gsnr_clip", True),
        ("adaptive_rank", True),
        ("curvature_mode", "sketch"),
        ("curvature_rank", 16),
        ("update_rule", "lion"),
    ],
)
def test_scao_rejects_unsupported_features_with_reason(name, value):
    with pytest.raises(ValueError, match=name) as info:
        SCAO(scao_model().parameters(), **{name: value})
    assert "not supported" in str(info.value)


def test_compat_keywords_are_validated_once_and_never_stored():
    compat_names = set(COMPAT_KEYWORDS) | set(INERT_KEYWORDS)
    model = scao_model()
    ps = list(model.parameters())
    opt = SCAO([{"params": ps[:2], "sparsity": 0.0, "beta3": 0.9}], lr=1e-2, amsgrad=False, beta3=0.95,
               lookahead_alpha=0.7, **FAST)
    opt.add_param_group({"params": ps[2:], "use_newton_schulz": False, "foreach": True})
    for group in opt.param_groups:
        assert not compat_names & set(group), compat_names & set(group)
        assert set(group) == set(opt.defaults) | {"params"}
    assert not compat_names & set(opt.defaults)
    for group in opt.state_dict()["param_groups"]:
        assert not compat_names & set(group)
    # a bad value in a group dict or in add_param_group is rejected at once, naming it
    with pytest.raises(ValueError, match="lookahead_k=3 is not supported"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lookahead_k": 3})
    with pytest.raises(ValueError, match="gsnr_threshold"):
        SCAO([{"params": ps, "gsnr_threshold": -1.0}])
    assert len(opt.param_groups) == 2


def test_checkpoint_of_an_earlier_version_with_compat_keys_loads():
    """Earlier versions stored every compat keyword in every param group: such a checkpoint
    loads (the keys are validated and dropped) and the run resumes bit-identically."""
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    m1, m2 = scao_model(), scao_model()
    o1 = SCAO(m1.parameters(), lr=1e-2, **FAST)
    _run(m1, o1, 7, x, y)
    sd = copy.deepcopy(o1.state_dict())
    old_keys = {**{k: v[0] for k, v in COMPAT_KEYWORDS.items()}, **INERT_KEYWORDS}
    for group in sd["param_groups"]:
        group.update(old_keys)
    m2.load_state_dict(m1.state_dict())
    o2 = SCAO(m2.parameters(), lr=1e-2, **FAST)
    o2.load_state_dict(sd)
    assert not (set(old_keys) & set(o2.param_groups[0]))
    _run(m1, o1, 8, x, y)
    _run(m2, o2, 8, x, y)
    assert max_diff(m1, m2) == 0.0
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["sparsity"] = 0.5
    with pytest.raises(ValueError, match="sparsity=0.5 is not supported"):
        SCAO(scao_model().parameters(), lr=1e-2, **FAST).load_state_dict(bad)


def test_compat_tables_cover_the_original_signature():
    original = {
        "use_newton_schulz", "async_precond", "beta3", "sparsity", "noise_std_init", "noise_anneal",
        "noise_relative", "lars_coeff", "lookahead_k", "lookahead_alpha", "dynamic_sparsity", "adaptive_warmup",
        "warmup_stability_threshold", "warmup_patience", "lazy_precond", "lazy_delta_threshold", "lazy_max_skip",
        "use_gsnr_clip", "gsnr_threshold", "adaptive_rank", "curvature_mode", "curvature_rank", "update_rule",
    }
    adamw_only = {"amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused"}
    assert original | adamw_only == set(COMPAT_KEYWORDS) | set(INERT_KEYWORDS)


def test_scao_accepts_torch_adamw_keywords():
    import inspect

    adamw_params = set(inspect.signature(torch.optim.AdamW).parameters) - {"params", "self"}
    model = scao_model()
    kwargs = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False, maximize=False,
                  foreach=None, capturable=False, differentiable=False, fused=None)
    assert adamw_params <= set(kwargs), adamw_params - set(kwargs)
    opt = SCAO(model.parameters(), **{k: kwargs[k] for k in adamw_params})
    train_step(model, opt, torch.randn(8, 8), torch.randn(8, 4))
    SCAO(model.parameters(), foreach=True, fused=False)
    for name in ("amsgrad", "maximize", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"{name}=True is not supported"):
            SCAO(model.parameters(), **{name: True})
    with pytest.raises(TypeError, match="fused must be a bool"):
        SCAO(model.parameters(), fused="yes")


def test_scao_bad_arguments():
    ps = list(scao_model().parameters())
    with pytest.raises(TypeError, match="unexpected keyword.*'warmup'"):
        SCAO(ps, warmup=10)
    with pytest.raises(ValueError, match="beta3"):
        SCAO(ps, beta3=1.5)
    with pytest.raises(TypeError, match="async_precond must be a bool"):
        SCAO(ps, async_precond="yes")
    with pytest.raises(ValueError, match="k_max"):
        SCAO(ps, k_min=8, k_max=4)
    with pytest.raises(ValueError, match="rho"):
        SCAO(ps, rho=1.0)
    with pytest.raises(ValueError, match="precond_freq"):
        SCAO(ps, precond_freq=0)
    with pytest.raises(ValueError, match="lr"):
        SCAO(ps, lr=-1.0)
    with pytest.raises(ValueError, match="factor_mode must be one of"):
        SCAO(ps, factor_mode="diag")
    with pytest.raises(ValueError, match="sides"):
        SCAO(ps, sides="left")
    with pytest.raises(ValueError, match="lookahead_alpha"):
        SCAO(ps, lookahead_alpha=2.0)
    # per-group values are validated too
    with pytest.raises(ValueError, match="sparsity"):
        SCAO([{"params": ps, "sparsity": 0.5}])


def test_scao_param_without_grad_is_left_unchanged():
    model = scao_model()
    opt = SCAO(model.parameters(), lr=1e-2, **FAST)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    for step in range(12):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if step >= 6:
            model[2].weight.grad = None
            frozen = model[2].weight.detach().clone()
        opt.step()
        if step >= 6:
            assert torch.equal(model[2].weight, frozen)


def test_scao_bf16_state_dtypes_survive_checkpoint():
    model = scao_model(dtype=torch.bfloat16)
    # float32 bases (basis_storage="bfloat16", the default, stores the bases in bf16 on purpose);
    # int8 statistics on the small model's short sides too (float32_below=0)
    opt = SCAO(model.parameters(), lr=1e-2, basis_storage="float32", float32_below=0, **FAST)
    x, y = torch.randn(16, 8, dtype=torch.bfloat16), torch.randn(16, 4, dtype=torch.bfloat16)
    _run(model, opt, 8, x, y)

    def dtypes(o):
        return [(t.dtype, t.device.type) for t in optree.tree_leaves(o.functional_state(0))]

    import optree

    before = dtypes(opt)
    assert (torch.int8, "cpu") in before and (torch.float32, "cpu") in before and (torch.int64, "cpu") in before
    assert not any(d == torch.bfloat16 for d, _ in before)  # statistics never in bf16
    opt2 = SCAO(model.parameters(), lr=1e-2, basis_storage="float32", float32_below=0, **FAST)
    opt2.load_state_dict(save_load(opt.state_dict()))
    assert dtypes(opt2) == before


def _scao_run(model, opt, steps, x, y):
    for _ in range(steps):
        train_step(model, opt, x, y)


@pytest.mark.parametrize("cut", [2, 5, 6, 7, 9, 13])  # warmup, ramp, right before/at/after refreshes
def test_scao_resume_bit_identical(cut):
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    total = 16
    ref = scao_model()
    ref_opt = SCAO(ref.named_parameters(), lr=1e-2, **FAST)
    _scao_run(ref, ref_opt, total, x, y)

    a = scao_model()
    a_opt = SCAO(a.named_parameters(), lr=1e-2, **FAST)
    _scao_run(a, a_opt, cut, x, y)
    ckpt = save_load({"model": a.state_dict(), "opt": a_opt.state_dict()})

    b = scao_model(seed=99)
    b.load_state_dict(ckpt["model"])
    b_opt = SCAO(b.named_parameters(), lr=1e-2, **FAST)
    b_opt.load_state_dict(ckpt["opt"])
    _scao_run(b, b_opt, total - cut, x, y)
    for p, q in zip(ref.parameters(), b.parameters()):
        assert torch.equal(p, q)


#: SCAO settings of the diagnostics tests, per form: the seed form's ramp, the eigenbasis form
#: (the default) with every direction kept, and with adaptive ranks (k_min 2, k_max 8).
DIAG_FORMS = {
    "seed": FAST,
    "eigenbasis": dict(precond_freq=3),
    "eigenbasis-adaptive": dict(precond_freq=3, epsilon_sparse=0.05, k_min=2, k_max=8),
}


@pytest.mark.parametrize("form", sorted(DIAG_FORMS))
def test_scao_diagnostics_phases_and_keys(form):
    model = scao_model()
    opt = SCAO(model.named_parameters(), lr=1e-2, **DIAG_FORMS[form])
    assert opt.diagnostics() == {}
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    phases = []
    for _ in range(12):
        train_step(model, opt, x, y)
        rec = opt.diagnostics()["0.weight"]
        phases.append((rec["phase"], rec["blend"]))
    if form == "seed":
        # start = max(warmup 4, min_precond_updates 2) = 4; ramp over 4 steps
        assert [p for p, _ in phases] == ["warmup"] * 4 + ["ramp"] * 3 + ["precond"] * 5
    else:  # no ramp: step 1 is Adam (skipped: skip_first), the bases refreshed after it are used from step 2
        assert phases == [("adam", 0.0)] + [("precond", 1.0)] * 11
    d = opt.diagnostics()
    rec = d["2.weight"]
    from scao_fx.diagnostics import DIAGNOSTIC_KEYS

    assert set(rec) == set(DIAGNOSTIC_KEYS)
    assert rec["shape"] == (12, 12) and rec["sides"] == "both" and rec["step"] == 12
    # refreshes every 3 steps, and (eigenbasis form) at step 1 too
    assert rec["refreshes"] == (4 if form == "seed" else 5)
    if form == "eigenbasis":  # every direction kept
        assert (rec["rank_left"], rec["rank_right"]) == (12, 12) and d["0.weight"]["rank_right"] == 8
        assert (d["4.weight"]["rank_left"], d["4.weight"]["rank_right"]) == (4, 12)
    else:
        assert 2 <= rec["rank_left"] <= 8 and 2 <= rec["rank_right"] <= 8
    assert rec["curvature_norm_left"] > 0 and rec["fallbacks_left"] == 0 and rec["fallbacks_right"] == 0
    assert d["0.bias"]["phase"] == "adam" and d["0.bias"]["rank_left"] is None and d["0.bias"]["sides"] == "none"
    t = opt.diagnostics(as_tensors=True)["2.weight"]
    assert isinstance(t["rank_left"], torch.Tensor) and isinstance(t["blend"], torch.Tensor)
    assert t["phase"] == rec["phase"] and float(t["blend"]) == rec["blend"]
    # the reported curvature norm is the debiased factor's Frobenius norm: compare with fp32
    m2 = scao_model()
    o2 = SCAO(m2.named_parameters(), lr=1e-2, use_int8_ema=False, **DIAG_FORMS[form])
    _run(m2, o2, 12, x, y)
    ref = o2.diagnostics()["2.weight"]["curvature_norm_left"]
    assert abs(rec["curvature_norm_left"] - ref) / ref < 0.1


@pytest.mark.parametrize("form", sorted(DIAG_FORMS))
def test_scao_diagnostics_counts_solver_fallbacks(form):
    from scao_fx._tree import find_nodes

    model = scao_model()
    opt = SCAO(model.named_parameters(), lr=1e-2, use_int8_ema=False, **DIAG_FORMS[form])
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    _run(model, opt, 5, x, y)
    assert opt.diagnostics()["2.weight"]["fallbacks_left"] == 0
    # poison one curvature factor: the next refresh fails and keeps the last good basis
    if form == "seed":
        kron = chain_state(opt.functional_state(0))[0].inner_state
    else:  # the groups and sides have the same types in both forms
        (kron,) = find_nodes(opt.functional_state(0), sf.KroneckerEigenbasisState)
    kron.groups[1].left.stat.diag.fill_(float("nan"))
    _run(model, opt, 1, x, y)
    d = opt.diagnostics()
    assert d["2.weight"]["fallbacks_left"] >= 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("form", sorted(DIAG_FORMS))
def test_scao_compat_methods(form):
    model = scao_model()
    opt = SCAO(model.named_parameters(), lr=1e-2, **DIAG_FORMS[form])
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    _run(model, opt, 7, x, y)
    assert opt.synchronize_precond() is None
    ranks = opt.current_ranks()
    assert set(ranks) == {"0.weight", "2.weight", "4.weight"}
    if form == "eigenbasis":  # the kept widths: every direction of each side
        assert ranks == {"0.weight": (12, 8), "2.weight": (12, 12), "4.weight": (4, 12)}
    else:
        assert all(2 <= k <= 8 for pair in ranks.values() for k in pair)


def test_diagnostics_debias_the_factors_by_their_accumulations():
    """With stat_freq=2 a constant gradient's factor norm still reads ||G G^T|| (debiased by the
    3 accumulations of 5 steps, not by 5)."""
    w = torch.nn.Parameter(torch.zeros(6, 4))
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    opt = SCAO([w], stat_freq=2, use_int8_ema=False)
    for _ in range(5):
        w.grad = g.clone()
        opt.step()
    rec = opt.diagnostics()["0"]
    assert rec["curvature_norm_left"] == pytest.approx(float(torch.linalg.matrix_norm(g @ g.T)), rel=1e-5)
    assert rec["curvature_norm_right"] == pytest.approx(float(torch.linalg.matrix_norm(g.T @ g)), rel=1e-5)


def test_default_scao_diagnostics_after_a_few_steps():
    """The default SCAO() (the eigenbasis form) reports its diagnostics: the records of the
    seed form, with no ramp (phase adam at step 1, precond afterwards)."""
    model = scao_model()
    opt = SCAO(model.named_parameters())
    assert opt.param_groups[0]["form"] == "eigenbasis"
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    _run(model, opt, 1, x, y)
    first = opt.diagnostics()
    assert {r["phase"] for r in first.values()} == {"adam"} and first["2.weight"]["blend"] == 0.0
    assert first["2.weight"]["rank_left"] == 12 and first["2.weight"]["refreshes"] == 1  # refreshed after step 1
    _run(model, opt, 3, x, y)
    d = opt.diagnostics()
    assert sorted(d) == sorted(n for n, _ in model.named_parameters())
    assert {n: r["phase"] for n, r in d.items()} == {
        "0.weight": "precond", "0.bias": "adam", "2.weight": "precond", "2.bias": "adam",
        "4.weight": "precond", "4.bias": "adam",
    }
    rec = d["0.weight"]
    assert rec["shape"] == (12, 8) and rec["sides"] == "both" and (rec["rank_left"], rec["rank_right"]) == (12, 8)
    assert rec["blend"] == 1.0 and rec["step"] == 4 and rec["refreshes"] == 1  # precond_freq 5: steps 1, 5, ...
    assert rec["curvature_norm_left"] > 0 and rec["fallbacks_left"] == rec["fallbacks_right"] == 0
    summary = sf.summarize_diagnostics(d)
    assert summary["phase_precond"] == 3.0 and summary["blend"] == 1.0 and summary["solver_fallbacks"] == 0.0
    # groups are read per their own form; a plain AdamW group is "adam"
    m2 = scao_model()
    ps = list(m2.parameters())
    o2 = SCAO([{"params": ps[:2]}, {"params": ps[2:4], "form": "seed", **{k: v for k, v in FAST.items() if k != "form"}},
               {"params": ps[4:], "preconditioner_enabled": False}])
    _run(m2, o2, 6, x, y)
    d2 = o2.diagnostics()
    assert d2["0"]["phase"] == "precond" and d2["2"]["phase"] == "ramp" and d2["4"]["phase"] == "adam"
    assert (d2["0"]["rank_left"], d2["0"]["rank_right"]) == (12, 8) and 2 <= d2["2"]["rank_left"] <= 8


@pytest.mark.parametrize("which", ["adamw", "scao"])
def test_step_reads_no_device_value(which, monkeypatch):
    """The facade's step never reads a device tensor on the host (no .item()/bool() sync).

    On the meta device any such read raises, so a step that completes there has no host sync
    outside the every-precond_freq refresh (kept out of range here). The one read allowed is the
    non-finite guard's deferred flag: step t's flag, read at step t + 1 (on CUDA through a pinned
    buffer and an event, so it never waits for step t + 1's work); it is counted here."""
    from scao_fx.transforms.finite import _PendingFlag

    reads = []
    monkeypatch.setattr(_PendingFlag, "read", lambda self, flag: reads.append(flag.device.type) or True)
    ps = [torch.nn.Parameter(torch.empty(6, 4, device="meta")), torch.nn.Parameter(torch.empty(4, device="meta"))]
    if which == "adamw":
        opt = make_adamw(ps)
    else:
        opt = SCAO(ps, form="seed", warmup_steps=2, blend_steps=2, min_precond_updates=0, precond_freq=1000)
    for _ in range(6):  # warmup, ramp and fully blended steps
        for p in ps:
            p.grad = torch.empty_like(p)
        opt.step()
    if which == "scao":  # the first step reads the initial flag (made on the device), later ones step t - 1's
        assert reads == ["meta"] * 6
    with pytest.raises(Exception, match="meta"):
        ps[0].sum().item()  # the probe really detects host reads


def test_deepcopy_gives_an_independent_optimizer():
    model = scao_model()
    opt = SCAO(model.parameters(), lr=1e-2, **FAST)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    _run(model, opt, 5, x, y)
    model2 = copy.deepcopy(model)
    both = copy.deepcopy({"model": model, "opt": opt})  # params and state copied together
    m3, o3 = both["model"], both["opt"]
    assert o3.param_groups[0]["params"][0] is next(m3.parameters())
    assert o3.defaults == opt.defaults  # torch adds "differentiable" on unpickle; not passed on
    adam_copy = copy.deepcopy(make_adamw(mlp().parameters()))
    assert "differentiable" not in adam_copy.defaults
    adam_copy.transform()  # rebuilds: the factory does not receive an unknown keyword
    o3.param_groups[0]["lr"] = 0.0  # the copy's lr drives the copy's transform only
    _run(m3, o3, 3, x, y)
    assert all(torch.equal(a, b) for a, b in zip(m3.parameters(), model2.parameters()))
    _run(model, opt, 3, x, y)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_scao_factor_mode_wide_is_one_sided():
    torch.manual_seed(0)
    lora_a = torch.nn.Parameter(0.1 * torch.randn(4, 24))   # (r, d_in): wide side is the right one
    lora_b = torch.nn.Parameter(0.1 * torch.randn(24, 4))   # (d_out, r): wide side is the left one
    square = torch.nn.Parameter(0.1 * torch.randn(6, 6))
    named = [("a", lora_a), ("b", lora_b), ("sq", square)]
    opts = {mode: SCAO([(n, p.detach().clone().requires_grad_()) for n, p in named], lr=1e-2, factor_mode=mode, **FAST)
            for mode in ("full", "wide")}
    for _mode, opt in opts.items():
        ps = opt.param_groups[0]["params"]
        for _ in range(8):
            opt.zero_grad()
            x = torch.randn(16, 24)
            (x @ ps[1] @ ps[0]).pow(2).mean().add(ps[2].sum() ** 2).backward()
            opt.step()
    wide, full = opts["wide"].diagnostics(), opts["full"].diagnostics()
    assert wide["a"]["sides"] == "right" and wide["a"]["rank_left"] is None and wide["a"]["rank_right"] >= 2
    assert wide["b"]["sides"] == "left" and wide["b"]["rank_right"] is None
    assert wide["sq"]["sides"] == "both" and full["a"]["sides"] == "both"
    # the functional equivalent
    assert opts["wide"].param_groups[0]["factor_mode"] == "wide"
    assert SCAO([lora_a], sides="wide").param_groups[0]["sides"] == "wide"


def test_functional_scao_diagnostics_and_errors():
    params = {"w": torch.zeros(6, 5), "b": torch.zeros(5)}
    tx = sf.scao(form="seed", warmup_steps=1, blend_steps=2, min_precond_updates=0, precond_freq=1, k_min=1, k_max=4)
    state = tx.init(params)
    phases = []
    for _ in range(4):
        grads = {"w": torch.randn(6, 5), "b": torch.randn(5)}
        _, state = tx.update(grads, state, params=params)
        # tree order of a dict is sorted by key: "b", then "w"
        phases.append(sf.scao_diagnostics(state, names=["b", "w"])["w"]["phase"])
    assert phases == ["warmup", "ramp", "precond", "precond"]
    rec = sf.scao_diagnostics(state, names=["b", "w"], codec=sf.int8_blockwise())["w"]
    assert rec["refreshes"] == 4 and 1 <= rec["rank_left"] <= 4 and rec["shape"] == (6, 5)
    # the default codec decodes scao()'s default int8 state: its norm matches an fp32 run's
    big = [torch.zeros(40, 30)]
    norms = []
    for int8 in (True, False):
        torch.manual_seed(0)
        tx2 = sf.scao(form="seed", warmup_steps=0, min_precond_updates=0, precond_freq=1, use_int8_ema=int8)
        st2 = tx2.init(big)
        for _ in range(3):
            _, st2 = tx2.update([torch.randn(40, 30)], st2, params=big)
        norms.append(sf.scao_diagnostics(st2, codec=None if int8 else sf.fp32_codec())["0"]["curvature_norm_left"])
    assert norms[1] > 0 and abs(norms[0] - norms[1]) / norms[1] < 0.05
    summary = sf.summarize_diagnostics(sf.scao_diagnostics(state))
    assert summary["phase_precond"] == 1.0 and summary["preconditioned_leaves"] == 1.0
    with pytest.raises(ValueError, match="names must have one entry per leaf"):
        sf.scao_diagnostics(state, names=["only-one"])
    with pytest.raises(ValueError, match="no SCAO preconditioner"):
        sf.scao_diagnostics(sf.adamw().init(params))
    assert sf.summarize_diagnostics({}) == {}


@pytest.mark.parametrize("skip_first", [True, False])
def test_functional_scao_diagnostics_eigenbasis_form(skip_first):
    # a dict tree (sorted: "b", "v", "w", "x"), a vector, a matrix rotated on one side only
    params = {"w": torch.zeros(6, 5), "b": torch.zeros(5), "x": torch.zeros(3, 40), "v": torch.zeros(())}
    names = ["b", "v", "w", "x"]
    tx = sf.scao(skip_first=skip_first, precond_freq=2, max_precond_dim=16, use_int8_ema=False)
    state = tx.init(params)
    steps = []
    for _ in range(3):
        grads = {k: torch.randn(p.shape) for k, p in params.items()}
        _, state = tx.update(grads, state, params=params)
        steps.append(sf.scao_diagnostics(state, names=names, codec=sf.fp32_codec()))
    assert [d["w"]["phase"] for d in steps] == ["adam", "precond", "precond"]
    assert [d["w"]["blend"] for d in steps] == [0.0, 1.0, 1.0]
    d = steps[-1]
    assert set(d) == set(names) and d["w"]["refreshes"] == 2 and d["w"]["step"] == 3  # refreshed at steps 1, 2
    assert (d["w"]["sides"], d["w"]["rank_left"], d["w"]["rank_right"], d["w"]["shape"]) == ("both", 6, 5, (6, 5))
    assert d["x"]["sides"] == "left" and d["x"]["rank_left"] == 3 and d["x"]["rank_right"] is None
    assert d["x"]["phase"] == "precond" and d["x"]["curvature_norm_right"] is None
    assert d["b"]["phase"] == d["v"]["phase"] == "adam" and d["b"]["sides"] == "none"
    assert d["w"]["curvature_norm_left"] > 0 and d["w"]["fallbacks_left"] == 0
    summary = sf.summarize_diagnostics(d)
    assert summary["preconditioned_leaves"] == 2.0 and summary["phase_precond"] == 2.0
    assert summary["rank_mean"] == (6 + 5 + 3) / 3
    # any state holding a KroneckerEigenbasisState: here with a non-Adam inner transform and no guard
    tx2 = sf.chain(sf.kronecker_eigenbasis(sf.scale_by_momentum(0.9), precond_freq=1, rank=sf.fixed_rank(2)),
                   sf.scale_by_learning_rate(0.1))
    p2 = [torch.zeros(4, 3), torch.zeros(3)]
    st2 = tx2.init(p2)
    _, st2 = tx2.update([torch.randn(4, 3), torch.randn(3)], st2)
    _, st2 = tx2.update([torch.randn(4, 3), torch.randn(3)], st2)
    d2 = sf.scao_diagnostics(st2, names=["w", "b"], curvature_norms=False)
    assert d2["w"]["phase"] == "precond" and (d2["w"]["rank_left"], d2["w"]["rank_right"]) == (2, 2)
    assert d2["w"]["curvature_norm_left"] is None and d2["b"]["phase"] == "adam"
    with pytest.raises(ValueError, match="names must have one entry per leaf"):
        sf.scao_diagnostics(state, names=["only-one"])


def test_scao_never_used_parameter_stays_put_and_finite():
    model = scao_model()
    unused = torch.nn.Linear(12, 12)  # requires grad, never receives one (an unused head)
    opt = SCAO(list(model.parameters()) + list(unused.parameters()), lr=1e-2, **FAST)
    w0 = unused.weight.detach().clone()
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    _run(model, opt, 12, x, y)
    assert torch.equal(unused.weight, w0)
    leaves = [t for t in optree_leaves(opt.functional_state(0)) if t.is_floating_point()]
    assert all(torch.isfinite(t).all() for t in leaves)
    assert opt.diagnostics()["6"]["phase"] == "precond"  # unused.weight has state, is just never moved


def optree_leaves(tree):
    import optree

    return optree.tree_leaves(tree)


def test_version_1_checkpoint_loads_and_resumes_exactly():
    """Checkpoints of the previous format (version 1: every leaf in transform_state, "state"
    empty), written by the code before the version-2 layout (tests/data/make_checkpoint_v1.py),
    still load and resume bit-identically; the next state_dict() is version 2."""
    import importlib.util
    import pathlib

    here = pathlib.Path(__file__).parent / "data"
    spec = importlib.util.spec_from_file_location("make_checkpoint_v1", here / "make_checkpoint_v1.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    ckpt = torch.load(here / "checkpoint_v1.pt", weights_only=True)
    assert ckpt["opt"]["version"] == 1 and ckpt["opt"]["state"] == {}
    m = gen.model()
    m.load_state_dict(ckpt["model"])
    params = list(m.parameters())
    opt = SCAO([{"params": params[:2]}, {"params": params[2:]}], form="seed", **gen.KW)  # the form of the time
    opt.load_state_dict(ckpt["opt"])
    assert opt.param_groups[1]["use_int8_ema"] is False  # the saved hyperparameters
    gen.run(m, opt, range(8, 13))
    for k, v in m.state_dict().items():
        assert torch.equal(v, ckpt["after_5_steps"][k]), k
    sd = opt.state_dict()
    assert sd["version"] == 2 and sorted(sd["state"]) == list(range(len(params)))
    # groups saved before the form keyword existed ran the seed form: an optimizer built with
    # today's defaults (the eigenbasis form) loads them as such and resumes the same way
    m2 = gen.model()
    m2.load_state_dict(ckpt["model"])
    params2 = list(m2.parameters())
    opt2 = SCAO([{"params": params2[:2]}, {"params": params2[2:]}])
    opt2.load_state_dict(ckpt["opt"])
    assert [g["form"] for g in opt2.param_groups] == ["seed", "seed"]
    assert opt2.param_groups[0]["basis_storage"] == "float32"
    assert opt2.param_groups[0]["float32_below"] == 0  # saved before the keyword: every side compressed
    assert opt2.param_groups[0]["moments"] == "float32"  # saved before the keyword: float32 moments
    gen.run(m2, opt2, range(8, 13))
    for k, v in m2.state_dict().items():
        assert torch.equal(v, ckpt["after_5_steps"][k]), k


class _PerLeafAdam(NamedTuple):
    """A minimal Adam whose step counters are a tree like the moments (one per leaf, None where
    the moment is None): the layout ScaleByAdamState.count is moving to."""

    @staticmethod
    def make(lr):
        def init(params):
            return sf.ScaleByAdamState(
                [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                [torch.zeros((), dtype=torch.int64) for _ in params],
            )

        def update(grads, state, *, params=None, inplace=True):
            mu, nu, count, out = [], [], [], []
            for g, m, v, c in zip(grads, state.mu, state.nu, state.count):
                if g is None:
                    mu.append(m), nu.append(v), count.append(c), out.append(None)
                    continue
                c = c + 1
                m = 0.9 * m + 0.1 * g
                v = 0.999 * v + 0.001 * g * g
                mh, vh = m / (1 - 0.9 ** int(c)), v / (1 - 0.999 ** int(c))
                mu.append(m), nu.append(v), count.append(c), out.append(-float(lr) * mh / (vh.sqrt() + 1e-8))
            return out, sf.ScaleByAdamState(mu, nu, count)

        return sf.GradientTransformation(init, update)


def test_checkpoint_layout_with_per_leaf_adam_counters():
    """Item 10 with per-parameter step counters: each parameter's "step" is its own counter,
    an AdamW checkpoint warm-starts each counter from its parameter's step, resume is exact."""
    model = mlp()
    params = list(model.parameters())
    opt = TransformOptimizer(params, _PerLeafAdam.make, {"lr": 1e-2})
    x, y = data()
    for i in range(3):
        train_step(model, opt, x, y)
        if i == 0:
            params[0].requires_grad_(False)
    params[0].requires_grad_(True)
    sd = save_load(opt.state_dict())
    assert [float(sd["state"][i]["step"]) for i in range(4)] == [1.0, 3.0, 3.0, 3.0]
    assert sd["transform_state"][0]["leaves"][0] == "state/0/exp_avg"
    # into AdamW and back
    adamw = torch.optim.AdamW(mlp().parameters(), lr=1e-2)
    adamw.load_state_dict(sd)
    back = TransformOptimizer(mlp().parameters(), _PerLeafAdam.make, {"lr": 1e-2})
    back.load_state_dict(save_load(adamw.state_dict()))
    state = back.functional_state(0)
    assert [int(c) for c in state.count] == [1, 3, 3, 3]
    for a, b in zip(state.mu, opt.functional_state(0).mu):
        assert torch.equal(a, b)
    # exact resume through the version-2 layout
    twin_model = mlp()
    twin_model.load_state_dict(model.state_dict())
    twin = TransformOptimizer(twin_model.parameters(), _PerLeafAdam.make, {"lr": 1e-2})
    twin.load_state_dict(sd)
    for _ in range(2):
        train_step(model, opt, x, y)
        train_step(twin_model, twin, x, y)
    assert max_diff(model, twin_model) == 0.0


def test_unfreezing_into_an_existing_shape_group_restarts_that_group():
    """Item 5, shared shapes: a parameter unfrozen into a shape group that already has members
    (same matrix shape) makes that group restart (fresh statistics, identity basis until its
    next refresh); every parameter's Adam moments are kept."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Linear(5, 5), torch.nn.Linear(5, 5))
    model[1].weight.requires_grad_(False)
    opt = SCAO(model.parameters(), form="seed", lr=1e-2, warmup_steps=1, blend_steps=1, min_precond_updates=1,
               precond_freq=2, k_min=1, k_max=4, use_int8_ema=False)
    x = torch.randn(8, 5)
    for _ in range(4):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    (kron,) = sf._tree.find_nodes(opt.functional_state(0), sf.KroneckerPreconditionState)
    assert [g.leaves.tolist() for g in kron.groups] == [[0, 3]] and int(kron.groups[0].left.rank.max()) > 0
    mu_before = [t.clone() for t in sf._tree.find_nodes(opt.functional_state(0), sf.ScaleByAdamState)[0].mu]
    model[1].weight.requires_grad_(True)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt._gather_grads(0, opt._refresh(0))  # the growth alone, without the step's update
    state = opt.functional_state(0)
    (kron,) = sf._tree.find_nodes(state, sf.KroneckerPreconditionState)
    assert [g.leaves.tolist() for g in kron.groups] == [[0, 2, 4]]
    assert int(kron.groups[0].left.rank.max()) == 0  # restarted
    assert int(kron.refreshes) > 0  # the group-wide counters are kept
    mu = sf._tree.find_nodes(state, sf.ScaleByAdamState)[0].mu
    for old, new in zip(mu_before, [mu[j] for j in (0, 1, 3, 4, 5)]):
        assert torch.equal(old, new)
    assert torch.equal(mu[2], torch.zeros(5, 5))
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("form,moments", [("seed", "float32"), ("eigenbasis", "float32"), ("seed", "int8")])
def test_scao_step_never_writes_into_grads(form, moments):
    """SCAO hands p.grad to its transforms without a copy (``_copy_grads = False``): every step
    (warmup, ramp, preconditioned, a skipped NaN step, a plain-AdamW group) leaves each gradient
    bit for bit as autograd wrote it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
    kw = dict(warmup_steps=2, blend_steps=3, min_precond_updates=1) if form == "seed" else {}
    groups = [{"params": [model[0].weight, model[1].weight, model[1].bias]},
              {"params": [model[0].bias, model[2].weight, model[2].bias], "preconditioner_enabled": False}]
    opt = SCAO(groups, lr=1e-2, weight_decay=0.1, precond_freq=2, k_min=1, k_max=4, form=form,
                moments=moments, **kw)
    assert not opt._copy_grads and TransformOptimizer._copy_grads
    x = torch.randn(5, 6)
    for step in range(9):
        opt.zero_grad()
        model(x).square().mean().backward()
        if step == 6:
            model[1].weight.grad[0, 0] = float("nan")  # skipped by the guard
        before = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for p, g in zip(model.parameters(), before):
            assert torch.equal(p.grad.view(torch.int32), g.view(torch.int32))
    assert opt.skipped_steps() >= 1


def test_transform_optimizer_copies_grads_for_links_that_reuse_them():
    """A generic factory may write into its input updates (``scale_by_learning_rate`` does under
    ``inplace=True``): the facade gives it copies, so p.grad is left as it was."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = TransformOptimizer([p], lambda lr: sf.scale_by_learning_rate(lr), {"lr": 0.5})
    p.grad = torch.full((3,), 2.0)
    opt.step()
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and torch.equal(p.detach(), torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# SCAO(moments="int8"): 8-bit Adam moments through the facade


def _wide_model(seed=0):
    """Leaves of at least 4096 entries, so that quantize_state encodes their moments."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 48))


def _wide_data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(32, 64, generator=g), torch.randn(32, 48, generator=g)


def test_scao_moments_keyword_is_validated_with_its_values():
    ps = [torch.nn.Parameter(torch.zeros(3, 2))]
    for bad in ("int4", "fp32", None):
        with pytest.raises(ValueError, match=r"moments must be one of \('float32', 'bfloat16', 'int8'\)"):
            SCAO(ps, form="seed", moments=bad)
        for form in ("seed", "eigenbasis"):
            with pytest.raises(ValueError, match="moments must be one of"):
                sf.scao(form=form, moments=bad)
    for form in ("seed", "eigenbasis"):
        for moments in ("int8", "bfloat16"):
            with pytest.raises(ValueError, match="moment_dtype must be None"):
                sf.scao(form=form, moments=moments, moment_dtype=torch.float32)
    assert SCAO(ps).defaults["moments"] == "bfloat16"


def test_scao_int8_moments_store_int8_and_train():
    x, y = _wide_data()
    losses = {}
    for moments in ("float32", "int8"):
        model = _wide_model()
        opt = SCAO(model.named_parameters(), lr=1e-2, moments=moments, **FAST)
        first = train_step(model, opt, x, y)
        for _ in range(30):
            last = train_step(model, opt, x, y)
        losses[moments] = float(last)
        assert float(last) < 0.7 * float(first)
        codes = [t for t in optree.tree_leaves(opt.functional_state(0)) if t.dtype == torch.int8]
        if moments == "int8":
            # two 8-bit moments per large leaf (64 x 96 and 96 x 48), besides the int8 curvature
            shapes = sorted(tuple(t.shape) for t in codes if t.ndim == 2 and t.shape in ((96, 64), (48, 96)))
            assert shapes == [(48, 96), (48, 96), (96, 64), (96, 64)]
            diag = opt.diagnostics()  # one record per parameter, read through the encoded moments
            assert sorted(diag) == ["0.bias", "0.weight", "2.bias", "2.weight"]
            assert diag["0.weight"]["phase"] == "precond" and diag["0.weight"]["step"] == 31
    assert losses["int8"] < 1.2 * losses["float32"]


@pytest.mark.parametrize("enabled", [True, False])
def test_scao_int8_moments_resume_bit_identical(enabled):
    x, y = _wide_data()
    kw = dict(lr=1e-2, moments="int8", preconditioner_enabled=enabled, **FAST)
    total, cut = 14, 6  # the cut sits in the ramp, two steps before a refresh
    ref = _wide_model()
    ref_opt = SCAO(ref.named_parameters(), **kw)
    _scao_run(ref, ref_opt, total, x, y)

    a = _wide_model()
    a_opt = SCAO(a.named_parameters(), **kw)
    _scao_run(a, a_opt, cut, x, y)
    ckpt = save_load({"model": a.state_dict(), "opt": a_opt.state_dict()})
    assert ckpt["opt"]["param_groups"][0]["moments"] == "int8"

    b = _wide_model(seed=99)
    b.load_state_dict(ckpt["model"])
    b_opt = SCAO(b.named_parameters(), **kw)
    b_opt.load_state_dict(ckpt["opt"])
    _scao_run(b, b_opt, total - cut, x, y)
    for p, q in zip(ref.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_scao_int8_moments_cost_a_quarter_of_the_adam_state():
    params = {"w": torch.zeros(256, 64), "b": torch.zeros(64)}
    fp32 = sf.memory_report(sf.scao(form="seed", max_precond_dim=32, moments="float32").init(params), params)["total_bytes"]
    int8 = sf.memory_report(sf.scao(form="seed", max_precond_dim=32, moments="int8").init(params), params)["total_bytes"]
    # 16384 entries: 8 bytes -> 2 bytes + 2 x 4 bytes of scale per 64 entries (the bias stays
    # fp32), and quantize_state's int64 step seed
    assert fp32 - int8 == 16384 * 8 - (2 * 16384 + 2 * 4 * 16384 // 64) - 8



def test_bfloat16_moments_round_stochastically_and_do_not_stall_with_beta2_near_one():
    """With beta2=0.999 a step of the second moment is below bfloat16's resolution: rounded to
    nearest, it stalls far from the float32 value; stored with stochastic rounding (what
    moments="bfloat16" does) it tracks float32 on average."""

    def nu_after(tx):
        p = {"w": torch.zeros(64, 96)}
        state = tx.init(p)
        gen = torch.Generator().manual_seed(0)
        for t in range(400):
            grad = (1.0 if t < 100 else 2.0) * torch.sign(torch.randn(64, 96, generator=gen))
            _, state = tx.update({"w": grad}, state, params=p)
        found = []
        optree.tree_map(lambda n: found.append(n.nu["w"]) if isinstance(n, sf.ScaleByAdamState) else None, state,
                        is_leaf=lambda x: isinstance(x, sf.ScaleByAdamState), none_is_leaf=True)
        (nu,) = found
        return nu

    kw = dict(form="seed", betas=(0.9, 0.999), max_precond_dim=32)  # no side preconditioned: plain Adam
    exact = nu_after(sf.scao(moments="float32", **kw))
    stored = nu_after(sf.scao(moments="bfloat16", **kw))
    assert stored.data.dtype == torch.bfloat16 and stored.data.shape == (64, 96)
    decoded = stored.data.float()
    assert abs(decoded.mean() / exact.mean() - 1) < 0.01  # unbiased: the mean is kept
    assert (decoded / exact - 1).abs().max() < 0.15
    nearest = nu_after(sf.scale_by_adam(0.9, 0.999, moment_dtype=torch.bfloat16)).float()
    assert abs(nearest.mean() / exact.mean() - 1) > 0.2  # round-to-nearest stalls


def _train_31_steps(make_model, x, y, **kw):
    """``SCAO(**kw)`` on a fresh ``make_model()`` for 31 steps: ``(optimizer, last loss)``, after
    checking the loss fell below 0.7 of the first."""
    model = make_model()
    opt = SCAO(model.named_parameters(), **kw)
    first = train_step(model, opt, x, y)
    for _ in range(30):
        last = train_step(model, opt, x, y)
    assert float(last) < 0.7 * float(first)
    return opt, float(last)


@pytest.mark.parametrize("moments", ["bfloat16", "int8"])
def test_scao_eigenbasis_stored_moments_train_and_resume_bit_identical(moments):
    """The default (eigenbasis) form with bfloat16 or 8-bit Adam moments: the moments of the
    rotated cores are stored as asked, training is as good as with float32 moments, and a run
    cut before, at and after refreshes resumes bit for bit."""
    x, y = _wide_data()
    kw = dict(lr=3e-3, precond_freq=3)
    losses = {}
    for m in ("float32", moments):
        opt, losses[m] = _train_31_steps(_wide_model, x, y, moments=m, **kw)
    assert losses[moments] < 1.2 * losses["float32"]
    leaves = optree.tree_leaves(opt.functional_state(0))
    big = sorted(tuple(t.shape) for t in leaves if t.shape in ((96, 64), (48, 96)))
    assert big == [(48, 96), (48, 96), (96, 64), (96, 64)]  # the two moments of the two matrices' cores
    want = torch.bfloat16 if moments == "bfloat16" else torch.int8
    assert all(t.dtype == want for t in leaves if t.shape in ((96, 64), (48, 96)))
    assert sorted(opt.diagnostics()) == ["0.bias", "0.weight", "2.bias", "2.weight"]

    total = 10
    ref = _wide_model()
    ref_opt = SCAO(ref.named_parameters(), moments=moments, **kw)
    _scao_run(ref, ref_opt, total, x, y)
    for cut in (3, 4, 6):  # refreshes after steps 1, 3, 6, 9
        a = _wide_model()
        a_opt = SCAO(a.named_parameters(), moments=moments, **kw)
        _scao_run(a, a_opt, cut, x, y)
        ckpt = save_load({"model": a.state_dict(), "opt": a_opt.state_dict()})
        b = _wide_model(seed=99)
        b.load_state_dict(ckpt["model"])
        b_opt = SCAO(b.named_parameters(), moments=moments, **kw)
        b_opt.load_state_dict(ckpt["opt"])
        _scao_run(b, b_opt, total - cut, x, y)
        for p, q in zip(ref.parameters(), b.parameters()):
            assert torch.equal(p, q)


@pytest.mark.parametrize("moments", ["bfloat16", "int8"])
def test_scao_stored_moments_load_from_the_earlier_layout(moments, monkeypatch):
    """Until 2026-12-07 the eigenbasis form stored compressed moments by wrapping the whole link
    in quantize_state (a QuantizedState with its own step seed); such a checkpoint loads into
    today's layout (the moments kept in the link's state) with the same codes, and trains on."""
    import scao_fx.alias as alias

    real = alias.scao_eigenbasis_precondition

    def earlier(inner, kw, *, leafwise_inner=None, moment_codecs=None):
        link = real(inner, kw, leafwise_inner=leafwise_inner)
        if moment_codecs is None:
            return link
        return sf.quantize_state(link, sf.KroneckerEigenbasisState(None, None, None, moment_codecs))

    x, y = _wide_data()
    kw = dict(lr=3e-3, precond_freq=3, moments=moments)
    model = _wide_model()
    with monkeypatch.context() as m:
        m.setattr(alias, "scao_eigenbasis_precondition", earlier)
        old = SCAO(model.named_parameters(), **kw)
        _scao_run(model, old, 4, x, y)
    assert sf.QuantizedState in {type(n) for n in optree.tree_leaves(
        old.functional_state(0), is_leaf=lambda n: isinstance(n, sf.QuantizedState))}
    ckpt = save_load({"model": model.state_dict(), "opt": old.state_dict()})
    new = SCAO(model.named_parameters(), **kw)
    new.load_state_dict(ckpt["opt"])
    codes = [t for t in optree.tree_leaves(old.functional_state(0)) if t.dtype in (torch.bfloat16, torch.int8)]
    loaded = [t for t in optree.tree_leaves(new.functional_state(0)) if t.dtype in (torch.bfloat16, torch.int8)]
    assert len(codes) == len(loaded) > 0 and all(torch.equal(a, b) for a, b in zip(codes, loaded))
    first = float(train_step(model, new, x, y))
    for _ in range(5):
        last = float(train_step(model, new, x, y))
    assert last < first


# --------------------------------------------------------------------------- foreach= / fused=


def _kernel_run(steps=4, **kw):
    model = _wide_model()
    opt = SCAO(model.named_parameters(), lr=1e-2, **FAST, **kw)
    x, y = _wide_data()
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        before = [p.grad.clone() for p in model.parameters()]
        opt.step()
        grads.append(all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters())))
    return [p.detach().clone() for p in model.parameters()], opt, grads


@pytest.mark.parametrize("enabled", [True, False])
def test_scao_foreach_and_fused_select_the_adam_arithmetic(enabled):
    ref, _, _ = _kernel_run(preconditioner_enabled=enabled)
    loop, _, _ = _kernel_run(preconditioner_enabled=enabled, foreach=False)
    for a, b in zip(ref, loop):
        assert torch.equal(a, b)  # the per-leaf loop is the foreach arithmetic, bit for bit
    fused, opt, untouched = _kernel_run(preconditioner_enabled=enabled, fused=True)
    assert all(untouched)  # the fused kernel leaves p.grad as autograd left it
    for a, b in zip(ref, fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # to float32 rounding
    assert any(not torch.equal(a, b) for a, b in zip(ref, fused))  # it did run the fused kernel
    # the state is the same layout: a fused optimizer's checkpoint loads into a default one
    SCAO(_wide_model().named_parameters(), lr=1e-2, preconditioner_enabled=enabled, **FAST).load_state_dict(
        opt.state_dict())


def test_scao_foreach_and_fused_together_are_refused():
    with pytest.raises(ValueError, match="cannot be given together"):
        SCAO(torch.nn.Linear(2, 2).parameters(), foreach=True, fused=True)


def test_scale_by_adam_fused_kernel_matches_foreach():
    torch.manual_seed(0)
    params = [torch.randn(16, 8), torch.randn(8, dtype=torch.float64), None]
    a, b = sf.scale_by_adam(), sf.scale_by_adam(kernel="fused")
    sa, sb = a.init(params), b.init(params)
    for _ in range(3):
        g = [torch.randn(16, 8), torch.randn(8, dtype=torch.float64), None]
        ua, sa = a.update(g, sa)
        ub, sb = b.update(g, sb)
        for x, y in zip(ua[:2], ub[:2]):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-7)
    assert ub[2] is None
    assert [int(c) for c in sb.count[:2]] == [3, 3]


def test_scale_by_adam_fused_kernel_falls_back_on_non_contiguous_gradients():
    torch.manual_seed(0)
    params = [torch.randn(8, 6)]
    a, b = sf.scale_by_adam(), sf.scale_by_adam(kernel="fused")
    sa, sb = a.init(params), b.init(params)
    g = [torch.randn(6, 8).t()]  # a transposed view
    ua, sa = a.update(g, sa)
    ub, sb = b.update(g, sb)
    assert torch.equal(ua[0], ub[0])  # the foreach path ran, bit for bit


def _square_model(seed=0):
    """Matrices with both sides >= 128, whose second moments second_moment="factored" factors."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(128, 160), torch.nn.Tanh(), torch.nn.Linear(160, 128))


@pytest.mark.parametrize("moments", ["float32", "int8"])
def test_scao_factored_second_moment_trains_stores_small_and_resumes_bit_identical(moments):
    """second_moment="factored": the rotated cores' second moments are float32 vectors of m + n
    entries (the first moments stored as ``moments`` says), training is about as good as with
    the full second moment, and a run cut before, at and after refreshes resumes bit for bit."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(32, 128, generator=g), torch.randn(32, 128, generator=g)
    kw = dict(lr=3e-3, precond_freq=3, moments=moments)
    losses = {}
    for second in ("full", "factored"):
        opt, losses[second] = _train_31_steps(_square_model, x, y, second_moment=second, **kw)
    assert losses["factored"] < 1.2 * losses["full"]
    node = find_nodes(opt.functional_state(0), sf.ScaleByAdamState)[0]
    nus = [t for t in optree.tree_leaves(node.nu) if t.ndim == 1 and t.numel() == 288]
    assert len(nus) == 2 and all(t.dtype == torch.float32 for t in nus)  # (160 + 128) per matrix
    assert not any(t.shape in ((160, 128), (128, 160)) for t in optree.tree_leaves(node.nu))

    total = 10
    ref = _square_model()
    ref_opt = SCAO(ref.named_parameters(), second_moment="factored", **kw)
    _scao_run(ref, ref_opt, total, x, y)
    for cut in (3, 4, 6):
        a = _square_model()
        a_opt = SCAO(a.named_parameters(), second_moment="factored", **kw)
        _scao_run(a, a_opt, cut, x, y)
        ckpt = save_load({"model": a.state_dict(), "opt": a_opt.state_dict()})
        b = _square_model(seed=99)
        b.load_state_dict(ckpt["model"])
        b_opt = SCAO(b.named_parameters(), second_moment="factored", **kw)
        b_opt.load_state_dict(ckpt["opt"])
        _scao_run(b, b_opt, total - cut, x, y)
        for p, q in zip(ref.parameters(), b.parameters()):
            assert torch.equal(p, q)


def test_scao_second_moment_is_validated_and_saved_in_the_groups():
    ps = [torch.nn.Parameter(torch.zeros(3, 2))]
    for bad in ("adafactor", None, True):
        with pytest.raises(ValueError, match=r"second_moment must be one of \('auto', 'full', 'factored'\)"):
            SCAO(ps, second_moment=bad)
    w = torch.nn.Parameter(torch.zeros(130, 128))
    w.grad = torch.ones(130, 128)
    with pytest.raises(ValueError, match="moment_at_refresh='project'"):
        SCAO([w], second_moment="factored", moment_at_refresh="project").step()
    opt = SCAO(ps, second_moment="factored")
    assert opt.param_groups[0]["second_moment"] == "factored"
    assert SCAO(ps).param_groups[0]["second_moment"] == "auto"


@pytest.mark.parametrize("form", ["eigenbasis", "seed"])
def test_scao_second_moment_auto_factors_in_the_eigenbasis_form_only(form):
    """The default "auto": the eigenbasis form factors a 160 x 128 matrix's second moment (288
    entries), the seed form and a preconditioner_enabled=False group keep Adam's full one."""
    def nu_shapes(opt):
        node = find_nodes(opt.functional_state(0), sf.ScaleByAdamState)[0]
        return sorted(tuple(t.shape) for t in optree.tree_leaves(node.nu) if t.ndim >= 1 and t.numel() > 160)

    for enabled in (True, False):
        model = _square_model()
        opt = SCAO(model.named_parameters(), form=form, preconditioner_enabled=enabled, moments="float32")
        g = torch.Generator().manual_seed(4)
        train_step(model, opt, torch.randn(8, 128, generator=g), torch.randn(8, 128, generator=g))
        factored = enabled and form == "eigenbasis"
        assert nu_shapes(opt) == ([(288,), (288,)] if factored else [(128, 160), (160, 128)])


def test_adamw_checkpoint_warm_starts_a_factored_second_moment_with_its_row_and_column_means():
    """checkpoint.warm_start into a template whose second moment is factored: the matrix's
    exp_avg_sq becomes its row and column means (what the factored statistics hold), the
    vector's is copied. (sf.SCAO loading a torch.optim checkpoint runs its groups with the
    keywords of the time, second_moment="full", so it keeps the full moments as they are.)"""
    from scao_fx.optim import checkpoint

    torch.manual_seed(0)
    ref_ps = [torch.nn.Parameter(torch.randn(130, 128)), torch.nn.Parameter(torch.randn(128))]
    ref = torch.optim.AdamW(ref_ps, lr=1e-3)
    for _ in range(3):
        for p in ref_ps:
            p.grad = torch.randn_like(p)
        ref.step()
    entries = {i: {"step": 3, "exp_avg": ref.state[p]["exp_avg"], "exp_avg_sq": ref.state[p]["exp_avg_sq"]}
               for i, p in enumerate(ref_ps)}
    tx = sf.chain(sf.scale_by_adam(factored=True), sf.scale_by_learning_rate(1e-3))
    state = checkpoint.warm_start(0, tx.init([p.detach() for p in ref_ps]), [0, 1], entries)
    node = find_nodes(state, sf.ScaleByAdamState)[0]
    nu_w, nu_b = optree.tree_leaves(node.nu)
    v = ref.state[ref_ps[0]]["exp_avg_sq"]
    assert nu_w.shape == (258,)
    torch.testing.assert_close(nu_w, torch.cat([v.mean(1), v.mean(0)]))
    assert torch.equal(nu_b, ref.state[ref_ps[1]]["exp_avg_sq"])
    u, _ = tx.update([torch.randn(130, 128), torch.randn(128)], state)  # and it steps on from there
    assert all(torch.isfinite(t).all() for t in u)

    ps = [torch.nn.Parameter(p.detach().clone()) for p in ref_ps]
    warm = SCAO(ps, form="seed", second_moment="factored", warmup_steps=100)
    warm.load_state_dict(save_load(ref.state_dict()))
    assert warm.param_groups[0]["second_moment"] == "full"
    node = find_nodes(warm.functional_state(0), sf.ScaleByAdamState)[0]
    assert torch.equal(optree.tree_leaves(node.nu)[0], v)
