"""Adam moments and decoupled weight decay.

:func:`scale_by_adam` turns gradients into Adam directions; :func:`add_decayed_weights` adds
``weight_decay * params`` (decoupled weight decay when placed after Adam and before the
learning rate, as in AdamW).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, NamedTuple

import torch

from .. import _treemath
from .._tree import check_same_structure, flatten, flatten_like_state, unflatten
from .._validation import check_bool, check_choice, check_dense_leaves, check_dtype, check_float, check_int
from ..base import EmptyState, GradientTransformation, increment, multi_tensor_ok, register_state, step_count
from ..parallel import is_dtensor
from .combinators import masked

__all__ = ["scale_by_adam", "ScaleByAdamState", "add_decayed_weights", "moment_dtype_for", "adam_kernel",
           "FACTORED_MIN_DIM", "factored_shape", "factored_second_moment", "factored_estimate", "factored_from_full",
           "is_factored"]

#: The arithmetic :func:`scale_by_adam` can run: ``"foreach"`` (multi-tensor ``torch._foreach_*``
#: ops, falling back to the loop where they do not apply: the default), ``"loop"`` (one set of
#: ops per leaf), ``"fused"`` (torch's fused Adam kernel, ``torch._fused_adam_``, on CPU float32
#: and float64 moments; the foreach path elsewhere). The three agree to float rounding; the loop
#: and foreach paths bit for bit.
ADAM_KERNELS = ("foreach", "loop", "fused")

_default_kernel: contextvars.ContextVar[str] = contextvars.ContextVar("scao_fx_adam_kernel", default="foreach")


@contextlib.contextmanager
def adam_kernel(kernel: str) -> Iterator[str]:
    """Within the block, :func:`scale_by_adam` transforms *built* without a ``kernel`` argument
    run ``kernel`` (one of :data:`ADAM_KERNELS`); ``sf.SCAO(fused=True)`` builds its chains so.

    Example:
        >>> import scao_fx as sf
        >>> from scao_fx.transforms.adam import adam_kernel
        >>> with adam_kernel("fused"):
        ...     tx = sf.adamw(1e-3)
    """
    token = _default_kernel.set(check_choice("kernel", kernel, ADAM_KERNELS))
    try:
        yield kernel
    finally:
        _default_kernel.reset(token)


def _fused_directions(grads: list, mus: list, nus: list, counts: list, b1: float, b2: float, eps: float) -> list | None:
    """Adam's directions ``m_hat / (sqrt(v_hat) + eps)`` from ``torch._fused_adam_``, moments
    updated in place, or None where the kernel does not apply (not all on the CPU in float32 or
    float64, or not all contiguous). The kernel runs ``p -= lr * m_hat / (sqrt(v_hat) + eps)`` on zeroed buffers with
    ``lr = -1``; it reads the (already incremented) counters and leaves the gradients as they are."""
    if any(m.device.type != "cpu" or m.dtype not in (torch.float32, torch.float64) for m in mus):
        return None
    if not all(t.is_contiguous() for t in grads + mus + nus):  # the kernel walks flat buffers
        return None
    out = [torch.zeros_like(m) for m in mus]
    for dtype in {m.dtype for m in mus}:
        idx = [j for j, m in enumerate(mus) if m.dtype == dtype]
        torch._fused_adam_(
            [out[j] for j in idx], [grads[j] for j in idx], [mus[j] for j in idx], [nus[j] for j in idx], [],
            [counts[j] for j in idx], lr=-1.0, beta1=b1, beta2=b2, weight_decay=0.0, eps=eps, amsgrad=False,
            maximize=False,
        )
    return out


@register_state
class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`: first and second moments and the step counts, each a tree
    like the params.

    ``count`` holds one 0-d int64 CPU counter per leaf (``None`` where the params have
    ``None``): the number of steps in which that leaf had a gradient, as ``torch.optim.AdamW``
    counts ``step`` per parameter. A leaf whose gradient is ``None`` on some steps is
    bias-corrected with its own count. (A single 0-d counter, the layout of earlier releases, is
    still accepted and read as every leaf's count.)
    """

    mu: Any
    nu: Any
    count: Any


#: Shortest side of a matrix whose second moment ``scale_by_adam(factored=True)`` factors (the
#: Adafactor convention): a smaller matrix keeps the full second moment, which costs little there.
FACTORED_MIN_DIM = 128


def factored_shape(shape: Any, min_dim: int = FACTORED_MIN_DIM) -> tuple[int, int] | None:
    """``(m, n)`` of a leaf of ``shape`` viewed as ``(shape[0], prod(shape[1:]))`` if its second
    moment is factored (two or more dims, both sides at least ``min_dim``), else ``None``."""
    if len(shape) < 2:
        return None
    m, n = int(shape[0]), int(math.prod(shape[1:]))
    return (m, n) if min(m, n) >= min_dim else None


def factored_second_moment(v: torch.Tensor, g2: torch.Tensor, b2: float, inplace: bool) -> torch.Tensor:
    r"""The factored second moment ``v = [r; c]`` (length ``m + n``) after the squared gradient
    ``g2`` of shape ``(m, n)``: :math:`r \leftarrow \beta_2 r + (1-\beta_2)\,\mathrm{mean}_j\, g_{ij}^2`,
    :math:`c \leftarrow \beta_2 c + (1-\beta_2)\,\mathrm{mean}_i\, g_{ij}^2` (Adafactor's row and
    column statistics; ``inplace``: into ``v`` itself)."""
    m = g2.shape[0]
    v = v.mul_(b2) if inplace else v.mul(b2)
    v[:m].add_(g2.mean(1), alpha=1 - b2)
    v[m:].add_(g2.mean(0), alpha=1 - b2)
    return v


def factored_from_full(v: torch.Tensor) -> torch.Tensor:
    """The factored statistics ``[r; c]`` of a full second moment ``v`` viewed as ``(shape[0],
    prod(shape[1:]))``: its row and column means (what :func:`factored_second_moment` holds when
    every step's ``g^2`` is ``v``)."""
    rows = v.reshape(v.shape[0], -1)
    return torch.cat([rows.mean(1), rows.mean(0)])


def is_factored(mu: Any, nu: Any) -> bool:
    """Whether the second moment ``nu`` of a leaf whose first moment is ``mu`` is factored (a
    1-D ``[r; c]`` where ``mu`` is a matrix), the rule every reader of the state uses."""
    return nu is not None and mu is not None and nu.shape != mu.shape


def factored_estimate(v: torch.Tensor, m: int) -> torch.Tensor:
    r"""The ``(m, n)`` second-moment estimate of a factored ``v = [r; c]``: the rank-one
    :math:`\hat V = r c^\top / \mathrm{mean}(r)`, exact when the second moment is itself rank
    one (:math:`V = a b^\top`); a zero ``r`` gives zeros, not NaN."""
    r, c = v[:m], v[m:]
    return torch.outer(r, c).div_(r.mean().clamp_min(torch.finfo(v.dtype).tiny))


def _leaf_counts(count: Any, n: int) -> list:
    """The per-leaf counters of a state: its ``count`` tree's leaves, or a single legacy 0-d
    counter repeated for the ``n`` leaves."""
    if isinstance(count, torch.Tensor):
        return [count] * n
    return flatten(count)[0]


def _incremented(counts: list) -> list:
    """Each counter plus one, saturating at the int64 maximum, never in place (two multi-tensor
    ops in eager mode, not a few small ops per leaf)."""
    if counts and multi_tensor_ok(counts):
        return list(torch._foreach_add(torch._foreach_clamp_max(counts, torch.iinfo(torch.int64).max - 1), 1))
    return [increment(c) for c in counts]


def _bias_corrections(count: torch.Tensor, b1: float, b2: float):
    """``(1 - b1^t, 1 - b2^t)``: Python floats (float64) in eager mode, where the CPU step counter is
    read without a device sync, exactly as ``torch.optim.AdamW`` does; float64 tensors under
    ``torch.compile`` (no graph break) and ``torch.func`` transforms (a batched counter)."""
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(count):
        t = count.to(torch.float64)  # traced or under vmap: stay in tensor land
        return 1 - b1**t, 1 - b2**t
    t = int(count)
    return 1 - b1**t, 1 - b2**t


def _same_kind(tensors: list) -> list[list[int]]:
    """The positions of the plain tensors and of the DTensors of ``tensors`` (the non-empty ones)."""
    plain = [j for j, t in enumerate(tensors) if not is_dtensor(t)]
    dtensors = [j for j, t in enumerate(tensors) if is_dtensor(t)]
    return [part for part in (plain, dtensors) if part]


#: Entries of Adam's denominators computed at once by the multi-tensor path (whole leaves: a
#: larger leaf is one chunk of its own). 2^24 float32 entries are 64 MB.
DENOMINATOR_CHUNK = 1 << 24


def _sqrt(x):
    return x.sqrt() if isinstance(x, torch.Tensor) else math.sqrt(x)


def moment_dtype_for(dtype: torch.dtype, moment_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype Adam statistics are kept in: ``moment_dtype`` or at least float32."""
    if moment_dtype is not None:
        return moment_dtype
    return torch.promote_types(dtype, torch.float32)


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    moment_dtype: torch.dtype | None = None,
    kernel: str | None = None,
    factored: bool = False,
    factored_min_dim: int = FACTORED_MIN_DIM,
) -> GradientTransformation:
    r"""Rescale updates by Adam's bias-corrected moments.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\\
        u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}

    Bias corrections are computed in the moments' dtype (float64 for float64 params), so the
    chain ``adamw`` reproduces ``torch.optim.AdamW`` to rounding.

    Args:
        b1: first-moment decay, in [0, 1).
        b2: second-moment decay, in [0, 1).
        eps: added to the denominator, >= 0 (with ``eps = eps_root = 0`` the denominator is
            floored at the dtype's smallest normal number, so an all-zero coordinate gives 0, not NaN).
        eps_root: added inside the square root, >= 0.
        moment_dtype: dtype of the moments; default: the parameter's dtype promoted to at least
            float32 (bf16/fp16 parameters keep fp32 statistics).
        kernel: the arithmetic (:data:`ADAM_KERNELS`): ``"foreach"`` (multi-tensor ops; the
            default, or the one :func:`adam_kernel` sets while building), ``"loop"`` (per-leaf
            ops, the same bits), ``"fused"`` (``torch._fused_adam_``: about 5x faster on the CPU,
            ``docs/examples/adam_kernels.py``; equal to float rounding, not bit for bit; used
            for CPU float32/float64 moments with ``eps > 0``, ``eps_root = 0``, in place, outside
            ``torch.compile``; the foreach path elsewhere). The state is the same for all three.
        factored: keep the second moment of every matrix leaf whose two sides (viewed as
            ``(shape[0], prod(shape[1:]))``) are both at least ``factored_min_dim`` as Adafactor
            does: row and column means of :math:`g^2` (:func:`factored_second_moment`), read as
            the rank-one :math:`\hat v = r c^\top / \mathrm{mean}(r)`
            (:func:`factored_estimate`), so ``m + n`` entries instead of ``m n``. The estimate is
            floored entrywise at :math:`(1-\beta_2) g_t^2`, the current step's share of Adam's
            own :math:`v_t` (which never falls below it): a rank-one fit underestimates the
            entries that are large against their row and column, and unfloored those get steps
            many times Adam's (early in training, where the gradient's square is far from rank
            one); floored, no entry's :math:`|g_t| / \sqrt{\hat v_t}` exceeds Adam's bound. That leaf's ``nu``
            is then a 1-D tensor ``[r; c]`` of at least float32; its first moment is unchanged.
            Other leaves, and DTensor shards, keep the full second moment. Default False.
        factored_min_dim: the shortest side a factored matrix may have, >= 1 (default
            :data:`FACTORED_MIN_DIM`, 128).

    Returns:
        A ``GradientTransformation`` with state :class:`ScaleByAdamState`.

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.chain(sf.scale_by_adam(), sf.scale_by_learning_rate(1e-3))
    """
    b1 = check_float("b1", b1, low=0.0, high=1.0, high_inclusive=False)
    b2 = check_float("b2", b2, low=0.0, high=1.0, high_inclusive=False)
    eps = check_float("eps", eps, low=0.0)
    eps_root = check_float("eps_root", eps_root, low=0.0)
    moment_dtype = check_dtype("moment_dtype", moment_dtype)
    kernel = check_choice("kernel", _default_kernel.get() if kernel is None else kernel, ADAM_KERNELS)
    factored = check_bool("factored", factored)
    factored_min_dim = check_int("factored_min_dim", factored_min_dim, low=1)
    # eps = eps_root = 0: a coordinate whose gradients were all zero (or underflowed) would give
    # 0 / 0 = NaN; the denominator is floored at the smallest normal number instead (a no-op
    # wherever it is positive, so still exactly torch.optim.AdamW's arithmetic there).
    floor_denominator = eps == 0.0 and eps_root == 0.0

    def init(params):
        leaves, spec = flatten(params)

        def zeros(p):
            return None if p is None else torch.zeros_like(p, dtype=moment_dtype_for(p.dtype, moment_dtype))

        def second(p):
            shape = None if p is None or not factored or is_dtensor(p) else factored_shape(p.shape, factored_min_dim)
            if shape is None:
                return zeros(p)
            dtype = torch.promote_types(moment_dtype_for(p.dtype, moment_dtype), torch.float32)
            return torch.zeros(sum(shape), dtype=dtype, device=p.device)

        mu = [zeros(p) for p in leaves]
        nu = [second(p) for p in leaves]
        counts = [None if p is None else step_count() for p in leaves]
        return ScaleByAdamState(unflatten(spec, mu), unflatten(spec, nu), unflatten(spec, counts))

    def multi_tensor(grads, mus, nus, bc1s, bc2s, inplace):
        """Adam's step on lists of tensors by multi-tensor kernels: ``(directions, mus, nus)``.
        Out of place (new moment tensors) when not ``inplace``, e.g. under apply_if_finite's
        deferred path."""
        if inplace:
            torch._foreach_lerp_(mus, grads, 1 - b1)
            torch._foreach_mul_(nus, b2)
        else:
            mus = torch._foreach_lerp(mus, grads, 1 - b1)
            nus = torch._foreach_mul(nus, b2)
        torch._foreach_addcmul_(nus, grads, grads, value=1 - b2)
        us = torch._foreach_div(mus, bc1s)
        # the denominators a chunk of leaves at a time (the same arithmetic), so that besides
        # the directions only one chunk's denominators are alive at once
        for chunk in _treemath.chunks_by_size(nus, DENOMINATOR_CHUNK):
            ns = [nus[j] for j in chunk]
            if eps_root:
                denom = torch._foreach_div(ns, [bc2s[j] for j in chunk])
                torch._foreach_add_(denom, eps_root)
                torch._foreach_sqrt_(denom)
            else:
                denom = torch._foreach_sqrt(ns)
                torch._foreach_div_(denom, [_sqrt(bc2s[j]) for j in chunk])
            torch._foreach_add_(denom, eps)
            if floor_denominator:  # one multi-tensor clamp per moment dtype
                for dtype in {d.dtype for d in denom}:
                    torch._foreach_clamp_min_([d for d in denom if d.dtype == dtype], torch.finfo(dtype).tiny)
            torch._foreach_div_([us[j] for j in chunk], denom)
            denom = None
        return us, mus, nus

    def dense_directions(grads, mus, nus, bc1s, bc2s, counts, inplace):
        """Adam's directions for leaves with a full second moment: ``(directions, mus, nus)``
        by the kernel ``kernel`` selects."""
        fast = kernel != "loop" and multi_tensor_ok(grads + mus + nus)
        fused_us = None
        if fast and kernel == "fused" and inplace and eps_root == 0.0 and not floor_denominator:
            fused_us = _fused_directions(grads, mus, nus, counts, b1, b2, eps)
        if fused_us is not None:
            us = fused_us
        elif fast:
            # Fast path: multi-tensor kernels (same arithmetic as below), one call per operation
            # for the plain tensors and one for the DTensors (foreach kernels do not mix them: the
            # eigenbasis form under FSDP2 hands Adam plain cores and DTensor vectors together).
            us = [None] * len(grads)
            for part in _same_kind(grads):
                u, m, v = multi_tensor([grads[j] for j in part], [mus[j] for j in part], [nus[j] for j in part],
                                       [bc1s[j] for j in part], [bc2s[j] for j in part], inplace)
                for k, j in enumerate(part):
                    us[j], mus[j], nus[j] = u[k], m[k], v[k]
        else:
            us = []
            for j, (g, m, v, bc1, bc2) in enumerate(zip(grads, mus, nus, bc1s, bc2s)):
                if inplace:
                    m = m.lerp_(g, 1 - b1)
                    v = v.mul_(b2).addcmul_(g, g, value=1 - b2)
                else:
                    m = m.lerp(g, 1 - b1)
                    v = v.mul(b2).addcmul(g, g, value=1 - b2)
                denom = (v / bc2 + eps_root).sqrt_() if eps_root else v.sqrt().div_(_sqrt(bc2))
                denom = denom.add_(eps)
                if floor_denominator:
                    denom = denom.clamp_min_(torch.finfo(denom.dtype).tiny)
                us.append((m / bc1).div_(denom))
                mus[j], nus[j] = m, v
        return us, mus, nus

    def factored_direction(g, m, v, bc1, bc2, inplace):
        """Adam's direction for a leaf whose second moment is factored: ``(direction, mu, nu)``."""
        m = m.lerp_(g, 1 - b1) if inplace else m.lerp(g, 1 - b1)
        g2 = g.reshape(g.shape[0], -1).to(v.dtype).square()
        v = factored_second_moment(v, g2, b2, inplace)
        # floored at this step's own share of Adam's v, (1 - b2) g^2, which Adam's v never falls below
        vhat = torch.maximum(factored_estimate(v, g.shape[0]), g2.mul_(1 - b2)).div_(bc2).reshape(g.shape)
        denom = (vhat.add_(eps_root) if eps_root else vhat).sqrt_().add_(eps)
        if floor_denominator:
            denom = denom.clamp_min_(torch.finfo(denom.dtype).tiny)
        return (m / bc1).div_(denom.to(m.dtype)), m, v

    def update(updates, state, *, params=None, inplace=True):
        g_leaves, spec, mu_leaves, mu_spec = flatten_like_state(updates, state.mu, "the Adam state")
        check_dense_leaves(g_leaves)
        nu_leaves, _ = flatten(state.nu)
        for i, (g, m, v) in enumerate(zip(g_leaves, mu_leaves, nu_leaves)):
            if g is not None and is_factored(m, v):
                sides = factored_shape(g.shape, min_dim=1)
                if sides is None or tuple(v.shape) != (sum(sides),):
                    raise ValueError(f"the Adam state's second moment of leaf {i} has shape {tuple(v.shape)}: neither "
                                     f"the leaf's {tuple(g.shape)} nor a factored one's (m + n,) = "
                                     f"({'-' if sides is None else sum(sides)},)")
        live = [i for i, g in enumerate(g_leaves) if g is not None]
        counts = _leaf_counts(state.count, len(mu_leaves))
        new_counts = list(counts)
        for i, c in zip(live, _incremented([counts[i] for i in live])):
            new_counts[i] = c
        corrections = [_bias_corrections(new_counts[i], b1, b2) for i in live]
        bc1s = [c[0] for c in corrections]
        bc2s = [c[1] for c in corrections]
        grads = [g_leaves[i].to(mu_leaves[i].dtype) for i in live]
        mus = [mu_leaves[i] for i in live]
        nus = [nu_leaves[i] for i in live]
        # the leaves whose second moment is factored (the state says so: a 1-D nu of a matrix)
        fac = [j for j, (m, v) in enumerate(zip(mus, nus)) if is_factored(m, v)]
        us = [None] * len(live)
        for j in fac:
            us[j], mus[j], nus[j] = factored_direction(grads[j], mus[j], nus[j], bc1s[j], bc2s[j], inplace)
        rest = sorted(set(range(len(live))) - set(fac))
        if rest:
            pick = lambda xs: [xs[j] for j in rest]  # noqa: E731
            u, m, v = dense_directions(pick(grads), pick(mus), pick(nus), pick(bc1s), pick(bc2s),
                                       [new_counts[live[j]] for j in rest], inplace)
            for k, j in enumerate(rest):
                us[j], mus[j], nus[j] = u[k], m[k], v[k]
        out, new_mu, new_nu = [None] * len(g_leaves), list(mu_leaves), list(nu_leaves)
        for j, i in enumerate(live):
            out[i] = us[j].to(g_leaves[i].dtype)
            new_mu[i], new_nu[i] = mus[j], nus[j]
        if isinstance(state.count, torch.Tensor):  # the legacy single counter stays one counter
            new_count = increment(state.count)
        else:
            new_count = unflatten(mu_spec, new_counts)
        return unflatten(spec, out), ScaleByAdamState(unflatten(mu_spec, new_mu), unflatten(mu_spec, new_nu), new_count)

    return GradientTransformation(init, update)


def add_decayed_weights(
    weight_decay: float = 0.0, mask: Any | Callable[[Any], Any] | None = None
) -> GradientTransformation:
    r"""Add ``weight_decay * params`` to the updates: :math:`u \leftarrow u + \lambda\,\theta`.

    Placed after :func:`scale_by_adam` and before :func:`scale_by_learning_rate`, this is
    AdamW's decoupled weight decay (:math:`\theta \leftarrow \theta - \eta(u + \lambda\theta)`).

    Args:
        weight_decay: the decay coefficient, >= 0.
        mask: optional tree of bools (or callable ``params -> tree``) selecting the leaves to
            decay (for example matrices only).

    Returns:
        A ``GradientTransformation`` (state ``EmptyState()``, or ``MaskedState`` with a mask).

    Raises:
        ValueError: if ``weight_decay`` is negative, or if ``update`` is called without
            ``params`` while ``weight_decay > 0``.

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.add_decayed_weights(0.1, mask=lambda p: {k: v.ndim >= 2 for k, v in p.items()})
    """
    weight_decay = check_float("weight_decay", weight_decay, low=0.0)

    def init(params):
        return EmptyState()

    def update(updates, state, *, params=None, inplace=True):
        if weight_decay == 0.0:
            return updates, state
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(updates, state, params=params)")
        g_leaves, spec = flatten(updates)
        p_leaves, p_spec = flatten(params)
        check_same_structure("updates", spec, "params", p_spec)
        p_leaves = [None if p is None else p.detach() for p in p_leaves]
        return unflatten(spec, _treemath.add_scaled(g_leaves, p_leaves, weight_decay, inplace=inplace)), state

    tx = GradientTransformation(init, update)
    return tx if mask is None else masked(tx, mask)
