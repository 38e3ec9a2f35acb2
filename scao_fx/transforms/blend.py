r"""Warmup and blend ramp from the raw gradient into an inner transform's output (SCAO part 5).

.. math::
    g_{eff} = b_t\,P(G) + (1 - b_t)\,G,\qquad
    b_t = \begin{cases} 0 & t \le T_0 \\ r\!\left(\min(1, (t - T_0)/T_b)\right) & t > T_0\end{cases}

with :math:`T_0 = \max(\text{warmup\_steps}, \text{min\_precond\_updates})` (the inner
curvature statistics are updated at every step, so after :math:`T_0` steps they hold at least
``min_precond_updates`` updates), :math:`T_b` = ``blend_steps`` and :math:`r` the identity
(``"linear"``) or :math:`\tfrac12(1-\cos\pi x)` (``"cosine"``). ``blend_steps=0`` is a hard
switch at :math:`T_0`. The inner transform runs at every step (its statistics accumulate during
warmup); its output is simply not used while :math:`b = 0`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .. import _treemath
from .._tree import flatten, unflatten
from .._validation import check_choice, check_int
from ..base import GradientTransformation, check_transform, increment, register_state, step_count

__all__ = ["blend_ramp", "BlendRampState", "blend_factor"]


@register_state
class BlendRampState(NamedTuple):
    """State of :func:`blend_ramp`: the inner state, the step count (CPU int64) and the last blend weight (CPU float32)."""

    inner_state: Any
    count: torch.Tensor
    blend: torch.Tensor


def blend_factor(count: torch.Tensor, start: int, blend_steps: int, shape: str = "linear") -> torch.Tensor:
    """The blend weight ``b`` after ``count`` steps (see the module docs).

    Args:
        count: steps done, a 0-d integer tensor.
        start: last step with ``b = 0`` (``max(warmup_steps, min_precond_updates)``).
        blend_steps: ramp length (0: hard switch).
        shape: ``"linear"`` or ``"cosine"``.

    Returns:
        A 0-d float32 tensor in [0, 1].

    Example:
        >>> import torch, scao_fx as sf
        >>> float(sf.blend_factor(torch.tensor(125), 100, 50))
        0.5
    """
    t = count.to(torch.float32) - start
    if blend_steps == 0:
        return (t > 0).to(torch.float32)
    x = torch.clamp(t / blend_steps, 0.0, 1.0)
    return x if shape == "linear" else 0.5 * (1 - torch.cos(math.pi * x))


def blend_ramp(
    inner: GradientTransformation,
    *,
    warmup_steps: int = 100,
    blend_steps: int = 50,
    shape: str = "linear",
    min_precond_updates: int = 0,
) -> GradientTransformation:
    """Use the raw gradient during warmup, then ramp into ``inner``'s output.

    Args:
        inner: the transform to blend in (e.g. :func:`kronecker_precondition`); it is called with
            ``inplace=False`` so the raw updates stay available for the blend.
        warmup_steps: steps of pure raw gradient, >= 0.
        blend_steps: length of the ramp, >= 0 (0: hard switch).
        shape: ``"linear"`` or ``"cosine"``.
        min_precond_updates: the ramp never starts before this many inner updates, >= 0.

    Returns:
        A ``GradientTransformation`` with state :class:`BlendRampState`.

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.blend_ramp(sf.kronecker_precondition(), warmup_steps=100, blend_steps=50)
    """
    check_transform("inner", inner)
    warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
    blend_steps = check_int("blend_steps", blend_steps, low=0)
    check_choice("shape", shape, ("linear", "cosine"))
    min_precond_updates = check_int("min_precond_updates", min_precond_updates, low=0)
    start = max(warmup_steps, min_precond_updates)

    def init(params):
        return BlendRampState(inner.init(params), step_count(), torch.zeros(()))

    def update(updates, state, *, params=None, inplace=True):
        count = increment(state.count)
        pre, inner_state = inner.update(updates, state.inner_state, params=params, inplace=False)
        b = blend_factor(count, start, blend_steps, shape)
        if not torch.compiler.is_compiling():
            # Outside the ramp the blend is exactly one side (lerp with weight 1 returns its end
            # point bit for bit); b lives on the CPU, so reading it is no device sync.
            weight = float(b)
            if weight == 0.0:
                return updates, BlendRampState(inner_state, count, b)
            if weight == 1.0:
                return pre, BlendRampState(inner_state, count, b)
        raw, spec = flatten(updates)
        pre_leaves, _ = flatten(pre)
        # A fresh tensor per leaf: writing into ``g`` is not allowed (the caller's updates), and
        # ``g`` may be an expanded (stride-0) or read-only view, e.g. from torch.func.grad.
        out = _treemath.lerp(raw, pre_leaves, b)
        # Exactly the raw gradient where b rounds to 0 in the leaf's dtype (and, traced, while
        # b == 0), whatever the inner output holds. In eager mode 0 < b < 1 here (a CPU tensor:
        # the check costs no device sync), so the select runs only for such rounding.
        compiling = torch.compiler.is_compiling()
        positive: dict[torch.dtype, bool] = {}
        for i, g in enumerate(raw):
            if g is None:
                continue
            if compiling:
                out[i] = torch.where(b.to(device=g.device, dtype=g.dtype, non_blocking=True) > 0, out[i], g)
                continue
            if g.dtype not in positive:
                positive[g.dtype] = bool(b.to(g.dtype) > 0)
            if not positive[g.dtype]:
                out[i] = g
        return unflatten(spec, out), BlendRampState(inner_state, count, b)

    return GradientTransformation(init, update)
