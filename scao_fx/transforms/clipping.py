"""Gradient clipping without host synchronisation."""

from __future__ import annotations

import torch

from .. import _treemath
from .._tree import flatten, unflatten
from .._validation import check_float
from ..base import EmptyState, GradientTransformation

__all__ = ["clip_by_global_norm", "global_norm"]


def global_norm(leaves) -> torch.Tensor:
    """Euclidean norm of all tensors in a flat list together (``None`` skipped).

    Computed in float32, or float64 when a leaf is float64, without host synchronisation.

    Args:
        leaves: a flat list of tensors (or ``None``).

    Returns:
        A 0-d tensor.

    Example:
        >>> import torch, scao_fx as sf
        >>> float(sf.global_norm([torch.tensor([3.0]), None, torch.tensor([4.0])]))
        5.0
    """
    tensors = [g for g in leaves if g is not None]
    if not tensors:
        return torch.zeros(())
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    tensors = [t.to(dtype) for t in tensors]
    norms = _treemath.norms(tensors)
    return torch.linalg.vector_norm(torch.stack([n.to(tensors[0].device) for n in norms]))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    r"""Rescale all updates together so their global norm is at most ``max_norm``.

    :math:`u \leftarrow u \cdot \min(1, \tau / (\lVert u \rVert_2 + 10^{-6}))`, computed with tensor
    ops only (no ``.item()``), so it never synchronises with the accelerator.

    Args:
        max_norm: the norm cap, > 0 (``inf``: no clipping).

    Returns:
        A ``GradientTransformation`` with state ``EmptyState()``.

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.chain(sf.clip_by_global_norm(1.0), sf.adamw(3e-4))
    """
    max_norm = check_float("max_norm", max_norm, low=0.0, low_inclusive=False, allow_inf=True)

    def init(params):
        return EmptyState()

    def update(updates, state, *, params=None, inplace=True):
        leaves, spec = flatten(updates)
        norm = global_norm(leaves)
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return unflatten(spec, _treemath.scale(leaves, factor, inplace=inplace)), state

    return GradientTransformation(init, update)
