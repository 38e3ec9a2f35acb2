r"""Orthogonalised updates: Newton-Schulz on every matrix leaf, scaled by its shape (Muon's core).

:func:`scale_by_newton_schulz` views each leaf of two or more dimensions as the matrix
``(shape[0], prod(shape[1:]))``, stacks the leaves of one matrix shape (a tall and a wide matrix
of transposed shapes share a stack) when ``grouped=True``, runs :func:`~scao_fx.precond.orthogonal.newton_schulz` once
per stack and multiplies each result by its shape factor
(:func:`~scao_fx.precond.orthogonal.shape_scale`). The math lives in
:mod:`scao_fx.precond.orthogonal`; this module is the plumbing over trees.
"""

from __future__ import annotations

import torch

from .._tree import flatten, unflatten
from .._validation import (
    check_bool,
    check_choice,
    check_dense_leaves,
    check_dtype,
    check_float,
    check_int,
)
from ..base import EmptyState, GradientTransformation
from ..precond.orthogonal import (
    NS_COEFFICIENTS,
    SHAPE_RULES,
    newton_schulz,
    shape_scale,
)
from .kronecker import matrix_shape

__all__ = ["scale_by_newton_schulz"]


def check_coefficients(name: str, coefficients) -> tuple[float, float, float]:
    """Validate Newton-Schulz coefficients: a triple ``(a, b, c)`` of finite reals."""
    if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
        raise TypeError(f"{name} must be a triple (a, b, c) of real numbers, got {coefficients!r}")
    return tuple(check_float(f"{name}[{i}]", c) for i, c in enumerate(coefficients))  # type: ignore[return-value]


def scale_by_newton_schulz(
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    adjust_lr: str = "original",
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    grouped: bool = False,
) -> GradientTransformation:
    r"""Orthogonalise every matrix update by Newton-Schulz and scale it by its shape.

    For a leaf of two or more dimensions, viewed as the ``m x n`` matrix :math:`G`
    (``n = prod(shape[1:])``):

    .. math::
        u = s(m, n)\; \mathrm{NS}^{(a,b,c)}_{k}(G;\ \epsilon) \;\approx\; s(m, n)\, UV^\top
        = s(m, n)\,(GG^\top)^{-1/4}\, G\, (G^\top G)^{-1/4}

    where :math:`G = U\Sigma V^\top`, :math:`\mathrm{NS}` is ``steps`` Newton-Schulz iterations
    (:func:`~scao_fx.precond.orthogonal.newton_schulz`) and :math:`s` the shape factor of
    ``adjust_lr`` (:func:`~scao_fx.precond.orthogonal.shape_scale`): ``"original"``
    :math:`\sqrt{\max(1, m/n)}`, ``"match_rms_adamw"`` :math:`0.2\sqrt{\max(m, n)}`, ``"none"`` 1.
    Followed by :func:`~scao_fx.scale_by_learning_rate`, this is ``torch.optim.Muon``'s step
    (``_adjust_lr`` multiplies the learning rate by the same factor). Leaves of fewer than two
    dimensions and ``None`` leaves pass through unchanged: route vectors elsewhere with
    :func:`~scao_fx.partition`, as :func:`~scao_fx.muon` does.

    Args:
        steps: Newton-Schulz iterations, >= 1.
        coefficients: ``(a, b, c)`` of the iteration's polynomial (default Muon's quintic,
            :data:`~scao_fx.precond.orthogonal.NS_COEFFICIENTS`).
        eps: floor of each matrix's Frobenius norm, > 0.
        adjust_lr: the shape factor: ``"original"``, ``"match_rms_adamw"`` or ``"none"``.
        dtype: dtype of the iteration (default bfloat16, as ``torch.optim.Muon``); ``None``
            iterates in the update's own dtype. The result is cast back to the update's dtype.
        grouped: stack the leaves of one matrix shape and device and orthogonalise each stack
            with batched products (fewer, larger kernels for many small matrices on a GPU). The
            default (False) runs one leaf at a time with ``torch.optim.Muon``'s exact operations;
            batched bfloat16 products can round differently (one bfloat16 ulp, now and then).

    Returns:
        A ``GradientTransformation`` with state ``EmptyState()``.

    Example:
        >>> import torch, scao_fx as sf
        >>> tx = sf.scale_by_newton_schulz(dtype=torch.float64)
        >>> u, _ = tx.update({"w": torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))}, tx.init(None))
        >>> torch.linalg.svdvals(u["w"]).round(decimals=2)  # 4 and 1 both land in Muon's [0.7, 1.2]
        tensor([0.7400, 0.7400], dtype=torch.float64)
    """
    steps = check_int("steps", steps, low=1)
    coefficients = check_coefficients("coefficients", coefficients)
    eps = check_float("eps", eps, low=0.0, low_inclusive=False)
    check_choice("adjust_lr", adjust_lr, SHAPE_RULES)
    dtype = check_dtype("dtype", dtype)
    grouped = check_bool("grouped", grouped)

    def orthogonalise(x: torch.Tensor) -> torch.Tensor:
        return newton_schulz(x, steps, coefficients, eps, dtype)

    def init(params):
        return EmptyState()

    def update(updates, state, *, params=None, inplace=True):
        leaves, spec = flatten(updates)
        check_dense_leaves(leaves)
        out = list(leaves)
        # Matrix views, keyed by the wide orientation's shape and the device.
        groups: dict[tuple, list[int]] = {}
        views: dict[int, torch.Tensor] = {}
        for i, g in enumerate(leaves):
            mn = None if g is None else matrix_shape(g.shape)
            if mn is None:
                continue
            m, n = mn
            mat = g.reshape(m, n)
            views[i] = mat.mT if m > n else mat
            key = (min(m, n), max(m, n), g.device) if grouped else (i,)
            groups.setdefault(key, []).append(i)
        for idx in groups.values():
            if len(idx) == 1:
                results = [orthogonalise(views[idx[0]])]
            else:
                results = list(orthogonalise(torch.stack([views[i] for i in idx])).unbind(0))
            for i, r in zip(idx, results):
                g = leaves[i]
                m, n = matrix_shape(g.shape)
                r = r.mT if m > n else r
                factor = shape_scale(m, n, adjust_lr)
                r = r.to(g.dtype)
                if factor != 1.0:
                    r = r * factor
                out[i] = r.reshape(g.shape)
        return unflatten(spec, out), state

    return GradientTransformation(init, update)
