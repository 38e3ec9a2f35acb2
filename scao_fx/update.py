"""Apply updates to parameters."""

from __future__ import annotations

from typing import Any

import torch

from . import _treemath
from ._tree import check_same_structure, flatten, unflatten

__all__ = ["apply_updates"]


def apply_updates(params: Any, updates: Any, *, inplace: bool = True) -> Any:
    r"""Return ``params + updates`` leaf by leaf (:math:`\theta \leftarrow \theta + u`).

    Args:
        params: the parameter tree.
        updates: a tree of the same structure (``None`` leaves leave their parameter unchanged).
        inplace: if True, add in place (under ``torch.no_grad``) and return the same tensors;
            if False, return new tensors and leave ``params`` untouched (the form to use under
            ``torch.func`` transforms such as ``vmap``).

    Returns:
        The updated parameter tree.

    Raises:
        ValueError: if the two trees differ in structure.

    Example:
        >>> import torch, scao_fx as sf
        >>> p = {"w": torch.ones(2)}
        >>> sf.apply_updates(p, {"w": torch.full((2,), -0.5)}, inplace=False)["w"]
        tensor([0.5000, 0.5000])
    """
    p_leaves, p_spec = flatten(params)
    u_leaves, u_spec = flatten(updates)
    check_same_structure("params", p_spec, "updates", u_spec)
    if inplace:
        with torch.no_grad():
            return unflatten(p_spec, _treemath.add_scaled(p_leaves, u_leaves, inplace=True))
    return unflatten(p_spec, _treemath.add_scaled(p_leaves, u_leaves))
