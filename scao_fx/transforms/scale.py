"""Scaling by a constant or a learning rate (float, 0-d tensor or schedule)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _treemath
from .._tree import flatten, unflatten
from .._validation import check_float, check_scalar_or_schedule
from ..base import EmptyState, GradientTransformation, increment, register_state, step_count

__all__ = ["scale", "scale_by_learning_rate", "ScaleByScheduleState"]


@register_state
class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_learning_rate` with a schedule: the number of updates so far."""

    count: torch.Tensor


def _scale_leaves(updates, factor, inplace: bool):
    leaves, spec = flatten(updates)
    return unflatten(spec, _treemath.scale(leaves, factor, inplace=inplace))


def scale(step_size: float) -> GradientTransformation:
    """Multiply every update by a constant ``step_size`` (any real number).

    Args:
        step_size: the factor.

    Returns:
        A ``GradientTransformation`` with state ``EmptyState()``.

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.scale(-1.0)   # gradient ascent -> descent
    """
    step_size = check_float("step_size", step_size)

    def init(params):
        return EmptyState()

    def update(updates, state, *, params=None, inplace=True):
        return _scale_leaves(updates, step_size, inplace), state

    return GradientTransformation(init, update)


def scale_by_learning_rate(lr) -> GradientTransformation:
    r"""Scale updates by :math:`-\eta`, turning a descent direction into a parameter change.

    Args:
        lr: a float >= 0, a 0-d float tensor (read at every step, so it can be changed in place
            between steps), or a schedule ``count -> lr`` (see :mod:`scao_fx.schedules`),
            called with the number of updates done before this one (0 at the first update).

    Returns:
        A ``GradientTransformation``: state ``EmptyState()`` for a float or tensor,
        :class:`ScaleByScheduleState` for a schedule.

    Raises:
        ValueError: if ``lr`` is negative (or NaN), or a tensor that is not 0-d.

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.scale_by_learning_rate(sf.schedules.cosine_decay(1e-3, 1000))
    """
    lr = check_scalar_or_schedule("lr", lr)

    if callable(lr):

        def init(params):
            return ScaleByScheduleState(step_count())

        def update(updates, state, *, params=None, inplace=True):
            rate = torch.as_tensor(lr(state.count))
            return _scale_leaves(updates, -rate, inplace), ScaleByScheduleState(increment(state.count))

        return GradientTransformation(init, update)

    def init_const(params):
        return EmptyState()

    def update_const(updates, state, *, params=None, inplace=True):
        return _scale_leaves(updates, -lr, inplace), state

    return GradientTransformation(init_const, update_const)
