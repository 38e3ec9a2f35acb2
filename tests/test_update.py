"""apply_updates."""

from __future__ import annotations

import pytest
import torch
from treeutil import clone

import scao_fx as sf


def test_inplace_adds_into_the_same_tensors():
    p = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    ids = {k: id(v) for k, v in p.items()}
    out = sf.apply_updates(p, {"w": torch.full((2, 2), -0.5), "b": torch.ones(2)})
    assert {k: id(v) for k, v in out.items()} == ids
    assert torch.equal(p["w"], torch.full((2, 2), 0.5)) and torch.equal(p["b"], torch.ones(2))


def test_out_of_place_leaves_params_alone():
    p = {"w": torch.ones(2), "nested": (torch.zeros(1), [torch.ones(3)])}
    saved = clone(p)
    out = sf.apply_updates(p, {"w": torch.ones(2), "nested": (torch.ones(1), [torch.ones(3)])}, inplace=False)
    assert torch.equal(p["w"], saved["w"]) and torch.equal(p["nested"][1][0], saved["nested"][1][0])
    assert torch.equal(out["w"], torch.full((2,), 2.0))
    assert isinstance(out["nested"], tuple) and isinstance(out["nested"][1], list)


@pytest.mark.parametrize("inplace", [True, False])
def test_none_update_keeps_parameter(inplace):
    p = {"a": torch.ones(2), "b": torch.ones(2)}
    out = sf.apply_updates(p, {"a": None, "b": torch.ones(2)}, inplace=inplace)
    assert out["a"] is p["a"] and torch.equal(out["a"], torch.ones(2))
    assert torch.equal(out["b"], torch.full((2,), 2.0))


def test_leaf_parameters_requiring_grad_update_in_place():
    lin = torch.nn.Linear(2, 1)
    params = dict(lin.named_parameters())
    w0 = lin.weight.detach().clone()
    sf.apply_updates(params, {k: torch.ones_like(v) for k, v in params.items()})
    assert torch.equal(lin.weight.detach(), w0 + 1)
    assert lin.weight.requires_grad


def test_update_cast_to_parameter_dtype():
    p = {"w": torch.ones(3, dtype=torch.bfloat16)}
    for inplace in (True, False):
        out = sf.apply_updates(clone(p), {"w": torch.full((3,), 0.5, dtype=torch.float32)}, inplace=inplace)
        assert out["w"].dtype == torch.bfloat16
        assert torch.equal(out["w"], torch.full((3,), 1.5, dtype=torch.bfloat16))


def test_structure_mismatch():
    with pytest.raises(ValueError, match="params and updates"):
        sf.apply_updates({"a": torch.ones(1)}, {"b": torch.ones(1)})


def test_differentiable_out_of_place():
    # inplace=False keeps the graph: a meta-gradient through one update step.
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    lr = torch.tensor(0.1, requires_grad=True)
    new = sf.apply_updates({"w": w}, {"w": -lr * w}, inplace=False)
    new["w"].sum().backward()
    torch.testing.assert_close(lr.grad, -w.detach().sum())
