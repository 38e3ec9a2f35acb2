r"""Eigendecompositions of stacked symmetric factors, robust to failure.

* :func:`robust_eigh` computes the decomposition in float32, retries in float64 when the result
  is not finite, and reports which factors failed both so the caller keeps their last good
  basis.
* :func:`top_eigenpairs_exact` (a full ``eigh``) and :func:`top_eigenpairs_subspace` (one
  warm-started orthogonal iteration + Rayleigh-Ritz, :math:`O(d^2 k)`) give the top ``cap``
  eigenpairs a basis refresh needs; :func:`factor_eigenpairs` regularises a factor
  (:func:`regularize`) and picks the solver.

Pure tensor code on stacks ``(B, d, d)``: no pytrees, no process groups.
"""

from __future__ import annotations

from typing import Callable

import torch

from .._treemath import abs_max

__all__ = [
    "robust_eigh",
    "top_eigenpairs_exact",
    "top_eigenpairs_subspace",
    "branch",
    "TIKHONOV_FLOOR",
    "regularize",
    "factor_eigenpairs",
]

#: Absolute floor of the Tikhonov term, only reached by an all-zero factor.
TIKHONOV_FLOOR = 1e-30


def _finite_rows(*tensors: torch.Tensor, lead: int) -> torch.Tensor:
    """Per leading index, whether every entry of every tensor is finite (one reduction each:
    the largest magnitude is finite exactly when every entry is)."""
    ok = None
    for t in tensors:
        if t.dim() > lead and t.numel() > 0:
            f = torch.isfinite(abs_max(t, tuple(range(lead, t.dim()))))
        else:
            f = torch.isfinite(t).flatten(lead).all(-1)
        ok = f if ok is None else ok & f
    return ok


def robust_eigh(factors: torch.Tensor, *, retry_float64: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched symmetric eigendecomposition that never raises and never returns non-finite values.

    Computes ``eigh`` in float32; factors whose result is not finite (or whose input is not)
    are retried in float64 when ``retry_float64`` (eager mode only: the retry needs a host
    decision). Factors that fail both are reported in ``ok`` and their outputs are zeroed, so the
    caller can keep its last good basis with ``torch.where``.

    Example:
        >>> import torch, scao_fx as sf
        >>> vals, vecs, ok = sf.robust_eigh(torch.diag(torch.tensor([1.0, 3.0]))[None])
        >>> vals, bool(ok)
        (tensor([[3., 1.]]), True)

    Args:
        factors: ``(..., d, d)`` symmetric matrices.
        retry_float64: retry failures in float64.

    Returns:
        ``(eigvals, eigvecs, ok)``: eigenvalues ``(..., d)`` in *decreasing* order, eigenvectors
        ``(..., d, d)`` as columns, and a bool ``(...)`` tensor, False where both attempts failed.
    """
    lead = factors.dim() - 2
    x = factors.to(torch.float32)
    finite_in = _finite_rows(x, lead=lead)
    safe = torch.where(finite_in[(...,) + (None,) * 2], x, torch.zeros_like(x))
    try:
        vals, vecs = torch.linalg.eigh(safe)
        ok = finite_in & _finite_rows(vals, vecs, lead=lead)
    except RuntimeError:  # LAPACK/cuSOLVER non-convergence: retry everything in float64
        vals = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
        vecs = torch.zeros_like(x)
        ok = torch.zeros_like(finite_in)
    if retry_float64 and not torch.compiler.is_compiling() and not bool((ok | ~finite_in).all()):
        try:
            vals64, vecs64 = torch.linalg.eigh(safe.to(torch.float64))
            ok64 = finite_in & _finite_rows(vals64, vecs64, lead=lead)
            use = ~ok & ok64
            vals = torch.where(use[..., None], vals64.to(vals.dtype), vals)
            vecs = torch.where(use[..., None, None], vecs64.to(vecs.dtype), vecs)
            ok = ok | ok64
        except RuntimeError:
            pass
    vals = torch.where(ok[..., None], vals, torch.zeros_like(vals))
    vecs = torch.where(ok[..., None, None], vecs, torch.zeros_like(vecs))
    return vals.flip(-1), vecs.flip(-1), ok


def branch(pred: torch.Tensor, true_fn: Callable, false_fn: Callable, operands: tuple) -> tuple:
    """``true_fn(*operands) if pred else false_fn(*operands)`` for a CPU bool tensor ``pred``.

    Eager: a Python branch (no device sync). Under ``torch.compile``: ``torch.cond``. Both
    functions return tuples of fresh tensors of the same shapes.
    """
    if torch.compiler.is_compiling():
        return torch.cond(pred, true_fn, false_fn, operands)
    return true_fn(*operands) if bool(pred) else false_fn(*operands)


def top_eigenpairs_exact(factor: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Top ``cap = basis.shape[-1]`` eigenpairs of a stack of symmetric factors by a full ``eigh``.

    Returns ``(values (B, cap) decreasing, vectors (B, d, cap), ok (B,), rest (B, d - cap))``
    where ``rest`` holds the remaining eigenvalues.
    """
    cap = basis.shape[-1]
    vals, vecs, ok = robust_eigh(factor)
    return _dense(vals[:, :cap]), _dense(vecs[..., :cap]), ok, _dense(vals[:, cap:])


def _dense(x: torch.Tensor) -> torch.Tensor:
    """A copy with standard strides (``contiguous()`` keeps odd strides of size-1 dims, which
    ``torch.cond`` rejects when its two branches disagree)."""
    return x.clone(memory_format=torch.contiguous_format)


def top_eigenpairs_subspace(factor: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, ...]:
    r"""Top eigenpairs by one step of orthogonal iteration warm-started at ``basis``, then Rayleigh-Ritz.

    :math:`Q = \mathrm{qr}(F U_{prev})`, :math:`Q^\top F Q = W \Lambda W^\top`, :math:`U = Q W`.
    Costs :math:`O(d^2 k)` instead of the :math:`O(d^3)` of a full ``eigh``; repeated at every
    refresh it tracks the leading subspace as the factor drifts (the previous basis is already
    close). Columns of a never-computed (all-zero) basis start from identity columns. The
    remaining ``d - cap`` eigenvalues are not computed: ``rest`` spreads the remaining trace
    evenly over them.
    """
    d, cap = basis.shape[-2], basis.shape[-1]
    start = torch.eye(d, cap, device=basis.device, dtype=factor.dtype).expand_as(basis)
    empty = (basis.abs().sum(dim=(-2, -1)) == 0)[:, None, None]
    u0 = torch.where(empty, start, basis.to(factor.dtype))
    q, _ = torch.linalg.qr(torch.matmul(factor, u0))
    h = torch.matmul(q.transpose(-1, -2), torch.matmul(factor, q))
    vals, w, ok = robust_eigh(0.5 * (h + h.transpose(-1, -2)))
    vals, vecs = vals.to(factor.dtype), torch.matmul(q, w.to(q.dtype))
    ok = ok & torch.isfinite(vecs).flatten(1).all(-1)
    remaining = torch.diagonal(factor, dim1=-2, dim2=-1).sum(-1) - vals.sum(-1)
    rest = (remaining / max(d - cap, 1))[:, None].expand(-1, d - cap)
    return _dense(vals), _dense(vecs), ok, _dense(rest)


def regularize(factor: torch.Tensor, tikhonov: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Tikhonov term relative to the factor's own scale: :math:`F + \epsilon I`.

    :math:`\epsilon = \max(10^{-30},\ \mathrm{tikhonov}\cdot\mathrm{tr}(F)/d)` per stacked factor, so
    scaling the loss scales :math:`\epsilon` with :math:`F` and never changes the update's
    direction.

    Returns:
        ``(F + eps I, eps)`` with ``eps`` of shape ``(B,)``.

    Example:
        >>> import torch
        >>> from scao_fx.precond.kron import regularize
        >>> reg, eps = regularize(4.0 * torch.eye(2)[None], 0.25)
        >>> eps.tolist(), reg[0].diagonal().tolist()
        ([1.0], [5.0, 5.0])
    """
    dim = factor.shape[-1]
    trace = torch.diagonal(factor, dim1=-2, dim2=-1).sum(-1)
    eps = torch.clamp(tikhonov * trace / dim, min=TIKHONOV_FLOOR)
    out = factor.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(eps[:, None])  # a copy and a diagonal, not an identity's passes
    return out, eps


def factor_eigenpairs(
    factor: torch.Tensor, basis: torch.Tensor, first: torch.Tensor, *, tikhonov: float, eigensolver: str
) -> tuple[torch.Tensor, ...]:
    r"""The top ``cap = basis.shape[-1]`` eigenpairs of the regularised factors :math:`F + \epsilon I`.

    A full ``eigh`` (``eigensolver="eigh"``, or ``"auto"`` with a full-width basis), else the
    warm-started subspace iteration from ``basis`` (a full ``eigh`` at the ``first`` refresh).

    Args:
        factor: ``(B, d, d)`` float32 debiased factors.
        basis: ``(B, d, cap)`` the previous basis (its width sets ``cap``).
        first: CPU bool 0-d tensor, True at the first refresh.
        tikhonov: relative Tikhonov factor (see :func:`regularize`).
        eigensolver: ``"auto"``, ``"eigh"`` or ``"subspace"``.

    Returns:
        ``(values (B, cap) decreasing, vectors (B, d, cap), ok (B,), rest (B, d - cap), eps (B,))``
        of :math:`F + \epsilon I`; ``rest`` holds (or summarises) the remaining eigenvalues.

    Example:
        >>> import torch
        >>> from scao_fx.precond.eigen import factor_eigenpairs
        >>> f = torch.diag(torch.tensor([4.0, 1.0, 1.0]))[None]
        >>> vals, vecs, ok, rest, eps = factor_eigenpairs(f, torch.zeros(1, 3, 1), torch.tensor(True),
        ...                                               tikhonov=0.0, eigensolver="eigh")
        >>> vals.tolist(), rest.tolist()
        ([[4.0]], [[1.0, 1.0]])
    """
    dim, cap = factor.shape[-1], basis.shape[-1]
    reg, eps = regularize(factor, tikhonov)
    if eigensolver == "eigh" or (eigensolver == "auto" and cap == dim):
        vals, vecs, ok, rest = top_eigenpairs_exact(reg, basis)
    else:
        vals, vecs, ok, rest = branch(first, top_eigenpairs_exact, top_eigenpairs_subspace, (reg, basis))
    return vals, vecs, ok, rest, eps
