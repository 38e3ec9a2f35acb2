"""Gradient transformations, one module per family.

* :mod:`~scao_fx.transforms.combinators`: ``chain``, ``named_chain``, ``identity``, ``masked``,
  ``partition``.
* :mod:`~scao_fx.transforms.adam`: ``scale_by_adam``, ``add_decayed_weights``.
* :mod:`~scao_fx.transforms.scale`: ``scale``, ``scale_by_learning_rate``.
* :mod:`~scao_fx.transforms.momentum`: ``scale_by_momentum``.
* :mod:`~scao_fx.transforms.orthogonal`: ``scale_by_newton_schulz`` (its math:
  :mod:`scao_fx.precond.orthogonal`).
* :mod:`~scao_fx.transforms.clipping`: ``clip_by_global_norm``.
* :mod:`~scao_fx.transforms.quantization`: the ``quantize_state`` combinator (codecs:
  :mod:`scao_fx.codecs`).
* :mod:`~scao_fx.transforms.kronecker`: ``kronecker_precondition`` (its parts: :mod:`scao_fx.precond`).
* :mod:`~scao_fx.transforms.eigenbasis`: ``kronecker_eigenbasis`` (an inner transform, Adam by
  default, run in the factors' eigenbases: the SOAP form).
* :mod:`~scao_fx.transforms.sharding`: ``full_tensor_updates`` (FSDP2 DTensor updates gathered whole).
* :mod:`~scao_fx.transforms.blend`: the ``blend_ramp`` combinator.
* :mod:`~scao_fx.transforms.finite`: the ``apply_if_finite`` combinator (skip non-finite steps).
"""

from .adam import ScaleByAdamState, add_decayed_weights, scale_by_adam
from .blend import BlendRampState, blend_factor, blend_ramp
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
from .eigenbasis import KroneckerEigenbasisState, kronecker_eigenbasis
from .finite import (
    ApplyIfFiniteState,
    FiniteGuard,
    NonFiniteGradientError,
    all_finite,
    apply_if_finite,
    skipped_steps,
    square_safe_bound,
)
from .kronecker import KroneckerGroupState, KroneckerPreconditionState, kronecker_precondition, matrix_shape
from .momentum import ScaleByMomentumState, scale_by_momentum
from .orthogonal import scale_by_newton_schulz
from .quantization import QuantizedState, bf16_adam_codecs, int8_adam_codecs, quantize_state
from .scale import ScaleByScheduleState, scale, scale_by_learning_rate
from .sharding import full_tensor_updates

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
    "scale_by_momentum",
    "ScaleByMomentumState",
    "scale_by_newton_schulz",
    "clip_by_global_norm",
    "global_norm",
    "QuantizedState",
    "quantize_state",
    "int8_adam_codecs",
    "bf16_adam_codecs",
    "kronecker_precondition",
    "KroneckerPreconditionState",
    "KroneckerGroupState",
    "matrix_shape",
    "kronecker_eigenbasis",
    "KroneckerEigenbasisState",
    "full_tensor_updates",
    "blend_ramp",
    "BlendRampState",
    "blend_factor",
    "apply_if_finite",
    "FiniteGuard",
    "ApplyIfFiniteState",
    "NonFiniteGradientError",
    "all_finite",
    "square_safe_bound",
    "skipped_steps",
]
