r"""Low-rank Kronecker-factored preconditioning with the complement kept (SCAO parts 3-4).

For every matrix leaf :math:`G \in \mathbb{R}^{m\times n}` (leaves with more than two dims are
viewed as ``(shape[0], prod(shape[1:]))``, e.g. conv weights as ``(out, in*kh*kw)``):

.. math::
    P(G) = A_L\,G\,A_R,\qquad
    A = U_k\,\mathrm{diag}(s_k^{-1/4} - c)\,U_k^\top + c\,I,\qquad c = \bar s_{tail}^{-1/4},

where :math:`U_k, s_k` are the top-``k`` eigenpairs of the Tikhonov-regularised, debiased
curvature factor (:math:`L + \epsilon I`, :math:`\epsilon = \max(\text{tiny},\ 10^{-4}\,\mathrm{tr}(L)/m)`),
``k`` comes from a :class:`~scao_fx.precond.rank.RankRule` and :math:`\bar s_{tail}` is the
mean of the discarded eigenvalues. No gradient direction is dropped and none keeps an
arbitrary gain of 1; with ``k = dim`` this is exactly :math:`L^{-1/4} G R^{-1/4}`.

Every ``precond_freq`` steps the bases are refreshed (batched ``eigh`` per shape group, float32
with a float64 retry, last good basis kept on failure); the other steps are pure tensor code.
Leaves of equal matrix shape, dtype and device are stacked and processed together.

This module is the plumbing (plan the shape groups, stack, accumulate, refresh when due, apply,
scatter back); the math is in :mod:`scao_fx.precond.kron`, :mod:`scao_fx.precond.eigen`,
:mod:`scao_fx.precond.curvature` and :mod:`scao_fx.precond.rank`.

Sides: a side longer than ``max_precond_dim`` (or of length 1) is not preconditioned
(one-sided); leaves with no preconditioned side (0-d/1-d, empty, or both sides too long) pass
through. The result is computed in float32 (float64 for float64 leaves) and cast back to the
leaf's dtype; for float16 (and bfloat16) leaves an entry beyond the dtype's range is clipped to
its largest finite value (:func:`~scao_fx.precond.kron.saturate`) instead of becoming ``inf``.
Before the first refresh :math:`A = I`. A leaf whose update is ``None`` at a step (no gradient)
gets ``None`` back and its statistics and basis are left exactly as they were.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import optree
import torch

from .._tree import flatten, unflatten
from .._validation import check_bool, check_choice, check_dense_leaves, check_float, check_int
from ..base import GradientTransformation, increment, register_state, step_count
from ..parallel import assign_owners, check_process_group, owner_refresh
from ..precond.curvature import CurvatureEMA, curvature_ema, statistics_schedule
from ..precond.kron import (
    KroneckerSide,
    apply_left,
    apply_right,
    graft_factor,
    init_side,
    normalize,
    saturate,
    side_from_eigenpairs,
)
from ..precond.rank import RankRule, spectral_mass_rank
from ..precond.sketch import CurvatureSketch
from .sharding import full_tensor_updates

__all__ = [
    "kronecker_precondition",
    "KroneckerPreconditionState",
    "KroneckerGroupState",
    "matrix_shape",
]


@register_state
class KroneckerGroupState(NamedTuple):
    """State of one shape group: leaf indices (CPU int64) and the left/right sides (``None`` if not preconditioned)."""

    leaves: torch.Tensor
    left: KroneckerSide | None
    right: KroneckerSide | None


@register_state
class KroneckerPreconditionState(NamedTuple):
    """State of :func:`kronecker_precondition`.

    Attributes:
        count: steps done (CPU int64, decides refreshes without a device sync).
        refreshes: basis refreshes done (CPU int64).
        groups: one :class:`KroneckerGroupState` per shape group, in first-appearance order.
    """

    count: torch.Tensor
    refreshes: torch.Tensor
    groups: tuple


def matrix_shape(shape: Sequence[int]) -> tuple[int, int] | None:
    """The matrix view ``(m, n)`` of a leaf shape, or ``None`` for 0-d and 1-d leaves.

    Args:
        shape: a tensor shape.

    Returns:
        ``(shape[0], prod(shape[1:]))``, or ``None`` below two dimensions.

    Example:
        >>> import scao_fx as sf
        >>> sf.matrix_shape((64, 3, 3, 3)), sf.matrix_shape((7,))
        ((64, 27), None)
    """
    if len(shape) < 2:
        return None
    return int(shape[0]), int(math.prod(shape[1:]))


@dataclass(frozen=True)
class _Group:
    m: int
    n: int
    left: bool
    right: bool
    indices: tuple[int, ...]


def _plan(leaves: Sequence[Any], max_precond_dim: int, grouped: bool, side_mode: str = "both") -> list[_Group]:
    """Group preconditioned leaves by (matrix shape, dtype, device); order of first appearance.

    ``side_mode="wide"`` keeps only the longer side of a non-square matrix (LoRA adapters)."""
    groups: dict[tuple, list[int]] = {}
    sides: dict[tuple, tuple[int, int, bool, bool]] = {}
    for i, leaf in enumerate(leaves):
        if leaf is None:
            continue
        mn = matrix_shape(leaf.shape)
        if mn is None or leaf.numel() == 0:  # vectors, scalars and empty matrices pass through
            continue
        m, n = mn
        left, right = 1 < m <= max_precond_dim, 1 < n <= max_precond_dim
        if side_mode == "wide" and m != n:
            left, right = left and m > n, right and n > m
        if not (left or right):
            continue
        key = (m, n, leaf.dtype, leaf.device) if grouped else (i,)
        groups.setdefault(key, []).append(i)
        sides[key] = (m, n, left, right)
    return [_Group(*sides[k], tuple(v)) for k, v in groups.items()]


def _resolve_plan(leaves: Sequence[Any], groups: tuple, max_precond_dim: int, grouped: bool, side_mode: str) -> list[_Group]:
    """The shape groups of this step: the state's groups, checked against the updates.

    In eager mode the state's groups (their leaf indices) are authoritative, so leaves whose
    update is ``None`` (no gradient this step) keep their place in their group. Under
    ``torch.compile`` the groups are rebuilt from the updates' static shapes (no ``None``).
    """
    plan = _plan(leaves, max_precond_dim, grouped, side_mode)
    if torch.compiler.is_compiling() or all(leaf is not None for leaf in leaves):
        _check_plan(plan, groups)
        return plan
    found = {i: (g.m if g.left else None, g.n if g.right else None) for g in plan for i in g.indices}
    resolved = []
    for gs in groups:
        idx = gs.leaves.tolist()  # CPU tensor: no device sync
        dims = (_side_dim(gs.left), _side_dim(gs.right))
        present = [i for i in idx if leaves[i] is not None]
        if any(found.pop(i, None) != dims for i in present):
            _check_plan(plan, groups)  # raises with the full picture
        m, n = matrix_shape(leaves[present[0]].shape) if present else (0, 0)
        resolved.append(_Group(m, n, gs.left is not None, gs.right is not None, tuple(idx)))
    if found:  # a leaf that the state does not precondition now has a preconditionable shape
        _check_plan(plan, groups)
    return resolved


def _keep_absent(present: torch.Tensor, new: KroneckerSide, old: KroneckerSide) -> KroneckerSide:
    """Per stacked leaf: ``new`` where its update was present this step, ``old`` where it was ``None``."""
    out = []
    for a, b in zip(_pack(new), _pack(old)):
        if a.dim() == 0 or a.shape[0] != present.numel():  # not stacked (e.g. the empty fp32 scale)
            out.append(a)
            continue
        mask = present.to(a.device).reshape(-1, *([1] * (a.dim() - 1)))  # a no-op for the usual same device
        out.append(torch.where(mask, a, b))
    return _unpack(out, new)


def _side_dim(side: KroneckerSide | None) -> int | None:
    return None if side is None else side.basis.shape[-2]


def _check_plan(plan: list[_Group], groups: tuple) -> None:
    """Raise a ValueError unless the updates' shape groups are the ones the state was built for."""
    # Leaf indices are a CPU tensor: compared in eager mode only (static shapes under compile).
    eager = not torch.compiler.is_compiling()
    expected = [
        (gs.leaves.tolist() if eager else gs.leaves.numel(), _side_dim(gs.left), _side_dim(gs.right)) for gs in groups
    ]
    got = [(list(g.indices) if eager else len(g.indices), g.m if g.left else None, g.n if g.right else None) for g in plan]
    if got != expected:
        raise ValueError(
            "updates do not match the kronecker_precondition state: the state was built for shape "
            f"groups (leaf indices, left dim, right dim) {expected}, the updates give {got}; was "
            "init() called on the same parameter tree, with the same shapes, and do the same leaves "
            "have gradients?"
        )


def _maybe_refresh(due: torch.Tensor, side: KroneckerSide, refresh: Callable[[KroneckerSide], KroneckerSide]) -> KroneckerSide:
    """``refresh(side) if due else side`` with ``due`` a CPU bool tensor.

    Eager: a Python branch (reading a CPU tensor is no device sync). Under ``torch.compile``:
    ``torch.cond``, so a compiled step has no graph break.
    """
    if torch.compiler.is_compiling():
        # The refresh never changes the statistics (the first n packed tensors): they are
        # operands only, not outputs (torch.cond rejects branches returning an input alias).
        ops = _pack(side)
        n = len(ops) - len(_REFRESHED_FIELDS)
        out = torch.cond(
            due,
            lambda *ops: _pack(refresh(_unpack(ops, side)))[n:],
            lambda *ops: tuple(o.clone() for o in ops[n:]),
            ops,
        )
        return _unpack(ops[:n] + tuple(out), side)
    return refresh(side) if bool(due) else side


def _local_refreshes(groups: tuple, due: torch.Tensor) -> Callable:
    """The refresh executor of one process: every factor is refreshed here."""
    return lambda gi, s, refresh: refresh


def _owner_refreshes(process_group: Any, name: str = "kronecker_precondition") -> Callable:
    """The refresh executor over ``process_group``: each factor is refreshed by its owner rank
    and broadcast (:func:`~scao_fx.parallel.owner_refresh`); owners are assigned per due step.
    ``name``: the link, for the error under ``torch.compile``."""

    def executor(groups: tuple, due: torch.Tensor) -> Callable:
        if torch.compiler.is_compiling():
            raise NotImplementedError(f"{name}(process_group=...) runs eagerly; do not torch.compile its update")
        if not bool(due):  # a CPU tensor: no device sync
            return _local_refreshes(groups, due)
        owners = _refresh_owners(groups, torch.distributed.get_world_size(process_group))
        return lambda gi, s, refresh: functools.partial(
            owner_refresh, refresh=refresh, owners=owners[gi, s], group=process_group
        )

    return executor


def _refresh_owners(groups: tuple, world: int) -> dict[tuple[int, int], list[int]]:
    """Owner rank of every stacked factor: ``{(group, side 0 left / 1 right): [owner per row]}``.

    Costs :math:`d^3` per ``d x d`` factor, balanced by :func:`~scao_fx.parallel.assign_owners`.
    Read from the state's shapes only, so every rank computes the same assignment.
    """
    keys, costs = [], []
    for gi, gs in enumerate(groups):
        for s, side in enumerate((gs.left, gs.right)):
            if side is not None:
                batch, dim = side.basis.shape[0], side.basis.shape[-2]
                keys += [(gi, s)] * batch
                costs += [float(dim) ** 3] * batch
    out: dict[tuple[int, int], list[int]] = {}
    for key, owner in zip(keys, assign_owners(costs, world)):
        out.setdefault(key, []).append(owner)
    return out


def _accumulate_when(due: torch.Tensor | None, old: Any, accumulate: Callable[[bool], Any], inplace: bool) -> Any:
    """``accumulate(inplace)`` if ``due`` (``None``: always) else ``old``, the statistics unchanged.

    Eager: a Python branch, so a step without statistics costs no Gram product. Under
    ``torch.compile`` both are computed (out of place) and selected with ``torch.where``.
    """
    if due is None:
        return accumulate(inplace)
    if not torch.compiler.is_compiling():
        return accumulate(inplace) if bool(due) else old  # a CPU tensor: no device sync
    new = accumulate(False)
    return optree.tree_map(lambda n, o: torch.where(due.to(n.device), n, o), new, old)


def _accumulate_side(curvature: Any, stat: Any, data: torch.Tensor, scale: torch.Tensor, seed: Any,
                     updates: torch.Tensor, inplace: bool) -> Any:
    """One accumulation of a side's statistics (``curvature.accumulate_outer``), ``inplace`` last
    (for :func:`_accumulate_when`)."""
    return curvature.accumulate_outer(stat, data, scale, seed, updates, inplace=inplace)


def _statistics_parts(curvature: Any, rank: Any, default_rank: Any) -> tuple:
    """The curvature statistic and rank rule of a Kronecker link (defaults filled in), checked."""
    curvature = curvature_ema() if curvature is None else curvature
    rank = default_rank() if rank is None else rank
    if not isinstance(curvature, (CurvatureEMA, CurvatureSketch)):
        raise TypeError(
            "curvature must be a CurvatureEMA (curvature_ema(...)) or a CurvatureSketch "
            f"(curvature_sketch(...)), got {curvature!r}"
        )
    if not isinstance(rank, RankRule):
        raise TypeError(f"rank must be a RankRule (spectral_mass_rank(...), full_rank(), fixed_rank(k)), got {rank!r}")
    return curvature, rank


def kronecker_precondition(
    *,
    curvature: CurvatureEMA | None = None,
    rank: RankRule | None = None,
    precond_freq: int = 20,
    stat_freq: int = 1,
    max_precond_dim: int = 4096,
    complement: str = "mean_tail",
    graft: str = "frobenius",
    tau: float | None = None,
    tikhonov: float = 1e-4,
    grouped: bool = True,
    sides: str = "both",
    eigensolver: str = "auto",
    gram_precision: str = "float32",
    process_group: Any = None,
) -> GradientTransformation:
    r"""Precondition matrix leaves by low-rank-plus-complement Kronecker factors.

    Args:
        curvature: the curvature statistic: :func:`curvature_ema` (full factors, default rho
            0.999, int8) or :func:`curvature_sketch` (a low-rank frequent-directions sketch,
            :math:`O(d\,\ell)` memory per side; the basis is then at most the sketch's width).
        rank: the rank rule (:func:`spectral_mass_rank` default ``(0.05, 8, 128)``;
            :func:`full_rank` for exact :math:`L^{-1/4}`).
        precond_freq: refresh the bases every this many steps, >= 1.
        stat_freq: accumulate the curvature statistics at step 1 and every this many steps,
            >= 1 (the Gram products and the statistics' codec are skipped on the other steps;
            ``rho`` is then a decay per accumulation, the EMA is debiased by the number of
            accumulations). 1: every step.
        max_precond_dim: longest side that is preconditioned, >= 2.
        complement: gain of the directions outside the top-``k`` subspace: ``"mean_tail"``
            (:math:`c` from the mean discarded eigenvalue), ``"kth"`` (from the ``k``-th
            eigenvalue) or ``"none"`` (projection: the complement is dropped; an ablation).
        graft: ``"frobenius"`` rescales each :math:`P(G)` to :math:`\lVert G\rVert_F` (safe,
            scale-equivariant); ``"none"`` returns the raw :math:`A_L G A_R`.
        tau: optional cap :math:`\lVert P(G)\rVert \le \tau\,\lVert G\rVert` (same exponent as
            the preconditioner; moot with Frobenius grafting), > 0.
        tikhonov: relative Tikhonov factor :math:`\epsilon = \mathrm{tikhonov}\cdot\mathrm{tr}(L)/m`, >= 0.
        grouped: stack leaves of equal shape and process them together (False: one group per
            leaf, for comparison).
        sides: ``"both"`` preconditions every side up to ``max_precond_dim``; ``"wide"`` only
            the longer side of a non-square matrix (one-sided, for LoRA adapters ``(r, d)`` /
            ``(d, r)`` whose ``r x r`` side is not worth a factor); square matrices keep both.
        eigensolver: how a refresh finds the top-``k_max`` eigenpairs: ``"eigh"`` (a full
            decomposition every time), ``"subspace"`` (full at the first refresh, then one
            warm-started orthogonal iteration + Rayleigh-Ritz, :math:`O(d^2 k)`), or ``"auto"``
            (``"subspace"`` where the basis is narrower than the factor, else ``"eigh"``).
        gram_precision: inputs of the per-step Gram products :math:`G G^\top`, :math:`G^\top G`
            (the curvature statistics only; the preconditioned gradient is always float32):
            ``"float32"`` or ``"bfloat16"`` (entries of :math:`G` rounded to bfloat16, relative
            error :math:`\le 2^{-9}`, below the int8 statistics' block rounding; products summed
            in float32; on CUDA on bfloat16 tensor cores). See ``docs/performance.md``.
        process_group: a ``torch.distributed`` process group over which refreshes are spread:
            each factor is decomposed by one owner rank and the results are broadcast (same
            result as ``None``, 1/world of the work per rank; every rank must call ``update``
            with the same leaves present). ``None``: every process refreshes everything itself.
            See :mod:`scao_fx.parallel`.

    DTensor updates (FSDP2's sharded gradients) are all-gathered per preconditioned matrix,
    preconditioned in full and returned as this rank's shard (see ``docs/distributed.md``).

    Returns:
        A ``GradientTransformation`` with state :class:`KroneckerPreconditionState`. It never
        modifies its input updates, even with ``inplace=True`` (which only reuses state buffers).

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.kronecker_precondition(rank=sf.full_rank(), curvature=sf.curvature_ema(0.99))
    """

    curvature, rank = _statistics_parts(curvature, rank, spectral_mass_rank)
    precond_freq = check_int("precond_freq", precond_freq, low=1)
    stat_freq = check_int("stat_freq", stat_freq, low=1)
    max_precond_dim = check_int("max_precond_dim", max_precond_dim, low=2)
    check_choice("complement", complement, ("mean_tail", "kth", "none"))
    check_choice("graft", graft, ("frobenius", "none"))
    tau = check_float("tau", tau, low=0.0, low_inclusive=False, allow_none=True, allow_inf=True)
    if tau == math.inf:  # no cap (and no inf * 0 = NaN for a zero gradient)
        tau = None
    tikhonov = check_float("tikhonov", tikhonov, low=0.0)
    side_mode = check_choice("sides", sides, ("both", "wide"))
    check_choice("eigensolver", eigensolver, ("auto", "eigh", "subspace"))
    check_choice("gram_precision", gram_precision, ("float32", "bfloat16"))
    grouped = check_bool("grouped", grouped)
    process_group = check_process_group("process_group", process_group)
    executor = _local_refreshes if process_group is None else _owner_refreshes(process_group)

    def init(params):
        leaves, _ = flatten(params)
        groups = []
        for g in _plan(leaves, max_precond_dim, grouped, side_mode):
            dev = leaves[g.indices[0]].device
            b = len(g.indices)
            groups.append(
                KroneckerGroupState(
                    leaves=torch.tensor(g.indices, dtype=torch.int64),
                    left=init_side(curvature, rank, b, g.m, dev) if g.left else None,
                    right=init_side(curvature, rank, b, g.n, dev) if g.right else None,
                )
            )
        return KroneckerPreconditionState(step_count(), step_count(), tuple(groups))

    def refresh(side: KroneckerSide, count: torch.Tensor, dim: int, first: torch.Tensor) -> KroneckerSide:
        pairs = curvature.top_eigenpairs(side.stat, count, side.basis, first, tikhonov=tikhonov,
                                         eigensolver=eigensolver)
        return side_from_eigenpairs(side, *pairs, rank=rank, complement=complement)

    def update(updates, state, *, params=None, inplace=True):
        leaves, spec = flatten(updates)
        check_dense_leaves(leaves)
        plan = _resolve_plan(leaves, state.groups, max_precond_dim, grouped, side_mode)
        count = increment(state.count)
        due = (count % precond_freq) == 0
        stat_due, updates = statistics_schedule(count, stat_freq)
        first = state.refreshes == 0
        run_refresh = executor(state.groups, due)
        out = list(leaves)
        new_groups = []
        for gi, (g, gs) in enumerate(zip(plan, state.groups)):
            present = [leaves[i] is not None for i in g.indices]
            if not any(present):  # no gradient for any leaf of the group: state untouched
                new_groups.append(gs)
                continue
            partial = not all(present)
            like = next(leaves[i] for i in g.indices if leaves[i] is not None)
            # which stacked rows had an update: one small host-to-device copy per group, not per state tensor
            present_rows = torch.tensor(present, device=like.device) if partial else None
            grads, gram_scale, unscale = normalize(
                torch.stack(
                    [
                        (leaves[i] if leaves[i] is not None else torch.zeros_like(like)).reshape(g.m, g.n)
                        for i in g.indices
                    ]
                )
            )
            seed = count * 64 + (2 * gi) % 64
            gram_in = grads if gram_precision == "float32" else grads.to(torch.bfloat16)
            sides = []
            for s, (side, dim, left) in enumerate(((gs.left, g.m, True), (gs.right, g.n, False))):
                if side is None:
                    sides.append(None)
                    continue
                old = side
                data = gram_in if left else gram_in.transpose(-1, -2)  # the factor sums data @ data^T
                stat = _accumulate_when(
                    stat_due, side.stat,
                    functools.partial(_accumulate_side, curvature, side.stat, data, gram_scale, seed, updates),
                    inplace and not partial,
                )
                side = side._replace(stat=stat)
                local = functools.partial(refresh, count=updates, dim=dim, first=first)
                side = _maybe_refresh(due, side, run_refresh(gi, s, local))
                if partial:
                    side = _keep_absent(present_rows, side, old)
                sides.append(side)
                seed = seed + 1
            left, right = sides
            pg = grads
            if left is not None:
                pg = apply_left(left, pg)
            if right is not None:
                pg = apply_right(right, pg)
            factor = graft_factor(grads, pg, graft, tau)
            if unscale.dtype == torch.float32:  # undo the normalization in the same multiply
                factor = unscale if factor is None else factor * unscale
            if factor is not None:  # pg is the new buffer of apply_left/apply_right: scaled in place
                pg = pg.mul_(factor[:, None, None])
            if unscale.dtype == torch.float64:  # float64 leaves: 2^e may exceed float32
                pg = pg.to(torch.float64) * unscale[:, None, None]
            pg = saturate(pg, like.dtype)
            for j, i in enumerate(g.indices):
                if leaves[i] is not None:
                    out[i] = pg[j].reshape(leaves[i].shape).to(leaves[i].dtype)
            new_groups.append(KroneckerGroupState(gs.leaves, left, right))
        refreshes = state.refreshes + due.to(torch.int64)
        return unflatten(spec, out), KroneckerPreconditionState(count, refreshes, tuple(new_groups))

    return _gather_matrices(GradientTransformation(init, update), max_precond_dim, side_mode)


def _gather_matrices(tx: GradientTransformation, max_precond_dim: int, side_mode: str) -> GradientTransformation:
    """``tx`` (a Kronecker link) under FSDP2: the DTensor updates of the leaves it preconditions
    (a side of at most ``max_precond_dim``) are all-gathered, processed whole and returned as
    this rank's shard (:func:`~scao_fx.transforms.sharding.full_tensor_updates`); the others
    (vectors, matrices with no preconditioned side) reach ``tx`` as DTensors."""

    def preconditioned(leaf: Any) -> bool:
        return bool(_plan([leaf], max_precond_dim, False, side_mode))

    return full_tensor_updates(tx, preconditioned)


#: The fields of a side that a refresh writes (its statistics are never changed by a refresh).
_REFRESHED_FIELDS = ("basis", "coef", "tail", "rank", "fallbacks")


def _pack(side: KroneckerSide) -> tuple:
    """Flatten a side into a tuple of tensors (``torch.cond`` operands): the statistics' tensors,
    then the refreshed fields."""
    return tuple(optree.tree_leaves(side.stat)) + tuple(getattr(side, f) for f in _REFRESHED_FIELDS)


def _unpack(ops: Sequence[torch.Tensor], like: KroneckerSide) -> KroneckerSide:
    """Inverse of :func:`_pack`, the statistics' structure taken from ``like``."""
    spec = optree.tree_structure(like.stat)
    n = spec.num_leaves
    return KroneckerSide(optree.tree_unflatten(spec, list(ops[:n])), *ops[n:])
