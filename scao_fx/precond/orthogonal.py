r"""Newton-Schulz orthogonalisation of a matrix or a stack of matrices: pure math, no pytrees.

For a matrix :math:`G = U \Sigma V^\top`, the orthogonal factor :math:`UV^\top` is
:math:`(GG^\top)^{-1/2} G`: Shampoo's :math:`L^{-1/4} G R^{-1/4}` with the one-step statistics
:math:`L = GG^\top`, :math:`R = G^\top G` (no time averaging). The Newton-Schulz iteration reaches
it with matrix products only. After scaling :math:`X_0 = G / \max(\lVert G\rVert_F, \epsilon)`
(singular values in :math:`[0, 1]`), each step applies an odd polynomial to the singular values:

.. math::
    A = X X^\top,\qquad B = bA + cA^2,\qquad X \leftarrow aX + BX,

i.e. :math:`\sigma \mapsto a\sigma + b\sigma^3 + c\sigma^5`. With ``(1.5, -0.5, 0)`` it is the
classical cubic iteration, which converges to :math:`UV^\top`; Muon's quintic coefficients
``(3.4445, -4.7750, 2.0315)`` (:data:`NS_COEFFICIENTS`, ``torch.optim.Muon``'s default) raise the
slope at zero so that five steps lift small singular values, leaving every singular value in
about ``[0.7, 1.2]`` rather than exactly 1.

:func:`newton_schulz` works on the wide orientation (rows <= columns, so :math:`A` is the
smaller Gram matrix) and in ``dtype`` (bfloat16 by default, as ``torch.optim.Muon``); on a
single matrix it performs the same operations in the same order as ``torch.optim.Muon``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NS_COEFFICIENTS", "newton_schulz", "shape_scale", "SHAPE_RULES"]

#: Muon's quintic Newton-Schulz coefficients ``(a, b, c)``, ``torch.optim.Muon``'s default.
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

#: The accepted names of :func:`shape_scale`'s ``rule``.
SHAPE_RULES = ("original", "match_rms_adamw", "none")


def newton_schulz(
    x: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = torch.bfloat16,
) -> torch.Tensor:
    r"""Orthogonalise a matrix, or each matrix of a stack, by ``steps`` Newton-Schulz iterations.

    .. math::
        X_0 = \frac{G}{\max(\lVert G\rVert_F, \epsilon)},\qquad
        X_{k+1} = a X_k + (b A_k + c A_k^2) X_k,\quad A_k = X_k X_k^\top

    computed on the wide orientation (a tall matrix is transposed before and after). Each matrix
    of a stack is normalised by its own Frobenius norm.

    Args:
        x: a matrix ``(m, n)`` or a stack ``(..., m, n)``; never modified.
        steps: number of iterations, >= 1.
        coefficients: ``(a, b, c)`` of the odd polynomial :math:`a\sigma + b\sigma^3 + c\sigma^5`.
        eps: floor of the norm, > 0 (an all-zero matrix stays zero).
        dtype: the dtype of the iteration (default bfloat16, as ``torch.optim.Muon``); ``None``
            keeps ``x``'s dtype.

    Returns:
        A tensor of ``x``'s shape in ``dtype``.

    Example:
        >>> import torch
        >>> from scao_fx.precond.orthogonal import newton_schulz
        >>> g = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
        >>> newton_schulz(g, steps=40, coefficients=(1.5, -0.5, 0.0), dtype=None)  # cubic: exactly U V^T
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.float64)
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a stack of matrices, got shape {tuple(x.shape)}")
    a, b, c = coefficients
    tall = x.shape[-2] > x.shape[-1]
    X = x.to(dtype) if dtype is not None else x
    if tall:
        X = X.mT
    batch = X.shape[:-2]
    if X.ndim == 2:
        X = X / X.norm().clamp(min=eps)
        for _ in range(steps):
            A = X @ X.T
            B = torch.addmm(A, A, A, beta=b, alpha=c)
            X = torch.addmm(X, B, X, beta=a)
    else:
        X = X.reshape(-1, *X.shape[-2:])
        X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
        X = X.reshape(*batch, *X.shape[-2:])
    return X.mT if tall else X


def shape_scale(rows: int, cols: int, rule: str = "original") -> float:
    r"""The learning-rate factor of an orthogonalised ``rows x cols`` update.

    * ``"original"``: :math:`\sqrt{\max(1, \mathrm{rows}/\mathrm{cols})}` (Keller Jordan's Muon;
      ``torch.optim.Muon``'s ``adjust_lr_fn=None`` or ``"original"``);
    * ``"match_rms_adamw"``: :math:`0.2\sqrt{\max(\mathrm{rows}, \mathrm{cols})}` (Moonshot's: the
      update's RMS matches AdamW's, so AdamW's learning rate and weight decay carry over);
    * ``"none"``: 1.

    Args:
        rows: the matrix's first dimension, >= 1.
        cols: the product of its other dimensions, >= 1.
        rule: one of :data:`SHAPE_RULES`.

    Returns:
        The factor, a Python float.

    Example:
        >>> from scao_fx.precond.orthogonal import shape_scale
        >>> shape_scale(512, 128), shape_scale(128, 512), shape_scale(128, 512, "match_rms_adamw")
        (2.0, 1.0, 4.525483399593905)
    """
    if rule == "original":
        return math.sqrt(max(1, rows / cols))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if rule == "none":
        return 1.0
    raise ValueError(f"rule must be one of {SHAPE_RULES!r}, got {rule!r}")
