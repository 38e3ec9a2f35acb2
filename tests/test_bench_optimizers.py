"""scao_fx.bench.optimizers: the registry, availability, state accounting, ablation mapping."""

from __future__ import annotations

import pytest
import torch

import scao_fx as sf
from scao_fx.bench import optimizers as optreg
from scao_fx.presets import SCAO_DEFAULTS


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


def _tiny_gpt(seed=0):
    from scao_fx.bench.model import GPT, preset

    return GPT(preset("tiny", 17, n_layer=1, d_model=16, n_head=2, block_size=8, batch_size=4), seed=seed)


def _gpt_batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 17, (4, 8), generator=gen), torch.randint(0, 17, (4, 8), generator=gen)) for _ in range(n)]


def _train_gpt(opt, model, batches):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        opt.step()


@pytest.mark.parametrize("name", list(optreg.REGISTRY))
def test_every_available_entry_trains(name):
    spec = optreg.get(name)
    if spec.unavailable_reason("cpu") is not None:
        pytest.skip(spec.unavailable_reason("cpu"))
    if spec.named_params:  # needs the benchmark model's parameter names
        model = _tiny_gpt()
        opt = spec.make(model.named_parameters(), spec.default_lr, 0.01)
        before = [p.detach().clone() for p in model.parameters()]
        _train_gpt(opt, model, _gpt_batches(3))
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    else:
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
    assert set(optreg.ABLATIONS) == {"scao-seed-form", "scao-no-int8", "scao-full-second-moment", "scao-fp32-basis",
                                     "scao-no-skip-first", "scao-power-refresh", "scao-adaptive-rank",
                                     "scao-no-precond"}
    for name, abl in optreg.ABLATIONS.items():
        spec = optreg.get(name)
        assert spec.kind == "ablation" and spec.takes_options and abl["removed"]
        if abl["kwargs"] is not None:
            sf.scao(**abl["kwargs"])  # every mapped argument exists and is valid
            assert any(SCAO_DEFAULTS[k] != v for k, v in abl["kwargs"].items())  # each changes the default
    # the no-precond variant is exactly the chain without the preconditioner: sf.adamw at SCAO's betas
    m1, m2 = _tiny_model(), _tiny_model()
    a = optreg.get("scao-no-precond").make(m1.parameters(), 1e-3, 0.01)
    b = sf.TransformOptimizer(m2.parameters(), lambda lr: sf.adamw(lr, betas=SCAO_DEFAULTS["betas"], weight_decay=0.01),
                              {"lr": 1e-3})
    _train(a, m1)
    _train(b, m2)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_scao_options_reach_the_chain():
    model = _tiny_model()
    opts = dict(form="seed", warmup_steps=1, blend_steps=1, precond_freq=1, min_precond_updates=1)
    opt = optreg.get("scao").make(model.parameters(), 1e-2, 0.0, opts)
    assert _train(opt, model, steps=4)
    with pytest.raises(TypeError):
        optreg.get("scao").make(_tiny_model().parameters(), 1e-2, 0.0, {"no_such_option": 1})


def test_variant_is_its_base_with_the_keys_set():
    """``scao@precond_freq=3+stat_freq=3`` trains exactly like ``scao`` given those keys; its own
    keys override --scao-opt's; it records what it is."""
    spec = optreg.get("scao@precond_freq=3+stat_freq=3")
    assert spec.name == "scao@precond_freq=3+stat_freq=3" and spec.kind == "ours"
    assert spec.extra["variant_of"] == "scao" and spec.extra["variant_options"] == {"precond_freq": 3, "stat_freq": 3}
    m1, m2 = _tiny_model(), _tiny_model()
    a = spec.make(m1.parameters(), 1e-2, 0.0, {"stat_freq": 1, "rho": 0.9})
    b = optreg.get("scao").make(m2.parameters(), 1e-2, 0.0, {"precond_freq": 3, "stat_freq": 3, "rho": 0.9})
    assert _train(a, m1, steps=6) and _train(b, m2, steps=6)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert a.param_groups[0]["stat_freq"] == 3 and a.param_groups[0]["rho"] == 0.9
    with pytest.raises(ValueError, match="takes no SCAO keys"):
        optreg.get("adamw@lr=1")
    with pytest.raises(KeyError, match="nope"):
        optreg.get("nope@rho=0.9")


def test_muon_entry_equals_muon_plus_adamw_by_hand():
    """``muon`` = torch.optim.Muon on the blocks' 2-D weights + torch.optim.AdamW on the rest."""
    spec = optreg.get("muon")
    if spec.unavailable_reason("cpu") is not None:
        pytest.skip(spec.unavailable_reason("cpu"))
    batches = _gpt_batches(4)
    m1, m2 = _tiny_gpt(), _tiny_gpt()
    ours = spec.make(m1.named_parameters(), 0.02, 0.01, {"adamw_lr": 3e-3})
    matrices = [p for n, p in m2.named_parameters() if n.startswith("blocks.") and p.ndim == 2]
    rest = [p for n, p in m2.named_parameters() if not (n.startswith("blocks.") and p.ndim == 2)]
    # the split: attention qkv/proj and MLP fc/out of each block; embeddings, head, norms, biases to AdamW
    assert {n for n, p in m2.named_parameters() if n.startswith("blocks.") and p.ndim == 2} == {
        "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.fc.weight", "blocks.0.out.weight"}
    muon = torch.optim.Muon(matrices, lr=0.02, weight_decay=0.01)
    adamw = torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.01)
    assert [g["lr"] for g in ours.param_groups] == [0.02, 3e-3]
    _train_gpt(ours, m1, batches)
    for x, y in batches:
        muon.zero_grad(set_to_none=True)
        adamw.zero_grad(set_to_none=True)
        m2(x, y)[1].backward()
        muon.step()
        adamw.step()
    for (name, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), name  # same ops in the same order: bit-identical
    changed = [not torch.equal(p, q) for p, q in zip(m1.parameters(), _tiny_gpt().parameters())]
    assert all(changed)
    # state: Muon's momentum (4 B per matrix entry) + AdamW's two moments and step (8 B per entry + 4 B per tensor)
    n_mat = sum(p.numel() for p in matrices)
    n_rest = sum(p.numel() for p in rest)
    assert optreg.state_bytes(ours) == 4 * n_mat + 8 * n_rest + 4 * len(rest)
    assert optreg.state_bytes(ours) == optreg.state_bytes(muon) + optreg.state_bytes(adamw)


def test_muon_defaults_and_bad_input():
    spec = optreg.get("muon")
    if spec.unavailable_reason("cpu") is not None:
        pytest.skip(spec.unavailable_reason("cpu"))
    opt = spec.make(_tiny_gpt().named_parameters(), spec.default_lr, 0.01)
    assert spec.default_lr == 0.02 and spec.option_set == "muon"
    assert opt.parts["adamw"].param_groups[0]["lr"] == optreg.get("adamw").default_lr
    assert opt.parts["muon"].param_groups[0]["adjust_lr_fn"] is None  # torch's default
    with pytest.raises(TypeError, match="name"):
        spec.make(_tiny_gpt().parameters(), 0.02, 0.01)
    with pytest.raises(ValueError, match="blocks"):
        spec.make(_tiny_model().named_parameters(), 0.02, 0.01)
    with pytest.raises(ValueError, match="AdamW part"):
        spec.make(_tiny_gpt().named_parameters(), 0.02, 0.01, {"adamw_lr": -1.0})


def test_adamw_variants_differ_only_in_beta2():
    m = _tiny_model()
    a = optreg.get("adamw").make(m.parameters(), 1e-3, 0.01)
    b = optreg.get("adamw-b95").make(m.parameters(), 1e-3, 0.01)
    assert a.defaults["betas"] == (0.9, 0.999) and b.defaults["betas"] == (0.9, 0.95)
    assert optreg.BASELINE_CANDIDATES == ("adamw", "adamw-b95")
    assert all(optreg.get(n).kind == "baseline" for n in optreg.BASELINE_CANDIDATES)


def test_requires_module_attribute():
    spec = optreg.OptimizerSpec("x", lambda p, lr, wd: None, 1e-3, "x", requires=("torch.optim:NoSuchOptimizer42",))
    reason = spec.unavailable_reason("cpu")
    assert reason is not None and "NoSuchOptimizer42" in reason
    assert optreg.OptimizerSpec("y", lambda p, lr, wd: None, 1e-3, "y", requires=("torch.optim:AdamW",)) \
        .unavailable_reason("cpu") is None


def test_scao_option_keys():
    keys = optreg.scao_option_keys()
    assert {"rho", "warmup_steps", "blend_steps", "use_int8_ema"} <= set(keys)
    assert "lr" not in keys and "weight_decay" not in keys
    optreg.check_scao_options({"rho": 0.9})
    with pytest.raises(ValueError, match=r"'rhoo'.*valid keys: .*rho"):
        optreg.check_scao_options({"rho": 0.9, "rhoo": 0.9})


def test_option_values_parse_to_python_values_and_tuples():
    from scao_fx.bench.optimizers import parse_options, parse_value

    assert parse_value("true") is True and parse_value("None") is None
    assert parse_value("3") == 3 and parse_value("5e-3") == 5e-3 and parse_value("eigh") == "eigh"
    assert parse_value("0.95,0.95") == (0.95, 0.95)
    assert parse_options(["betas=0.9,0.99", "precond_freq=3"], "--scao-opt") == {"betas": (0.9, 0.99), "precond_freq": 3}
