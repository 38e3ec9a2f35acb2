"""Pytree helpers: the trees ``torch.func`` uses, handled with optree as torchopt does.

Every transform of the library flattens its inputs once with :func:`flatten`, works on the flat
list of leaves and rebuilds the tree with :func:`unflatten`. ``None`` leaves (parameters without
a gradient) are kept as ``None`` and skipped by every transform.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import optree

__all__ = ["flatten", "unflatten", "check_same_structure", "walk", "find_nodes"]


def flatten(tree: Any) -> tuple[list[Any], optree.PyTreeSpec]:
    """Flatten ``tree`` into its leaves (``None`` kept as a leaf placeholder) and its spec."""
    leaves, spec = optree.tree_flatten(tree, none_is_leaf=True)
    return leaves, spec


def unflatten(spec: optree.PyTreeSpec, leaves: Sequence[Any]) -> Any:
    """Inverse of :func:`flatten`."""
    return optree.tree_unflatten(spec, list(leaves))


def check_same_structure(name_a: str, spec_a: optree.PyTreeSpec, name_b: str, spec_b: optree.PyTreeSpec) -> None:
    """Raise a ``ValueError`` naming both arguments if two tree structures differ."""
    if spec_a != spec_b:
        raise ValueError(
            f"{name_a} and {name_b} must have the same tree structure; got\n"
            f"  {name_a}: {spec_a}\n  {name_b}: {spec_b}\n"
            "(was the state created by init() on a different parameter tree?)"
        )


def flatten_like_state(updates: Any, moments: Any, what: str) -> tuple:
    """``(update leaves, spec, moment leaves, moment spec)`` for a transform whose state holds a
    tree of per-leaf ``moments`` shaped like the updates; a ``ValueError`` names ``what`` (e.g.
    "the Adam state") when the leaf counts, the structures or a leaf's shape differ."""
    g_leaves, spec = flatten(updates)
    m_leaves, m_spec = flatten(moments)
    if m_spec.num_leaves != spec.num_leaves:
        raise ValueError(
            f"updates has {spec.num_leaves} leaves but {what} was built for "
            f"{m_spec.num_leaves}; was init() called on the same parameter tree?"
        )
    check_same_structure("updates", spec, f"{what}'s moments", m_spec)
    for i, (g, m) in enumerate(zip(g_leaves, m_leaves)):
        if g is not None and (m is None or g.shape != m.shape):
            raise ValueError(
                f"updates leaf {i} has shape {tuple(g.shape)} but {what} holds "
                f"{None if m is None else tuple(m.shape)} there; was init() called on the same parameter tree?"
            )
    return g_leaves, spec, m_leaves, m_spec


def walk(tree: Any, visit: Callable[[Any], bool]) -> None:
    """Depth-first walk over a state tree (dicts, lists, tuples and NamedTuples).

    ``visit(node)`` is called on every node; returning True stops the descent below that node.
    """
    if visit(tree):
        return
    if isinstance(tree, dict):
        children = list(tree.values())
    elif isinstance(tree, (tuple, list)):
        children = list(tree)
    else:
        return
    for child in children:
        walk(child, visit)


def find_nodes(tree: Any, cls: type) -> list:
    """All nodes of type ``cls`` in ``tree``, in depth-first order (not searching inside them)."""
    found: list = []

    def visit(node: Any) -> bool:
        if isinstance(node, cls):
            found.append(node)
            return True
        return False

    walk(tree, visit)
    return found
