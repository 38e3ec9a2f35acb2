"""The transform protocol: torchopt's ``GradientTransformation``, re-exported.

A gradient transformation is a pair of pure functions::

    state = tx.init(params)
    updates, state = tx.update(updates, state, params=params, inplace=True)

``updates`` and ``params`` are pytrees (dicts from ``dict(model.named_parameters())``, nested
dicts, lists, tuples); ``state`` is a pytree of NamedTuples of plain tensors, so a checkpoint
loads with ``torch.load(..., weights_only=True)``.

Contract kept by every transform of this library:

* ``inplace=False`` never mutates its inputs (updates, state, params);
* returned updates never alias a state tensor, so a later in-place link cannot corrupt state;
* ``inplace=True`` may reuse the input update buffers;
* ``None`` leaves (parameters without a gradient) pass through untouched.
"""

from __future__ import annotations

import torch
from torchopt.base import (
    ChainedGradientTransformation,
    EmptyState,
    GradientTransformation,
    IdentityGradientTransformation,
)

__all__ = [
    "GradientTransformation",
    "ChainedGradientTransformation",
    "EmptyState",
    "IdentityGradientTransformation",
    "check_transform",
    "step_count",
    "increment",
    "register_state",
    "multi_tensor_ok",
]


def register_state(cls: type) -> type:
    """Class decorator: allow a state NamedTuple in ``torch.load(..., weights_only=True)``.

    ``torch.load`` with ``weights_only=True`` only unpickles allow-listed globals; every state
    class of the library is registered here at import time, so a saved functional state (a tree
    of these NamedTuples of plain tensors) loads back safely once ``scao_fx`` is imported.
    """
    torch.serialization.add_safe_globals([cls])
    return cls


register_state(EmptyState)


def check_transform(name: str, tx: object) -> GradientTransformation:
    """Raise ``TypeError`` naming ``name`` unless ``tx`` is a ``GradientTransformation``."""
    if not isinstance(tx, GradientTransformation):
        raise TypeError(
            f"{name} must be a GradientTransformation (a scao_fx or torchopt transform), "
            f"got {type(tx).__name__}"
        )
    return tx


def step_count() -> torch.Tensor:
    """A fresh step counter: a 0-d int64 tensor on the CPU.

    Counters live on the CPU so that deciding a schedule (refresh every ``precond_freq`` steps,
    warmup, blend) never synchronises with an accelerator; a 0-d CPU tensor still combines with
    CUDA tensors in arithmetic.
    """
    return torch.zeros((), dtype=torch.int64)


def increment(count: torch.Tensor) -> torch.Tensor:
    """``count + 1``, saturating at the int64 maximum (never overflows); never in place."""
    return count + (count < torch.iinfo(torch.int64).max).to(count.dtype)


def multi_tensor_ok(tensors) -> bool:
    """Whether the multi-tensor ``torch._foreach_*`` kernels may run on ``tensors``.

    False under ``torch.compile`` (inductor fuses a per-leaf loop anyway) and under
    ``torch.func`` transforms (``vmap``, ``grad``): ``_foreach_*`` ops have no batching rule.
    """
    if torch.compiler.is_compiling():
        return False
    return not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)
