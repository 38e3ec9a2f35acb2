"""The tree-math layer: the multi-tensor path gives the per-leaf loop's bits, on every tree."""

from __future__ import annotations

import math

import pytest
import torch

from scao_fx import _treemath

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _tree(device: str, seed: int = 0) -> list:
    """A mixed tree: float32, bfloat16, float16 and float64 leaves, None holes, an empty leaf,
    a non-contiguous view and awkward values (subnormals, large entries)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return [
        r(7, 5),
        None,
        r(33, dtype=torch.bfloat16),
        r(4, 3, 2, dtype=torch.float16, scale=100.0),
        r(0, 3),
        r(6, 4).t(),  # non-contiguous
        r(9, dtype=torch.float64),
        r(5, scale=1e-40),  # float32 subnormals
        r(3, 3, scale=1e30),
        None,
    ]


def _loop(fn):
    """Run ``fn`` with the multi-tensor path switched off (the per-leaf loop)."""
    original = _treemath.fusable
    _treemath.fusable = lambda tensors: False
    try:
        return fn()
    finally:
        _treemath.fusable = original


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
            continue
        assert x.dtype == y.dtype and x.shape == y.shape and x.device == y.device
        # bit for bit (NaNs and signed zeros included)
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)) if x.numel() else True


def _clone(xs: list) -> list:
    return [None if x is None else x.clone() for x in xs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("factor", [0.1, -3e-4, 1.0, "cpu-tensor", "device-tensor"])
@pytest.mark.parametrize("inplace", [False, True])
def test_scale_fused_equals_loop(device, factor, inplace):
    if factor == "cpu-tensor":
        factor = torch.tensor(-1.7e-3)
    elif factor == "device-tensor":
        factor = torch.tensor(0.3, device=device)
    xs = _tree(device)
    assert _treemath.fusable(xs)
    fused_in, loop_in = _clone(xs), _clone(xs)
    fused = _treemath.scale(fused_in, factor, inplace=inplace)
    loop = _loop(lambda: _treemath.scale(loop_in, factor, inplace=inplace))
    _same(fused, loop)
    _same(fused_in, loop_in)  # in place: the inputs hold the results; else untouched
    _same(fused_in, fused if inplace else xs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [1.0, 0.05, -2.5])
@pytest.mark.parametrize("inplace", [False, True])
def test_add_scaled_fused_equals_loop(device, alpha, inplace):
    xs, ys = _tree(device, 0), _tree(device, 1)
    ys[2] = ys[2].to(torch.float32)  # a y of another dtype than its x: cast to x's dtype first
    ys[6] = None  # a hole in y only: x kept
    fused_in, loop_in = _clone(xs), _clone(xs)
    fused = _treemath.add_scaled(fused_in, ys, alpha, inplace=inplace)
    loop = _loop(lambda: _treemath.add_scaled(loop_in, ys, alpha, inplace=inplace))
    _same(fused, loop)
    _same(fused_in, loop_in)
    assert fused[6] is fused_in[6]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight", [1e-3, 0.25, 0.5, 0.75, 0.999])
def test_lerp_fused_equals_loop(device, weight):
    starts, ends = _tree(device, 0), _tree(device, 1)
    w = torch.tensor(weight)
    fused = _treemath.lerp(starts, ends, w)
    loop = _loop(lambda: _treemath.lerp(starts, ends, w))
    _same(fused, loop)
    # the per-leaf op the blend ran before: torch.lerp with the weight as a 0-d tensor of the leaf's dtype
    reference = [None if s is None else torch.lerp(s, e, w.to(device=s.device, dtype=s.dtype)) for s, e in zip(starts, ends)]
    _same(fused, reference)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ord", [2.0, math.inf])
def test_norms_and_mul_each_fused_equal_loop(device, ord):
    xs = [x for x in _tree(device) if x is not None and x.numel()]  # an empty max has no value
    fused = _treemath.norms(xs, ord)
    loop = [torch.linalg.vector_norm(x, ord) for x in xs]
    if ord == math.inf or device == "cpu":  # a maximum is exact; the CPU fused path runs the per-leaf kernel
        _same(fused, loop)
    scalars = [0.5 * (i + 1) for i in range(len(fused))]
    _same(_treemath.mul_each(fused, scalars), [n * s for n, s in zip(fused, scalars)])


def test_empty_trees():
    assert _treemath.scale([], 2.0) == []
    assert _treemath.scale([None, None], torch.tensor(2.0), inplace=True) == [None, None]
    assert _treemath.add_scaled([], [], 0.5) == []
    assert _treemath.add_scaled([None], [torch.ones(2)], 0.5) == [None]
    assert _treemath.lerp([None], [None], torch.tensor(0.5)) == [None]
    assert _treemath.norms([]) == []
    assert _treemath.mul_each([], []) == []
    assert not _treemath.fusable([])
    assert not _treemath.fusable([None, 1.0])


def test_fusable_falls_back_where_foreach_does_not_apply():
    x = torch.ones(3, requires_grad=True)
    assert not _treemath.fusable([x])  # autograd would record the multi-tensor op
    with torch.no_grad():
        assert _treemath.fusable([x])
    # under torch.func the loop runs (foreach ops have no batching rule) and gives the same values
    xs = torch.randn(4, 3)
    out = torch.func.vmap(lambda row: _treemath.scale([row, None], 0.5)[0])(xs)
    assert torch.equal(out, xs * 0.5)


def test_differentiable_out_of_place():
    x = torch.randn(3, requires_grad=True)
    (out,) = _treemath.add_scaled([x], [torch.ones(3)], 2.0)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


@pytest.mark.parametrize("dims", [None, (-1,), (-2, -1), (1, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_abs_max_is_the_infinity_norm_bit_for_bit(dims, dtype):
    from scao_fx._treemath import abs_max

    gen = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(3, 4, 5, generator=gen),
        -torch.rand(3, 4, 5, generator=gen),  # all negative: the minimum's magnitude wins
        torch.zeros(3, 4, 5),
        torch.full((3, 4, 5), -0.0),  # negative zeros: the maximum is still +0.0
        torch.randn(5, 4, 3, generator=gen).transpose(0, 2),  # not contiguous
    ]
    poisoned = torch.randn(3, 4, 5, generator=gen)
    poisoned[0, 1, 2], poisoned[1, 0, 0], poisoned[2, 3, 4] = float("nan"), float("inf"), -float("inf")
    cases.append(poisoned)
    for x in cases:
        x = x.to(dtype)
        got, want = abs_max(x, dims), torch.linalg.vector_norm(x, math.inf, dims)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        assert not torch.signbit(got.nan_to_num()).any()  # +0.0 for an all-zero reduction, as the norm
