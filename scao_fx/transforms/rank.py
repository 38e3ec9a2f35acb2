r"""Adaptive rank truncation: robust eigendecomposition and rank rules.

A rank rule maps the eigenvalues of a (stack of) Kronecker factors, sorted in decreasing order,
to the number ``k`` of eigen-directions to keep, as an int64 tensor (one ``k`` per stacked
factor). Rules never produce data-dependent shapes: the basis keeps a fixed width
``rule.capacity(dim)`` and directions past ``k`` are masked, so steps stay compile-friendly.

* :func:`spectral_mass_rank` — the smallest ``k`` whose eigenvalues hold at least
  ``1 - epsilon`` of the spectral mass, clamped to ``[k_min, k_max]`` (SCAO's rule).
* :func:`full_rank` — keep every direction (``k = dim``): exact :math:`L^{-1/4}`.
* :func:`fixed_rank` — always ``min(k, dim)``.

:func:`robust_eigh` computes the decomposition in float32, retries in float64 when the result
is not finite, and reports which factors failed both so the caller keeps their last good basis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validation import check_float, check_int

__all__ = ["RankRule", "spectral_mass_rank", "full_rank", "fixed_rank", "robust_eigh"]


@dataclass(frozen=True)
class RankRule:
    """A rank rule: ``select(eigvals_desc) -> k`` and the basis width ``capacity(dim)``.

    Attributes:
        epsilon: spectral mass allowed to be discarded (0 keeps everything up to ``k_max``).
        k_min: lower clamp on ``k``.
        k_max: upper clamp on ``k`` and the basis width (``None``: the factor's dimension).
        adaptive: whether ``k`` depends on the spectrum (False: ``k = capacity``).

    Example:
        >>> import torch, scao_fx as sf
        >>> rule = sf.spectral_mass_rank(0.05, k_min=1, k_max=8)
        >>> rule.capacity(4), int(rule.select(torch.tensor([10.0, 0.1, 0.1, 0.1])))
        (4, 1)
    """

    epsilon: float = 0.0
    k_min: int = 1
    k_max: int | None = None
    adaptive: bool = True

    def capacity(self, dim: int) -> int:
        """Width of the stored basis for a ``dim x dim`` factor."""
        return dim if self.k_max is None else min(dim, self.k_max)

    def select(self, eigvals_desc: torch.Tensor) -> torch.Tensor:
        r"""Number of directions to keep for each factor of a stack.

        Args:
            eigvals_desc: ``(..., dim)`` non-negative eigenvalues sorted in decreasing order.

        Returns:
            ``(...)`` int64 tensor ``k`` with ``min(k_min, cap) <= k <= cap``, where for the
            adaptive rule :math:`k = \min\{j : \sum_{i<j} \lambda_i \ge (1-\epsilon)\sum_i \lambda_i\}`.
        """
        dim = eigvals_desc.shape[-1]
        cap = self.capacity(dim)
        lead = eigvals_desc.shape[:-1]
        if not self.adaptive:
            return torch.full(lead, cap, dtype=torch.int64, device=eigvals_desc.device)
        lam = eigvals_desc.clamp(min=0).to(torch.float64)
        total = lam.sum(-1, keepdim=True)
        frac = lam.cumsum(-1) / torch.where(total > 0, total, torch.ones_like(total))
        # Entries whose prefix has not reached the target mass; k = that count + 1.
        short = (frac < (1.0 - self.epsilon) * (1 - 1e-12)).sum(-1) + 1
        k = torch.where(total.squeeze(-1) > 0, short, torch.full_like(short, self.k_min))
        return k.clamp(min=min(self.k_min, cap), max=cap)


def spectral_mass_rank(epsilon: float = 0.05, k_min: int = 8, k_max: int = 128) -> RankRule:
    r"""SCAO's adaptive rank: keep the top-``k`` eigen-directions holding ``>= 1 - epsilon`` of the mass.

    :math:`k = \mathrm{clamp}(\min\{j : \sum_{i \le j}\lambda_i \ge (1-\epsilon)\,\mathrm{tr}\},\ k_{min},\ k_{max})`.

    Args:
        epsilon: discarded spectral mass, in [0, 1).
        k_min: smallest rank, >= 1.
        k_max: largest rank and basis width, >= k_min.

    Returns:
        A :class:`RankRule` (adaptive).

    Example:
        >>> import torch, scao_fx as sf
        >>> rule = sf.spectral_mass_rank(0.1, k_min=1, k_max=4)
        >>> int(rule.select(torch.tensor([5.0, 4.0, 0.5, 0.5])))
        2
    """
    epsilon = check_float("epsilon", epsilon, low=0.0, high=1.0, high_inclusive=False)
    k_min = check_int("k_min", k_min, low=1)
    k_max = check_int("k_max", k_max, low=k_min)
    return RankRule(epsilon=epsilon, k_min=k_min, k_max=k_max, adaptive=True)


def full_rank() -> RankRule:
    r"""Keep every direction: the preconditioner is exactly :math:`L^{-1/4}` (the ablation of adaptive rank).

    Returns:
        A :class:`RankRule` with ``k = dim`` and a full-width basis.

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.kronecker_precondition(rank=sf.full_rank())
    """
    return RankRule(epsilon=0.0, k_min=1, k_max=None, adaptive=False)


def fixed_rank(k: int) -> RankRule:
    """Always keep ``min(k, dim)`` directions.

    Args:
        k: the rank, >= 1.

    Returns:
        A non-adaptive :class:`RankRule` of width ``min(k, dim)``.

    Example:
        >>> import scao_fx as sf
        >>> sf.fixed_rank(16).capacity(768)
        16
    """
    k = check_int("k", k, low=1)
    return RankRule(epsilon=0.0, k_min=k, k_max=k, adaptive=False)


def _finite_rows(*tensors: torch.Tensor, lead: int) -> torch.Tensor:
    ok = None
    for t in tensors:
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
