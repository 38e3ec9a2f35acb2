r"""Rotations into and out of the Kronecker factors' eigenbases (the SOAP form), on stacks.

For a matrix gradient :math:`G \in \mathbb{R}^{m\times n}` and kept bases :math:`U \in
\mathbb{R}^{m\times k_L}`, :math:`V \in \mathbb{R}^{n\times k_R}` (orthonormal columns: the
top eigenvectors of the left and right curvature factors),

.. math::
    C = U^\top G V \quad(\text{the core, } k_L\times k_R),\qquad
    G_\perp = G - U C V^\top \quad(\text{the complement, } m\times n).

:math:`U C V^\top` is the orthogonal projection of :math:`G` onto the kept subspace
:math:`\mathrm{span}(U)\otimes\mathrm{span}(V)`, so :math:`G = U C V^\top + G_\perp` with the
two parts orthogonal: no direction is dropped. With full bases (:math:`k_L = m`, :math:`k_R = n`)
the complement is zero and :math:`G = U C V^\top` exactly (up to rounding).

A side that is not preconditioned has no basis (``None``): the identity, no rotation on that
side. Every function is pure tensor code on stacks (``(B, m, n)`` gradients, ``(B, d, k)``
bases): no pytrees, no state.
"""

from __future__ import annotations

import torch

from .kron import KroneckerSide

__all__ = ["kept_basis", "rotate", "rotate_back", "project_complement", "change_basis", "change_basis_second_moment"]


def kept_basis(side: KroneckerSide, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""The side's basis with the columns past its rank ``k`` zeroed, ``(B, d, cap)``.

    A side never refreshed (rank 0: before its first refresh, or every refresh of it failed)
    gets the first ``cap`` columns of the identity instead, so the rotation is the identity
    there and an inner transform sees the original coordinates.

    Args:
        side: a :class:`~scao_fx.precond.kron.KroneckerSide`.
        dtype: dtype of the result.

    Returns:
        ``(B, d, cap)`` with orthonormal columns in the kept directions and zero columns elsewhere.

    Example:
        >>> import torch, scao_fx as sf
        >>> from scao_fx.precond.kron import init_side
        >>> from scao_fx.precond.eigenbasis import kept_basis
        >>> kept_basis(init_side(sf.curvature_ema(), sf.full_rank(), batch=1, dim=2))[0].tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    basis = side.basis.to(dtype)
    d, cap = basis.shape[-2], basis.shape[-1]
    if side.rank.device.type == "cpu" and not torch.compiler.is_compiling() and bool((side.rank == cap).all()):
        return basis if basis is not side.basis else basis.clone()  # every column kept: nothing to mask
    keep = torch.arange(cap, device=basis.device)[None, :] < side.rank[:, None]  # (B, cap)
    masked = basis * keep[:, None, :].to(dtype)
    eye = torch.eye(d, cap, dtype=dtype, device=basis.device).expand_as(basis)
    return torch.where((side.rank == 0)[:, None, None], eye, masked)


def rotate(g: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    r"""The core :math:`C = U^\top G V` of a stack ``g`` ``(B, m, n)``; ``None`` is the identity.

    Example:
        >>> import torch
        >>> from scao_fx.precond.eigenbasis import rotate
        >>> u = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])   # swaps the two rows
        >>> rotate(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), u, None).tolist()
        [[[3.0, 4.0], [1.0, 2.0]]]
    """
    if left is not None:
        g = torch.matmul(left.transpose(-1, -2), g)
    if right is not None:
        g = torch.matmul(g, right)
    return g


def rotate_back(core: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    r""":math:`U C V^\top` for a stack of cores ``(B, k_L, k_R)``: the inverse of :func:`rotate` on the kept subspace.

    Example:
        >>> import torch
        >>> from scao_fx.precond.eigenbasis import rotate, rotate_back
        >>> q, _ = torch.linalg.qr(torch.randn(1, 3, 3, dtype=torch.float64))
        >>> g = torch.randn(1, 3, 2, dtype=torch.float64)
        >>> torch.allclose(rotate_back(rotate(g, q, None), q, None), g)
        True
    """
    if left is not None:
        core = torch.matmul(left, core)
    if right is not None:
        core = torch.matmul(core, right.transpose(-1, -2))
    return core


def project_complement(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    r"""The part of ``x`` outside the kept subspace: :math:`X - U (U^\top X V) V^\top`.

    Example:
        >>> import torch
        >>> from scao_fx.precond.eigenbasis import project_complement
        >>> u = torch.tensor([[[1.0], [0.0]]])             # keep the first row direction only
        >>> project_complement(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), u, None).tolist()
        [[[0.0, 0.0], [3.0, 4.0]]]
    """
    return x - rotate_back(rotate(x, left, right), left, right)


def change_basis(
    core: torch.Tensor,
    old_left: torch.Tensor | None,
    old_right: torch.Tensor | None,
    new_left: torch.Tensor | None,
    new_right: torch.Tensor | None,
) -> torch.Tensor:
    r"""Re-express cores from old bases in new ones: :math:`U_{new}^\top U_{old}\,C\,V_{old}^\top V_{new}`.

    For a quantity linear in the gradient (a first moment) this is exactly what projecting it,
    kept in the original coordinates, with the new bases would give: :math:`U_{new}^\top (U_{old}
    C V_{old}^\top) V_{new}`. The part of :math:`U_{old} C V_{old}^\top` outside the new kept
    subspace is lost (none with full bases).

    Example:
        >>> import torch
        >>> from scao_fx.precond.eigenbasis import change_basis
        >>> eye = torch.eye(2)[None]
        >>> swap = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
        >>> change_basis(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), eye, None, swap, None).tolist()
        [[[3.0, 4.0], [1.0, 2.0]]]
    """
    if old_left is not None:
        core = torch.matmul(torch.matmul(new_left.transpose(-1, -2), old_left), core)
    if old_right is not None:
        core = torch.matmul(core, torch.matmul(old_right.transpose(-1, -2), new_right))
    return core


def change_basis_second_moment(
    nu: torch.Tensor,
    old_left: torch.Tensor | None,
    old_right: torch.Tensor | None,
    new_left: torch.Tensor | None,
    new_right: torch.Tensor | None,
) -> torch.Tensor:
    r"""Carry second moments (mean squares) of cores from old bases to new ones.

    A core entry in the new bases is :math:`C'_{ij} = \sum_{ab} P_{ia} C_{ab} Q_{bj}` with the
    overlaps :math:`P = U_{new}^\top U_{old}`, :math:`Q = V_{old}^\top V_{new}`. Taking the old
    coordinates as uncorrelated, its mean square is

    .. math::
        \nu' = (P \circ P)\,\nu\,(Q \circ Q),

    a weighted average of the old mean squares (the rows and columns of :math:`P \circ P` sum to
    1 for full bases): a direction that turned into another inherits its second moment, wherever
    the refresh put it. Where the bases did not move, :math:`\nu' = \nu`.

    Example:
        >>> import torch
        >>> from scao_fx.precond.eigenbasis import change_basis_second_moment
        >>> eye = torch.eye(2)[None]
        >>> half = torch.tensor([[[1.0, 1.0], [1.0, -1.0]]]) / 2 ** 0.5   # 45 degrees
        >>> change_basis_second_moment(torch.tensor([[[4.0], [0.0]]]), eye, None, half, None).round(decimals=5).tolist()
        [[[2.0], [2.0]]]
    """
    if old_left is not None:
        overlap = torch.matmul(new_left.transpose(-1, -2), old_left)
        nu = torch.matmul(overlap * overlap, nu)
    if old_right is not None:
        overlap = torch.matmul(old_right.transpose(-1, -2), new_right)
        nu = torch.matmul(nu, overlap * overlap)
    return nu
