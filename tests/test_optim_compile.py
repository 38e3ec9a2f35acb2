"""torch.compile(opt.step, fullgraph=True) on the torch.optim facades (SCAO, TransformOptimizer).

fullgraph=True raises on any graph break, so each test that runs also shows the step traces
whole; the compiled parameters then match the eager ones to float32 rounding."""

from __future__ import annotations

import pytest
import torch

import scao_fx as sf
from scao_fx.optim import TransformOptimizer

# short schedules: precondition from step 2, a refresh every 2 steps (seed form)
FAST_SEED = dict(form="seed", warmup_steps=1, blend_steps=2, min_precond_updates=0, precond_freq=2, k_min=2, k_max=4)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def _train(make_opt, *, compiled, steps=4, lrs=None, backend="aot_eager"):
    model = _model()
    opt = make_opt(model.parameters())
    step = torch.compile(opt.step, fullgraph=True, backend=backend) if compiled else opt.step
    torch.manual_seed(1)
    data = [(torch.randn(5, 6), torch.randn(5, 4)) for _ in range(steps)]
    for t, (x, y) in enumerate(data):
        if lrs is not None:  # what an LR scheduler does between steps
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        torch.nn.functional.mse_loss(model(x), y).backward()
        step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], opt


def _check(make_opt, **kw):
    torch._dynamo.reset()
    eager, _ = _train(make_opt, compiled=False, **kw)
    compiled, opt = _train(make_opt, compiled=True, **kw)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    return opt


def test_compiled_step_follows_a_changing_lr():
    # An LR scheduler changes group["lr"] between steps: the compiled step fills the group's lr
    # buffer with a traced (symbolic) value, no recompilation per value; aot_eager runs the AOT
    # graph, where a write to the 0-d lr buffer itself would be dropped.
    lrs = [1e-2, 8e-3, 6e-3]
    opt = _check(lambda ps: sf.SCAO(ps, lr=1e-2, preconditioner_enabled=False), steps=3, lrs=lrs)
    assert float(opt._runtimes[0].lr) == pytest.approx(lrs[-1])


def test_scao_compiled_step_matches_eager_through_a_refresh():
    # Dynamo's own backend ("eager"): fullgraph tracing of the whole facade step, fast
    opt = _check(lambda ps: sf.SCAO(ps, lr=1e-2, **FAST_SEED), steps=3, lrs=[1e-2, 9e-3, 8e-3], backend="eager")
    assert any(r[0] for r in opt.current_ranks().values())  # a refresh ran in the compiled steps


@pytest.mark.slow
def test_scao_defaults_compiled_step_inductor_matches_eager():
    _check(lambda ps: sf.SCAO(ps), steps=3, backend="inductor")


@pytest.mark.slow
def test_scao_eigenbasis_compiled_step_matches_eager():
    _check(lambda ps: sf.SCAO(ps, lr=1e-2, form="eigenbasis", precond_freq=2), steps=3, backend="eager")


def test_transform_optimizer_compiled_step_matches_eager():
    def make(ps):
        return TransformOptimizer(ps, lambda lr, weight_decay: sf.adamw(lr, weight_decay=weight_decay),
                                  {"lr": 1e-2, "weight_decay": 0.1})

    _check(make, steps=3, backend="eager")


def test_compiled_step_refuses_to_rebuild_and_eager_transform_rebuilds():
    torch._dynamo.reset()
    model = _model()
    opt = sf.SCAO(model.parameters(), lr=1e-2, preconditioner_enabled=False)
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    model(torch.randn(3, 6)).sum().backward()
    step()
    before = opt.transform(0)
    opt.param_groups[0]["weight_decay"] = 0.2
    # building a transform is eager Python: the traced step names the change instead
    with pytest.raises(Exception, match=r"weight_decay.*opt\.transform\(0\)"):
        step()
    rebuilt = opt.transform(0)  # eager: rebuilds (state kept)
    assert rebuilt is not before and opt._runtimes[0].built_with["weight_decay"] == 0.2
    step()  # the recompiled step runs the rebuilt transform
    assert opt.transform(0) is rebuilt


def test_factory_error_note_is_kept_in_eager_mode():
    def factory(lr, k):
        if k < 0:
            raise ValueError("k must be >= 0")
        return sf.adamw(lr)

    opt = TransformOptimizer(torch.nn.Linear(2, 2).parameters(), factory, {"lr": 0.1, "k": 0})
    opt.param_groups[0]["k"] = -1
    with pytest.raises(ValueError, match="k must be") as info:
        opt.step()
    assert any("param_groups[0]" in note for note in info.value.__notes__)
