"""Combinators: compose transforms and route leaves between them.

* :func:`chain` runs transforms one after the other (state: a tuple, torchopt-compatible).
* :func:`named_chain` does the same with state keyed by name, so a checkpoint survives adding or
  removing a link.
* :func:`identity` passes updates through.
* :func:`masked` applies a transform to the leaves selected by a boolean mask only.
* :func:`partition` routes each leaf to one of several transforms by a label.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import optree

from .._tree import check_same_structure, flatten, unflatten
from ..base import (
    ChainedGradientTransformation,
    GradientTransformation,
    IdentityGradientTransformation,
    check_transform,
    register_state,
)

__all__ = [
    "chain",
    "named_chain",
    "identity",
    "masked",
    "partition",
    "MaskedState",
    "PartitionState",
    "NamedChainState",
]


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Compose transforms left to right: ``update = t_n(...t_2(t_1(g)))``.

    The state is a tuple with one entry per link, exactly as ``torchopt.chain`` builds it, so a
    chain of this library can be nested in ``torchopt.chain`` and vice versa.

    Args:
        *transforms: the links, each a ``GradientTransformation`` of this library or torchopt.

    Returns:
        A ``GradientTransformation`` whose state is ``tuple(link states)``.

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.chain(sf.clip_by_global_norm(1.0), sf.adamw(lr=1e-3))
    """
    for i, tx in enumerate(transforms):
        check_transform(f"transforms[{i}]", tx)
    return ChainedGradientTransformation(*transforms)


def identity() -> GradientTransformation:
    """The transform that returns its updates unchanged.

    Returns:
        A ``GradientTransformation`` with state ``EmptyState()``; ``chain`` drops it.

    Example:
        >>> import torch, scao_fx as sf
        >>> tx = sf.identity()
        >>> tx.update({"w": torch.ones(2)}, tx.init({"w": torch.zeros(2)}))[0]["w"]
        tensor([1., 1.])
    """
    return IdentityGradientTransformation()


@register_state
class NamedChainState(NamedTuple):
    """State of :func:`named_chain`: one entry per link name (a dict ``name -> link state``)."""

    states: dict


def named_chain(*named: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Compose ``(name, transform)`` pairs; the state is keyed by name.

    Because each link's state sits under its name (not its position), a checkpoint taken before
    a link was added or removed can be migrated by adding or dropping one dict entry; nothing is
    matched by position, so no link ever silently receives another link's state. ``update``
    raises a ``ValueError`` listing both sets of names when state and chain disagree.

    Args:
        *named: ``(name, transform)`` pairs; names must be unique non-empty strings.

    Returns:
        A ``GradientTransformation`` with state ``NamedChainState(states={name: link_state})``.

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.named_chain(("clip", sf.clip_by_global_norm(1.0)), ("adam", sf.adam(lr=1e-3)))
    """
    names: list[str] = []
    for i, pair in enumerate(named):
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and pair[0]):
            raise TypeError(f"named[{i}] must be a (name, transform) pair with a non-empty str name, got {pair!r}")
        if pair[0] in names:
            raise ValueError(f"named_chain names must be unique; {pair[0]!r} appears twice")
        check_transform(f"named[{i}] ({pair[0]!r})", pair[1])
        names.append(pair[0])

    def init(params: Any) -> NamedChainState:
        return NamedChainState({name: tx.init(params) for name, tx in named})

    def update(updates, state, *, params=None, inplace=True):
        states = state.states if isinstance(state, NamedChainState) else state
        if set(states) != set(names):
            raise ValueError(
                f"state does not match this named_chain: state has links {sorted(states)}, "
                f"the chain has {sorted(names)}; add or drop entries of state.states to migrate"
            )
        new_states = {}
        for name, tx in named:
            updates, new_states[name] = tx.update(updates, states[name], params=params, inplace=inplace)
        return updates, NamedChainState(new_states)

    return GradientTransformation(init, update)


@register_state
class MaskedState(NamedTuple):
    """State of :func:`masked`: the inner transform's state over the selected leaves."""

    inner_state: Any


def _resolve_tree_arg(name: str, arg: Any, params: Any, spec) -> list:
    """Flatten a mask/label tree (or call it on params) and check it matches ``spec``."""
    tree = arg(params) if callable(arg) else arg
    leaves, arg_spec = optree.tree_flatten(tree, none_is_leaf=True)
    if arg_spec != spec:
        raise ValueError(
            f"{name} must have the same tree structure as the parameters: {name} has "
            f"{arg_spec.num_leaves} leaves ({arg_spec}), the parameters {spec.num_leaves} ({spec})"
        )
    return leaves


def masked(inner: GradientTransformation, mask: Any) -> GradientTransformation:
    """Apply ``inner`` to the leaves where ``mask`` is True; pass the others through.

    Args:
        inner: the transform to apply on the selected leaves. It sees a flat list of them.
        mask: a tree of bools with the parameters' structure, or a callable ``params -> tree``.

    Returns:
        A ``GradientTransformation`` with state ``MaskedState(inner_state)``.

    Raises:
        ValueError: if the mask's tree structure differs from the parameters'.

    Example:
        >>> import scao_fx as sf
        >>> decay_matrices = lambda p: {k: v.ndim >= 2 for k, v in p.items()}
        >>> tx = sf.masked(sf.add_decayed_weights(0.1), decay_matrices)
    """
    check_transform("inner", inner)
    if not (callable(mask) or mask is not None):
        raise TypeError("mask must be a tree of bools or a callable params -> tree of bools")

    def selection(tree: Any, params_for_mask: Any) -> tuple[list, Any, list[int]]:
        leaves, spec = flatten(tree)
        mask_leaves = _resolve_tree_arg("mask", mask, params_for_mask if params_for_mask is not None else tree, spec)
        for m in mask_leaves:
            if not isinstance(m, (bool, type(None))):
                raise TypeError(f"mask leaves must be bools, got {type(m).__name__}")
        idx = [i for i, m in enumerate(mask_leaves) if m]
        return leaves, spec, idx

    def init(params):
        leaves, _, idx = selection(params, params)
        return MaskedState(inner.init([leaves[i] for i in idx]))

    def update(updates, state, *, params=None, inplace=True):
        leaves, spec, idx = selection(updates, params)
        sub_params = None
        if params is not None:
            p_leaves, p_spec = flatten(params)
            check_same_structure("updates", spec, "params", p_spec)
            sub_params = [p_leaves[i] for i in idx]
        sub, inner_state = inner.update([leaves[i] for i in idx], state.inner_state, params=sub_params, inplace=inplace)
        out = list(leaves)
        for j, i in enumerate(idx):
            out[i] = sub[j]
        return unflatten(spec, out), MaskedState(inner_state)

    return GradientTransformation(init, update)


@register_state
class PartitionState(NamedTuple):
    """State of :func:`partition`: ``{label: inner state over that label's leaves}``."""

    inner_states: dict


def partition(transforms: Mapping[str, GradientTransformation], labels: Any) -> GradientTransformation:
    """Route each leaf to the transform named by its label.

    Args:
        transforms: a mapping ``label -> transform``.
        labels: a tree of labels with the parameters' structure, or a callable applied to each
            parameter leaf returning its label (for example ``lambda p: "matrix" if p.ndim >= 2
            else "vector"``).

    Returns:
        A ``GradientTransformation`` with state ``PartitionState({label: state})``. Every
        transform sees the flat list of its leaves in tree order.

    Raises:
        ValueError: if a label is not a key of ``transforms``, or the label tree's structure
            differs from the parameters'.

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.partition({"matrix": sf.adamw(1e-3), "vector": sf.adam(1e-3)},
        ...                   lambda p: "matrix" if p.ndim >= 2 else "vector")
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise TypeError("transforms must be a non-empty mapping label -> GradientTransformation")
    for k, tx in transforms.items():
        check_transform(f"transforms[{k!r}]", tx)
    keys = list(transforms)

    def leaf_labels(params: Any) -> tuple[list, Any, list]:
        leaves, spec = flatten(params)
        if callable(labels):
            labs = [None if leaf is None else labels(leaf) for leaf in leaves]
        else:
            labs = _resolve_tree_arg("labels", labels, params, spec)
        for lab, leaf in zip(labs, leaves):
            if leaf is not None and lab not in transforms:
                raise ValueError(f"labels: label {lab!r} is not one of the transforms' keys {keys!r}")
        return leaves, spec, labs

    def init(params):
        leaves, _, labs = leaf_labels(params)
        return PartitionState(
            {k: transforms[k].init([x for x, lab in zip(leaves, labs) if lab == k]) for k in keys}
        )

    def update(updates, state, *, params=None, inplace=True):
        # Labels come from params when given (callable labels may look at the parameter), else updates.
        u_leaves, spec = flatten(updates)
        p_leaves = None
        if params is not None:
            p_leaves, p_spec, labs = leaf_labels(params)
            check_same_structure("updates", spec, "params", p_spec)
        else:
            if callable(labels) and any(u is None for u in u_leaves):
                # init labelled that leaf from its parameter; without params it would silently
                # drop out of its transform's leaf list and shift every later leaf's state.
                raise ValueError(
                    "labels: a callable label cannot be computed for a None update; "
                    "call update(updates, state, params=params)"
                )
            _, _, labs = leaf_labels(updates)
        out = list(u_leaves)
        new_states = {}
        for k in keys:
            idx = [i for i, lab in enumerate(labs) if lab == k]
            sub_p = None if p_leaves is None else [p_leaves[i] for i in idx]
            sub, new_states[k] = transforms[k].update(
                [u_leaves[i] for i in idx], state.inner_states[k], params=sub_p, inplace=inplace
            )
            for j, i in enumerate(idx):
                out[i] = sub[j]
        return unflatten(spec, out), PartitionState(new_states)

    return GradientTransformation(init, update)

