"""Adam moments and decoupled weight decay.

:func:`scale_by_adam` turns gradients into Adam directions; :func:`add_decayed_weights` adds
``weight_decay * params`` (decoupled weight decay when placed after Adam and before the
learning rate, as in AdamW).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from .._tree import flatten, unflatten
from .._validation import check_float
from ..base import register_state, EmptyState, GradientTransformation, increment, step_count
from .combinators import masked

__all__ = ["scale_by_adam", "ScaleByAdamState", "add_decayed_weights", "moment_dtype_for"]


@register_state
class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`: first and second moments (trees like the params) and the step."""

    mu: Any
    nu: Any
    count: torch.Tensor


def moment_dtype_for(dtype: torch.dtype, moment_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype Adam statistics are kept in: ``moment_dtype`` or at least float32."""
    if moment_dtype is not None:
        return moment_dtype
    return torch.promote_types(dtype, torch.float32)


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    moment_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    r"""Rescale updates by Adam's bias-corrected moments.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\\
        u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}

    Bias corrections are computed in the moments' dtype (float64 for float64 params), so the
    chain ``adamw`` reproduces ``torch.optim.AdamW`` to rounding.

    Args:
        b1: first-moment decay, in [0, 1).
        b2: second-moment decay, in [0, 1).
        eps: added to the denominator, >= 0.
        eps_root: added inside the square root, >= 0.
        moment_dtype: dtype of the moments; default: the parameter's dtype promoted to at least
            float32 (bf16/fp16 parameters keep fp32 statistics).

    Returns:
        A ``GradientTransformation`` with state :class:`ScaleByAdamState`.

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.chain(sf.scale_by_adam(), sf.scale_by_learning_rate(1e-3))
    """
    b1 = check_float("b1", b1, low=0.0, high=1.0, high_inclusive=False)
    b2 = check_float("b2", b2, low=0.0, high=1.0, high_inclusive=False)
    eps = check_float("eps", eps, low=0.0)
    eps_root = check_float("eps_root", eps_root, low=0.0)

    def init(params):
        leaves, spec = flatten(params)

        def zeros(p):
            return None if p is None else torch.zeros_like(p, dtype=moment_dtype_for(p.dtype, moment_dtype))

        mu = [zeros(p) for p in leaves]
        nu = [zeros(p) for p in leaves]
        return ScaleByAdamState(unflatten(spec, mu), unflatten(spec, nu), step_count())

    def update(updates, state, *, params=None, inplace=True):
        g_leaves, spec = flatten(updates)
        mu_leaves, mu_spec = flatten(state.mu)
        nu_leaves, _ = flatten(state.nu)
        if mu_spec.num_leaves != spec.num_leaves:
            raise ValueError(
                f"updates has {spec.num_leaves} leaves but the Adam state was built for "
                f"{mu_spec.num_leaves}; was init() called on the same parameter tree?"
            )
        count = increment(state.count)
        out, new_mu, new_nu = [], [], []
        for g, m, v in zip(g_leaves, mu_leaves, nu_leaves):
            if g is None:
                out.append(None)
                new_mu.append(m)
                new_nu.append(v)
                continue
            t = count.to(m.dtype)
            bc1 = 1 - b1**t
            bc2 = 1 - b2**t
            gm = g.to(m.dtype)
            if inplace:
                m = m.lerp_(gm, 1 - b1)
                v = v.mul_(b2).addcmul_(gm, gm, value=1 - b2)
            else:
                m = m.lerp(gm, 1 - b1)
                v = v.mul(b2).addcmul(gm, gm, value=1 - b2)
            denom = (v / bc2 + eps_root).sqrt_().add_(eps) if eps_root else v.sqrt().div_(bc2.sqrt()).add_(eps)
            u = (m / bc1).div_(denom)
            if inplace and u.dtype == g.dtype:
                u = g.copy_(u)
            out.append(u.to(g.dtype))
            new_mu.append(m)
            new_nu.append(v)
        return unflatten(spec, out), ScaleByAdamState(unflatten(mu_spec, new_mu), unflatten(mu_spec, new_nu), count)

    return GradientTransformation(init, update)


def add_decayed_weights(
    weight_decay: float = 0.0, mask: Any | Callable[[Any], Any] | None = None
) -> GradientTransformation:
    r"""Add ``weight_decay * params`` to the updates: :math:`u \leftarrow u + \lambda\,\theta`.

    Placed after :func:`scale_by_adam` and before :func:`scale_by_learning_rate`, this is
    AdamW's decoupled weight decay (:math:`\theta \leftarrow \theta - \eta(u + \lambda\theta)`).

    Args:
        weight_decay: the decay coefficient, >= 0.
        mask: optional tree of bools (or callable ``params -> tree``) selecting the leaves to
            decay (for example matrices only).

    Returns:
        A ``GradientTransformation`` (state ``EmptyState()``, or ``MaskedState`` with a mask).

    Raises:
        ValueError: if ``weight_decay`` is negative, or if ``update`` is called without
            ``params`` while ``weight_decay > 0``.

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.add_decayed_weights(0.1, mask=lambda p: {k: v.ndim >= 2 for k, v in p.items()})
    """
    weight_decay = check_float("weight_decay", weight_decay, low=0.0)

    def init(params):
        return EmptyState()

    def update(updates, state, *, params=None, inplace=True):
        if weight_decay == 0.0:
            return updates, state
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(updates, state, params=params)")
        g_leaves, spec = flatten(updates)
        p_leaves, _ = flatten(params)
        out = []
        for g, p in zip(g_leaves, p_leaves):
            if g is None:
                out.append(None)
            elif inplace:
                out.append(g.add_(p.detach().to(g.dtype), alpha=weight_decay))
            else:
                out.append(g.add(p.detach().to(g.dtype), alpha=weight_decay))
        return unflatten(spec, out), state

    tx = GradientTransformation(init, update)
    return tx if mask is None else masked(tx, mask)
