"""scao_fx.bench.optimizers: the registry, availability, state accounting, ablation mapping."""

from __future__ import annotations

import pytest
import torch

import scao_fx as sf
from scao_fx.bench import optimizers as optreg


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _train(opt, model, steps=3):
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", list(optreg.REGISTRY))
def test_every_available_entry_trains(name):
    spec = optreg.get(name)
    if spec.unavailable_reason("cpu") is not None:
        pytest.skip(spec.unavailable_reason("cpu"))
    model = _tiny_model()
    opt = spec.make(model.parameters(), spec.default_lr, 0.01)
    assert _train(opt, model)
    b = optreg.state_bytes(opt)
    n = sum(p.numel() for p in model.parameters())
    assert b >= 4 * n  # every optimizer here keeps at least one float32 moment per parameter


def test_missing_peer_is_a_reason_not_an_error():
    spec = optreg.OptimizerSpec("ghost", lambda p, lr, wd: None, 1e-3, "x", requires=("no_such_package_xyz_42",))
    reason = spec.unavailable_reason("cpu")
    assert reason is not None and "no_such_package_xyz_42" in reason
    cuda = optreg.OptimizerSpec("gpu-only", lambda p, lr, wd: None, 1e-3, "x", cuda_only=True)
    assert cuda.unavailable_reason("cpu") == "needs a CUDA device"
    assert optreg.available("cpu")["adamw"] is None


def test_register_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError):
        optreg.register(optreg.get("adamw"))
    with pytest.raises(KeyError, match="registered"):
        optreg.get("nope")


def test_state_bytes_adamw_and_sf_chain_agree():
    m1, m2 = _tiny_model(), _tiny_model()
    a = optreg.get("adamw").make(m1.parameters(), 1e-3, 0.01)
    b = optreg.get("sf-adamw").make(m2.parameters(), 1e-3, 0.01)
    _train(a, m1, 1)
    _train(b, m2, 1)
    n = sum(p.numel() for p in m1.parameters())
    assert 8 * n <= optreg.state_bytes(a) <= 8 * n + 64
    assert 8 * n <= optreg.state_bytes(b) <= 8 * n + 64


def test_register_chain_runs_through_transform_optimizer():
    name = "test-sgd-chain"
    optreg.register_chain(name, lambda lr, weight_decay: sf.chain(sf.scale_by_learning_rate(lr)), 0.1, "sgd",
                          kind="ours", overwrite=True)
    try:
        model = _tiny_model()
        opt = optreg.get(name).make(model.parameters(), 0.1, 0.0)
        assert isinstance(opt, sf.TransformOptimizer)
        assert _train(opt, model)
    finally:
        optreg.REGISTRY.pop(name)


def test_ablation_mapping_builds_the_intended_chains():
    assert set(optreg.ABLATIONS) == {"scao-no-blend", "scao-no-int8", "scao-full-rank", "scao-no-complement",
                                     "scao-no-precond"}
    removed = {v["removed"] for v in optreg.ABLATIONS.values()}
    assert removed == {"blend ramp", "int8 curvature", "adaptive rank", "complement", "preconditioning entirely"}
    for name, abl in optreg.ABLATIONS.items():
        spec = optreg.get(name)
        assert spec.kind == "ablation" and spec.takes_options
        if abl["kwargs"] is not None:
            sf.scao_precondition(**abl["kwargs"])  # every mapped argument exists and is valid
    # the no-precond variant is exactly the chain without the preconditioner: sf.adamw
    m1, m2 = _tiny_model(), _tiny_model()
    a = optreg.get("scao-no-precond").make(m1.parameters(), 1e-3, 0.01)
    b = optreg.get("sf-adamw").make(m2.parameters(), 1e-3, 0.01)
    _train(a, m1)
    _train(b, m2)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_scao_options_reach_the_chain():
    model = _tiny_model()
    opts = dict(warmup_steps=1, blend_steps=1, precond_freq=1, min_precond_updates=1)
    opt = optreg.get("scao").make(model.parameters(), 1e-2, 0.0, opts)
    assert _train(opt, model, steps=4)
    with pytest.raises(TypeError):
        optreg.get("scao").make(_tiny_model().parameters(), 1e-2, 0.0, {"no_such_option": 1})
