"""FSDP2 support for transforms that need whole matrices: the :func:`full_tensor_updates` wrapper.

FSDP2 (``torch.distributed.fsdp.fully_shard``) hands each rank DTensor gradients holding its
shard only. A transform that mixes the entries of a matrix (Kronecker preconditioning) needs
the whole matrix: this wrapper all-gathers the selected DTensor updates
(:func:`~scao_fx.parallel.gather_full`), runs the inner transform on plain tensors, and returns
this rank's shard of each result (:func:`~scao_fx.parallel.shard_like`, a local slice). Other
updates pass through untouched, so element-wise links keep running on the shards.
"""

from __future__ import annotations

from typing import Any, Callable

from .._tree import flatten, unflatten
from ..base import GradientTransformation, check_transform
from ..parallel import gather_full, is_dtensor, shard_like

__all__ = ["full_tensor_updates"]


def full_tensor_updates(inner: GradientTransformation, select: Callable[[Any], bool]) -> GradientTransformation:
    """Run ``inner`` on the full value of every DTensor update that ``select`` picks.

    Args:
        inner: the transform that needs whole tensors.
        select: ``leaf -> bool``, True for the updates to gather (a DTensor's shape is global).

    Raises:
        TypeError: if ``inner`` is not a ``GradientTransformation`` or ``select`` not callable.

    Returns:
        A ``GradientTransformation`` with ``inner``'s state; without DTensor updates it is
        ``inner`` with one extra pass over the leaves.

    Example:
        >>> import torch, scao_fx as sf
        >>> from scao_fx.transforms.sharding import full_tensor_updates
        >>> tx = full_tensor_updates(sf.scale(2.0), lambda leaf: leaf.dim() == 2)
        >>> tx.update({"w": torch.ones(2, 2)}, tx.init({"w": torch.ones(2, 2)}))[0]["w"].sum().item()
        8.0
    """
    check_transform("inner", inner)
    if not callable(select):
        raise TypeError(f"select must be a callable leaf -> bool, got {select!r}")

    def update(updates, state, *, params=None, inplace=True):
        leaves, spec = flatten(updates)
        sharded = {i: x for i, x in enumerate(leaves) if is_dtensor(x) and select(x)}
        if not sharded:
            return inner.update(updates, state, params=params, inplace=inplace)
        full = [gather_full(x) if i in sharded else x for i, x in enumerate(leaves)]
        out, state = inner.update(unflatten(spec, full), state, params=params, inplace=inplace)
        out_leaves, out_spec = flatten(out)
        for i, like in sharded.items():
            if out_leaves[i] is not None:
                out_leaves[i] = shard_like(out_leaves[i], like)
        return unflatten(out_spec, out_leaves), state

    return GradientTransformation(inner.init, update)
