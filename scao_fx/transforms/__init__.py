"""Gradient transformations, one module per family.

* :mod:`~scao_fx.transforms.combinators`: ``chain``, ``named_chain``, ``identity``, ``masked``,
  ``partition``.
* :mod:`~scao_fx.transforms.adam`: ``scale_by_adam``, ``add_decayed_weights``.
* :mod:`~scao_fx.transforms.scale`: ``scale``, ``scale_by_learning_rate``.
* :mod:`~scao_fx.transforms.clipping`: ``clip_by_global_norm``.
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
]
