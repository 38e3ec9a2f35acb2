"""The checkpoint format of :class:`~scao_fx.TransformOptimizer` (version 2), as pure functions.

:func:`pack` lays the param groups and their functional states out as a ``state_dict``;
:func:`unpack` checks a saved one against the optimizer's groups (reading version 2, the
previous version 1, and ``torch.optim.Adam``/``AdamW`` checkpoints) and :func:`restore` puts one
group's saved leaves back into the structure of a freshly initialised state (the *template*),
checking structure, dtypes and shapes; :func:`warm_start` fills a template's Adam moments and
step counts from a ``torch.optim`` checkpoint. Nothing here touches an optimizer: the
:class:`~scao_fx.TransformOptimizer` methods ``state_dict`` / ``load_state_dict`` call these.

The layout (version 2)::

    {"state": {global index: {"step": float32 0-d tensor, "exp_avg": tensor, "exp_avg_sq": tensor}},
     "param_groups": [{...hyperparameters, "params": [global indices]}, ...],
     "transform_state": [None | {"active": [positions in the group],
                                 "treespec": str,
                                 "leaves": [tensor | None | "state/<global index>/<name>", ...]}],
     "format": "scao_fx.TransformOptimizer", "version": 2}

``state`` is ``torch.optim.AdamW``'s per-parameter layout: the Adam moments of every parameter
whose group's chain holds one Adam state (:class:`~scao_fx.transforms.adam.ScaleByAdamState`)
with plain moment tensors of the parameter's shape, and ``step`` (a float32 copy of the step
counter, as ``torch.optim.AdamW`` keeps it). ``transform_state`` holds the rest of each group's
functional state (shape-group curvature stacked over several parameters, the exact int64 step
counters, the blend and guard state); a leaf that lives in ``state`` is written there as the
string ``"state/<global index>/<name>"``, so nothing is stored twice. Version 1 had ``state``
empty and every leaf in ``transform_state``.

Only plain dicts, lists, strings, numbers and tensors: ``torch.load(weights_only=True)`` loads it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optree
import torch

from .._tree import find_nodes
from ..codecs import EncodedTensor
from ..transforms.adam import ScaleByAdamState, factored_from_full, is_factored
from ..transforms.eigenbasis import KroneckerEigenbasisState
from ..transforms.finite import ApplyIfFiniteState
from ..transforms.quantization import QuantizedState

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "READS_VERSIONS",
    "is_torch_layout",
    "pack",
    "restore",
    "state_mismatch",
    "unpack",
    "unpack_torch",
    "warm_start",
]

FORMAT = "scao_fx.TransformOptimizer"
FORMAT_VERSION = 2
#: The versions :func:`unpack` reads.
READS_VERSIONS = (1, 2)
#: ``torch.optim.Adam``/``AdamW``'s names of the per-parameter entries this format writes.
MOMENT_NAMES = ("exp_avg", "exp_avg_sq")
_REF = "state/"


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


def _adam_node(state: Any, n_active: int) -> ScaleByAdamState | None:
    """The state's one Adam state whose moments are a tree of ``n_active`` leaves (one per
    active parameter), or ``None`` (no Adam state, several, or moments laid out otherwise)."""
    found = find_nodes(state, ScaleByAdamState)
    if len(found) != 1:
        return None
    node = found[0]
    if optree.tree_structure(node.mu, none_is_leaf=True).num_leaves != n_active:
        return None
    if optree.tree_structure(node.nu, none_is_leaf=True).num_leaves != n_active:
        return None
    return node


def _counts(node: ScaleByAdamState, n_active: int) -> list[torch.Tensor] | None:
    """The step counter of each active parameter: the one 0-d counter repeated, or the
    per-leaf counters (a tree shaped like the moments); ``None`` if laid out otherwise."""
    count = node.count
    if isinstance(count, torch.Tensor) and count.ndim == 0:
        return [count] * n_active
    leaves = optree.tree_leaves(count, none_is_leaf=True)
    if len(leaves) != n_active:
        return None
    return leaves


def _per_parameter(
    params: Sequence[torch.Tensor], active: Sequence[int], state: Any
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``{position: (exp_avg, exp_avg_sq, count)}`` for the active parameters whose Adam
    moments are plain tensors of the parameter's shape (int8-quantised ones are not)."""
    node = _adam_node(state, len(active))
    if node is None:
        return {}
    mus = optree.tree_leaves(node.mu, none_is_leaf=True)
    nus = optree.tree_leaves(node.nu, none_is_leaf=True)
    counts = _counts(node, len(active))
    if counts is None:
        return {}
    out = {}
    for j, mu, nu, count in zip(active, mus, nus, counts):
        shape = params[j].shape
        if (
            isinstance(mu, torch.Tensor)
            and isinstance(nu, torch.Tensor)
            and mu.shape == shape
            and nu.shape == shape
            and isinstance(count, torch.Tensor)
        ):
            out[j] = (mu, nu, count)
    return out


def _pack_state(
    params: Sequence[torch.Tensor], start: int, active: Sequence[int] | None, state: Any, per_param: dict
) -> dict | None:
    """One group's ``transform_state`` entry (``None`` for a group without state yet); the
    Adam moments go into ``per_param`` (the ``state`` section), referenced from the leaves."""
    if state is None:
        return None
    active = list(active or [])
    leaves, spec = optree.tree_flatten(state, none_is_leaf=True)
    for leaf in leaves:
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"the functional state holds a {type(leaf).__name__} leaf; states must hold "
                "tensors only to be saved (see scao_fx.base)"
            )
    moved: dict[int, str] = {}
    for j, (mu, nu, count) in _per_parameter(params, active, state).items():
        index = start + j
        per_param[index] = {"step": count.detach().to(torch.float32), "exp_avg": mu, "exp_avg_sq": nu}
        moved[id(mu)] = f"{_REF}{index}/exp_avg"
        moved[id(nu)] = f"{_REF}{index}/exp_avg_sq"
    leaves = [moved.get(id(leaf), leaf) if leaf is not None else None for leaf in leaves]
    return {"active": active, "treespec": str(spec), "leaves": leaves}


def pack(param_groups: Sequence[Mapping[str, Any]], states: Sequence[tuple[Sequence[int] | None, Any]]) -> dict:
    """The ``state_dict`` of an optimizer's param groups and their functional states.

    Args:
        param_groups: the optimizer's param groups (dicts holding ``"params"``).
        states: per group, ``(active, state)``: the positions in the group of the parameters
            the state covers, and the functional state (``None`` before the group's first step).

    Returns:
        The version-2 layout of the module docstring; its tensors are the live state tensors
        (the ``step`` entries are float32 copies of the counters).

    Raises:
        TypeError: if a state holds a leaf that is neither a tensor nor ``None``.

    Example:
        >>> import torch
        >>> from scao_fx.optim import checkpoint
        >>> w = torch.zeros(2)
        >>> sd = checkpoint.pack([{"params": [w], "lr": 0.1}], [([0], (torch.ones(2),))])
        >>> sd["param_groups"], sd["transform_state"][0]["active"], sd["version"]
        ([{'lr': 0.1, 'params': [0]}], [0], 2)
    """
    per_param: dict[int, dict] = {}
    entries = []
    start = 0
    for group, (active, state) in zip(param_groups, states):
        entries.append(_pack_state(group["params"], start, active, state, per_param))
        start += len(group["params"])
    return {
        "state": per_param,
        "param_groups": _pack_groups(param_groups),
        "transform_state": entries,
        "format": FORMAT,
        "version": FORMAT_VERSION,
    }


def is_torch_layout(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` is a plain ``torch.optim`` one (``state`` and ``param_groups``,
    no ``format``), e.g. ``torch.optim.AdamW(...).state_dict()``."""
    return "format" not in state_dict and "transform_state" not in state_dict and "state" in state_dict and "param_groups" in state_dict


def _check_groups(state_dict: Mapping[str, Any], param_groups: Sequence[Mapping[str, Any]]) -> None:
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has {len(param_groups)}")
    for i, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param_groups[{i}] has {len(group['params'])} parameters, the state_dict's has {len(saved['params'])}"
            )


def _resolve(index: int, state_dict: Mapping[str, Any], leaves: Sequence[Any]) -> list[Any]:
    """Group ``index``'s saved leaves with the ``"state/<global index>/<name>"`` references
    replaced by the tensors they name in ``state_dict["state"]``."""
    per_param = state_dict.get("state") or {}
    out = []
    for leaf in leaves:
        if isinstance(leaf, str):
            if not leaf.startswith(_REF) or leaf.count("/") != 2:
                raise ValueError(f"transform_state[{index}] holds the string {leaf!r}, which is not a reference into 'state'")
            _, gidx, name = leaf.split("/")
            entry = per_param.get(int(gidx), per_param.get(gidx))
            if not isinstance(entry, Mapping) or name not in entry:
                raise ValueError(
                    f"transform_state[{index}] refers to state_dict['state'][{gidx}][{name!r}], which is missing; "
                    "was the checkpoint's 'state' section edited?"
                )
            leaf = entry[name]
        out.append(leaf)
    return out


def unpack(state_dict: Mapping[str, Any], param_groups: Sequence[Mapping[str, Any]]) -> list[tuple[list[int], Mapping] | None]:
    """Check a saved ``state_dict`` (version 1 or 2) against an optimizer's param groups.

    Args:
        state_dict: what :func:`pack` produced (possibly through ``torch.save`` / ``torch.load``).
        param_groups: the groups of the optimizer that loads it.

    Returns:
        Per group, ``None`` (no saved state) or ``(active, entry)``: the positions of the
        parameters with state and the group's ``transform_state`` entry with its leaves resolved
        (references into ``state`` replaced by the tensors), for :func:`restore`.

    Raises:
        ValueError: if ``state_dict`` is not of this format or of a version it reads, or its
            number of groups, parameters per group or active positions do not fit
            ``param_groups``, or a reference into ``state`` is dangling.

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
            "entry) nor by torch.optim.Adam/AdamW; it cannot be loaded"
        )
    if state_dict.get("version") not in READS_VERSIONS:
        raise ValueError(
            f"unsupported state_dict version {state_dict.get('version')!r}; this scao_fx reads versions {READS_VERSIONS}"
        )
    tstates = state_dict["transform_state"]
    _check_groups(state_dict, param_groups)
    if len(tstates) != len(param_groups):
        raise ValueError(f"state_dict has {len(tstates)} transform states, this optimizer has {len(param_groups)} param groups")
    out: list[tuple[list[int], Mapping] | None] = []
    for i, (group, tstate) in enumerate(zip(param_groups, tstates)):
        if tstate is None:
            out.append(None)
            continue
        active = [int(j) for j in tstate["active"]]
        if any(not 0 <= j < len(group["params"]) for j in active) or len(set(active)) != len(active):
            raise ValueError(f"transform_state[{i}]['active'] has positions outside param_groups[{i}] or repeated ones")
        out.append((active, {**tstate, "leaves": _resolve(i, state_dict, tstate["leaves"])}))
    return out


def unpack_torch(state_dict: Mapping[str, Any], param_groups: Sequence[Mapping[str, Any]]) -> list[dict[int, dict]]:
    """Check a ``torch.optim.Adam``/``AdamW`` ``state_dict`` against an optimizer's param groups.

    Args:
        state_dict: a ``torch.optim`` state dict (:func:`is_torch_layout`).
        param_groups: the groups of the optimizer that loads it.

    Returns:
        Per group, ``{position in the group: {"step": int, "exp_avg": tensor, "exp_avg_sq":
        tensor}}`` for the parameters the checkpoint has state for.

    Raises:
        ValueError: if the number of groups or of parameters per group differs, or a
            parameter's state lacks ``exp_avg``/``exp_avg_sq`` (not an Adam checkpoint) or holds
            moments of another shape than the parameter.

    Example:
        >>> import torch
        >>> from scao_fx.optim import checkpoint
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.ones(2)
        >>> adamw = torch.optim.AdamW([w]); adamw.step()
        >>> [sorted(g[0]) for g in checkpoint.unpack_torch(adamw.state_dict(), [{"params": [w]}])]
        [['exp_avg', 'exp_avg_sq', 'step']]
    """
    _check_groups(state_dict, param_groups)
    for i, saved in enumerate(state_dict["param_groups"]):
        if "betas" not in saved and "amsgrad" not in saved:  # the keys of torch's Adam family
            raise ValueError(
                f"state_dict['param_groups'][{i}] has neither 'betas' nor 'amsgrad': only torch.optim.Adam/AdamW checkpoints "
                f"(or scao_fx ones) can be loaded into a scao_fx optimizer; it holds {sorted(saved)}"
            )
    per_param = state_dict["state"]
    out = []
    for i, (saved, group) in enumerate(zip(state_dict["param_groups"], param_groups)):
        entries: dict[int, dict] = {}
        for j, gidx in enumerate(saved["params"]):
            entry = per_param.get(gidx)
            if entry is None:
                continue
            where = f"state_dict['state'][{gidx}] (param_groups[{i}]['params'][{j}])"
            if "max_exp_avg_sq" in entry:
                raise ValueError(f"{where} holds AMSGrad's max_exp_avg_sq: AMSGrad is not implemented by scao_fx")
            missing = [k for k in (*MOMENT_NAMES, "step") if k not in entry]
            if missing:
                raise ValueError(
                    f"{where} has no {missing}: only torch.optim.Adam/AdamW checkpoints (exp_avg, exp_avg_sq, "
                    f"step) can be loaded into a scao_fx optimizer; it holds {sorted(entry)}"
                )
            shape = group["params"][j].shape
            for k in MOMENT_NAMES:
                if not isinstance(entry[k], torch.Tensor) or entry[k].shape != shape:
                    got = tuple(entry[k].shape) if isinstance(entry[k], torch.Tensor) else type(entry[k]).__name__
                    raise ValueError(f"{where}[{k!r}] is {got}, the parameter has shape {tuple(shape)}")
            step = entry["step"]
            step = float(step.item()) if isinstance(step, torch.Tensor) else float(step)
            if not (step >= 0 and step == int(step)):
                raise ValueError(f"{where}['step'] must be a non-negative whole number, got {step!r}")
            entries[j] = {"step": int(step), "exp_avg": entry["exp_avg"], "exp_avg_sq": entry["exp_avg_sq"]}
        out.append(entries)
    return out


def _second_moment_like(exp_avg_sq: torch.Tensor, like: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """A torch.optim ``exp_avg_sq`` in the layout of the state's second moment ``like`` (first
    moment ``mu``): a copy, or for a factored second moment (``scale_by_adam(factored=True)``)
    its row and column means, what the factored statistics would hold."""
    v = exp_avg_sq.to(device=like.device, dtype=like.dtype, copy=True)
    return factored_from_full(v) if is_factored(mu, like) and v.ndim >= 2 else v


def warm_start(index: int, template: Any, active: Sequence[int], entries: Mapping[int, Mapping]) -> Any:
    """Group ``index``'s fresh state ``template`` with its Adam moments and step counts taken
    from a ``torch.optim`` checkpoint (:func:`unpack_torch`); everything else stays fresh.

    The moments are copied in the template's dtype and onto its device (float32 moments for a
    bf16 parameter stay float32). With one step counter for the whole group it takes the
    largest saved step; with per-parameter counters, each parameter's own. Parameters without
    saved state keep zero moments.

    Args:
        index: the group's index (for the error messages).
        template: a fresh ``init`` of the group's transform over the parameters at ``active``.
        active: the positions (in the group) of the parameters the template covers.
        entries: ``{position: {"step": int, "exp_avg": tensor, "exp_avg_sq": tensor}}``.

    Returns:
        The warm-started state.

    Raises:
        ValueError: if the template holds no single Adam state with one plain moment per
            parameter (e.g. int8-quantised moments), so there is nothing to warm-start.

    Example:
        >>> import torch, scao_fx as sf
        >>> from scao_fx.optim import checkpoint
        >>> tx = sf.adamw(1e-3)
        >>> w = torch.zeros(2)
        >>> s = checkpoint.warm_start(0, tx.init([w]), [0], {0: {"step": 3, "exp_avg": torch.ones(2), "exp_avg_sq": torch.ones(2)}})
        >>> s[0].mu[0], int(s[0].count[0])
        (tensor([1., 1.]), 3)
    """
    node = _adam_node(template, len(active))
    counts = None if node is None else _counts(node, len(active))
    fresh = [] if node is None else optree.tree_leaves(node.mu, none_is_leaf=True)
    pos = {j: i for i, j in enumerate(active)}
    if node is None or counts is None or any(not isinstance(fresh[pos[j]], torch.Tensor) for j in entries):
        raise ValueError(
            f"param_groups[{index}]'s transform holds no single Adam state with one moment tensor per parameter "
            "(int8-quantised moments, several Adam links or none), so a torch.optim checkpoint's moments "
            "cannot be loaded into it"
        )
    mus = list(fresh)
    nus = optree.tree_leaves(node.nu, none_is_leaf=True)
    for j, entry in entries.items():
        i = pos[j]
        mus[i] = entry["exp_avg"].detach().to(device=mus[i].device, dtype=mus[i].dtype, copy=True)
        nus[i] = _second_moment_like(entry["exp_avg_sq"].detach(), nus[i], fresh[i])
    steps = [entries[j]["step"] if j in entries else 0 for j in active]
    if isinstance(node.count, torch.Tensor) and node.count.ndim == 0:
        count: Any = torch.full_like(node.count, max(steps, default=0))
    else:
        leaves = [None if c is None else torch.full_like(c, s) for c, s in zip(counts, steps)]
        count = optree.tree_unflatten(optree.tree_structure(node.count, none_is_leaf=True), leaves)
    filled = node._replace(
        mu=optree.tree_unflatten(optree.tree_structure(node.mu, none_is_leaf=True), mus),
        nu=optree.tree_unflatten(optree.tree_structure(node.nu, none_is_leaf=True), nus),
        count=count,
    )
    return optree.tree_map(
        lambda x: filled if x is node else x, template, is_leaf=lambda x: x is node, none_is_leaf=True
    )


def _comparable(state: Any) -> Any:
    """``state`` without the non-finite guard's roll-back copies (empty at ``init`` on the
    CPU, filled after a deferred step on an accelerator): not part of the state's shape."""
    return optree.tree_map(
        lambda x: x._replace(rollback=()) if isinstance(x, ApplyIfFiniteState) else x,
        state,
        is_leaf=lambda x: isinstance(x, ApplyIfFiniteState),
        none_is_leaf=True,
    )


def state_mismatch(template: Any, state: Any) -> str | None:
    """How ``state`` differs from ``template`` in structure, shapes or dtypes (devices are not
    compared), or ``None`` if it fits: whether a transform rebuilt with other hyperparameters
    can still use an existing state.

    Example:
        >>> import torch
        >>> from scao_fx.optim import checkpoint
        >>> checkpoint.state_mismatch((torch.zeros(2),), (torch.zeros(3),))
        'leaf 0: shape (3,), the rebuilt transform expects (2,)'
        >>> checkpoint.state_mismatch((torch.zeros(2),), (torch.ones(2),)) is None
        True
    """
    t_leaves, t_spec = optree.tree_flatten(_comparable(template), none_is_leaf=True)
    s_leaves, s_spec = optree.tree_flatten(_comparable(state), none_is_leaf=True)
    if t_spec != s_spec:
        return (
            f"its tree structure differs: {s_spec.num_leaves} leaves in the state, "
            f"{t_spec.num_leaves} in the rebuilt transform's:\n  state: {s_spec}\n  rebuilt transform: {t_spec}"
        )
    paths = optree.tree_paths(_comparable(template), none_is_leaf=True)
    for path, t, s in zip(paths, t_leaves, s_leaves):
        where = "leaf " + ".".join(map(str, path))
        if (t is None) != (s is None):
            return f"{where}: {type(s).__name__} in the state, the rebuilt transform expects {type(t).__name__}"
        if isinstance(t, torch.Tensor) and isinstance(s, torch.Tensor):
            if t.dtype != s.dtype:
                return f"{where}: dtype {s.dtype}, the rebuilt transform expects {t.dtype}"
            if t.shape != s.shape:
                return f"{where}: shape {tuple(s.shape)}, the rebuilt transform expects {tuple(t.shape)}"
    return None


def _with_adam_counts(state: Any, count_of: Any) -> Any:
    """``state`` with every :class:`ScaleByAdamState`'s ``count`` replaced by ``count_of(node)``."""

    def swap(node: Any) -> Any:
        return node._replace(count=count_of(node)) if isinstance(node, ScaleByAdamState) else node

    return optree.tree_map(swap, state, is_leaf=lambda x: isinstance(x, ScaleByAdamState), none_is_leaf=True)


def _split_count(node: ScaleByAdamState) -> Any:
    """A single tree-wide counter as one counter per leaf of the moments (``None`` kept)."""
    return optree.tree_map(lambda m: None if m is None else node.count.clone(), node.mu, none_is_leaf=True)


def _stores_moments(node: KroneckerEigenbasisState) -> bool:
    """Whether an eigenbasis link keeps encoded Adam moments in its own state."""
    return any(isinstance(x, EncodedTensor) for adam in find_nodes(node.inner_state, ScaleByAdamState)
               for x in optree.tree_leaves(adam.mu, is_leaf=lambda y: isinstance(y, EncodedTensor), none_is_leaf=True))


def _wrap_eigenbasis(state: Any) -> Any:
    """The layout of earlier releases for ``sf.scao(moments="bfloat16" / "int8")``: the eigenbasis
    link with encoded moments inside ``quantize_state`` (its own step seed)."""
    return optree.tree_map(
        lambda x: QuantizedState(x, torch.zeros((), dtype=torch.int64))
        if isinstance(x, KroneckerEigenbasisState) and _stores_moments(x) else x,
        state, is_leaf=lambda x: isinstance(x, KroneckerEigenbasisState), none_is_leaf=True)


def _unwrap_eigenbasis(state: Any) -> Any:
    """Inverse of :func:`_wrap_eigenbasis` (the wrapper's step seed is dropped)."""
    return optree.tree_map(
        lambda x: x.inner_state if isinstance(x, QuantizedState) and isinstance(x.inner_state, KroneckerEigenbasisState)
        else x,
        state, is_leaf=lambda x: isinstance(x, QuantizedState), none_is_leaf=True)


def _legacy_layouts(template: Any) -> list:
    """``(layout, convert)`` pairs: a state of ``template``'s transform as earlier releases laid it
    out, and the function that turns a state restored in that layout into ``template``'s."""
    return [
        # Adam's step count as one counter for the tree: every leaf gets that counter's value,
        # as those releases bias-corrected
        (_with_adam_counts(template, lambda node: torch.zeros((), dtype=torch.int64)),
         lambda state: _with_adam_counts(state, _split_count)),
        # compressed moments of the eigenbasis form stored by quantize_state around the link
        (_wrap_eigenbasis(template), _unwrap_eigenbasis),
    ]


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
    if str(optree.tree_structure(template, none_is_leaf=True)) != entry["treespec"]:
        for legacy, convert in _legacy_layouts(template):
            if str(optree.tree_structure(legacy, none_is_leaf=True)) == entry["treespec"]:
                return convert(restore(index, legacy, entry))
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
