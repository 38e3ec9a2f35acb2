r"""Honest optimizer-state memory accounting.

:func:`state_bytes` counts the bytes of every tensor in a state tree (each storage once).
:func:`memory_report` attributes them to parameter leaves: per-leaf tensors (Adam moments) by
position, and the stacked tensors of a Kronecker shape group evenly over the group's leaves.

For a matrix leaf ``m x n`` preconditioned on both sides, SCAO's curvature costs

.. math::
    \underbrace{(m^2 + n^2)(1 + 4/b)}_{\text{int8 off-diagonal + block scales}}
    + \underbrace{4(m + n)}_{\text{fp32 diagonals}}
    + \underbrace{4\,(m\,k_m + n\,k_n) + 8(k_m + k_n)}_{\text{fp32 bases and gains}}

bytes (``b`` the int8 block size, ``k = min(dim, k_max)`` the basis width): the full factors
are kept, so the cost is *not* :math:`O((m+n)k)`; ``max_precond_dim`` bounds it.
"""

from __future__ import annotations

from typing import Any

import optree
import torch

from ._tree import find_nodes, flatten, walk
from .transforms.kronecker import KroneckerPreconditionState

__all__ = ["state_bytes", "memory_report"]


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves = optree.tree_leaves(tree, none_is_leaf=False)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def state_bytes(state: Any) -> int:
    """Total bytes of the tensors in ``state`` (a storage shared by several tensors counts once).

    Args:
        state: any tree of tensors (a transform's state, a list of tensors, ...). Tensors on
            the ``meta`` device are counted as the bytes they would take, so a state initialised
            from meta parameters measures a model's optimizer memory without allocating it.

    Returns:
        The number of bytes, as an int.

    Example:
        >>> import torch, scao_fx as sf
        >>> st = sf.adamw(1e-3).init({"w": torch.zeros(10, 10)})
        >>> sf.state_bytes(st)  # two fp32 moments of 100 entries + an int64 counter
        808
    """
    seen: dict[tuple, int] = {}
    for t in _tensors(state):
        storage = t.untyped_storage()
        # Tensors on the meta device (shapes only, no memory) all have data pointer 0: tell
        # their storages apart by the storage object itself (views of one share it).
        ptr = storage.data_ptr() if t.device.type != "meta" else ("meta", storage._cdata)
        key = (ptr, t.device.type, t.device.index)
        seen[key] = max(seen.get(key, 0), storage.nbytes())
    return sum(seen.values())


def memory_report(state: Any, params: Any) -> dict[str, Any]:
    """Optimizer-state bytes per parameter leaf and per parameter.

    Args:
        state: a state tree of the library (e.g. from ``sf.scao(...).init(params)``).
        params: the parameter tree the state was built for (gives names, sizes and the
            per-leaf layout).

    Returns:
        A dict with ``"total_bytes"``, ``"num_params"``, ``"bytes_per_param"``,
        ``"per_leaf"`` (``{path: bytes}``, per-leaf counters included) and ``"unattributed_bytes"``
        (tree-wide counters and any tensor that belongs to no single leaf).

    Example:
        >>> import torch, scao_fx as sf
        >>> p = {"w": torch.zeros(16, 8)}
        >>> rep = sf.memory_report(sf.adamw(1e-3).init(p), p)
        >>> rep["per_leaf"]["w"]  # two fp32 moments of 128 entries and the leaf's int64 step count
        1032
    """
    p_leaves, p_spec = flatten(params)
    paths = [".".join(str(k) for k in path) for path in optree.tree_paths(params, none_is_leaf=True)]
    per_leaf = {path: 0 for path in paths}
    counted: set[int] = set()

    # Stacked Kronecker groups: spread evenly over the group's leaves.
    for kp in find_nodes(state, KroneckerPreconditionState):
        for group in kp.groups:
            idx = [int(i) for i in group.leaves]
            tensors = [t for t in _tensors((group.left, group.right))]
            nbytes = sum(t.untyped_storage().nbytes() for t in tensors)
            counted.update(id(t) for t in tensors)
            for i in idx:
                per_leaf[paths[i]] += nbytes // len(idx)

    # Per-leaf trees (Adam moments and alike): any sub-tree with the params' structure.
    def visit(node) -> bool:
        if isinstance(node, KroneckerPreconditionState):
            return True
        leaves, spec = optree.tree_flatten(node, none_is_leaf=True)
        if spec != p_spec or not all(isinstance(x, (torch.Tensor, type(None))) for x in leaves):
            return False
        for path, x in zip(paths, leaves):
            if isinstance(x, torch.Tensor) and id(x) not in counted:
                per_leaf[path] += x.untyped_storage().nbytes()
                counted.add(id(x))
        return True

    walk(state, visit)
    total = state_bytes(state)
    n = sum(p.numel() for p in p_leaves if p is not None)
    attributed = sum(per_leaf.values())
    return {
        "total_bytes": total,
        "num_params": n,
        "bytes_per_param": total / max(n, 1),
        "per_leaf": per_leaf,
        "unattributed_bytes": total - attributed,
    }
