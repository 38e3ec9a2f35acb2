r"""An inner transform run in the Kronecker factors' eigenbases (the SOAP form).

For every matrix leaf :math:`G \in \mathbb{R}^{m\times n}` (leaves with more than two dims are
viewed as ``(shape[0], prod(shape[1:]))``) the curvature factors :math:`L, R` are accumulated
and refreshed exactly as in :func:`~scao_fx.kronecker_precondition` (same statistics, codecs,
rank rules, eigensolvers, shape groups). Instead of the power :math:`L^{-1/4} G R^{-1/4}`, the
gradient is rotated into the factors' kept eigenbases :math:`U` (top :math:`k_L` eigenvectors of
:math:`L`) and :math:`V` (of :math:`R`), an inner transform (Adam by default) runs on the rotated
coordinates, and its output is rotated back:

.. math::
    C = U^\top G V,\qquad G_\perp = G - U C V^\top,\qquad
    \mathrm{out} = U\,\mathrm{inner}(C)\,V^\top + \Pi_\perp\!\big(\mathrm{inner}(G_\perp)\big),

with :math:`\Pi_\perp(X) = X - U (U^\top X V) V^\top`. In the eigenbasis Adam's diagonal second
moment models the coordinates in which the curvature is (approximately) diagonal; with full
bases this is SOAP (Vyas et al., 2024): the complement is empty.

**The complement** (adaptive or fixed rank below the side's length): the part of the gradient
outside the kept subspace gets the inner transform *in the original coordinates* (its own
moments, shaped like the leaf), and its output is projected back onto the complement, so the two
parts stay orthogonal: no direction is dropped and none gets an arbitrary gain (every direction
is normalised by a second moment). A group whose sides all keep every direction (``full_rank()``
or a fixed rank at least the side's length) has no complement and no complement state.

**At a refresh** the bases change and the inner state follows them: with
``moment_at_refresh="rotate"`` (default) the first moment ``mu`` of every
:class:`~scao_fx.ScaleByAdamState` in the inner state is re-expressed in the new bases
(:func:`~scao_fx.precond.eigenbasis.change_basis`), which with full bases is exactly SOAP's
choice of keeping the first moment in the original coordinates and projecting it at every step;
the second moment ``nu`` is carried over as it is, position by position, as SOAP does (with
``eigensolver="power"`` position ``i`` is the continuation of the old basis's column ``i``;
with ``eigh`` eigenvalues are sorted at every refresh, so position ``i`` is the ``i``-th
largest direction of the old and of the new basis). ``"project"`` also carries the second moment
to the new bases as the mean squares of uncorrelated old coordinates,
:math:`\nu' = (P\circ P)\,\nu\,(Q\circ Q)` with :math:`P = U_{new}^\top U_{old}`, :math:`Q =
V_{old}^\top V_{new}` (:func:`~scao_fx.precond.eigenbasis.change_basis_second_moment`); measured
worse than ``"rotate"`` on the GPT benchmark (``docs/scao.md``). ``"keep"`` carries every inner
state tensor unchanged (an ablation). Other inner states (e.g. :func:`~scao_fx.quantize_state`'s encoded moments) are
always carried unchanged: to store the moments encoded, give the link ``moment_codecs`` (as
``sf.scao(moments="int8")`` does), which decodes each group's first moment for its turn at a
refresh and encodes it again. A first moment in bfloat16 (``moment_dtype``) is turned in
float32 and stored back in bfloat16.

**Schedule**: the statistics are updated at every step (with ``stat_freq > 1``: at step 1 and
every ``stat_freq``-th step, the other steps skip the Gram products and the statistics' codec);
a step's gradient is rotated with the bases of the last refresh, and the bases are refreshed
*after* the rotation at step 1 and then every ``precond_freq`` steps
(``count % precond_freq == 0``), SOAP's order. By default step 1 runs the inner transform in
the original coordinates (a side never refreshed uses the identity basis: plain Adam) and
preconditioning starts at step 2; its second moment, a function of the original coordinates,
is then carried into the eigenbasis by position, where it means something else. With ``skip_first=True`` (what :func:`~scao_fx.soap` uses, and SOAP's choice)
step 1 only accumulates the statistics and computes the first bases: every update of the step
is zero and the inner transform's first step is step 2, in the eigenbasis. Refreshing before
the rotation would rotate :math:`G_1` into its own singular bases at step 1: the core is then
diagonal up to rounding, and Adam's first step (:math:`m/\sqrt{v} = \mathrm{sign}`) turns the
rounding noise of the off-diagonal entries into updates of size 1.

**Refresh by power iteration** (``eigensolver="power"``, full-width bases): the first refresh
is an exact ``eigh`` (eigenvalues decreasing); every later one is a single step of orthogonal
iteration warm-started from the current basis, :math:`Q \leftarrow \mathrm{qr}((F + \epsilon I
+ \delta I) Q)`, with the columns orthonormalised in the order of their Rayleigh quotients and
each put back at its own position, signs kept (:math:`\delta` a small multiple of the largest
Rayleigh quotient so that directions of a null space are not rebuilt from rounding noise).
Column ``i`` then keeps tracking the same, slowly turning direction, and the second moment
carried by position stays attached to it. An exact ``eigh`` at every refresh sorts by
eigenvalue instead: directions whose eigenvalues cross or are close (most of the spectrum of
a short EMA) change position or turn arbitrarily inside their cluster, and the carried second
moment no longer belongs to the direction at its position.

Sides longer than ``max_precond_dim`` (or of length 1) are not rotated (one-sided); leaves with
no rotated side (vectors, scalars, empty tensors) go through the inner transform in their own
coordinates (with Adam: plain Adam). The inner transform sees one tree ``(leaves, cores,
complements)``: the original tree with the rotated leaves replaced by ``None``, a tuple of the
cores (one per rotated leaf, ``(k_L, k_R)``, float32, or float64 for float64 leaves) and a tuple
of the complements (``(m, n)``, or ``None`` without complement). It must be elementwise or
per-leaf (Adam, sign, clipping per leaf, ...) and must not need ``params`` (put weight decay
after this link).

**Distributed** (as :func:`~scao_fx.kronecker_precondition`, ``docs/distributed.md``): with
``process_group`` each stacked factor's refresh (any eigensolver, ``"power"`` included) runs on
one owner rank and the new bases are broadcast, bit-identical to the local refresh; FSDP2's
DTensor updates of the rotated matrices are all-gathered, processed whole and returned as this
rank's shard, the other leaves reach the inner transform as DTensors.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import optree
import torch

from .._tree import find_nodes, flatten, unflatten
from .._validation import check_bool, check_choice, check_dense_leaves, check_float, check_int
from ..base import GradientTransformation, check_transform, increment, register_state, step_count
from ..codecs import Codec, EncodedTensor
from ..parallel import check_process_group
from ..precond.curvature import CurvatureEMA, statistics_schedule
from ..precond.eigen import branch, regularize, robust_eigh
from ..precond.eigenbasis import change_basis, change_basis_second_moment, kept_basis, project_complement, rotate, rotate_back
from ..precond.kron import init_side, normalize, saturate, side_from_eigenpairs
from ..precond.rank import RankRule, full_rank
from .adam import ScaleByAdamState, is_factored, scale_by_adam
from .kronecker import (
    KroneckerGroupState,
    _accumulate_side,
    _accumulate_when,
    _gather_matrices,
    _keep_absent,
    _local_refreshes,
    _maybe_refresh,
    _owner_refreshes,
    _plan,
    _resolve_plan,
    _statistics_parts,
)
from .quantization import decode_tensor, open_encoded, store_encoded

__all__ = ["kronecker_eigenbasis", "KroneckerEigenbasisState"]


@register_state
class KroneckerEigenbasisState(NamedTuple):
    """State of :func:`kronecker_eigenbasis`.

    Attributes:
        count: steps done (CPU int64).
        refreshes: basis refreshes done (CPU int64).
        groups: one :class:`~scao_fx.KroneckerGroupState` per shape group (the sides' statistics
            and bases, as in :func:`~scao_fx.kronecker_precondition`).
        inner_state: the inner transform's state over the tree ``(leaves, cores, complements)``.
    """

    count: torch.Tensor
    refreshes: torch.Tensor
    groups: tuple
    inner_state: Any


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _has_complement(curvature: Any, rank: RankRule, dims: tuple) -> bool:
    """Whether some rotated side can keep fewer directions than its length (static)."""
    return any(
        d is not None and (rank.adaptive or min(rank.capacity(d), curvature.directions(d)) < d) for d in dims
    )


def _bases(gs: KroneckerGroupState, dtype: torch.dtype) -> tuple:
    return tuple(None if s is None else kept_basis(s, dtype) for s in (gs.left, gs.right))


def _in_precision(fn, x: torch.Tensor, bases: tuple) -> torch.Tensor:
    """``fn(x, *bases)`` (:func:`rotate` or :func:`rotate_back`) in the bases' dtype, returned in
    ``x``'s dtype: bfloat16 bases make it a bfloat16 matrix product with float32 accumulation."""
    dtype = next((b.dtype for b in bases if b is not None), x.dtype)
    if dtype == x.dtype:
        return fn(x, *bases)
    return fn(x.to(dtype), *bases).to(x.dtype)


def kronecker_eigenbasis(
    inner: GradientTransformation | None = None,
    *,
    curvature: CurvatureEMA | None = None,
    rank: RankRule | None = None,
    precond_freq: int = 10,
    stat_freq: int = 1,
    max_precond_dim: int = 4096,
    moment_at_refresh: str = "rotate",
    tikhonov: float = 1e-4,
    grouped: bool = True,
    sides: str = "both",
    eigensolver: str = "auto",
    gram_precision: str = "float32",
    rotation_precision: str = "float32",
    skip_first: bool = False,
    process_group: Any = None,
    leafwise_inner: bool | None = None,
    moment_codecs: ScaleByAdamState | None = None,
) -> GradientTransformation:
    r"""Run ``inner`` (Adam by default) in the eigenbases of each matrix's Kronecker factors.

    See the module documentation for the math, the complement and what happens at a refresh.

    Args:
        inner: the transform run in the rotated coordinates; default :func:`scale_by_adam` with
            its defaults. It receives ``params=None``.
        curvature: the curvature statistic (:func:`curvature_ema` or :func:`curvature_sketch`);
            default :func:`curvature_ema` with its defaults (rho 0.999, int8 storage).
        rank: the rank rule; default :func:`full_rank` (every eigen-direction kept: SOAP).
        precond_freq: refresh the bases at step 1 and then every this many steps, >= 1.
        stat_freq: accumulate the curvature statistics at step 1 and every this many steps, >= 1
            (the other steps skip the Gram products and the statistics' codec; ``rho`` is then a
            decay per accumulation and the EMA is debiased by the number of accumulations). 1:
            every step (SOAP). Keep ``precond_freq`` a multiple of it, so that every refresh
            reads a fresh accumulation.
        max_precond_dim: longest side that is rotated, >= 2.
        moment_at_refresh: ``"rotate"`` (Adam's first moment follows the basis, the second is
            carried by position: SOAP), ``"project"`` (the second moment is carried too, by the
            squared overlaps of the old and new bases) or ``"keep"`` (the inner state is carried
            unchanged).
        tikhonov: relative Tikhonov factor of a refresh, >= 0 (moves eigenvalues, not eigenvectors:
            it only matters for the rank rule).
        grouped: stack leaves of equal matrix shape, dtype and device (False: one group per leaf).
        sides: ``"both"`` or ``"wide"`` (only the longer side of non-square matrices).
        eigensolver: ``"auto"``, ``"eigh"`` or ``"subspace"`` (see :func:`kronecker_precondition`),
            or ``"power"``: a full ``eigh`` at the first refresh, then one warm-started power
            iteration per refresh whose columns keep their positions (see the module
            documentation; full-width bases only, i.e. ``full_rank()``).
        gram_precision: ``"float32"`` or ``"bfloat16"`` inputs of the Gram products.
        rotation_precision: ``"float32"`` or ``"bfloat16"``: the precision of the rotations
            into and out of the eigenbasis (:math:`U^\top G V` and :math:`U C V^\top`, the
            per-step matrix products): ``"bfloat16"`` multiplies bfloat16 copies of the matrix
            and of the bases (a bfloat16 basis as stored) with float32 accumulation, and hands
            the inner transform a float32 core; the inner state, the moments' change of basis at
            a refresh and the statistics are unchanged. Groups with a complement (a truncated
            rank) rotate in float32 whatever this says, so that no rounding of the kept part
            leaks into the complement, and so do matrices with a side the curvature keeps
            exact (shorter than its ``float32_below``, see :func:`~scao_fx.curvature_ema`).
        skip_first: step 1 only accumulates the statistics and computes the first bases; every
            leaf's update is zero and the inner transform neither runs nor counts the step (its
            first step is step 2, in the eigenbasis). False: step 1 runs the inner transform in
            the original coordinates.
        process_group: a ``torch.distributed`` process group over which the refreshes are
            spread, as in :func:`kronecker_precondition`: each stacked factor is refreshed
            (``eigh``, subspace or power step) by one owner rank and the new bases are broadcast
            (same result as ``None``, bit for bit; every rank must call ``update`` with the same
            leaves present; eager only). ``None``: every process refreshes everything itself.
            See ``docs/distributed.md``.
        leafwise_inner: ``inner`` treats every leaf on its own (as :func:`scale_by_adam` does:
            no global norm, no cross-leaf statistic), so the link may call it a group of
            matrices at a time (in eager mode, after step 1 with ``skip_first``): each group's
            directions are rotated back before the next group's are computed, and only one
            group's rotated gradients and directions are alive at once besides the rotated
            gradients still to be read. The same results, bit for bit; about 4 bytes per
            parameter less at the step's peak (docs/memory.md). ``None`` (default): True when
            ``inner`` is left at its default, else False (a transform that is not leafwise
            would see part of the tree).
        moment_codecs: store the moments of the inner state's Adam
            (:class:`~scao_fx.ScaleByAdamState`) through codecs between steps, e.g.
            :func:`~scao_fx.bf16_adam_codecs` (4 bytes per entry instead of 8) or
            :func:`~scao_fx.int8_adam_codecs`: a :class:`~scao_fx.ScaleByAdamState` of codecs (or
            ``None`` per moment: kept float32). Float32 moments of at least 4096 entries are
            stored encoded; a step decodes only the moments it is about to update (with a
            leafwise inner: one group's at a time) and encodes them again right after, so the
            step's peak holds float32 copies of one group's moments, not of all; a refresh
            decodes, turns and re-encodes each group's first moment. Stochastic rounding draws
            its bits from the link's step count (the same results whether the inner transform
            runs a group at a time or once). ``None`` (default): the moments stay as the inner
            transform keeps them.

    DTensor updates (FSDP2's sharded gradients) of the rotated matrices are all-gathered,
    processed whole (rotation, inner transform, rotation back) and returned as this rank's
    shard; their inner state (the cores and complements) is then a plain tensor, the same on
    every rank. The other leaves (vectors, matrices with no rotated side) reach the inner
    transform as DTensors, so their inner state is sharded (see ``docs/distributed.md``).

    Returns:
        A ``GradientTransformation`` with state :class:`KroneckerEigenbasisState`. Its input
        updates are never modified in place by the link itself (the inner transform may reuse
        the updates of unrotated leaves with ``inplace=True``, as it would alone).

    Example:
        >>> import torch, scao_fx as sf
        >>> tx = sf.chain(sf.kronecker_eigenbasis(sf.scale_by_adam(0.95, 0.95), precond_freq=10),
        ...               sf.scale_by_learning_rate(3e-3))
        >>> params = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.ones(4, 3), "b": torch.ones(3)}, state)
    """
    if leafwise_inner is None:
        leafwise_inner = inner is None
    leafwise_inner = check_bool("leafwise_inner", leafwise_inner)
    codecs = _check_moment_codecs(moment_codecs)
    inner = scale_by_adam() if inner is None else check_transform("inner", inner)
    curvature, rank = _statistics_parts(curvature, rank, full_rank)
    precond_freq = check_int("precond_freq", precond_freq, low=1)
    stat_freq = check_int("stat_freq", stat_freq, low=1)
    max_precond_dim = check_int("max_precond_dim", max_precond_dim, low=2)
    check_choice("moment_at_refresh", moment_at_refresh, ("rotate", "project", "keep"))
    tikhonov = check_float("tikhonov", tikhonov, low=0.0)
    grouped = check_bool("grouped", grouped)
    side_mode = check_choice("sides", sides, ("both", "wide"))
    check_choice("eigensolver", eigensolver, ("auto", "eigh", "subspace", "power"))
    check_choice("gram_precision", gram_precision, ("float32", "bfloat16"))
    rotation_dtype = getattr(torch, check_choice("rotation_precision", rotation_precision, ("float32", "bfloat16")))
    skip_first = check_bool("skip_first", skip_first)
    process_group = check_process_group("process_group", process_group)
    executor = (_local_refreshes if process_group is None
                else _owner_refreshes(process_group, "kronecker_eigenbasis"))
    if eigensolver == "power" and (rank.adaptive or rank.k_max is not None or not isinstance(curvature, CurvatureEMA)):
        raise ValueError("eigensolver='power' keeps every direction of a curvature_ema: use rank=full_rank() "
                         "and curvature=curvature_ema(...)")

    def cap(dim: int) -> int:
        return min(rank.capacity(dim), curvature.directions(dim))

    def templates(leaves, plan):
        """The inner transform's tree ``(leaves, cores, complements)`` of zeros (for init)."""
        rotated = {i for g in plan for i in g.indices}
        passthrough = [None if i in rotated else leaf for i, leaf in enumerate(leaves)]
        cores, comps = [], []
        for g in plan:
            comp = _has_complement(curvature, rank, (g.m if g.left else None, g.n if g.right else None))
            shape = (cap(g.m) if g.left else g.m, cap(g.n) if g.right else g.n)
            for i in g.indices:
                dev, dtype = leaves[i].device, _work_dtype(leaves[i].dtype)
                cores.append(torch.zeros(shape, dtype=dtype, device=dev))
                comps.append(torch.zeros(g.m, g.n, dtype=dtype, device=dev) if comp else None)
        return passthrough, tuple(cores), tuple(comps)

    def init(params):
        leaves, spec = flatten(params)
        plan = _plan(leaves, max_precond_dim, grouped, side_mode)
        groups = []
        for g in plan:
            dev = leaves[g.indices[0]].device
            b = len(g.indices)
            groups.append(
                KroneckerGroupState(
                    leaves=torch.tensor(g.indices, dtype=torch.int64),
                    left=init_side(curvature, rank, b, g.m, dev) if g.left else None,
                    right=init_side(curvature, rank, b, g.n, dev) if g.right else None,
                )
            )
        passthrough, cores, comps = templates(leaves, plan)
        inner_state = inner.init((unflatten(spec, passthrough), cores, comps))
        if moment_at_refresh == "project" and _has_factored_moments(inner_state):
            raise ValueError("moment_at_refresh='project' carries a full second moment to the new bases, but the inner "
                             "Adam factors it (scale_by_adam(factored=True)); use 'rotate' (the factored second "
                             "moment is then carried by position) or 'keep'")
        if codecs is not None:
            if not _link_adam_nodes(inner_state):
                raise ValueError("moment_codecs stores the moments of an Adam (scale_by_adam) inner transform, but "
                                 "the inner transform's state has no ScaleByAdamState over this link's tree")
            inner_state = _store_moments(inner_state, inner_state, None, codecs, 0)
        return KroneckerEigenbasisState(step_count(), step_count(), tuple(groups), inner_state)

    def accumulate_group(gs, x, seed, updates, inplace):
        """Both sides' statistics after one accumulation of the stacked matrices ``x`` ``(B, m, n)``."""
        grads, gram_scale, _ = normalize(x.clone())
        gram_in = grads if gram_precision == "float32" else grads.to(torch.bfloat16)
        stats = []
        for side, left in ((gs.left, True), (gs.right, False)):
            if side is None:
                stats.append(None)
                continue
            data = gram_in if left else gram_in.transpose(-1, -2)
            stats.append(_accumulate_side(curvature, side.stat, data, gram_scale, seed, updates, inplace))
            seed = seed + 1
        return tuple(stats)

    def refresh(side, count, first):
        if eigensolver == "power":
            factor, eps = regularize(curvature.factor(side.stat, count, side.basis.shape[-2]), tikhonov)
            vals, vecs, ok = branch(first, _exact_full, _power_step, (factor, side.basis))
            pairs = (vals, vecs, ok, vals.new_zeros(vals.shape[0], 0), eps)
        else:
            pairs = curvature.top_eigenpairs(side.stat, count, side.basis, first, tikhonov=tikhonov,
                                             eigensolver=eigensolver)
        return side_from_eigenpairs(side, *pairs, rank=rank)

    def rotate_moments(inner_state, changes, in_place, seed):
        """Re-express the cores of every Adam first moment in the new bases, and with
        ``moment_at_refresh="project"`` carry the second moments there too (``changes``: per
        group, ``(core positions, old bases, new bases)``). ``in_place``: written back into the
        moments' own tensors (a group's temporaries at a time), else new tensors. Moments stored
        through ``moment_codecs`` are decoded, turned and encoded again with ``seed``."""

        def fix(node):
            mu = node.mu
            node = node._replace(mu=(mu[0], moved(mu[1], change_basis, codecs and codecs.mu), mu[2]))
            if moment_at_refresh == "project":
                nu = node.nu
                node = node._replace(nu=(nu[0], moved(nu[1], change_basis_second_moment, codecs and codecs.nu), nu[2]))
            return node

        def moved(cores, fn, codec):
            """The cores with each group's stack carried to its new bases by ``fn``."""
            cores = list(cores)
            for positions, old, new in changes:
                stack = torch.stack([decode_tensor(codec, cores[p]) for p in positions])  # bf16 moments turn in float32
                turned = fn(stack.to(torch.promote_types(stack.dtype, torch.float32)), *old, *new)
                stack = None
                for j, p in enumerate(positions):
                    if isinstance(cores[p], EncodedTensor):
                        cores[p] = store_encoded(codec, turned[j], cores[p], None, seed, inplace=in_place)
                    elif in_place:
                        cores[p].copy_(turned[j])
                    else:
                        cores[p] = turned[j].to(cores[p].dtype)
            return tuple(cores)

        return _map_link_adam(fix, inner_state)

    def run_inner(tree, inner_state, seed, inplace):
        """``inner.update`` on ``tree`` (no params); with ``moment_codecs`` the moments of the leaves
        ``tree`` updates are decoded just before and encoded again (with ``seed``) just after."""
        if codecs is None:
            return inner.update(tree, inner_state, params=None, inplace=inplace)
        live = [x is not None for x in flatten(tree)[0]]
        out, new_state = inner.update(tree, _open_moments(inner_state, live, codecs), params=None, inplace=inplace)
        return out, _store_moments(new_state, inner_state, live, codecs, seed, inplace)

    def update(updates, state, *, params=None, inplace=True):
        leaves, spec = flatten(updates)
        check_dense_leaves(leaves)
        plan = _resolve_plan(leaves, state.groups, max_precond_dim, grouped, side_mode)
        count = increment(state.count)
        due = ((count % precond_freq) == 0) | (count == 1)
        stat_due, updates = statistics_schedule(count, stat_freq)
        first = state.refreshes == 0
        run_refresh = executor(state.groups, due)
        rotated = {i for g in plan for i in g.indices}
        passthrough = [None if i in rotated else leaf for i, leaf in enumerate(leaves)]
        skip = (count == 1) if skip_first else None
        seed = count * 64 + 1  # the moments' stochastic rounding (odd: the statistics' seeds are even)
        # A leafwise inner runs the unrotated leaves first and then each group's cores, rotated
        # just before and rotated back just after (phase 3): eager only, and not with a legacy
        # single Adam step counter, which would count every call.
        by_group = (leafwise_inner and not torch.compiler.is_compiling() and not (skip is not None and bool(skip))
                    and not _single_counter(state.inner_state))
        # 1. accumulate the statistics and rotate with the bases of the last refresh
        cores, comps, work = [], [], []
        for gi, (g, gs) in enumerate(zip(plan, state.groups)):
            present = [leaves[i] is not None for i in g.indices]
            if not any(present):  # no gradient for any leaf of the group: state untouched
                cores += [None] * len(g.indices)
                comps += [None] * len(g.indices)
                work.append(None)
                continue
            has_comp = _has_complement(curvature, rank, (g.m if g.left else None, g.n if g.right else None))
            partial = not all(present)
            like = next(leaves[i] for i in g.indices if leaves[i] is not None)
            dtype = _work_dtype(like.dtype)
            x = _stack_group(leaves, g, like, dtype)
            stats = _accumulate_when(
                stat_due, tuple(None if side is None else side.stat for side in (gs.left, gs.right)),
                functools.partial(accumulate_group, gs, x, count * 64 + (2 * gi) % 64, updates),
                inplace and not partial,
            )
            # the bases of the last refresh, in the rotations' precision (float32 with a complement
            # or a side the curvature keeps exact)
            exact = any(curvature.exact(d) for d in (g.m if g.left else None, g.n if g.right else None) if d)
            bases = _bases(gs, dtype if has_comp or exact or rotation_dtype == torch.float32 else rotation_dtype)
            work.append((stats, bases, present, like, has_comp, dtype))
            if by_group:  # rotated in phase 3 from a fresh stack: keeping ``x`` would hold every group's copy
                cores += [None] * len(g.indices)
                comps += [None] * len(g.indices)
                continue
            core, comp = _rotate_group(x, bases, has_comp)
            for j in range(len(g.indices)):
                cores.append(core[j] if present[j] else None)
                comps.append(comp[j] if (comp is not None and present[j]) else None)
        x = None  # (the last group's stacked gradients; the cores are views of ``core``, kept)

        # 2. the inner transform in the rotated coordinates (not at step 1 with skip_first: the
        # step's update is zero and the inner state stays as it was)
        tree = (unflatten(spec, passthrough), tuple(cores), tuple(comps))
        if by_group:
            nones = (None,) * len(cores)
            out_tree, inner_state = run_inner((tree[0], nones, nones), state.inner_state, seed, inplace)
            none_pass = unflatten(spec, [None] * len(leaves))
        elif skip is not None and not torch.compiler.is_compiling() and bool(skip):
            out_tree, inner_state = optree.tree_map(torch.zeros_like, tree), state.inner_state
        else:
            select = skip is not None and torch.compiler.is_compiling()  # compiled: select, not branch
            out_tree, inner_state = run_inner(tree, state.inner_state, seed, inplace and not select)
            if select:
                out_tree = optree.tree_map(lambda x: torch.where(skip.to(x.device), torch.zeros_like(x), x), out_tree)
                inner_state = optree.tree_map(
                    lambda new, old: torch.where(skip.to(new.device), old, new)
                    if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor) and new.shape == old.shape
                    else new,
                    inner_state, state.inner_state,
                )
        out_pass, out_cores, out_comps = out_tree
        out, _ = flatten(out_pass)
        # The rotated gradients are read no more: drop them before rotating back, and drop each
        # group's rotated updates once it is rotated back, so that the step's temporaries stay
        # about one tree of updates (docs/memory.md, "The step's transient memory").
        # (assignments, not ``del``: torch.compile traces no deletion of a closure's variable)
        tree = cores = comps = out_tree = out_pass = core = comp = None
        out_cores, out_comps = list(out_cores), list(out_comps)

        # 3. rotate back, refresh the bases when due, and let the inner state follow them
        refresh_now = torch.compiler.is_compiling() or bool(due)
        # eager and allowed to write the state: each group's moments follow its new bases in place
        turn_now = inplace and not torch.compiler.is_compiling()
        new_groups, changes, position = [], [], 0
        for gi, (g, gs, w) in enumerate(zip(plan, state.groups, work)):
            start, position = position, position + len(g.indices)
            if w is None:
                new_groups.append(gs)
                continue
            stats, bases, present, like, has_comp, dtype = w
            if by_group:  # rotate this group, run the inner transform on its cores alone
                core, comp = _rotate_group(_stack_group(leaves, g, like, dtype), bases, has_comp)
                rows = [None] * len(out_cores)
                crows = [None] * len(out_comps)
                for j in range(position - start):
                    if present[j]:
                        rows[start + j] = core[j]
                        crows[start + j] = None if comp is None else comp[j]
                core = comp = None
                out_g, inner_state = run_inner((none_pass, tuple(rows), tuple(crows)), inner_state, seed, inplace)
                out_cores[start:position], out_comps[start:position] = out_g[1][start:position], out_g[2][start:position]
                out_g = None
            rows, out_cores[start:position] = out_cores[start:position], [None] * (position - start)
            core = torch.stack([r if r is not None else torch.zeros_like(_any(rows)) for r in rows])
            rows = None
            pg = _in_precision(rotate_back, core, bases)
            core = None
            if has_comp:
                crows, out_comps[start:position] = out_comps[start:position], [None] * (position - start)
                pg = pg + project_complement(
                    torch.stack([r if r is not None else torch.zeros_like(_any(crows)) for r in crows]), *bases
                )
                crows = None
            pg = saturate(pg, like.dtype)
            for j, i in enumerate(g.indices):
                if leaves[i] is not None:
                    out[i] = pg[j].reshape(leaves[i].shape).to(leaves[i].dtype)
            partial = not all(present)
            present_rows = torch.tensor(present, device=like.device) if partial else None
            sides_new = []
            for s, (side, stat) in enumerate(zip((gs.left, gs.right), stats)):
                if side is None:
                    sides_new.append(None)
                    continue
                local = functools.partial(refresh, count=updates, first=first)
                new = _maybe_refresh(due, side._replace(stat=stat), run_refresh(gi, s, local))
                sides_new.append(_keep_absent(present_rows, new, side) if partial else new)
            new_gs = KroneckerGroupState(gs.leaves, *sides_new)
            new_groups.append(new_gs)
            if moment_at_refresh != "keep" and refresh_now:
                old = bases if all(b is None or b.dtype == dtype for b in bases) else _bases(gs, dtype)
                change = (list(range(start, position)), old, _bases(new_gs, dtype))
                if turn_now:  # this group's moments now, in place: its bases' float32 copies go with it
                    inner_state = rotate_moments(inner_state, [change], True, seed + 2)
                else:
                    changes.append(change)
                old = change = None
        if changes:  # out of place: compiled (torch.cond's branches may not write their inputs) or inplace=False
            inner_state = _when(due, lambda s: rotate_moments(s, changes, False, seed + 2), inner_state)
        refreshes = state.refreshes + due.to(torch.int64)
        return unflatten(spec, out), KroneckerEigenbasisState(count, refreshes, tuple(new_groups), inner_state)

    return _gather_matrices(GradientTransformation(init, update), max_precond_dim, side_mode)


def _check_moment_codecs(codecs: Any) -> ScaleByAdamState | None:
    """``moment_codecs`` checked: ``None`` or a :class:`ScaleByAdamState` of codecs."""
    if codecs is None:
        return None
    if not (isinstance(codecs, ScaleByAdamState) and codecs.count is None
            and all(c is None or isinstance(c, Codec) for c in (codecs.mu, codecs.nu))):
        raise TypeError("moment_codecs must be None or a ScaleByAdamState of codecs (mu and nu: a Codec or None, "
                        f"count: None), e.g. bf16_adam_codecs() or int8_adam_codecs(); got {codecs!r}")
    return codecs


def _is_link_adam(node: Any) -> bool:
    """Whether ``node`` is an Adam state over the tree this link hands its inner transform."""
    mu = node.mu if isinstance(node, ScaleByAdamState) else None
    return isinstance(mu, tuple) and len(mu) == 3 and isinstance(mu[1], tuple)


def _has_factored_moments(inner_state: Any) -> bool:
    """Whether an Adam state over the link's tree keeps a factored second moment (a ``nu`` leaf
    shaped unlike its ``mu``)."""
    for node in _link_adam_nodes(inner_state):
        if any(map(is_factored, flatten(node.mu)[0], flatten(node.nu)[0])):
            return True
    return False


def _link_adam_nodes(inner_state: Any) -> list:
    return [node for node in find_nodes(inner_state, ScaleByAdamState) if _is_link_adam(node)]


def _map_link_adam(fn, inner_state: Any, *rest: Any) -> Any:
    """``inner_state`` with every Adam state over the link's tree replaced by ``fn(node, *the same
    node of each of rest)``."""
    return optree.tree_map(lambda node, *others: fn(node, *others) if _is_link_adam(node) else node,
                           inner_state, *rest, is_leaf=lambda x: isinstance(x, ScaleByAdamState), none_is_leaf=True)


def _open_moments(inner_state: Any, live: list, codecs: ScaleByAdamState) -> Any:
    """The Adam moments of ``inner_state`` decoded where ``live`` (a flag per leaf of the link's
    tree) and ``None`` where encoded elsewhere (:func:`~scao_fx.transforms.quantization.open_encoded`):
    only the moments a call of Adam updates are ever decoded."""

    def open_node(node):
        return node._replace(**{name: open_encoded(codec, getattr(node, name), live)
                                for name, codec in (("mu", codecs.mu), ("nu", codecs.nu)) if codec is not None})

    return _map_link_adam(open_node, inner_state)


def _store_moments(new_state: Any, old_state: Any, live: list | None, codecs: ScaleByAdamState, seed: Any,
                   inplace: bool = False) -> Any:
    """``new_state`` with its Adam moments encoded (with ``seed``) where ``live`` (``None``: every
    leaf) and the stored ones of ``old_state`` elsewhere
    (:func:`~scao_fx.transforms.quantization.store_encoded`; ``inplace``: into the stored codes)."""

    def store_node(new, old):
        return new._replace(**{name: store_encoded(codec, getattr(new, name), getattr(old, name), live, seed,
                                                   inplace=inplace)
                               for name, codec in (("mu", codecs.mu), ("nu", codecs.nu)) if codec is not None})

    return _map_link_adam(store_node, new_state, old_state)


def _exact_full(factor: torch.Tensor, basis: torch.Tensor) -> tuple:
    """Every eigenpair of ``factor`` by a full ``eigh``, eigenvalues decreasing: ``(vals, vecs, ok)``."""
    vals, vecs, ok = robust_eigh(factor)
    return vals.contiguous(), vecs.to(factor.dtype).contiguous(), ok.contiguous()


def _power_step(factor: torch.Tensor, basis: torch.Tensor) -> tuple:
    r"""One step of orthogonal (power) iteration from ``basis`` whose columns keep their positions.

    The columns of :math:`F Q` are orthonormalised by a QR in the order of their Rayleigh
    quotients :math:`q_i^\top F q_i` (largest first, so the leading directions are the least
    disturbed by the Gram-Schmidt) and put back at their own positions, with the signs of the
    previous columns: column ``i`` of the new basis continues column ``i`` of the old one, which
    is what lets the inner transform's second moment be carried position by position. The
    factor is shifted by a small multiple of its largest Rayleigh quotient (eigenvectors
    unchanged) so that columns in a (numerical) null space are not rebuilt from rounding noise.
    Returns ``(Rayleigh quotients of the new columns (B, d), new basis (B, d, d), ok (B,))``.
    """
    q0 = basis.to(factor.dtype)
    fq = torch.matmul(factor, q0)
    ray = (q0 * fq).sum(-2)  # (B, d)
    top = ray.abs().amax(-1).clamp(min=torch.finfo(factor.dtype).tiny)
    shift = min(32 * factor.shape[-1] * torch.finfo(factor.dtype).eps, 0.1) * top
    work = fq + shift[:, None, None] * q0
    index = torch.argsort(ray, dim=-1, descending=True)[:, None, :].expand_as(work)
    q, r = torch.linalg.qr(torch.gather(work, -1, index))
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    q = q * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None, :]
    new = torch.empty_like(q).scatter_(-1, index, q)
    vals = (new * torch.matmul(factor, new)).sum(-2)
    ok = torch.isfinite(new).flatten(1).all(-1) & torch.isfinite(vals).all(-1)
    new = torch.where(ok[:, None, None], new, q0)
    return vals.contiguous(), new.contiguous(), ok.contiguous()


def _any(rows: list) -> torch.Tensor:
    return next(r for r in rows if r is not None)


def _stack_group(leaves: list, g: Any, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The group's gradients stacked as ``(B, m, n)`` in ``dtype`` (zeros for absent leaves)."""
    return torch.stack(
        [(leaves[i] if leaves[i] is not None else torch.zeros_like(like)).reshape(g.m, g.n).to(dtype) for i in g.indices]
    )


def _rotate_group(x: torch.Tensor, bases: tuple, has_comp: bool) -> tuple:
    """``(core, complement)`` of stacked gradients: the rotation into ``bases`` (in their
    precision) and, with a truncated rank, what the kept bases miss (else ``None``)."""
    core = _in_precision(rotate, x, bases)
    return core, (x - rotate_back(core, *bases) if has_comp else None)


def _single_counter(inner_state: Any) -> bool:
    """Whether an Adam state in ``inner_state`` keeps the legacy single step counter (one tensor
    for every leaf, counted once per call) instead of one per leaf."""
    return any(isinstance(node.count, torch.Tensor) for node in find_nodes(inner_state, ScaleByAdamState))


def _when(pred: torch.Tensor, fn, tree: Any) -> Any:
    """``fn(tree) if pred else tree`` for a CPU bool ``pred``: a Python branch in eager mode,
    ``torch.cond`` under ``torch.compile`` (``fn`` keeps the tree's structure)."""
    if not torch.compiler.is_compiling():
        return fn(tree) if bool(pred) else tree
    flat, spec = optree.tree_flatten(tree, none_is_leaf=False)
    out = branch(
        pred,
        # branches of torch.cond may not return their inputs: the leaves fn leaves alone are copied
        lambda *ops: tuple(
            o.clone() if any(o is x for x in ops) else o
            for o in optree.tree_flatten(fn(optree.tree_unflatten(spec, list(ops))))[0]
        ),
        lambda *ops: tuple(o.clone() for o in ops),
        tuple(flat),
    )
    return optree.tree_unflatten(spec, list(out))
