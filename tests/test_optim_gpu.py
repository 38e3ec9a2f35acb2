"""The torch.optim facade on a CUDA device: state placement, checkpoints, AMP, host syncs.

Skipped without CUDA (marker ``gpu``).
"""

from __future__ import annotations

import io

import optree
import pytest
import torch

import scao_fx as sf

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FAST = dict(form="seed", warmup_steps=3, blend_steps=3, precond_freq=3, min_precond_updates=2, k_min=2, k_max=16)


def model_on(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
    ).to(device="cuda", dtype=dtype)


def batch(dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(1)
    return (torch.randn(64, 16, device="cuda", generator=g, dtype=dtype),
            torch.randn(64, 4, device="cuda", generator=g, dtype=dtype))


def run(model, opt, steps, x, y):
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def placement(opt):
    return [(t.dtype, t.device.type, tuple(t.shape)) for t in optree.tree_leaves(opt.functional_state(0))]


@pytest.mark.parametrize("map_location", ["cuda", "cpu"])
def test_cuda_checkpoint_restores_devices_dtypes_and_resumes_exactly(map_location):
    x, y = batch()
    ref = model_on()
    ref_opt = sf.SCAO(ref.parameters(), lr=1e-2, **FAST)
    run(ref, ref_opt, 14, x, y)

    a = model_on()
    a_opt = sf.SCAO(a.parameters(), lr=1e-2, **FAST)
    run(a, a_opt, 7, x, y)
    where = placement(a_opt)
    assert ("cpu" in {d for _, d, s in where if s == ()})  # step counters stay on the CPU
    assert any(dt == torch.int8 and d == "cuda" for dt, d, _ in where)  # int8 codes on the GPU
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": a_opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location=map_location, weights_only=True)

    b = model_on(seed=3)
    b.load_state_dict(ckpt["model"])
    b_opt = sf.SCAO(b.parameters(), lr=1e-2, **FAST)
    b_opt.load_state_dict(ckpt["opt"])
    assert placement(b_opt) == where
    run(b, b_opt, 7, x, y)
    for p, q in zip(ref.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("which", ["adamw", "scao"])
def test_cuda_step_has_no_host_sync(which):
    model = model_on()
    params = list(model.parameters())
    if which == "adamw":
        opt = sf.TransformOptimizer(params, lambda lr: sf.adamw(lr), {"lr": 1e-3})
    else:  # refreshes kept out of range: they are the only place allowed to synchronise
        opt = sf.SCAO(params, form="seed", lr=1e-3, warmup_steps=2, blend_steps=2, min_precond_updates=0, precond_freq=1000)
    grads = [[torch.randn_like(p) for p in params] for _ in range(6)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for gs in grads:  # warmup, ramp and fully blended steps
            for p, g in zip(params, gs):
                p.grad = g
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(p).all() for p in params)


def test_cuda_bf16_params_keep_fp32_statistics():
    model = model_on(dtype=torch.bfloat16)
    opt = sf.SCAO(model.parameters(), lr=1e-2, **FAST)
    x, y = batch(torch.bfloat16)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).float().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any(dt == torch.bfloat16 for dt, _, _ in placement(opt))


def test_cuda_autocast_grad_scaler_skips_inf():
    model = model_on()
    opt = sf.SCAO(model.parameters(), lr=1e-2, **FAST)
    scaler = torch.amp.GradScaler("cuda", init_scale=256.0)
    x, y = batch()

    def scaled_backward():
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = ((model(x) - y) ** 2).mean()
        scaler.scale(loss.float()).backward()
        return loss.item()

    losses = []
    for _ in range(10):
        losses.append(scaled_backward())
        scaler.step(opt)
        scaler.update()
    assert losses[-1] < losses[0]
    before = [p.detach().clone() for p in model.parameters()]
    state_before = [t.clone() for t in optree.tree_leaves(opt.functional_state(0))]
    scaled_backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(state_before, optree.tree_leaves(opt.functional_state(0))))
