"""Carry a param group's functional state over to a larger set of parameters (progressive
unfreezing), as pure functions.

A :class:`~scao_fx.TransformOptimizer` keeps one functional state per param group, over the
list of the group's *active* parameters (those that required grad when the state was created).
When a frozen parameter is unfrozen later, the group's state must grow to include it. The
simplest robust way, used here: initialise a fresh state over the enlarged active list, then
copy every piece of the old state that can be attributed to it:

* a ``list`` whose length is the number of old active parameters in the old state and the
  number of new ones in the fresh state is a per-parameter list (the tree the adapter passes is
  a list of parameters, so Adam's moments, per-parameter step counters, quantised moments, ...
  are such lists): each old parameter's entry moves to its new position; new parameters keep
  the fresh entry;
* the Kronecker preconditioner's shape groups (:class:`~scao_fx.KroneckerGroupState`, stacked
  statistics over several parameters) are matched by their members: a shape group whose members
  are unchanged keeps its curvature, bases and ranks exactly (its leaf indices are renumbered);
  a shape group that gains the new parameter (same matrix shape) **restarts** (fresh statistics
  and identity basis for all its members until its next refresh after enough statistics);
* the non-finite guard's roll-back copies (deferred mode) are carried the same way;
* any other pair of tensors of equal shape and dtype (step counters, the blend, the guard's
  counters) keeps the old value; anything that cannot be matched keeps the fresh value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optree
import torch

from ..transforms.finite import ApplyIfFiniteState
from ..transforms.kronecker import KroneckerPreconditionState

__all__ = ["carry_over"]


def carry_over(old: Any, fresh: Any, old_active: Sequence[int], new_active: Sequence[int]) -> Any:
    """The state ``fresh`` (a fresh ``init`` over the parameters at ``new_active``) with every
    piece of ``old`` (the state over ``old_active``) that belongs to it copied in.

    Args:
        old: the group's current state.
        fresh: a fresh ``init`` of the same transform over the enlarged parameter list.
        old_active: the positions (in the group) of the parameters ``old`` covers.
        new_active: the positions of the parameters ``fresh`` covers (a superset, sorted).

    Returns:
        The carried-over state; its tensors are ``old``'s (not copies) where carried.

    Example:
        >>> import torch, scao_fx as sf
        >>> from scao_fx.optim import regroup
        >>> tx = sf.adam(0.1)
        >>> a, b = torch.ones(2), torch.ones(3)
        >>> adam_state, *rest = tx.init([b])
        >>> old = (adam_state._replace(mu=[torch.full((3,), 7.0)], count=[torch.tensor(4)]), *rest)
        >>> new = regroup.carry_over(old, tx.init([a, b]), [1], [0, 1])
        >>> new[0].mu, [int(c) for c in new[0].count]  # the new leaf starts at step 0, like AdamW
        ([tensor([0., 0.]), tensor([7., 7., 7.])], [0, 4])
    """
    new_pos = {j: i for i, j in enumerate(new_active)}
    moved = [new_pos[j] for j in old_active]  # old position i -> new position
    return _carry(old, fresh, moved, len(old_active), len(new_active))


def _carry(old: Any, fresh: Any, moved: list[int], n_old: int, n_new: int) -> Any:
    if isinstance(fresh, torch.Tensor):
        if isinstance(old, torch.Tensor) and old.shape == fresh.shape and old.dtype == fresh.dtype:
            return old
        return fresh
    if fresh is None or old is None:
        return fresh
    if isinstance(fresh, KroneckerPreconditionState) and isinstance(old, KroneckerPreconditionState):
        return _carry_kronecker(old, fresh, moved)
    if isinstance(fresh, ApplyIfFiniteState) and isinstance(old, ApplyIfFiniteState):
        return _carry_guard(old, fresh, moved, n_old, n_new)
    if type(fresh) is list and type(old) is list and len(old) == n_old and len(fresh) == n_new and n_old != n_new:
        out = list(fresh)
        for i, j in enumerate(moved):
            out[j] = _carry(old[i], fresh[j], moved, n_old, n_new)
        return out
    if isinstance(fresh, dict) and isinstance(old, dict) and type(fresh) is type(old) and fresh.keys() == old.keys():
        return type(fresh)((k, _carry(old[k], v, moved, n_old, n_new)) for k, v in fresh.items())
    if isinstance(fresh, (tuple, list)) and type(fresh) is type(old) and len(fresh) == len(old):
        items = [_carry(o, f, moved, n_old, n_new) for o, f in zip(old, fresh)]
        return type(fresh)(*items) if hasattr(fresh, "_fields") else type(fresh)(items)
    return fresh


def _members(group_leaves: torch.Tensor, active_of: Sequence[int]) -> tuple[int, ...]:
    return tuple(active_of[i] for i in group_leaves.tolist())


def _carry_kronecker(old: KroneckerPreconditionState, fresh: KroneckerPreconditionState, moved: list[int]) -> Any:
    """Shape groups keyed by their members (in new positions): unchanged ones keep their state."""
    by_members = {_members(gs.leaves, moved): gs for gs in old.groups}
    groups = []
    for gs in fresh.groups:
        match = by_members.get(tuple(gs.leaves.tolist()))
        groups.append(gs if match is None else match._replace(leaves=gs.leaves))
    return fresh._replace(count=old.count, refreshes=old.refreshes, groups=tuple(groups))


def _carry_guard(old: ApplyIfFiniteState, fresh: ApplyIfFiniteState, moved: list[int], n_old: int, n_new: int) -> Any:
    inner = _carry(old.inner_state, fresh.inner_state, moved, n_old, n_new)
    rollback = fresh.rollback
    device = fresh.pending_finite.device
    if old.rollback and device.type != "cpu":
        # the roll-back copies are the inner state's host leaves, in order: carry them as a state
        def with_backup(state: Any, backup: Sequence[torch.Tensor]) -> Any:
            leaves, spec = optree.tree_flatten(state)
            it = iter(backup)
            return optree.tree_unflatten(spec, [next(it) if _host(x, device) else x for x in leaves])

        backed = _carry(with_backup(old.inner_state, old.rollback), with_backup(fresh.inner_state, fresh.rollback),
                        moved, n_old, n_new)
        rollback = tuple(x for x in optree.tree_leaves(backed) if _host(x, device))
    return fresh._replace(
        inner_state=inner,
        skipped=old.skipped,
        consecutive=old.consecutive,
        pending_finite=old.pending_finite,
        rollback=rollback,
    )


def _host(x: Any, device: torch.device) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cpu" and device.type != "cpu"
