"""The checkpoint format of :class:`~scao_fx.TransformOptimizer` (version 1), as pure functions.

:func:`pack` lays the param groups and their functional states out as a ``state_dict``;
:func:`unpack` checks a saved one against the optimizer's groups and :func:`restore` puts one
group's saved leaves back into the structure of a freshly initialised state (the *template*),
checking structure, dtypes and shapes. Nothing here touches an optimizer: the
:class:`~scao_fx.TransformOptimizer` methods ``state_dict`` / ``load_state_dict`` call these.

The layout (``torch.optim``-like; ``state`` is empty because the state is per group)::

    {"state": {},
     "param_groups": [{...hyperparameters, "params": [global indices]}, ...],
     "transform_state": [None | {"active": [positions in the group],
                                 "treespec": str, "leaves": [tensor | None, ...]}],
     "format": "scao_fx.TransformOptimizer", "version": 1}

Only plain dicts, lists, strings, numbers and tensors: ``torch.load(weights_only=True)`` loads it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optree
import torch

__all__ = ["FORMAT", "FORMAT_VERSION", "pack", "restore", "unpack"]

FORMAT = "scao_fx.TransformOptimizer"
FORMAT_VERSION = 1


def _pack_groups(param_groups: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The groups' entries with ``params`` replaced by global parameter indices."""
    groups = []
    start = 0
    for group in param_groups:
        packed = {k: v for k, v in group.items() if k != "params"}
        packed["params"] = list(range(start, start + len(group["params"])))
        start += len(group["params"])
        groups.append(packed)
    return groups


def _pack_state(active: Sequence[int] | None, state: Any) -> dict | None:
    """One group's ``transform_state`` entry (``None`` for a group without state yet)."""
    if state is None:
        return None
    leaves, spec = optree.tree_flatten(state, none_is_leaf=True)
    for leaf in leaves:
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"the functional state holds a {type(leaf).__name__} leaf; states must hold "
                "tensors only to be saved (see scao_fx.base)"
            )
    return {"active": list(active or []), "treespec": str(spec), "leaves": leaves}


def pack(param_groups: Sequence[Mapping[str, Any]], states: Sequence[tuple[Sequence[int] | None, Any]]) -> dict:
    """The ``state_dict`` of an optimizer's param groups and their functional states.

    Args:
        param_groups: the optimizer's param groups (dicts holding ``"params"``).
        states: per group, ``(active, state)``: the positions in the group of the parameters
            the state covers, and the functional state (``None`` before the group's first step).

    Returns:
        The version-1 layout of the module docstring; its tensors are the live state tensors.

    Raises:
        TypeError: if a state holds a leaf that is neither a tensor nor ``None``.

    Example:
        >>> import torch
        >>> from scao_fx.optim import checkpoint
        >>> w = torch.zeros(2)
        >>> sd = checkpoint.pack([{"params": [w], "lr": 0.1}], [([0], (torch.ones(2),))])
        >>> sd["param_groups"], sd["transform_state"][0]["active"], sd["version"]
        ([{'lr': 0.1, 'params': [0]}], [0], 1)
    """
    return {
        "state": {},
        "param_groups": _pack_groups(param_groups),
        "transform_state": [_pack_state(active, state) for active, state in states],
        "format": FORMAT,
        "version": FORMAT_VERSION,
    }


def unpack(state_dict: Mapping[str, Any], param_groups: Sequence[Mapping[str, Any]]) -> list[tuple[list[int], Mapping] | None]:
    """Check a saved ``state_dict`` against an optimizer's param groups.

    Args:
        state_dict: what :func:`pack` produced (possibly through ``torch.save`` / ``torch.load``).
        param_groups: the groups of the optimizer that loads it.

    Returns:
        Per group, ``None`` (no saved state) or ``(active, entry)``: the positions of the
        parameters with state and the group's ``transform_state`` entry (for :func:`restore`).

    Raises:
        ValueError: if ``state_dict`` is not of this format or version, or its number of groups,
            parameters per group or active positions do not fit ``param_groups``.

    Example:
        >>> import torch
        >>> from scao_fx.optim import checkpoint
        >>> groups = [{"params": [torch.zeros(2)]}]
        >>> sd = checkpoint.pack(groups, [([0], (torch.ones(2),))])
        >>> [active for active, _ in checkpoint.unpack(sd, groups)]
        [[0]]
    """
    if state_dict.get("format") != FORMAT or "transform_state" not in state_dict:
        raise ValueError(
            "state_dict was not produced by a scao_fx TransformOptimizer (no 'transform_state' "
            "entry); a torch.optim optimizer's state cannot be loaded into it"
        )
    if state_dict.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported state_dict version {state_dict.get('version')!r}; this scao_fx reads version {FORMAT_VERSION}")
    saved_groups = state_dict["param_groups"]
    tstates = state_dict["transform_state"]
    if len(saved_groups) != len(param_groups) or len(tstates) != len(param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has {len(param_groups)}")
    for i, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param_groups[{i}] has {len(group['params'])} parameters, the state_dict's has {len(saved['params'])}"
            )
    out: list[tuple[list[int], Mapping] | None] = []
    for i, (group, tstate) in enumerate(zip(param_groups, tstates)):
        if tstate is None:
            out.append(None)
            continue
        active = [int(j) for j in tstate["active"]]
        if any(not 0 <= j < len(group["params"]) for j in active):
            raise ValueError(f"transform_state[{i}]['active'] has positions outside param_groups[{i}]")
        out.append((active, tstate))
    return out


def restore(index: int, template: Any, entry: Mapping[str, Any]) -> Any:
    """Group ``index``'s saved state, in the structure and on the devices of ``template``.

    Every saved tensor keeps its dtype exactly (int8 codes stay int8, float32 statistics of bf16
    parameters stay float32, int64 counters stay int64) and is copied onto the device of the
    template's leaf (step counters stay on the CPU even if ``torch.load`` mapped everything to a
    GPU), so resuming is bit-identical to not stopping.

    Args:
        index: the group's index (for the error messages).
        template: a fresh ``init`` of the group's transform over its active parameters.
        entry: the group's ``transform_state`` entry (from :func:`unpack`).

    Returns:
        The restored state (copies: the entry's tensors are not aliased).

    Raises:
        ValueError: if the structure, a dtype or a shape differs from the template's (the
            message names the leaf).
        TypeError: if a saved leaf that should be a tensor is not one.

    Example:
        >>> import torch
        >>> from scao_fx.optim import checkpoint
        >>> groups = [{"params": [torch.zeros(2)]}]
        >>> sd = checkpoint.pack(groups, [([0], (torch.ones(2),))])
        >>> (active, entry), = checkpoint.unpack(sd, groups)
        >>> checkpoint.restore(0, (torch.zeros(2),), entry)
        (tensor([1., 1.]),)
    """
    t_leaves, t_spec = optree.tree_flatten(template, none_is_leaf=True)
    s_leaves = list(entry["leaves"])
    if str(t_spec) != entry["treespec"] or len(s_leaves) != len(t_leaves):
        raise ValueError(
            f"transform_state[{index}] does not match this optimizer's transform for param_groups[{index}] "
            f"(were the hyperparameters or the model changed?):\n  saved: {entry['treespec']}\n  "
            f"now:   {t_spec}"
        )
    paths = optree.tree_paths(template, none_is_leaf=True)
    out = []
    for path, t, s in zip(paths, t_leaves, s_leaves):
        where = f"transform_state[{index}] leaf {'.'.join(map(str, path))}"
        if t is None or s is None:
            if (t is None) != (s is None):
                raise ValueError(f"{where}: saved {type(s).__name__}, expected {type(t).__name__}")
            out.append(None)
            continue
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{where}: expected a tensor, got {type(s).__name__}")
        if s.dtype != t.dtype:
            raise ValueError(f"{where}: saved dtype {s.dtype}, this optimizer keeps {t.dtype} there")
        if s.shape != t.shape:
            raise ValueError(f"{where}: saved shape {tuple(s.shape)}, expected {tuple(t.shape)}")
        out.append(s.detach().to(device=t.device, copy=True))
    return optree.tree_unflatten(t_spec, out)
