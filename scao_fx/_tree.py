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
