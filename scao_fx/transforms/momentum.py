r"""Momentum: an exponential moving average of the updates, with an optional Nesterov look-ahead."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .._tree import flatten, flatten_like_state, unflatten
from .._validation import check_bool, check_dense_leaves, check_dtype, check_float
from ..base import GradientTransformation, multi_tensor_ok, register_state
from .adam import moment_dtype_for

__all__ = ["scale_by_momentum", "ScaleByMomentumState"]


@register_state
class ScaleByMomentumState(NamedTuple):
    """State of :func:`scale_by_momentum`: the moment (a tree like the params)."""

    mu: Any


def scale_by_momentum(
    beta: float = 0.9, nesterov: bool = False, *, moment_dtype: torch.dtype | None = None
) -> GradientTransformation:
    r"""Replace updates by their exponential moving average (momentum), optionally Nesterov's.

    .. math::
        m_t = \beta\, m_{t-1} + (1-\beta)\, g_t,\qquad
        u_t = \begin{cases} (1-\beta)\, g_t + \beta\, m_t & \text{nesterov} \\ m_t & \text{otherwise}\end{cases}

    This is the form ``torch.optim.Muon`` computes (``buf.lerp_(g, 1 - beta)``, then
    ``g.lerp(buf, beta)``): the heavy-ball sum :math:`B_t = \beta B_{t-1} + g_t` scaled by
    :math:`1-\beta`, so the update keeps the gradient's scale. :math:`m_0 = 0` and there is no
    bias correction.

    Args:
        beta: decay, in [0, 1).
        nesterov: return the look-ahead :math:`(1-\beta) g_t + \beta m_t` instead of :math:`m_t`.
        moment_dtype: dtype of the moment; default: the parameter's dtype promoted to at least
            float32.

    Returns:
        A ``GradientTransformation`` with state :class:`ScaleByMomentumState`.

    Example:
        >>> import torch, scao_fx as sf
        >>> tx = sf.scale_by_momentum(0.5)
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> u, state = tx.update({"w": torch.ones(2)}, state)
        >>> u["w"], tx.update({"w": torch.ones(2)}, state)[0]["w"]
        (tensor([0.5000, 0.5000]), tensor([0.7500, 0.7500]))
    """
    beta = check_float("beta", beta, low=0.0, high=1.0, high_inclusive=False)
    nesterov = check_bool("nesterov", nesterov)
    moment_dtype = check_dtype("moment_dtype", moment_dtype)

    def init(params):
        leaves, spec = flatten(params)
        mu = [None if p is None else torch.zeros_like(p, dtype=moment_dtype_for(p.dtype, moment_dtype)) for p in leaves]
        return ScaleByMomentumState(unflatten(spec, mu))

    def update(updates, state, *, params=None, inplace=True):
        g_leaves, spec, mu_leaves, mu_spec = flatten_like_state(updates, state.mu, "the momentum state")
        check_dense_leaves(g_leaves)
        live = [i for i, g in enumerate(g_leaves) if g is not None]
        grads = [g_leaves[i].to(mu_leaves[i].dtype) for i in live]
        mus = [mu_leaves[i] for i in live]
        if live and multi_tensor_ok(grads + mus):
            if inplace:
                torch._foreach_lerp_(mus, grads, 1 - beta)
            else:
                mus = list(torch._foreach_lerp(mus, grads, 1 - beta))
            # A fresh tensor either way: the returned updates never share memory with the state.
            us = list(torch._foreach_lerp(grads, mus, beta)) if nesterov else [m.clone() for m in mus]
        else:
            mus = [m.lerp_(g, 1 - beta) if inplace else m.lerp(g, 1 - beta) for g, m in zip(grads, mus)]
            us = [g.lerp(m, beta) for g, m in zip(grads, mus)] if nesterov else [m.clone() for m in mus]
        out, new_mu = [None] * len(g_leaves), list(mu_leaves)
        for j, i in enumerate(live):
            out[i] = us[j].to(g_leaves[i].dtype)
            new_mu[i] = mus[j]
        return unflatten(spec, out), ScaleByMomentumState(unflatten(mu_spec, new_mu))

    return GradientTransformation(init, update)
