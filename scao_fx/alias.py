"""Optimizer aliases: plain chains of the library's transforms."""

from __future__ import annotations

from typing import Any

import torch

from ._validation import check_betas, check_float, check_scalar_or_schedule
from .base import GradientTransformation
from .transforms.adam import add_decayed_weights, scale_by_adam
from .transforms.combinators import chain
from .transforms.scale import scale_by_learning_rate

__all__ = ["adam", "adamw"]


def adam(
    lr=1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    eps_root: float = 0.0,
    mask: Any = None,
    moment_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    r"""Adam with (optional) decoupled weight decay.

    ``chain(scale_by_adam(b1, b2, eps, eps_root), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(lr))``, i.e.
    :math:`\theta \leftarrow \theta - \eta\,(\hat m / (\sqrt{\hat v} + \epsilon) + \lambda\theta)`.

    Args:
        lr: learning rate: float >= 0, 0-d tensor, or schedule ``count -> lr``.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: denominator epsilon, >= 0.
        weight_decay: decoupled weight decay, >= 0 (default 0: plain Adam).
        eps_root: epsilon inside the square root, >= 0.
        mask: tree of bools (or callable) selecting the leaves that are decayed.
        moment_dtype: dtype of the moments (default: at least float32).

    Returns:
        A three-link chain (state: a tuple of three link states).

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.adam(lr=1e-3)
    """
    b1, b2 = check_betas("betas", betas)
    check_scalar_or_schedule("lr", lr)
    check_float("eps", eps, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, moment_dtype=moment_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(lr),
    )


def adamw(
    lr=1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    *,
    eps_root: float = 0.0,
    mask: Any = None,
    moment_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    r"""AdamW: :func:`adam` with ``weight_decay=0.01`` by default (``torch.optim.AdamW``'s default).

    Matches ``torch.optim.AdamW`` (same hyperparameters) to rounding; see :func:`adam` for the
    arguments.

    Example:
        >>> import torch, scao_fx as sf
        >>> params = {"w": torch.zeros(3)}
        >>> tx = sf.adamw(lr=1e-3, weight_decay=0.1)
        >>> state = tx.init(params)
    """
    return adam(lr, betas, eps, weight_decay, eps_root=eps_root, mask=mask, moment_dtype=moment_dtype)
