r"""Low-rank Kronecker-factored preconditioning with the complement kept (SCAO parts 3-4).

For every matrix leaf :math:`G \in \mathbb{R}^{m\times n}` (leaves with more than two dims are
viewed as ``(shape[0], prod(shape[1:]))``, e.g. conv weights as ``(out, in*kh*kw)``):

.. math::
    P(G) = A_L\,G\,A_R,\qquad
    A = U_k\,\mathrm{diag}(s_k^{-1/4} - c)\,U_k^\top + c\,I,\qquad c = \bar s_{tail}^{-1/4},

where :math:`U_k, s_k` are the top-``k`` eigenpairs of the Tikhonov-regularised, debiased
curvature factor (:math:`L + \epsilon I`, :math:`\epsilon = \max(\text{tiny},\ 10^{-4}\,\mathrm{tr}(L)/m)`),
``k`` comes from a :class:`~scao_fx.transforms.rank.RankRule` and :math:`\bar s_{tail}` is the
mean of the discarded eigenvalues. No gradient direction is dropped and none keeps an
arbitrary gain of 1; with ``k = dim`` this is exactly :math:`L^{-1/4} G R^{-1/4}`.

Every ``precond_freq`` steps the bases are refreshed (batched ``eigh`` per shape group, float32
with a float64 retry, last good basis kept on failure); the other steps are pure tensor code.
Leaves of equal matrix shape, dtype and device are stacked and processed together.

Sides: a side longer than ``max_precond_dim`` (or of length 1) is not preconditioned
(one-sided); leaves with no preconditioned side (0-d/1-d, or both sides too long) pass through.
Before the first refresh :math:`A = I`. A leaf whose update is ``None`` at a step (no gradient)
gets ``None`` back and its statistics and basis are left exactly as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch

from .._tree import flatten, unflatten
from .._validation import check_bool, check_choice, check_float, check_int
from ..distributed import _is_dtensor, _owner_refresh, assign_owners, check_process_group, gather_full, shard_like
from ..base import GradientTransformation, increment, register_state, step_count
from .curvature import CurvatureEMA, FactorStatistic, curvature_ema
from .quantization import EncodedTensor
from .rank import RankRule, robust_eigh, spectral_mass_rank

__all__ = [
    "kronecker_precondition",
    "KroneckerPreconditionState",
    "KroneckerGroupState",
    "KroneckerSide",
    "matrix_shape",
    "top_eigenpairs_exact",
    "top_eigenpairs_subspace",
    "TIKHONOV_FLOOR",
]

#: Absolute floor of the Tikhonov term, only reached by an all-zero factor.
TIKHONOV_FLOOR = 1e-30


@register_state
class KroneckerSide(NamedTuple):
    """One preconditioned side of a shape group (``B`` stacked ``d x d`` factors).

    Attributes:
        stat: the curvature EMA (:class:`~scao_fx.transforms.curvature.FactorStatistic`).
        basis: ``(B, d, cap)`` float32 eigenvectors (zero before the first refresh).
        coef: ``(B, cap)`` float32 :math:`s^{-1/4} - c` on kept directions, 0 past ``k``.
        tail: ``(B,)`` float32 complement gain ``c`` (1 before the first refresh).
        rank: ``(B,)`` int64 kept rank ``k``.
        fallbacks: ``(B,)`` int64 number of refreshes that kept the previous basis.
    """

    stat: FactorStatistic
    basis: torch.Tensor
    coef: torch.Tensor
    tail: torch.Tensor
    rank: torch.Tensor
    fallbacks: torch.Tensor


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
        if mn is None:
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
    return _unpack(out)


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


def _apply_left(side: KroneckerSide, g: torch.Tensor) -> torch.Tensor:
    """:math:`A G` for ``g`` of shape ``(B, d, n)``."""
    t = torch.matmul(side.basis.transpose(-1, -2), g) * side.coef[..., None]
    return torch.baddbmm(g * side.tail[:, None, None], side.basis, t)


def _apply_right(side: KroneckerSide, g: torch.Tensor) -> torch.Tensor:
    """:math:`G A` for ``g`` of shape ``(B, m, d)``."""
    t = torch.matmul(g, side.basis) * side.coef[:, None, :]
    return torch.baddbmm(g * side.tail[:, None, None], t, side.basis.transpose(-1, -2))


def _branch(pred: torch.Tensor, true_fn: Callable, false_fn: Callable, operands: tuple) -> tuple:
    """``true_fn(*operands) if pred else false_fn(*operands)`` for a CPU bool tensor ``pred``.

    Eager: a Python branch (no device sync). Under ``torch.compile``: ``torch.cond``. Both
    functions return tuples of fresh tensors of the same shapes.
    """
    if torch.compiler.is_compiling():
        return torch.cond(pred, true_fn, false_fn, operands)
    return true_fn(*operands) if bool(pred) else false_fn(*operands)


def top_eigenpairs_exact(factor: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Top ``cap = basis.shape[-1]`` eigenpairs of a stack of symmetric factors by a full ``eigh``.

    Returns ``(values (B, cap) decreasing, vectors (B, d, cap), ok (B,), rest (B, d - cap))``
    where ``rest`` holds the remaining eigenvalues.
    """
    cap = basis.shape[-1]
    vals, vecs, ok = robust_eigh(factor)
    return _dense(vals[:, :cap]), _dense(vecs[..., :cap]), ok, _dense(vals[:, cap:])


def _dense(x: torch.Tensor) -> torch.Tensor:
    """A copy with standard strides (``contiguous()`` keeps odd strides of size-1 dims, which
    ``torch.cond`` rejects when its two branches disagree)."""
    return x.clone(memory_format=torch.contiguous_format)


def top_eigenpairs_subspace(factor: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, ...]:
    r"""Top eigenpairs by one step of orthogonal iteration warm-started at ``basis``, then Rayleigh-Ritz.

    :math:`Q = \mathrm{qr}(F U_{prev})`, :math:`Q^\top F Q = W \Lambda W^\top`, :math:`U = Q W`.
    Costs :math:`O(d^2 k)` instead of the :math:`O(d^3)` of a full ``eigh``; repeated at every
    refresh it tracks the leading subspace as the factor drifts (the previous basis is already
    close). Columns of a never-computed (all-zero) basis start from identity columns. The
    remaining ``d - cap`` eigenvalues are not computed: ``rest`` spreads the remaining trace
    evenly over them.
    """
    d, cap = basis.shape[-2], basis.shape[-1]
    start = torch.eye(d, cap, device=basis.device, dtype=factor.dtype).expand_as(basis)
    empty = (basis.abs().sum(dim=(-2, -1)) == 0)[:, None, None]
    u0 = torch.where(empty, start, basis.to(factor.dtype))
    q, _ = torch.linalg.qr(torch.matmul(factor, u0))
    h = torch.matmul(q.transpose(-1, -2), torch.matmul(factor, q))
    vals, w, ok = robust_eigh(0.5 * (h + h.transpose(-1, -2)))
    vals, vecs = vals.to(factor.dtype), torch.matmul(q, w.to(q.dtype))
    ok = ok & torch.isfinite(vecs).flatten(1).all(-1)
    remaining = torch.diagonal(factor, dim1=-2, dim2=-1).sum(-1) - vals.sum(-1)
    rest = (remaining / max(d - cap, 1))[:, None].expand(-1, d - cap)
    return _dense(vals), _dense(vecs), ok, _dense(rest)


def _maybe_refresh(due: torch.Tensor, side: KroneckerSide, refresh: Callable[[KroneckerSide], KroneckerSide]) -> KroneckerSide:
    """``refresh(side) if due else side`` with ``due`` a CPU bool tensor.

    Eager: a Python branch (reading a CPU tensor is no device sync). Under ``torch.compile``:
    ``torch.cond``, so a compiled step has no graph break.
    """
    if torch.compiler.is_compiling():
        # The refresh never changes the statistics (the first 3 packed tensors): they are
        # operands only, not outputs (torch.cond rejects branches returning an input alias).
        ops = _pack(side)
        out = torch.cond(
            due,
            lambda *ops: _pack(refresh(_unpack(ops)))[3:],
            lambda *ops: tuple(o.clone() for o in ops[3:]),
            ops,
        )
        return _unpack(ops[:3] + tuple(out))
    return refresh(side) if bool(due) else side


def _refresh_owners(groups: tuple, world: int) -> dict[tuple[int, int], list[int]]:
    """Owner rank of every stacked factor: ``{(group, side 0 left / 1 right): [owner per row]}``.

    Costs :math:`d^3` per ``d x d`` factor, balanced by :func:`~scao_fx.distributed.assign_owners`.
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


def kronecker_precondition(
    *,
    curvature: CurvatureEMA | None = None,
    rank: RankRule | None = None,
    precond_freq: int = 20,
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
        curvature: the curvature statistic (:func:`curvature_ema`, default rho 0.999, int8).
        rank: the rank rule (:func:`spectral_mass_rank` default ``(0.05, 8, 128)``;
            :func:`full_rank` for exact :math:`L^{-1/4}`).
        precond_freq: refresh the bases every this many steps, >= 1.
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
            See :mod:`scao_fx.distributed`.

    DTensor updates (FSDP2's sharded gradients) are all-gathered per preconditioned matrix,
    preconditioned in full and returned as this rank's shard (see ``docs/distributed.md``).

    Returns:
        A ``GradientTransformation`` with state :class:`KroneckerPreconditionState`. It never
        modifies its input updates, even with ``inplace=True`` (which only reuses state buffers).

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.kronecker_precondition(rank=sf.full_rank(), curvature=sf.curvature_ema(0.99))
    """
    curvature = curvature_ema() if curvature is None else curvature
    rank = spectral_mass_rank() if rank is None else rank
    if not isinstance(curvature, CurvatureEMA):
        raise TypeError(f"curvature must be a CurvatureEMA (curvature_ema(...)), got {curvature!r}")
    if not isinstance(rank, RankRule):
        raise TypeError(f"rank must be a RankRule (spectral_mass_rank(...), full_rank(), fixed_rank(k)), got {rank!r}")
    precond_freq = check_int("precond_freq", precond_freq, low=1)
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

    def init_side(batch: int, dim: int, device) -> KroneckerSide:
        cap = rank.capacity(dim)
        return KroneckerSide(
            stat=curvature.init(batch, dim, device),
            basis=torch.zeros(batch, dim, cap, device=device),
            coef=torch.zeros(batch, cap, device=device),
            tail=torch.ones(batch, device=device),
            rank=torch.zeros(batch, dtype=torch.int64, device=device),
            fallbacks=torch.zeros(batch, dtype=torch.int64, device=device),
        )

    def init(params):
        leaves, _ = flatten(params)
        groups = []
        for g in _plan(leaves, max_precond_dim, grouped, side_mode):
            dev = leaves[g.indices[0]].device
            b = len(g.indices)
            groups.append(
                KroneckerGroupState(
                    leaves=torch.tensor(g.indices, dtype=torch.int64),
                    left=init_side(b, g.m, dev) if g.left else None,
                    right=init_side(b, g.n, dev) if g.right else None,
                )
            )
        return KroneckerPreconditionState(step_count(), step_count(), tuple(groups))

    def refresh_side(side: KroneckerSide, count: torch.Tensor, dim: int, first: torch.Tensor) -> KroneckerSide:
        factor = curvature.factor(side.stat, count, dim)
        trace = torch.diagonal(factor, dim1=-2, dim2=-1).sum(-1)
        eps = torch.clamp(tikhonov * trace / dim, min=TIKHONOV_FLOOR)
        eye = torch.eye(dim, device=factor.device, dtype=factor.dtype)
        reg = factor + eps[:, None, None] * eye
        cap = rank.capacity(dim)
        if eigensolver == "eigh" or (eigensolver == "auto" and cap == dim):
            vals, vecs, ok, rest = top_eigenpairs_exact(reg, side.basis)
        else:
            vals, vecs, ok, rest = _branch(first, top_eigenpairs_exact, top_eigenpairs_subspace, (reg, side.basis))
        # The full regularised spectrum, each eigenvalue floored at eps (an int8-decoded factor can
        # be slightly indefinite): the ``cap`` computed values, then the rest (exact, or the
        # remaining trace spread evenly by the subspace solver). Past ``cap`` only sums matter.
        s_all = torch.maximum(torch.cat([vals, rest], dim=-1), eps[:, None])
        s = s_all[:, :cap]
        k = rank.select(s_all - eps[:, None])
        idx = torch.arange(dim, device=s.device)
        if complement == "none":
            c = torch.zeros_like(eps)
        elif complement == "kth":
            c = s.gather(-1, (k - 1).clamp(min=0)[:, None]).squeeze(-1) ** -0.25
        else:
            tail_mask = idx[None, :] >= k[:, None]
            n_tail = tail_mask.sum(-1)
            mean_tail = (s_all * tail_mask).sum(-1) / n_tail.clamp(min=1)
            c = torch.where(n_tail > 0, mean_tail, s_all[:, -1]) ** -0.25
        idx = idx[:cap]
        keep = idx[None, :] < k[:, None]
        coef = torch.where(keep, s ** -0.25 - c[:, None], torch.zeros_like(s))
        okb = ok[:, None]
        return KroneckerSide(
            stat=side.stat,
            basis=torch.where(ok[:, None, None], vecs, side.basis).contiguous(),
            coef=torch.where(okb, coef, side.coef).contiguous(),
            tail=torch.where(ok, c.to(side.tail.dtype), side.tail).contiguous(),
            rank=torch.where(ok, k, side.rank).contiguous(),
            fallbacks=side.fallbacks + (~ok).to(torch.int64),
        )

    def update(updates, state, *, params=None, inplace=True):
        leaves, spec = flatten(updates)
        plan = _resolve_plan(leaves, state.groups, max_precond_dim, grouped, side_mode)
        count = increment(state.count)
        due = (count % precond_freq) == 0
        first = state.refreshes == 0
        owners = None
        if process_group is not None:
            if torch.compiler.is_compiling():
                raise NotImplementedError("kronecker_precondition(process_group=...) runs eagerly; do not torch.compile its update")
            if bool(due):  # a CPU tensor: no device sync
                owners = _refresh_owners(state.groups, torch.distributed.get_world_size(process_group))
        # FSDP2: DTensor gradients of preconditioned matrices are gathered whole (all-gather).
        sharded = {i: leaves[i] for g in plan for i in g.indices if _is_dtensor(leaves[i])}
        if sharded:
            leaves = [gather_full(x) if i in sharded else x for i, x in enumerate(leaves)]
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
            grads, gram_scale, unscale = _normalized(
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
                product = _gram(gram_in, left).mul_(gram_scale[:, None, None])  # the Gram matrices of G itself
                stat = curvature.accumulate(side.stat, product, seed, inplace=inplace and not partial)
                side = side._replace(stat=stat)
                refresh = lambda sd, dim=dim: refresh_side(sd, count, dim, first)  # noqa: E731
                if owners is not None:
                    refresh = lambda sd, own=owners[gi, s], local=refresh: _owner_refresh(sd, local, own, process_group)  # noqa: E731
                side = _maybe_refresh(due, side, refresh)
                if partial:
                    side = _keep_absent(present_rows, side, old)
                sides.append(side)
                seed = seed + 1
            left, right = sides
            pg = grads
            if left is not None:
                pg = _apply_left(left, pg)
            if right is not None:
                pg = _apply_right(right, pg)
            gnorm = torch.linalg.matrix_norm(grads)
            pnorm = torch.linalg.matrix_norm(pg)
            safe_p = torch.where(pnorm > 0, pnorm, torch.ones_like(pnorm))
            factor = None
            if graft == "frobenius":
                factor = gnorm / safe_p
            elif tau is not None:
                factor = torch.clamp(tau * gnorm / safe_p, max=1.0)
            if unscale.dtype == torch.float32:  # undo the normalization in the same multiply
                factor = unscale if factor is None else factor * unscale
            if factor is not None:
                pg = pg * factor[:, None, None]
            if unscale.dtype == torch.float64:  # float64 leaves: 2^e may exceed float32
                pg = pg.to(torch.float64) * unscale[:, None, None]
            for j, i in enumerate(g.indices):
                if leaves[i] is not None:
                    out[i] = pg[j].reshape(leaves[i].shape).to(leaves[i].dtype)
            new_groups.append(KroneckerGroupState(gs.leaves, left, right))
        for i, like in sharded.items():
            out[i] = shard_like(out[i], like) if out[i] is not None else None
        refreshes = state.refreshes + due.to(torch.int64)
        return unflatten(spec, out), KroneckerPreconditionState(count, refreshes, tuple(new_groups))

    return GradientTransformation(init, update)


def _gram(x: torch.Tensor, left: bool) -> torch.Tensor:
    r"""Batched Gram matrices in float32: :math:`X X^\top` (``left``) or :math:`X^\top X`.

    A bfloat16 ``x`` (``gram_precision="bfloat16"``) is multiplied as is with float32
    accumulation and output: ``bmm(..., out_dtype=float32)`` (bfloat16 tensor cores) on CUDA,
    the float32 product of its (exactly widened) entries elsewhere.
    """
    a, b = (x, x.transpose(-1, -2)) if left else (x.transpose(-1, -2), x)
    if x.dtype == torch.float32:
        return torch.matmul(a, b)
    if x.is_cuda and not torch.compiler.is_compiling():
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.matmul(a.float(), b.float())


def _pow2(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2 ** e`` built from its bits (exact), for integers ``e`` in ``dtype``'s normal range."""
    if dtype == torch.float64:
        return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def _normalized(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Scale each stacked gradient by a power of two near its largest entry, as float32.

    The preconditioner is linear in :math:`G` and the graft is scale-free, so the work runs on
    :math:`\hat G = G / 2^e` and the result is multiplied back by :math:`2^e` (exact: a power of
    two; in float64 for float64 leaves); the Gram matrices are :math:`\hat G \hat G^\top 4^e`,
    again exact. Bit for bit the same as working on :math:`G` in the usual range, but a gradient
    of 1e30 (float32) or 1e300 (float64) no longer overflows float32 intermediates (norms,
    products) into inf/NaN. A float32 ``stack`` is scaled in place (it is a fresh stack), so no
    copy of the gradients is made.

    Returns ``(G / 2^e as float32, per-leaf 4^e as float32 to scale the Gram matrices by (zero
    for a leaf whose Gram matrix would overflow float32: it then adds nothing to the curvature
    statistics), per-leaf 2^e (float32, or float64 for float64 leaves))``.
    """
    amax = torch.linalg.vector_norm(stack.detach(), ord=math.inf, dim=(-2, -1)).to(torch.float64)
    e = torch.frexp(torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax)))[1].to(torch.int64)
    if stack.dtype == torch.float64:
        e = e.clamp(-1000, 1000)
        normalized = (stack * _pow2(-e, torch.float64)[:, None, None]).to(torch.float32)
        unscale = _pow2(e, torch.float64)
    else:  # float32 (and narrower) values lie within 2^[-149, 128]: one float32 factor suffices
        e = e.clamp(-100, 100)
        down = _pow2(-e, torch.float32)[:, None, None]
        # in place for a float32 stack; bf16/fp16 promote to a new float32 tensor
        normalized = stack.mul_(down) if stack.dtype == torch.float32 else stack * down
        unscale = _pow2(e, torch.float32)
    # |entries of G G^T| <= max(m, n) 4^e: keep the Gram matrices where that fits float32.
    fits = 2 * e + math.ceil(math.log2(max(stack.shape[-2:]))) <= 127
    up = torch.where(fits, _pow2(torch.where(fits, e, 0).clamp(-100, 100), torch.float32), 0.0)
    return normalized, up * up, unscale


def _pack(side: KroneckerSide) -> tuple:
    """Flatten a side into a tuple of tensors (``torch.cond`` operands)."""
    st = side.stat
    return (st.offdiag.data, st.offdiag.scale, st.diag, side.basis, side.coef, side.tail, side.rank, side.fallbacks)


def _unpack(ops: Sequence[torch.Tensor]) -> KroneckerSide:
    """Inverse of :func:`_pack`."""
    return KroneckerSide(FactorStatistic(EncodedTensor(ops[0], ops[1]), ops[2]), *ops[3:])
