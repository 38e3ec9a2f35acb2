"""scao_fx.bench.model: the benchmark GPT."""

from __future__ import annotations

import math

import pytest
import torch

from scao_fx.bench.model import GPT, PRESETS, GPTConfig, preset


def _cfg(**kw):
    return GPTConfig(**{**dict(vocab_size=50, n_layer=2, n_head=2, d_model=32, block_size=16, batch_size=3), **kw})


def test_forward_shapes_and_initial_loss():
    cfg = _cfg()
    model = GPT(cfg, seed=0)
    idx = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(0))
    logits = model(idx)
    assert logits.shape == (3, 16, 50)
    logits2, loss = model(idx, idx)
    assert torch.equal(logits, logits2)
    assert loss.shape == ()
    # small init: predictions near uniform
    assert abs(float(loss.detach()) - math.log(50)) < 0.1
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_deterministic_init_by_seed():
    a, b, c = GPT(_cfg(), seed=1), GPT(_cfg(), seed=1), GPT(_cfg(), seed=2)
    for (na, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), na
        if not na.endswith("bias") and ".ln" not in na and not na.startswith("ln_"):
            assert not torch.equal(pa, pc), na
    # independent of the global RNG
    torch.manual_seed(5)
    d = GPT(_cfg(), seed=1)
    assert torch.equal(d.head.weight, a.head.weight)


def test_causality():
    model = GPT(_cfg(), seed=0).eval()
    idx = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 50
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_presets_and_validation():
    cfg = preset("small", 96)
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.block_size, cfg.batch_size) == (4, 4, 128, 128, 16)
    assert preset("tiny", 10, batch_size=4).batch_size == 4
    assert set(PRESETS) >= {"tiny", "small", "medium", "large"}
    n = GPT(cfg).num_params()
    assert 0.7e6 < n < 1.0e6
    with pytest.raises(ValueError):
        preset("huge", 10)
    with pytest.raises(ValueError):
        _cfg(d_model=30, n_head=4)
    with pytest.raises(ValueError):
        _cfg(n_layer=0)
    with pytest.raises(ValueError):
        GPT(_cfg())(torch.zeros(1, 17, dtype=torch.long))
