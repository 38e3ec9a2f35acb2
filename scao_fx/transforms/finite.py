r"""Skip non-finite steps: the :func:`apply_if_finite` combinator.

A NaN or Inf gradient must never reach a second-order optimizer's state: one poisoned
curvature factor poisons its eigenbasis, and with it every later update. ``apply_if_finite``
checks the whole gradient tree with one fused reduction and, when any entry is not finite,
skips the step for the *whole* tree: the returned updates are ``-0.0`` (so
``param + update == param`` bit for bit, negative zeros included) and the inner state is left
exactly as it was. Skips are counted; after ``max_consecutive_skips`` skipped steps in a row a
:class:`NonFiniteGradientError` is raised. With ``skip_overflow=True`` (as ``sf.scao`` uses it) a
finite gradient so large that its square would overflow the optimizer's float32 statistics
(:func:`square_safe_bound`) is skipped too: it would otherwise leave Adam's second moment at
``inf`` for good.

How the finite flag reaches the host decides the cost (``host_sync``):

* gradients on the CPU (or ``host_sync=True``): the flag is read at once and a bad step does not
  run the inner transform at all. On an accelerator this is one device-to-host read per step.
* gradients on an accelerator (default, ``host_sync=None``; or ``host_sync=False``): no host
  sync in the step. The inner transform runs out of place and every state tensor on the
  device is selected with ``torch.where(finite, new, old)``; the flag is copied to pinned host
  memory asynchronously and read at the *next* update, by which time the device has produced it
  (the read waits for that one flag, never for the current step's work; on CUDA, while other
  accelerators read it with a plain ``bool`` at the next update). If it was bad, the
  host-side tensors of the state (the CPU step counters) are rolled back then and the skip is
  counted, so the state is exactly the state of a run in which the bad step never happened. The
  price is memory: while the step runs, the inner state exists twice (old and new).
* under ``torch.compile``: everything is selected with ``torch.where`` (no host read, no error
  raised inside the graph; the counters still count).
"""

from __future__ import annotations

import math
import weakref
from typing import Any, NamedTuple

import optree
import torch

from .. import _treemath
from .._tree import flatten, unflatten
from .._validation import check_dense_leaves, check_int
from ..base import GradientTransformation, check_transform, increment, register_state, step_count
from ..parallel import all_ranks, is_dtensor

__all__ = [
    "apply_if_finite",
    "FiniteGuard",
    "ApplyIfFiniteState",
    "NonFiniteGradientError",
    "all_finite",
    "square_safe_bound",
    "skipped_steps",
]


class FiniteGuard(GradientTransformation):
    """The transform :func:`apply_if_finite` returns: a ``GradientTransformation`` whose
    ``update`` also takes ``finite=``, a verdict computed by the caller.

    ``update(updates, state, *, params=None, inplace=True, finite=None)``: with ``finite`` (a
    0-d bool tensor) the guard uses that verdict instead of checking ``updates`` itself. The
    ``torch.optim`` facade checks all its param groups' gradients once and passes the one
    verdict to every group's guard, so a NaN in one group skips every group. The verdict is an
    argument of the call, never state shared between optimizers or threads.
    """

    __slots__ = ()


class NonFiniteGradientError(FloatingPointError):
    """Raised by :func:`apply_if_finite` after too many consecutive non-finite steps."""


@register_state
class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`.

    Attributes:
        inner_state: the wrapped transform's state (untouched by skipped steps).
        skipped: CPU int64, steps skipped so far (a deferred skip is counted at the next update).
        consecutive: CPU int64, skipped steps in a row up to the last resolved step.
        pending_finite: 0-d bool, the finite flag of the last step when it has not been read by
            the host yet (deferred mode); ``True`` when nothing is pending.
        rollback: deferred mode only: the inner state's host (CPU) tensors from before the
            pending step, restored if that step turns out to be non-finite; ``()`` otherwise.
    """

    inner_state: Any
    skipped: torch.Tensor
    consecutive: torch.Tensor
    pending_finite: torch.Tensor
    rollback: tuple


def square_safe_bound(x: torch.Tensor) -> float:
    r"""The largest :math:`|x_{ij}|` whose statistics cannot overflow: :math:`\sqrt{f_{max} / n}`.

    :math:`f_{max}` is the largest float32 (float64 for a float64 leaf: the dtype of its
    statistics) and :math:`n` the number of entries. Below it, Adam's :math:`g^2` and every entry
    of a Frobenius-grafted preconditioned gradient (at most :math:`\lVert G\rVert_F \le
    \sqrt{n}\max|G|`) and its square stay finite.
    """
    fmax = torch.finfo(torch.float64 if x.dtype in (torch.float64, torch.complex128) else torch.float32).max
    return math.sqrt(fmax / max(x.numel(), 1))


def all_finite(tree: Any, *, overflow_safe: bool = False) -> torch.Tensor:
    """A 0-d bool tensor: True iff every entry of every tensor leaf of ``tree`` is finite.

    One fused infinity-norm reduction per (device, dtype) group; the result stays on the first
    leaf's device (no host sync). ``None`` leaves and empty tensors are ignored.

    Args:
        tree: a pytree of tensors.
        overflow_safe: also require every entry to be at most :func:`square_safe_bound` of its
            leaf (a finite gradient so large that the optimizer's statistics would overflow).

    Example:
        >>> import torch, scao_fx as sf
        >>> bool(sf.all_finite({"w": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}))
        False
        >>> bool(sf.all_finite({"w": torch.full((4,), 1e30)}, overflow_safe=True))
        False
    """
    all_leaves = flatten(tree)[0]
    check_dense_leaves(all_leaves, "gradient tree")
    leaves = [x for x in all_leaves if isinstance(x, torch.Tensor) and x.numel() > 0]
    if not leaves:
        return torch.ones((), dtype=torch.bool)
    device = leaves[0].device
    floats = [x for x in leaves if x.is_floating_point() or x.is_complex()]
    # DTensors (FSDP2 shards): each rank checks its own shards and the ranks then agree (an
    # all-reduce of the flag); a max-reduction of sharded norms would drop a NaN. Bounds use the
    # global size.
    sharded = [x for x in floats if is_dtensor(x)]
    checked = [
        (x.to_local() if is_dtensor(x) else x, square_safe_bound(x) if overflow_safe else math.inf) for x in floats
    ]
    checked = [(x, bound) for x, bound in checked if x.numel() > 0]
    if not checked:  # integer tensors are always finite
        flag = torch.ones((), dtype=torch.bool, device=device)
    else:
        # The infinity norm (max |x|) is finite for every finite tensor (no overflow, unlike a
        # sum of squares) and NaN/Inf as soon as one entry is. With bounds, each norm is divided
        # by its leaf's bound (a list of host scalars: no transfer) and must stay <= 1.
        norms = _treemath.norms([x for x, _ in checked], math.inf)
        if overflow_safe:
            norms = _treemath.mul_each(norms, [1.0 / bound for _, bound in checked])
        # One stacked check per (dtype, device) kind of norm, not a few kernels per leaf.
        kinds: dict[tuple, list] = {}
        for n in norms:
            kinds.setdefault((n.dtype, n.device), []).append(n)
        oks = []
        for ns in kinds.values():
            stacked = torch.stack(ns)
            ok = torch.isfinite(stacked) & (stacked <= 1.0) if overflow_safe else torch.isfinite(stacked)
            oks.append(ok.all().to(device))
        flag = oks[0] if len(oks) == 1 else torch.stack(oks).all()
    return all_ranks(flag, sharded) if sharded else flag


def _is_host(leaf: Any, device: torch.device) -> bool:
    """Whether a state leaf lives on the host while the finite flag lives on ``device``."""
    return isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu" and device.type != "cpu"


class _PendingFlag:
    """The host copy of the last deferred flag: a pinned buffer and the event that fills it."""

    def __init__(self) -> None:
        self.source: weakref.ref | None = None
        self.host: torch.Tensor | None = None
        self.event: Any = None

    def record(self, flag: torch.Tensor) -> None:
        self.source = weakref.ref(flag)
        if flag.device.type == "cuda":
            if self.host is None:
                self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
            if self.event is None:
                self.event = torch.cuda.Event()
            self.host.copy_(flag, non_blocking=True)
            self.event.record()

    def read(self, flag: torch.Tensor) -> bool:
        """The host value of ``flag``: free on the CPU, waits only for ``flag`` itself on CUDA."""
        if flag.device.type == "cpu":
            return bool(flag)
        recorded = self.source is not None and self.source() is flag
        if recorded and flag.device.type == "cuda" and self.event is not None:
            self.event.synchronize()
            return bool(self.host)
        return bool(flag)  # a state restored from a checkpoint: one plain read


def apply_if_finite(
    inner: GradientTransformation,
    max_consecutive_skips: int = 10,
    *,
    host_sync: bool | None = None,
    skip_overflow: bool = False,
) -> GradientTransformation:
    r"""Run ``inner`` only on steps whose whole gradient tree is finite.

    On a step where any gradient entry is NaN or Inf the updates are ``-0.0`` (``p + u == p``
    exactly) and ``inner``'s state is left exactly as it was (see the module docstring for how
    this is done without a host sync on accelerators); the skip is counted in
    ``ApplyIfFiniteState.skipped``. After ``max_consecutive_skips`` consecutive skips
    :class:`NonFiniteGradientError` is raised (the state passed in is still intact).

    Args:
        inner: the transform to protect (for example a whole optimizer chain).
        max_consecutive_skips: consecutive skipped steps tolerated before raising, >= 1.
        host_sync: ``None`` (default): read the flag at once when the gradients are on the CPU,
            defer the read by one step on accelerators; ``True``: always read at once (one
            device-to-host sync per step on accelerators, no extra memory); ``False``: always
            defer (the inner state is selected with ``torch.where``).
        skip_overflow: also skip steps with a finite gradient entry above its leaf's
            :func:`square_safe_bound` (about 1.8e19 / sqrt(entries) for float32 statistics), whose
            square would overflow the optimizer's statistics into a permanent ``inf``.

    Returns:
        A :class:`FiniteGuard` (a ``GradientTransformation`` whose ``update`` also takes
        ``finite=``, a verdict computed by the caller) with state :class:`ApplyIfFiniteState`.

    Raises:
        NonFiniteGradientError: from ``update``, after too many consecutive skips.

    Example:
        >>> import torch, scao_fx as sf
        >>> tx = sf.apply_if_finite(sf.adam(lr=0.1), max_consecutive_skips=3)
        >>> params = {"w": torch.ones(2)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([1.0, float("inf")])}, state, params=params)
        >>> updates["w"], int(state.skipped)
        (tensor([-0., -0.]), 1)
    """
    check_transform("inner", inner)
    max_consecutive_skips = check_int("max_consecutive_skips", max_consecutive_skips, low=1)
    if host_sync is not None and not isinstance(host_sync, bool):
        raise TypeError(f"host_sync must be None, True or False, got {host_sync!r}")
    if not isinstance(skip_overflow, bool):
        raise TypeError(f"skip_overflow must be a bool, got {skip_overflow!r}")
    pending = _PendingFlag()

    def deferred_for(device: torch.device) -> bool:
        return host_sync is False or (host_sync is None and device.type != "cpu")

    def host_leaves(inner_state: Any, device: torch.device) -> tuple:
        return tuple(x.clone() for x in optree.tree_leaves(inner_state) if _is_host(x, device))

    def init(params: Any) -> ApplyIfFiniteState:
        inner_state = inner.init(params)
        tensors = [x for x in flatten(params)[0] if isinstance(x, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
        if not deferred_for(device):
            return ApplyIfFiniteState(inner_state, step_count(), step_count(), torch.ones((), dtype=torch.bool), ())
        # the "pending" verdict lives where the real ones will (so a checkpoint restores it there)
        # and is recorded, so the first update reads it without a sync
        true = torch.ones((), dtype=torch.bool, device=device)
        pending.record(true)
        return ApplyIfFiniteState(inner_state, step_count(), step_count(), true, host_leaves(inner_state, device))

    overflow_note = " (or entries above the overflow bound, skip_overflow=True)" if skip_overflow else ""

    def count_skip(state: ApplyIfFiniteState, inner_state: Any) -> ApplyIfFiniteState:
        consecutive = increment(state.consecutive)
        if int(consecutive) >= max_consecutive_skips:
            raise NonFiniteGradientError(
                f"apply_if_finite: {int(consecutive)} consecutive steps had non-finite gradients{overflow_note} "
                f"(max_consecutive_skips={max_consecutive_skips}); every one was skipped and the "
                "parameters and optimizer state are unchanged. Lower the learning rate, check the "
                "data and the loss for NaN/Inf, or use a gradient scaler for float16 training."
            )
        return state._replace(inner_state=inner_state, skipped=increment(state.skipped), consecutive=consecutive)

    def resolve(state: ApplyIfFiniteState) -> ApplyIfFiniteState:
        """Apply the verdict of a deferred flag: roll the host tensors back if it was bad."""
        if pending.read(state.pending_finite):
            if int(state.consecutive) == 0:
                return state
            return state._replace(consecutive=torch.zeros_like(state.consecutive))
        leaves, spec = optree.tree_flatten(state.inner_state)
        device = state.pending_finite.device
        backup = iter(state.rollback)
        restored = [next(backup) if _is_host(x, device) else x for x in leaves]
        state = count_skip(state, optree.tree_unflatten(spec, restored))
        return state._replace(pending_finite=torch.ones((), dtype=torch.bool))

    def neg_zero(leaves: list) -> list:
        # new tensors even with inplace=True: the guard never writes into the updates it is given
        # (the facade passes p.grad itself), and skipped steps are rare
        return [None if u is None else torch.full_like(u, -0.0) for u in leaves]

    def update(updates, state, *, params=None, inplace=True, finite=None):
        if not isinstance(state, ApplyIfFiniteState):
            raise TypeError(f"state must be an ApplyIfFiniteState (from this transform's init), got {type(state).__name__}")
        leaves, spec = flatten(updates)
        if finite is None:
            finite = all_finite(leaves, overflow_safe=skip_overflow)
        elif not (isinstance(finite, torch.Tensor) and finite.dtype == torch.bool and finite.dim() == 0):
            raise TypeError(f"finite must be None or a 0-d bool tensor (a verdict from all_finite), got {finite!r}")
        compiling = torch.compiler.is_compiling()
        if not compiling and not deferred_for(finite.device):
            if bool(finite):
                new_updates, inner_state = inner.update(updates, state.inner_state, params=params, inplace=inplace)
                zero = torch.zeros_like(state.consecutive)
                return new_updates, state._replace(inner_state=inner_state, consecutive=zero)
            return unflatten(spec, neg_zero(leaves)), count_skip(state, state.inner_state)

        if not compiling:
            state = resolve(state)
        new_updates, new_inner = inner.update(updates, state.inner_state, params=params, inplace=False)
        on_device: dict[torch.device, torch.Tensor] = {}

        def flag_on(device: torch.device) -> torch.Tensor:
            if device not in on_device:
                on_device[device] = finite.to(device)  # a host read only under torch.compile
            return on_device[device]

        def select(new: Any, old: Any) -> Any:
            if not isinstance(new, torch.Tensor):
                return new
            if _is_host(new, finite.device) and not compiling:
                return new  # rolled back at the next update if this step was not finite
            if compiling:
                return torch.where(flag_on(new.device), new, old)
            if new is old:
                return new
            try:  # into the new buffer: the state exists twice during the step, never three times
                return torch.where(flag_on(new.device), new, old, out=new)
            except RuntimeError:  # a buffer that cannot be written (e.g. an expanded view)
                return torch.where(flag_on(new.device), new, old)

        gated_inner = optree.tree_map(select, new_inner, state.inner_state)
        out = [None if u is None else torch.where(flag_on(u.device), u, -0.0) for u in flatten(new_updates)[0]]
        if compiling:
            bad = (~finite).to(state.skipped.device, torch.int64)
            return unflatten(spec, out), state._replace(
                inner_state=gated_inner,
                skipped=state.skipped + bad,
                consecutive=(state.consecutive + 1) * bad,
            )
        rollback = host_leaves(state.inner_state, finite.device)
        pending.record(finite)
        return unflatten(spec, out), state._replace(inner_state=gated_inner, pending_finite=finite, rollback=rollback)

    return FiniteGuard(init, update)


def skipped_steps(state: Any) -> int:
    """Total steps skipped by every :func:`apply_if_finite` in a state tree.

    A deferred skip (accelerator, last step) is included: reading it synchronises once.

    Example:
        >>> import torch, scao_fx as sf
        >>> tx = sf.scao(lr=1e-3)
        >>> sf.skipped_steps(tx.init({"w": torch.zeros(4, 4)}))
        0
    """
    from .._tree import find_nodes

    total = 0
    for node in find_nodes(state, ApplyIfFiniteState):
        total += int(node.skipped) + (0 if bool(node.pending_finite) else 1)
        total += skipped_steps(node.inner_state)
    return total
