r"""Kronecker preconditioning math on stacks of same-shape matrices: refresh, apply, graft, normalize.

For a matrix gradient :math:`G \in \mathbb{R}^{m\times n}` and a curvature factor per side,

.. math::
    P(G) = A_L\,G\,A_R,\qquad
    A = U_k\,\mathrm{diag}(s_k^{-1/4} - c)\,U_k^\top + c\,I,\qquad c = \bar s_{tail}^{-1/4},

where :math:`U_k, s_k` are the top-``k`` eigenpairs of the Tikhonov-regularised factor
(:math:`F + \epsilon I`, :math:`\epsilon = \max(\text{tiny},\ \mathrm{tikhonov}\cdot\mathrm{tr}(F)/d)`)
and :math:`c` the complement's gain. With ``k = d`` this is exactly :math:`F^{-1/4}`.

Every function here is pure tensor code on stacks (``(B, d, d)`` factors, ``(B, m, n)``
gradients): no pytrees, no process groups, no state beyond the :class:`KroneckerSide` record.
The link :func:`scao_fx.kronecker_precondition` is the plumbing around them.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .._treemath import abs_max
from ..base import register_state
from .curvature import gram
from .eigen import TIKHONOV_FLOOR, factor_eigenpairs, regularize
from .rank import RankRule

__all__ = [
    "KroneckerSide",
    "TIKHONOV_FLOOR",
    "init_side",
    "regularize",
    "complement_gain",
    "refresh_side",
    "side_from_eigenpairs",
    "apply_left",
    "apply_right",
    "graft_factor",
    "gram",
    "normalize",
    "saturate",
]

@register_state
class KroneckerSide(NamedTuple):
    """One preconditioned side of a shape group (``B`` stacked ``d x d`` factors).

    Attributes:
        stat: the curvature statistic (:class:`~scao_fx.precond.curvature.FactorStatistic` of the
            full-factor EMA, :class:`~scao_fx.precond.sketch.SketchStatistic` of the sketch).
        basis: ``(B, d, cap)`` eigenvectors (zero before the first refresh), float32 (or the
            statistic's ``basis_dtype_for(d)``).
        coef: ``(B, cap)`` float32 :math:`s^{-1/4} - c` on kept directions, 0 past ``k``.
        tail: ``(B,)`` float32 complement gain ``c`` (1 before the first refresh).
        rank: ``(B,)`` int64 kept rank ``k``.
        fallbacks: ``(B,)`` int64 number of refreshes that kept the previous basis.
    """

    stat: Any
    basis: torch.Tensor
    coef: torch.Tensor
    tail: torch.Tensor
    rank: torch.Tensor
    fallbacks: torch.Tensor


def init_side(curvature: Any, rank: RankRule, batch: int, dim: int, device=None) -> KroneckerSide:
    """A side before its first refresh: zero statistics and basis, :math:`A = I` (tail gain 1).

    The basis is ``min(rank.capacity(dim), curvature.directions(dim))`` wide, stored as
    ``curvature.basis_dtype_for(dim)``.

    Example:
        >>> import scao_fx as sf
        >>> from scao_fx.precond.kron import init_side
        >>> side = init_side(sf.curvature_ema(), sf.fixed_rank(2), batch=3, dim=5)
        >>> tuple(side.basis.shape), side.tail.tolist()
        ((3, 5, 2), [1.0, 1.0, 1.0])
    """
    cap = min(rank.capacity(dim), curvature.directions(dim))
    return KroneckerSide(
        stat=curvature.init(batch, dim, device),
        basis=torch.zeros(batch, dim, cap, dtype=curvature.basis_dtype_for(dim), device=device),
        coef=torch.zeros(batch, cap, device=device),
        tail=torch.ones(batch, device=device),
        rank=torch.zeros(batch, dtype=torch.int64, device=device),
        fallbacks=torch.zeros(batch, dtype=torch.int64, device=device),
    )


def complement_gain(s_all: torch.Tensor, k: torch.Tensor, complement: str) -> torch.Tensor:
    r"""Gain :math:`c` of the directions outside the kept top-``k`` subspace.

    ``"mean_tail"``: :math:`c = \bar s_{tail}^{-1/4}` with :math:`\bar s_{tail}` the mean of the
    discarded eigenvalues (the last eigenvalue when nothing is discarded); ``"kth"``:
    :math:`c = s_k^{-1/4}`; ``"none"``: :math:`c = 0` (a projection: the complement is dropped).

    Args:
        s_all: ``(B, d)`` the whole (floored) regularised spectrum in decreasing order.
        k: ``(B,)`` int64 kept ranks.
        complement: ``"mean_tail"``, ``"kth"`` or ``"none"``.

    Example:
        >>> import torch
        >>> from scao_fx.precond.kron import complement_gain
        >>> s = torch.tensor([[16.0, 1.0, 1.0]])
        >>> complement_gain(s, torch.tensor([1]), "mean_tail").tolist()
        [1.0]
    """
    if complement == "none":
        return torch.zeros(s_all.shape[:-1], dtype=s_all.dtype, device=s_all.device)
    if complement == "kth":
        return s_all.gather(-1, (k - 1).clamp(min=0)[:, None]).squeeze(-1) ** -0.25
    idx = torch.arange(s_all.shape[-1], device=s_all.device)
    tail_mask = idx[None, :] >= k[:, None]
    n_tail = tail_mask.sum(-1)
    mean_tail = (s_all * tail_mask).sum(-1) / n_tail.clamp(min=1)
    return torch.where(n_tail > 0, mean_tail, s_all[:, -1]) ** -0.25


def refresh_side(
    side: KroneckerSide,
    factor: torch.Tensor,
    first: torch.Tensor,
    *,
    rank: RankRule,
    tikhonov: float = 1e-4,
    complement: str = "mean_tail",
    eigensolver: str = "auto",
) -> KroneckerSide:
    r"""A new basis, rank and gains for ``side`` from its debiased curvature ``factor``.

    Regularise (:func:`regularize`), find the top ``cap`` eigenpairs (a full ``eigh``, or a
    warm-started subspace iteration from the previous basis after the first refresh), floor the
    spectrum at :math:`\epsilon` (an int8-decoded factor can be slightly indefinite), choose
    ``k`` with the rank rule, the complement gain with :func:`complement_gain`, and the
    coefficients :math:`s_i^{-1/4} - c` of the kept directions. A factor whose decomposition
    failed keeps its previous basis, gains and rank, and counts a fallback.

    Args:
        side: the side to refresh (its statistics are returned unchanged).
        factor: ``(B, d, d)`` float32 debiased factors (``CurvatureEMA.factor``).
        first: CPU bool 0-d tensor, True at the first refresh (no basis to warm-start from).
        rank: the rank rule.
        tikhonov: relative Tikhonov factor, >= 0.
        complement: ``"mean_tail"``, ``"kth"`` or ``"none"``.
        eigensolver: ``"auto"``, ``"eigh"`` or ``"subspace"`` (see
            :func:`scao_fx.kronecker_precondition`).

    Returns:
        The refreshed :class:`KroneckerSide`.

    Example:
        >>> import torch, scao_fx as sf
        >>> from scao_fx.precond.kron import init_side, refresh_side
        >>> side = init_side(sf.curvature_ema(), sf.full_rank(), batch=1, dim=2)
        >>> new = refresh_side(side, torch.diag(torch.tensor([16.0, 1.0]))[None], torch.tensor(True),
        ...                    rank=sf.full_rank(), tikhonov=0.0)
        >>> new.rank.tolist(), round(float(new.coef[0, 0] + new.tail[0]), 4)
        ([2], 0.5)
    """
    pairs = factor_eigenpairs(factor, side.basis, first, tikhonov=tikhonov, eigensolver=eigensolver)
    return side_from_eigenpairs(side, *pairs, rank=rank, complement=complement)


def side_from_eigenpairs(
    side: KroneckerSide,
    vals: torch.Tensor,
    vecs: torch.Tensor,
    ok: torch.Tensor,
    rest: torch.Tensor,
    eps: torch.Tensor,
    *,
    rank: RankRule,
    complement: str = "mean_tail",
) -> KroneckerSide:
    r"""The refreshed side from the top eigenpairs of a regularised factor (the second half of a refresh).

    Floors the spectrum at :math:`\epsilon`, chooses ``k`` with the rank rule (at most the basis
    width), the complement gain with :func:`complement_gain` and the coefficients
    :math:`s_i^{-1/4} - c` of the kept directions; factors with ``ok`` False keep their previous
    basis, gains and rank, and count a fallback. Any curvature statistic's ``top_eigenpairs``
    feeds it.

    Args:
        side: the side to refresh (its statistics are returned unchanged).
        vals: ``(B, cap)`` top eigenvalues of :math:`F + \epsilon I`, decreasing.
        vecs: ``(B, d, cap)`` their eigenvectors.
        ok: ``(B,)`` bool, False where the decomposition failed.
        rest: ``(B, d - cap)`` the remaining eigenvalues of :math:`F + \epsilon I` (or their mean, repeated).
        eps: ``(B,)`` the Tikhonov term.
        rank: the rank rule.
        complement: ``"mean_tail"``, ``"kth"`` or ``"none"``.

    Returns:
        The refreshed :class:`KroneckerSide`.

    Example:
        >>> import torch, scao_fx as sf
        >>> from scao_fx.precond.kron import init_side, side_from_eigenpairs
        >>> side = init_side(sf.curvature_ema(), sf.fixed_rank(1), batch=1, dim=2)
        >>> new = side_from_eigenpairs(side, torch.tensor([[16.0]]), torch.tensor([[[1.0], [0.0]]]),
        ...                            torch.tensor([True]), torch.tensor([[1.0]]), torch.tensor([0.0]),
        ...                            rank=sf.fixed_rank(1))
        >>> new.rank.tolist(), new.tail.tolist(), new.coef.tolist()
        ([1], [1.0], [[-0.5]])
    """
    cap = vals.shape[-1]
    # The full regularised spectrum, each eigenvalue floored at eps: the ``cap`` computed values,
    # then the rest (exact, or the remaining trace spread evenly by the subspace solver). Past
    # ``cap`` only sums matter.
    s_all = torch.maximum(torch.cat([vals, rest], dim=-1), eps[:, None])
    s = s_all[:, :cap]
    k = rank.select(s_all - eps[:, None])
    if rank.capacity(s_all.shape[-1]) > cap:  # a basis narrower than the rule's width (a sketch)
        k = k.clamp(max=cap)
    c = complement_gain(s_all, k, complement)
    keep = torch.arange(cap, device=s.device)[None, :] < k[:, None]
    coef = torch.where(keep, s ** -0.25 - c[:, None], torch.zeros_like(s))
    return KroneckerSide(
        stat=side.stat,
        basis=torch.where(ok[:, None, None], vecs.to(side.basis.dtype), side.basis).contiguous(),
        coef=torch.where(ok[:, None], coef, side.coef).contiguous(),
        tail=torch.where(ok, c.to(side.tail.dtype), side.tail).contiguous(),
        rank=torch.where(ok, k, side.rank).contiguous(),
        fallbacks=side.fallbacks + (~ok).to(torch.int64),
    )


def apply_left(side: KroneckerSide, g: torch.Tensor) -> torch.Tensor:
    r""":math:`A G` for ``g`` of shape ``(B, d, n)``: :math:`U (\mathrm{coef} \odot U^\top G) + c\,G`."""
    u = side.basis.to(g.dtype)  # no copy for a float32 basis
    t = torch.matmul(u.transpose(-1, -2), g) * side.coef[..., None]
    return (g * side.tail[:, None, None]).baddbmm_(u, t)  # into the new c G: one full-size buffer


def apply_right(side: KroneckerSide, g: torch.Tensor) -> torch.Tensor:
    r""":math:`G A` for ``g`` of shape ``(B, m, d)``: :math:`(G U \odot \mathrm{coef}) U^\top + c\,G`."""
    u = side.basis.to(g.dtype)  # no copy for a float32 basis
    t = torch.matmul(g, u) * side.coef[:, None, :]
    return (g * side.tail[:, None, None]).baddbmm_(t, u.transpose(-1, -2))


def graft_factor(grads: torch.Tensor, pg: torch.Tensor, graft: str, tau: float | None) -> torch.Tensor | None:
    r"""Per-matrix factor that rescales the preconditioned ``pg``, or ``None`` for no rescaling.

    ``graft="frobenius"``: :math:`\lVert G\rVert_F / \lVert P(G)\rVert_F` (the step keeps the
    gradient's norm); ``"none"`` with ``tau``: :math:`\min(1, \tau \lVert G\rVert_F / \lVert
    P(G)\rVert_F)` (a cap on the norm ratio); ``"none"`` without ``tau``: ``None``. A zero
    :math:`P(G)` gives a factor of 0.

    Example:
        >>> import torch
        >>> from scao_fx.precond.kron import graft_factor
        >>> g, p = torch.ones(1, 2, 2), 3.0 * torch.ones(1, 2, 2)
        >>> graft_factor(g, p, "frobenius", None).tolist()
        [0.3333333432674408]
    """
    if graft != "frobenius" and tau is None:
        return None
    gnorm = torch.linalg.matrix_norm(grads)
    pnorm = torch.linalg.matrix_norm(pg)
    safe_p = torch.where(pnorm > 0, pnorm, torch.ones_like(pnorm))
    if graft == "frobenius":
        return gnorm / safe_p
    return torch.clamp(tau * gnorm / safe_p, max=1.0)


def _pow2(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2 ** e`` built from its bits (exact), for integers ``e`` in ``dtype``'s normal range."""
    if dtype == torch.float64:
        return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def normalize(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Scale each stacked gradient by a power of two near its largest entry, as float32.

    The preconditioner is linear in :math:`G` and the graft is scale-free, so the work runs on
    :math:`\hat G = G / 2^e` and the result is multiplied back by :math:`2^e` (exact: a power of
    two; in float64 for float64 leaves); the Gram matrices are :math:`\hat G \hat G^\top 4^e`,
    again exact. Bit for bit the same as working on :math:`G` in the usual range, but a gradient
    of 1e30 (float32) or 1e300 (float64) no longer overflows float32 intermediates (norms,
    products) into inf/NaN. A float32 ``stack`` is scaled in place (it is a fresh stack), so no
    copy of the gradients is made.

    Returns:
        ``(G / 2^e as float32, per-leaf 4^e as float32 to scale the Gram matrices by (zero for a
        leaf whose Gram matrix would overflow float32: it then adds nothing to the curvature
        statistics), per-leaf 2^e (float32, or float64 for float64 leaves))``.

    Example:
        >>> import torch
        >>> from scao_fx.precond.kron import normalize
        >>> g, gram_scale, unscale = normalize(torch.full((1, 2, 2), 6.0))
        >>> g[0, 0, 0].item(), gram_scale.tolist(), unscale.tolist()
        (0.75, [64.0], [8.0])
    """
    amax = abs_max(stack.detach(), (-2, -1)).to(torch.float64)
    e = torch.frexp(torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax)))[1].to(torch.int64)
    if stack.dtype == torch.float64:
        e = e.clamp(-1000, 1000)
        normalized = (stack * _pow2(-e, torch.float64)[:, None, None]).to(torch.float32)
        unscale = _pow2(e, torch.float64)
    else:  # float32 (and narrower) values lie within 2^[-149, 128]: one float32 factor suffices
        e = e.clamp(-100, 100)
        down = _pow2(-e, torch.float32)[:, None, None]
        # in place for a float32 stack; bf16/fp16 promote to a new float32 tensor
        normalized = stack.mul_(down) if stack.dtype == torch.float32 else stack * down
        unscale = _pow2(e, torch.float32)
    # |entries of G G^T| <= max(m, n) 4^e: keep the Gram matrices where that fits float32.
    fits = 2 * e + math.ceil(math.log2(max(stack.shape[-2:]))) <= 127
    up = torch.where(fits, _pow2(torch.where(fits, e, 0).clamp(-100, 100), torch.float32), 0.0)
    return normalized, up * up, unscale


def saturate(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    r"""``x`` clipped to the finite range of ``dtype`` when that range is narrower than ``x``'s.

    The preconditioned gradient of a float16 leaf is computed in float32; with the Frobenius
    graft an entry can reach :math:`\lVert G\rVert_F`, beyond float16's 65504, and the cast back
    would turn it into ``inf`` (and Adam's moments into NaN). Clipping keeps the parameters
    finite; NaN stays NaN (the non-finite guard skips such steps). The same holds at the edge of
    bfloat16's range (its largest value is just below float32's); float32 and float64 results
    are returned untouched, without a pass.

    Example:
        >>> import torch
        >>> from scao_fx.precond.kron import saturate
        >>> saturate(torch.tensor([1e5, -1e6, 3.0]), torch.float16).tolist()
        [65504.0, -65504.0, 3.0]
    """
    if not dtype.is_floating_point or x.dtype == dtype:
        return x
    top = torch.finfo(dtype).max
    if top >= torch.finfo(x.dtype).max:
        return x
    return x.clamp(-top, top)
