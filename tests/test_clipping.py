"""clip_by_global_norm and global_norm."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

import scao_fx as sf
from scao_fx.transforms.clipping import global_norm


def tree(scale=1.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return {
        "w": scale * torch.randn(4, 3, generator=gen, dtype=torch.float64).to(dtype),
        "b": scale * torch.randn(3, generator=gen, dtype=torch.float64).to(dtype),
        "none": None,
    }


def norm_of(t):
    return torch.sqrt(sum((v.double() ** 2).sum() for v in t.values() if v is not None))


def test_global_norm():
    t = tree()
    torch.testing.assert_close(global_norm([t["w"], None, t["b"]]).double(), norm_of(t), rtol=1e-6, atol=0)
    torch.testing.assert_close(global_norm([t["b"]]).double(), t["b"].double().norm(), rtol=1e-6, atol=0)
    assert global_norm([None]).item() == 0.0
    d = tree(dtype=torch.float64)
    assert global_norm([d["w"], d["b"]]).dtype == torch.float64


@pytest.mark.parametrize("inplace", [True, False])
def test_clips_only_above_the_cap(inplace):
    small, big = tree(0.01), tree(100.0)
    tx = sf.clip_by_global_norm(1.0)
    u, _ = tx.update({k: (v.clone() if v is not None else None) for k, v in small.items()}, tx.init(small), inplace=inplace)
    torch.testing.assert_close(u["w"], small["w"])
    u, _ = tx.update({k: (v.clone() if v is not None else None) for k, v in big.items()}, tx.init(big), inplace=inplace)
    assert u["none"] is None
    torch.testing.assert_close(norm_of(u), torch.tensor(1.0, dtype=torch.float64), rtol=1e-5, atol=0)
    # Direction unchanged.
    torch.testing.assert_close(u["w"] / u["b"].norm(), big["w"] / big["b"].norm(), rtol=1e-5, atol=1e-6)


def test_matches_torch_clip_grad_norm():
    t = tree(7.0)
    tensors = [t["w"].clone(), t["b"].clone()]
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in tensors]
    for p, x in zip(params, tensors):
        p.grad = x.clone()
    torch.nn.utils.clip_grad_norm_(params, 2.0)
    u, _ = sf.clip_by_global_norm(2.0).update([t["w"].clone(), t["b"].clone()], sf.EmptyState())
    for a, p in zip(u, params):
        torch.testing.assert_close(a, p.grad, rtol=1e-6, atol=1e-7)


def test_no_host_sync_works_under_vmap():
    # A .item() / float() on the norm would fail under vmap ("data-dependent" control flow).
    stacked = {"w": torch.stack([tree(s)["w"] for s in (0.01, 100.0)]), "b": torch.stack([tree(s)["b"] for s in (0.01, 100.0)])}
    tx = sf.clip_by_global_norm(1.0)
    out = vmap(lambda u: tx.update(u, sf.EmptyState(), inplace=False)[0])(stacked)
    torch.testing.assert_close(out["w"][0], stacked["w"][0])
    n1 = torch.sqrt(out["w"][1].double().pow(2).sum() + out["b"][1].double().pow(2).sum())
    torch.testing.assert_close(n1, torch.tensor(1.0, dtype=torch.float64), rtol=1e-5, atol=0)


def test_bad_max_norm():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="max_norm"):
            sf.clip_by_global_norm(bad)
