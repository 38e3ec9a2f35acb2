"""Float64 dense reference of SCAO's preconditioner, shared by the SCAO tests (not a test module).

Written from the math of docs/scao.md (the preconditioner, the complement, the curvature EMA), independently of the library code:
eigendecompositions in float64 with ``torch.linalg.eigh``, explicit dense matrices, Python
loops. Everything here is deliberately slow and obvious.
"""

from __future__ import annotations

import torch

F64 = torch.float64


def ema_closed_form(grams: list[torch.Tensor], rho: float) -> torch.Tensor:
    r"""Debiased EMA started at zero: :math:`\sum_t (1-\rho)\rho^{T-t} X_t / (1-\rho^T)` (float64)."""
    T = len(grams)
    acc = torch.zeros_like(grams[0], dtype=F64)
    for t, x in enumerate(grams, start=1):
        acc = acc + (1 - rho) * rho ** (T - t) * x.to(F64)
    return acc / (1 - rho**T)


def left_factor(grads: list[torch.Tensor], rho: float) -> torch.Tensor:
    """Debiased EMA of G G^T."""
    return ema_closed_form([g.to(F64) @ g.to(F64).T for g in grads], rho)


def right_factor(grads: list[torch.Tensor], rho: float) -> torch.Tensor:
    """Debiased EMA of G^T G."""
    return ema_closed_form([g.to(F64).T @ g.to(F64) for g in grads], rho)


def spectral_mass_k(vals_desc: list[float], epsilon: float, k_min: int, k_max: int | None) -> int:
    """Smallest k whose top-k eigenvalues hold >= (1 - epsilon) of the mass, clamped (a plain loop).

    The clamp range is ``[min(k_min, cap), cap]`` with ``cap = min(dim, k_max)``; an all-zero
    spectrum gives ``k_min`` (clamped).
    """
    dim = len(vals_desc)
    cap = dim if k_max is None else min(dim, k_max)
    lam = [max(0.0, float(v)) for v in vals_desc]
    total = sum(lam)
    if total <= 0:
        k = k_min
    else:
        k, acc = dim, 0.0
        for j, v in enumerate(lam, start=1):
            acc += v
            if acc >= (1 - epsilon) * total * (1 - 1e-12):
                k = j
                break
    return max(min(k_min, cap), min(k, cap))


def precond_matrix(
    factor: torch.Tensor,
    *,
    tikhonov: float = 0.0,
    k: int | None = None,
    complement: str = "mean_tail",
    rank_rule=None,
) -> tuple[torch.Tensor, int]:
    r"""The float64 matrix :math:`A = U_k\,\mathrm{diag}(s_k^{-1/4} - c)\,U_k^\top + c I`.

    ``s`` are the eigenvalues of :math:`F + \epsilon I`, :math:`\epsilon = \max(10^{-30},
    \mathrm{tikhonov}\cdot\mathrm{tr}(F)/d)`. ``k``: given, or from ``rank_rule = (epsilon, k_min,
    k_max)`` applied to :math:`s - \epsilon`, or ``d`` (full rank: then :math:`A = (F+\epsilon I)^{-1/4}`).
    ``c``: mean of the discarded ``s`` to the -1/4 (``"mean_tail"``; the smallest ``s`` when
    nothing is discarded), ``s_k^{-1/4}`` (``"kth"``) or 0 (``"none"``). Returns ``(A, k)``.
    """
    f = factor.to(F64)
    d = f.shape[0]
    eps = max(1e-30, tikhonov * float(torch.trace(f)) / d)
    s, u = torch.linalg.eigh(f + eps * torch.eye(d, dtype=F64))
    s, u = s.flip(0).clamp(min=eps), u.flip(1)
    if k is None:
        if rank_rule is None:
            k = d
        else:
            k = spectral_mass_k((s - eps).tolist(), *rank_rule)
    if complement == "none":
        c = 0.0
    elif complement == "kth":
        c = float(s[k - 1]) ** -0.25
    elif k < d:
        c = float(s[k:].mean()) ** -0.25
    else:
        c = float(s[-1]) ** -0.25
    uk = u[:, :k]
    a = uk @ torch.diag(s[:k] ** -0.25 - c) @ uk.T + c * torch.eye(d, dtype=F64)
    return a, k


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b||_F / ||b||_F`` in float64."""
    a, b = a.to(F64), b.to(F64)
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the flattened tensors in float64."""
    a, b = a.to(F64).flatten(), b.to(F64).flatten()
    return float(a @ b / (a.norm() * b.norm()))
