"""Gradient transformations, one module per family.

* :mod:`~scao_fx.transforms.combinators`: ``chain``, ``named_chain``, ``identity``, ``masked``,
  ``partition``.
* :mod:`~scao_fx.transforms.adam`: ``scale_by_adam``, ``add_decayed_weights``.
* :mod:`~scao_fx.transforms.scale`: ``scale``, ``scale_by_learning_rate``.
* :mod:`~scao_fx.transforms.clipping`: ``clip_by_global_norm``.
* :mod:`~scao_fx.transforms.quantization`: codecs (``int8_blockwise``, ``fp32_codec``,
  ``bf16_codec``) and the ``quantize_state`` combinator.
* :mod:`~scao_fx.transforms.curvature`: ``curvature_ema`` (Kronecker factor statistics).
* :mod:`~scao_fx.transforms.rank`: rank rules (``spectral_mass_rank``, ``full_rank``,
  ``fixed_rank``) and ``robust_eigh``.
* :mod:`~scao_fx.transforms.kronecker`: ``kronecker_precondition``.
* :mod:`~scao_fx.transforms.blend`: the ``blend_ramp`` combinator.
* :mod:`~scao_fx.transforms.finite`: the ``apply_if_finite`` combinator (skip non-finite steps).
"""

from .adam import ScaleByAdamState, add_decayed_weights, scale_by_adam
from .clipping import clip_by_global_norm, global_norm
from .combinators import (
    MaskedState,
    NamedChainState,
    PartitionState,
    chain,
    identity,
    masked,
    named_chain,
    partition,
)
from .blend import BlendRampState, blend_factor, blend_ramp
from .curvature import CurvatureEMA, FactorStatistic, curvature_ema
from .finite import (
    ApplyIfFiniteState,
    NonFiniteGradientError,
    all_finite,
    apply_if_finite,
    skipped_steps,
    square_safe_bound,
)
from .kronecker import (
    KroneckerGroupState,
    KroneckerPreconditionState,
    KroneckerSide,
    kronecker_precondition,
    matrix_shape,
)
from .quantization import (
    Codec,
    EncodedTensor,
    QuantizedState,
    bf16_codec,
    fp32_codec,
    int8_adam_codecs,
    int8_blockwise,
    quantize_state,
)
from .rank import RankRule, fixed_rank, full_rank, robust_eigh, spectral_mass_rank
from .scale import ScaleByScheduleState, scale, scale_by_learning_rate

__all__ = [
    "chain",
    "named_chain",
    "identity",
    "masked",
    "partition",
    "MaskedState",
    "NamedChainState",
    "PartitionState",
    "scale_by_adam",
    "ScaleByAdamState",
    "add_decayed_weights",
    "scale",
    "scale_by_learning_rate",
    "ScaleByScheduleState",
    "clip_by_global_norm",
    "global_norm",
    "Codec",
    "EncodedTensor",
    "QuantizedState",
    "fp32_codec",
    "bf16_codec",
    "int8_blockwise",
    "quantize_state",
    "int8_adam_codecs",
    "CurvatureEMA",
    "FactorStatistic",
    "curvature_ema",
    "RankRule",
    "spectral_mass_rank",
    "full_rank",
    "fixed_rank",
    "robust_eigh",
    "kronecker_precondition",
    "KroneckerPreconditionState",
    "KroneckerGroupState",
    "KroneckerSide",
    "matrix_shape",
    "blend_ramp",
    "BlendRampState",
    "blend_factor",
    "apply_if_finite",
    "ApplyIfFiniteState",
    "NonFiniteGradientError",
    "all_finite",
    "square_safe_bound",
    "skipped_steps",
]
