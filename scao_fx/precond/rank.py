r"""Adaptive rank truncation: rank rules.

A rank rule maps the eigenvalues of a (stack of) Kronecker factors, sorted in decreasing order,
to the number ``k`` of eigen-directions to keep, as an int64 tensor (one ``k`` per stacked
factor). Rules never produce data-dependent shapes: the basis keeps a fixed width
``rule.capacity(dim)`` and directions past ``k`` are masked, so steps stay compile-friendly.

* :func:`spectral_mass_rank` — the smallest ``k`` whose eigenvalues hold at least
  ``1 - epsilon`` of the spectral mass, clamped to ``[k_min, k_max]`` (SCAO's rule).
* :func:`full_rank` — keep every direction (``k = dim``): exact :math:`L^{-1/4}`.
* :func:`fixed_rank` — always ``min(k, dim)``.

The eigendecompositions they read come from :mod:`scao_fx.precond.eigen`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validation import check_float, check_int

__all__ = ["RankRule", "spectral_mass_rank", "full_rank", "fixed_rank"]


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


def spectral_mass_rank(epsilon: float = 0.05, k_min: int = 8, k_max: int | None = 128) -> RankRule:
    r"""SCAO's adaptive rank: keep the top-``k`` eigen-directions holding ``>= 1 - epsilon`` of the mass.

    :math:`k = \mathrm{clamp}(\min\{j : \sum_{i \le j}\lambda_i \ge (1-\epsilon)\,\mathrm{tr}\},\ k_{min},\ k_{max})`.

    Args:
        epsilon: discarded spectral mass, in [0, 1).
        k_min: smallest rank, >= 1.
        k_max: largest rank and basis width, >= k_min; ``None``: no cap (the basis is as wide
            as the factor).

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
    k_max = None if k_max is None else check_int("k_max", k_max, low=k_min)
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
