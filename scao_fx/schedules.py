r"""Learning-rate schedules: functions ``count -> lr`` built from tensor ops.

A schedule takes the step count (an int or a 0-d integer tensor, counting from 0 for the first
update) and returns a 0-d float64 tensor, without host synchronisation, so it works inside
``torch.compile`` and ``torch.func.vmap``. Pass one as ``lr`` to :func:`scale_by_learning_rate`,
:func:`adam`, :func:`adamw` or :func:`scao`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ._validation import check_float, check_int

__all__ = ["constant", "linear_warmup", "cosine_decay", "warmup_cosine_decay", "Schedule"]

Schedule = Callable[[int | torch.Tensor], torch.Tensor]


def _as_float(count) -> torch.Tensor:
    return torch.as_tensor(count).to(torch.float64)


def constant(value: float) -> Schedule:
    """``lr(t) = value``.

    Example:
        >>> import scao_fx as sf
        >>> float(sf.schedules.constant(3e-4)(10))
        0.0003
    """
    value = check_float("value", value, low=0.0)
    return lambda count: torch.full_like(_as_float(count), value)


def linear_warmup(peak: float, warmup_steps: int, init: float = 0.0) -> Schedule:
    r"""Linear ramp from ``init`` to ``peak`` over ``warmup_steps``, then ``peak``.

    :math:`\eta(t) = \eta_0 + (\eta_{peak} - \eta_0)\min(1, t / T_w)`.

    Example:
        >>> import scao_fx as sf
        >>> float(sf.schedules.linear_warmup(1.0, 10)(5))
        0.5
    """
    peak = check_float("peak", peak, low=0.0)
    init = check_float("init", init, low=0.0)
    warmup_steps = check_int("warmup_steps", warmup_steps, low=0)

    def schedule(count):
        t = _as_float(count)
        frac = torch.clamp(t / max(warmup_steps, 1), max=1.0) if warmup_steps else torch.ones_like(t)
        return init + (peak - init) * frac

    return schedule


def cosine_decay(init: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    r"""Cosine decay from ``init`` to ``alpha * init`` over ``decay_steps``, then constant.

    :math:`\eta(t) = \eta_0\,[(1-\alpha)\tfrac12(1+\cos(\pi\min(t,T)/T)) + \alpha]`.

    Example:
        >>> import scao_fx as sf
        >>> round(float(sf.schedules.cosine_decay(1.0, 100)(50)), 6)
        0.5
    """
    init = check_float("init", init, low=0.0)
    decay_steps = check_int("decay_steps", decay_steps, low=1)
    alpha = check_float("alpha", alpha, low=0.0, high=1.0)

    def schedule(count):
        t = torch.clamp(_as_float(count), max=float(decay_steps))
        cos = 0.5 * (1 + torch.cos(math.pi * t / decay_steps))
        return init * ((1 - alpha) * cos + alpha)

    return schedule


def warmup_cosine_decay(
    peak: float, warmup_steps: int, decay_steps: int, init: float = 0.0, end: float = 0.0
) -> Schedule:
    r"""Linear warmup from ``init`` to ``peak`` over ``warmup_steps``, then cosine decay to ``end``.

    ``decay_steps`` counts the whole schedule (warmup included) and must exceed ``warmup_steps``.

    Example:
        >>> import scao_fx as sf
        >>> float(sf.schedules.warmup_cosine_decay(1.0, 10, 110)(10))
        1.0
    """
    peak = check_float("peak", peak, low=0.0)
    init = check_float("init", init, low=0.0)
    end = check_float("end", end, low=0.0)
    warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
    decay_steps = check_int("decay_steps", decay_steps, low=warmup_steps + 1)
    span = decay_steps - warmup_steps

    def schedule(count):
        t = _as_float(count)
        warm = init + (peak - init) * (t / max(warmup_steps, 1))
        s = torch.clamp(t - warmup_steps, min=0.0, max=float(span))
        cos = end + (peak - end) * 0.5 * (1 + torch.cos(math.pi * s / span))
        return torch.where(t < warmup_steps, warm, cos)

    return schedule
