r"""Leaf-wise arithmetic over flat lists of tensors, with the multi-tensor fast path written once.

Every function takes flat lists of leaves (``None`` entries pass through untouched) and computes,
leaf by leaf, exactly the per-leaf PyTorch op named in its docstring. Where :func:`fusable`
allows it, the leaves are bucketed by (device, dtype) and each bucket runs one
``torch._foreach_*`` kernel: the same element-wise arithmetic (same operation, same operand
order, same scalar precision), so the bits do not depend on the path taken. Elsewhere (under
``torch.compile`` or ``torch.func``, on DTensors, with autograd recording, and for float16 and
bfloat16 buckets) a Python loop runs the per-leaf op itself.

Example:
    >>> import torch
    >>> from scao_fx import _treemath
    >>> _treemath.add_scaled([torch.ones(2), None], [torch.ones(2), None], 0.5)
    [tensor([1.5000, 1.5000]), None]
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from .base import multi_tensor_ok
from .parallel import is_dtensor

__all__ = ["fusable", "scale", "add_scaled", "lerp", "norms", "mul_each", "chunks_by_size"]


def fusable(tensors: Sequence[Any]) -> bool:
    """Whether ``torch._foreach_*`` kernels may replace a per-leaf loop over ``tensors``.

    :func:`~scao_fx.base.multi_tensor_ok` (not under ``torch.compile`` nor ``torch.func``), no
    DTensor (their per-leaf ops keep their sharding rules) and no autograd graph to record.
    """
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not tensors or not multi_tensor_ok(tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return not any(is_dtensor(t) for t in tensors)


def _buckets(xs: Sequence[Any]) -> dict[tuple, list[int]]:
    """Indices of the tensor leaves of ``xs`` by (device, dtype), in order of first appearance."""
    out: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        if x is not None:
            out.setdefault((x.device, x.dtype), []).append(i)
    return out


#: Dtypes whose buckets take the multi-tensor kernels: their compute type is the dtype itself, so
#: a Python scalar operand means one value whichever path reads it. (For float16/bfloat16 the
#: in-place multi-tensor kernels of some backends round the scalar to the dtype first, the
#: per-leaf ops do not: those buckets keep the loop.)
_FOREACH_DTYPES = (torch.float32, torch.float64)


def _run(xs: Sequence[Any], fused: bool, group_op: Callable, leaf_op: Callable) -> list:
    """``leaf_op(i)`` for every tensor leaf ``i`` of ``xs`` (``None`` kept), or ``group_op(indices,
    device, dtype)`` (one multi-tensor call returning the bucket's results) per bucket when
    ``fused`` and the bucket's dtype allows it."""
    out = list(xs)
    for (device, dtype), idx in _buckets(xs).items():
        if fused and dtype in _FOREACH_DTYPES:
            for i, r in zip(idx, group_op(idx, device, dtype)):
                out[i] = r
        else:
            for i in idx:
                out[i] = leaf_op(i)
    return out


def _host_scalar(factor: Any, dtype: torch.dtype) -> Any:
    """``factor`` in ``dtype`` as a Python number when it is one or lives on the host (no device
    sync); a multiply by it is the multiply by the 0-d tensor ``factor.to(dtype)``. ``None`` for a
    factor on an accelerator."""
    if not isinstance(factor, torch.Tensor):
        return factor
    if factor.device.type != "cpu":
        return None
    return factor.to(dtype).item()


def scale(xs: Sequence[Any], factor: Any, *, inplace: bool = False) -> list:
    r"""Every leaf times ``factor``: :math:`x \leftarrow f\,x` (``x.mul(f)``, ``x.mul_(f)`` in place).

    ``factor`` is a Python number or a 0-d tensor, cast to each leaf's dtype first.
    """

    def group_op(idx, device, dtype):
        group = [xs[i] for i in idx]
        f = _host_scalar(factor, dtype)
        if f is None:
            f = factor.to(device=device, dtype=dtype)
        if not inplace:
            return torch._foreach_mul(group, f)
        torch._foreach_mul_(group, f)
        return group

    def leaf_op(i):
        x = xs[i]
        f = factor.to(device=x.device, dtype=x.dtype) if isinstance(factor, torch.Tensor) else factor
        return x.mul_(f) if inplace else x.mul(f)

    return _run(xs, fusable(list(xs) + [factor]), group_op, leaf_op)


def add_scaled(xs: Sequence[Any], ys: Sequence[Any], alpha: float = 1.0, *, inplace: bool = False) -> list:
    r""":math:`x + \alpha\,y` leaf by leaf (``x.add(y.to(x.dtype), alpha=alpha)``; ``add_`` in place).

    A leaf where ``x`` or ``y`` is ``None`` keeps ``x``.
    """
    live = [x if (x is not None and y is not None) else None for x, y in zip(xs, ys)]
    ys = [None if x is None else y.to(x.dtype) for x, y in zip(live, ys)]

    def group_op(idx, device, dtype):
        group, others = [xs[i] for i in idx], [ys[i] for i in idx]
        if not inplace:
            return torch._foreach_add(group, others, alpha=alpha)
        torch._foreach_add_(group, others, alpha=alpha)
        return group

    def leaf_op(i):
        return xs[i].add_(ys[i], alpha=alpha) if inplace else xs[i].add(ys[i], alpha=alpha)

    out = _run(live, fusable(live + ys), group_op, leaf_op)
    return [x if o is None else o for x, o in zip(xs, out)]


def lerp(starts: Sequence[Any], ends: Sequence[Any], weight: torch.Tensor) -> list:
    r""":math:`s + w\,(e - s)` leaf by leaf, as new tensors (``torch.lerp(s, e, w)``).

    ``weight`` is a 0-d tensor, cast to each leaf's dtype (and device) first. A leaf where
    ``s`` is ``None`` stays ``None``.
    """

    def group_op(idx, device, dtype):
        return torch._foreach_lerp([starts[i] for i in idx], [ends[i] for i in idx], _host_scalar(weight, dtype))

    def leaf_op(i):
        s = starts[i]
        # non_blocking: a pageable 0-d host->device copy that never waits for the device
        return torch.lerp(s, ends[i], weight.to(device=s.device, dtype=s.dtype, non_blocking=True))

    fused = weight.device.type == "cpu" and fusable(list(starts) + list(ends) + [weight])
    return _run(starts, fused, group_op, leaf_op)


def abs_max(x: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    r""":math:`\max |x|` over ``dims`` (every entry when ``None``: a 0-d tensor), NaN where a NaN
    is reduced: ``torch.linalg.vector_norm(x, inf, dims)``, and bit-identical to it (a maximum is
    exact). On the CPU it is :math:`|\max(\max x, -\min x)|` from an ``amax`` and an ``amin``
    pass (no temporary of ``x``'s size; ``dims`` must then be trailing dimensions): in torch 2.13
    the infinity norm and ``torch.aminmax`` along a dimension take a much slower CPU path (the
    non-finite guard's share of the profiled step: ``docs/examples/cpu_profile_step.py``).
    Complex, empty and non-CPU reductions use the infinity norm.

    Example:
        >>> import torch
        >>> from scao_fx._treemath import abs_max
        >>> abs_max(torch.tensor([[1.0, -3.0], [2.0, 0.5]]), (-1,)).tolist()
        [3.0, 2.0]
    """
    if x.device.type != "cpu" or x.is_complex() or x.numel() == 0 or is_dtensor(x):
        return torch.linalg.vector_norm(x, math.inf, dims)
    if dims is None:
        flat = x.reshape(-1)
    else:
        lead = x.dim() - len(dims)
        if sorted(d % x.dim() for d in dims) != list(range(lead, x.dim())):
            return torch.linalg.vector_norm(x, math.inf, dims)
        flat = x.reshape(*x.shape[:lead], -1)
    # NaN propagates through amax, amin and maximum; abs() only makes an all-zero maximum +0.0
    return torch.maximum(flat.amax(-1), flat.amin(-1).neg_()).abs_()


def norms(tensors: Sequence[torch.Tensor], ord: float = 2.0) -> list:
    r"""The vector norm :math:`\lVert x\rVert_{ord}` of each tensor (``torch.linalg.vector_norm``),
    each a 0-d tensor on its tensor's device.

    One ``torch._foreach_norm`` for two tensors or more where
    :func:`~scao_fx.base.multi_tensor_ok` (DTensors included: a norm is a reduction either way); a
    lone tensor takes the per-leaf reduction, whose summation order the 2-norm's bits depend on
    (an infinity norm, a maximum, is exact either way: on the CPU it is :func:`abs_max`, an
    ``amax`` and an ``amin`` pass per tensor).
    """
    tensors = list(tensors)
    if ord == math.inf and all(t.device.type == "cpu" for t in tensors):
        return [abs_max(t) for t in tensors]  # torch's CPU infinity norm is much slower
    if len(tensors) > 1 and multi_tensor_ok(tensors):
        return list(torch._foreach_norm(tensors, ord))
    return [torch.linalg.vector_norm(t, ord) for t in tensors]


def mul_each(xs: Sequence[torch.Tensor], scalars: Sequence[float]) -> list:
    r""":math:`x_i\,s_i` with one Python number per tensor (``x * s``), as new tensors."""
    xs = list(xs)
    if xs and fusable(xs):
        return list(torch._foreach_mul(xs, list(scalars)))
    return [x * s for x, s in zip(xs, scalars)]


def chunks_by_size(tensors: Sequence[torch.Tensor], limit: int) -> list[list[int]]:
    """Consecutive positions of ``tensors`` grouped so that each group holds at most ``limit``
    entries (a tensor larger than ``limit`` is a group of its own): the pieces a step processes
    one at a time to bound its temporaries.

    Example:
        >>> import torch
        >>> chunks_by_size([torch.zeros(3), torch.zeros(2), torch.zeros(9), torch.zeros(1)], 5)
        [[0, 1], [2], [3]]
    """
    out: list[list[int]] = []
    current: list[int] = []
    size = 0
    for j, t in enumerate(tensors):
        n = t.numel()
        if current and size + n > limit:
            out.append(current)
            current, size = [], 0
        current.append(j)
        size += n
    if current:
        out.append(current)
    return out
