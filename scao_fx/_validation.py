"""Argument validation shared by every public constructor.

Every check raises a ``ValueError`` (bad value) or ``TypeError`` (bad type) whose message names
the argument, the value received and the accepted range, so a typo in a config file is
reported where it was made rather than as a NaN a thousand steps later.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import torch

__all__ = [
    "check_float",
    "check_int",
    "check_choice",
    "check_betas",
    "check_scalar_or_schedule",
    "check_bool",
    "check_dtype",
]


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_none: bool = False,
    allow_inf: bool = False,
) -> float | None:
    """Validate a real number against an interval; return it as a Python float.

    Infinities are rejected unless ``allow_inf`` (for caps where ``inf`` means "no cap"): an
    infinite learning rate, epsilon or decay turns every parameter into inf/NaN at the first step.
    """
    if value is None and allow_none:
        return None
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    lo = "-inf" if low is None else repr(low)
    hi = "inf" if high is None else repr(high)
    open_lo = not low_inclusive or (low is None and not allow_inf)
    open_hi = not high_inclusive or (high is None and not allow_inf)
    bracket = ("(" if open_lo else "[") + f"{lo}, {hi}" + (")" if open_hi else "]")
    bad = math.isnan(value) or (math.isinf(value) and not allow_inf)
    if low is not None:
        bad |= value < low if low_inclusive else value <= low
    if high is not None:
        bad |= value > high if high_inclusive else value >= high
    if bad:
        raise ValueError(f"{name} must be in {bracket}, got {value!r}")
    return value


def check_int(
    name: str, value: Any, *, low: int | None = None, high: int | None = None, allow_none: bool = False
) -> int | None:
    """Validate an integer against an inclusive interval."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    """Validate that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices!r}, got {value!r}")
    return value


def check_betas(name: str, betas: Any) -> tuple[float, float]:
    """Validate an Adam ``(beta1, beta2)`` pair, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    b1 = check_float(f"{name}[0]", betas[0], low=0.0, high=1.0, high_inclusive=False)
    b2 = check_float(f"{name}[1]", betas[1], low=0.0, high=1.0, high_inclusive=False)
    return b1, b2  # type: ignore[return-value]


def check_scalar_or_schedule(name: str, value: Any, *, low: float = 0.0) -> float | torch.Tensor | Callable:
    """Validate a learning-rate-like value: a float >= ``low``, a 0-d tensor, or a schedule.

    A tensor's value is checked like a float's (finite, >= ``low``): read once, here, at
    construction (a tensor on an accelerator is read back once); the tensor itself is returned,
    so later in-place changes (a scheduler's) are seen without a rebuild.
    """
    if callable(value):
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim != 0:
            raise ValueError(f"{name} must be a 0-d tensor when given as a tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        current = float(value.detach())
        if not (math.isfinite(current) and current >= low):
            raise ValueError(f"{name} must be in [{low}, inf), got tensor({current!r})")
        return value
    return check_float(name, value, low=low)  # type: ignore[return-value]


def check_bool(name: str, value: Any) -> bool:
    """Validate a bool (not merely a truthy value: ``"no"`` would silently mean True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r} of type {type(value).__name__}")
    return value


def check_dtype(name: str, value: Any, *, allow_none: bool = True) -> torch.dtype | None:
    """Validate a floating-point ``torch.dtype`` (or ``None`` when allowed)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(
            f"{name} must be {'None or ' if allow_none else ''}a floating-point torch.dtype "
            f"(torch.float32, torch.float64, torch.bfloat16, torch.float16), got {value!r}"
        )
    return value


def check_dense_leaves(leaves: Any, what: str = "updates") -> None:
    """Raise ``TypeError`` naming the leaf if any tensor leaf is sparse (or not strided).

    Every transform of the library works on dense (strided) tensors; a sparse gradient (e.g.
    from ``torch.nn.Embedding(sparse=True)``) would otherwise fail deep inside a kernel.
    """
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor) and x.layout != torch.strided:
            raise TypeError(
                f"{what} leaf {i} is a {x.layout} tensor of shape {tuple(x.shape)}; scao_fx transforms need "
                "dense gradients (use torch.nn.Embedding(sparse=False), or x.to_dense())"
            )
