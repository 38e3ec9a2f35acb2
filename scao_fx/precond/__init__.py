"""Pure preconditioner math on stacked factors: no pytrees, no process groups.

* :mod:`~scao_fx.precond.curvature`: ``curvature_ema`` (Kronecker factor statistics through a codec).
* :mod:`~scao_fx.precond.sketch`: ``curvature_sketch`` (low-rank frequent-directions sketches of the factors).
* :mod:`~scao_fx.precond.rank`: rank rules (``spectral_mass_rank``, ``full_rank``, ``fixed_rank``).
* :mod:`~scao_fx.precond.eigen`: ``robust_eigh`` and the top-eigenpair solvers of a refresh.
* :mod:`~scao_fx.precond.kron`: refresh, apply, graft and normalization of Kronecker sides.
* :mod:`~scao_fx.precond.orthogonal`: ``newton_schulz`` (Muon's orthogonalisation) and ``shape_scale``.

The links in :mod:`scao_fx.transforms` are the plumbing around these functions.
"""

from .curvature import CurvatureEMA, FactorStatistic, curvature_ema
from .eigen import robust_eigh, top_eigenpairs_exact, top_eigenpairs_subspace
from .kron import KroneckerSide
from .orthogonal import NS_COEFFICIENTS, newton_schulz, shape_scale
from .rank import RankRule, fixed_rank, full_rank, spectral_mass_rank
from .sketch import CurvatureSketch, SketchStatistic, curvature_sketch

__all__ = [
    "CurvatureEMA",
    "FactorStatistic",
    "curvature_ema",
    "CurvatureSketch",
    "SketchStatistic",
    "curvature_sketch",
    "RankRule",
    "spectral_mass_rank",
    "full_rank",
    "fixed_rank",
    "robust_eigh",
    "top_eigenpairs_exact",
    "top_eigenpairs_subspace",
    "KroneckerSide",
    "NS_COEFFICIENTS",
    "newton_schulz",
    "shape_scale",
]
