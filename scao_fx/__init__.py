"""scao-fx: functional, chainable second-order optimization (SCAO) for PyTorch.

Every optimizer is a ``GradientTransformation`` (torchopt's protocol) composed with
:func:`chain`::

    import scao_fx as sf
    tx = sf.adamw(lr=1e-3)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params=params)
    params = sf.apply_updates(params, updates)
"""

from . import precond, schedules, transforms
from .alias import adam, adamw, muon, scao, scao_precondition, soap
from .base import EmptyState, GradientTransformation
from .codecs import Codec, EncodedTensor, bf16_codec, fp32_codec, int8_blockwise
from .diagnostics import scao_diagnostics, summarize_diagnostics
from .memory import memory_report, state_bytes
from .optim import SCAO, TransformOptimizer, dcp_state_dict
from .parallel import assign_owners, gather_full, shard_like
from .precond import (
    CurvatureEMA,
    CurvatureSketch,
    FactorStatistic,
    KroneckerSide,
    RankRule,
    SketchStatistic,
    curvature_ema,
    curvature_sketch,
    fixed_rank,
    full_rank,
    robust_eigh,
    spectral_mass_rank,
)
from .transforms import *  # noqa: F401,F403  (re-export the transform families)
from .transforms import __all__ as _transforms_all
from .update import apply_updates

__version__ = "0.1.0"

__all__ = [
    "GradientTransformation",
    "EmptyState",
    "apply_updates",
    "memory_report",
    "state_bytes",
    "TransformOptimizer",
    "SCAO",
    "scao_diagnostics",
    "summarize_diagnostics",
    "assign_owners",
    "gather_full",
    "shard_like",
    "dcp_state_dict",
    "adam",
    "adamw",
    "muon",
    "scao",
    "scao_precondition",
    "soap",
    "Codec",
    "EncodedTensor",
    "fp32_codec",
    "bf16_codec",
    "int8_blockwise",
    "schedules",
    "transforms",
    "precond",
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
    "KroneckerSide",
    *_transforms_all,
]
