"""Diagnostics of SCAO states, read on demand (nothing is computed in the step).

:func:`scao_diagnostics` walks a functional state of either form of :func:`scao_fx.scao`: the
eigenbasis form (the default: anything containing a
:class:`~scao_fx.transforms.eigenbasis.KroneckerEigenbasisState`, e.g. ``sf.scao()`` or a chain
with ``sf.kronecker_eigenbasis(...)``) or the seed form (``sf.scao(form="seed")``,
``chain(scao_precondition(...), ...)`` or anything containing a
:class:`~scao_fx.transforms.blend.BlendRampState` around a
:class:`~scao_fx.transforms.kronecker.KroneckerPreconditionState`), and reports, per leaf:

=====================  ======================================================================
``shape``              the leaf's matrix view ``(m, n)`` (``None`` for 0-d/1-d leaves)
``sides``              preconditioned sides: ``"both"``, ``"left"``, ``"right"`` or ``"none"``
``rank_left/right``    kept rank ``k`` of each side (0 before the first refresh, ``None`` if the
                       side is not preconditioned); in the eigenbasis form the kept width of
                       the rotation (every direction with the default full rank)
``phase``              ``"warmup"`` (plain Adam), ``"ramp"`` (blending in), ``"precond"`` (fully
                       preconditioned) or ``"adam"`` (a leaf that is never preconditioned; in
                       the eigenbasis form also every leaf before the first refresh)
``blend``              the blend weight ``b`` of the current step, in [0, 1] (eigenbasis form:
                       0.0 or 1.0, see below)
``curvature_norm_*``   Frobenius norm of the debiased curvature factor of each side
``refreshes``          basis refreshes done so far
``fallbacks_*``        refreshes whose eigendecomposition failed and kept the last good basis
``step``               steps done
=====================  ======================================================================

**The eigenbasis form** has no warmup and no ramp: the bases are refreshed at the end of step 1
and every later step runs Adam in them. A rotated leaf's ``phase`` is ``"adam"`` after step 1
(whose update was plain Adam, or zero with ``skip_first``, SCAO's default) and ``"precond"``
from step 2 on; ``blend`` is 0.0, then 1.0 (the form switches at once, there is nothing in
between). Like the seed form's, phase and blend follow the schedule: a side that was never
refreshed (its leaf had no gradient at a refresh step yet, or every refresh of it failed: see
``fallbacks_*``) has rank 0 and rotates by the identity. Leaves with no rotated side (vectors,
scalars, matrices whose sides are all longer than ``max_precond_dim``) are ``"adam"`` always.

Every value comes from state tensors (ranks, counters and factors live in the state already), so
the optimizer step pays nothing for diagnostics; reading them as Python numbers synchronises
with the device once, at the time you ask. ``as_tensors=True`` returns tensors instead (no sync).
"""

from __future__ import annotations

from typing import Any, Sequence

import optree
import torch

from ._tree import find_nodes
from ._validation import check_choice, check_float, check_int
from .codecs import Codec, EncodedTensor, int8_blockwise
from .precond.curvature import curvature_ema, statistics_schedule
from .precond.sketch import SketchStatistic, curvature_sketch
from .presets import SCAO_DEFAULTS
from .transforms.adam import ScaleByAdamState
from .transforms.blend import BlendRampState, blend_factor
from .transforms.eigenbasis import KroneckerEigenbasisState
from .transforms.kronecker import KroneckerPreconditionState

__all__ = ["scao_diagnostics", "summarize_diagnostics", "DIAGNOSTIC_KEYS"]

#: The keys of each per-leaf diagnostics record.
DIAGNOSTIC_KEYS = (
    "shape",
    "sides",
    "rank_left",
    "rank_right",
    "phase",
    "blend",
    "curvature_norm_left",
    "curvature_norm_right",
    "refreshes",
    "fallbacks_left",
    "fallbacks_right",
    "step",
)


def adam_record(shape: tuple[int, int] | None, *, blend: Any, refreshes: Any, step: Any) -> dict[str, Any]:
    """The diagnostics record of a leaf that is not preconditioned (plain Adam).

    Args:
        shape: the leaf's matrix view, or ``None``.
        blend: the blend weight to report.
        refreshes: the refresh count to report.
        step: the step count to report.

    Returns:
        A record with every key of :data:`DIAGNOSTIC_KEYS`.
    """
    return {
        "shape": shape,
        "sides": "none",
        "rank_left": None,
        "rank_right": None,
        "phase": "adam",
        "blend": blend,
        "curvature_norm_left": None,
        "curvature_norm_right": None,
        "refreshes": refreshes,
        "fallbacks_left": None,
        "fallbacks_right": None,
        "step": step,
    }


def _default_codec() -> Codec:
    """The curvature codec of ``scao_precondition()``'s defaults (int8, its default block size)."""
    return int8_blockwise(SCAO_DEFAULTS["block_size"])


def _num_leaves(state: Any) -> int | None:
    eig = find_nodes(state, KroneckerEigenbasisState)
    adam = find_nodes(eig[0].inner_state if eig else state, ScaleByAdamState)
    if not adam:
        return None
    mu = adam[0].mu
    if eig:
        # the eigenbasis form's inner tree (leaves, cores, complements): the rotated leaves are
        # None in the first part, so it has one entry per leaf of the parameter tree
        if not (isinstance(mu, tuple) and len(mu) == 3):
            return None
        return len(optree.tree_flatten(mu[0], none_is_leaf=True)[0])
    # an 8-bit moment (quantize_state) is one EncodedTensor per leaf, not two tensors
    encoded = lambda x: isinstance(x, EncodedTensor)  # noqa: E731
    return len(optree.tree_flatten(mu, is_leaf=encoded, none_is_leaf=True)[0])


def _preconditioner(state: Any) -> tuple[Any, Any]:
    """``(ramp, inner)`` of the seed form (``BlendRampState`` around its
    ``KroneckerPreconditionState``) or ``(None, KroneckerEigenbasisState)`` of the eigenbasis form."""
    ramps = [r for r in find_nodes(state, BlendRampState) if isinstance(r.inner_state, KroneckerPreconditionState)]
    if ramps:
        return ramps[0], ramps[0].inner_state
    eig = find_nodes(state, KroneckerEigenbasisState)
    if eig:
        return None, eig[0]
    raise ValueError(
        "state holds no SCAO preconditioner (a KroneckerEigenbasisState, or a BlendRampState around a "
        "KroneckerPreconditionState); is it the state of sf.scao(...), chain(sf.scao_precondition(...), ...) "
        "or a chain with sf.kronecker_eigenbasis(...)?"
    )


def _ramp_schedule(ramp: BlendRampState, warmup_steps: int, blend_steps: int, min_precond_updates: int,
                   blend_shape: str) -> tuple[Any, str]:
    """The seed form's ``(blend, phase)`` of the last step (from the ramp's state)."""
    recorded = getattr(ramp, "blend", None)  # the blend weight of the last step, if the state keeps it
    if isinstance(recorded, torch.Tensor) and recorded.device.type == "cpu":
        b = float(recorded)  # CPU tensor: no device sync
        return recorded, "warmup" if b <= 0.0 else ("precond" if b >= 1.0 else "ramp")
    start = max(warmup_steps, min_precond_updates)
    blend = blend_factor(ramp.count, start, blend_steps, blend_shape)
    count = int(ramp.count)  # CPU tensor: no device sync
    return blend, "warmup" if count <= start else ("ramp" if count < start + blend_steps else "precond")


def _eigenbasis_schedule(eig: KroneckerEigenbasisState) -> tuple[torch.Tensor, str]:
    """The eigenbasis form's ``(blend, phase)`` of the last step: the bases are first refreshed
    at the end of step 1, so step 1 is plain Adam (or zero, with ``skip_first``) and every later
    step is preconditioned; no ramp (blend 0.0, then 1.0)."""
    on = eig.count >= 2  # CPU tensor: no device sync
    return on.to(torch.float32), "precond" if bool(on) else "adam"


def _group_records(
    records: dict[str, dict[str, Any]],
    labels: Sequence[str],
    groups: Sequence[Any],
    count: torch.Tensor,
    *,
    phase: str,
    readers: tuple[Any, Any] | None,
    out: Any,
) -> None:
    """Fill the records of the preconditioned leaves from their shape groups
    (:class:`~scao_fx.KroneckerGroupState`, the same in both forms), in place.

    ``readers``: ``(curvature_ema reader, sketch reader)`` for the factor norms, ``None`` to skip them.
    """
    for group in groups:
        leaf_ids = group.leaves.tolist()  # CPU tensor
        norms = {}
        for side_name, side in (("left", group.left), ("right", group.right)):
            if side is None or readers is None:
                continue
            dim = side.basis.shape[1]
            # a sketch's norm needs only rho (its core holds the factor's compression)
            reader = readers[1] if isinstance(side.stat, SketchStatistic) else readers[0]
            norms[side_name] = reader.frobenius_norm(side.stat, count, dim)  # (B,)
        m = group.left.basis.shape[1] if group.left is not None else None
        nn = group.right.basis.shape[1] if group.right is not None else None
        for j, leaf in enumerate(leaf_ids):
            rec = records[labels[leaf]]
            rec["sides"] = "both" if (m and nn) else ("left" if m else "right")
            if rec["shape"] is None and m and nn:
                rec["shape"] = (m, nn)
            rec["phase"] = phase
            for side_name, side in (("left", group.left), ("right", group.right)):
                if side is None:
                    continue
                rec[f"rank_{side_name}"] = out(side.rank[j])
                rec[f"fallbacks_{side_name}"] = out(side.fallbacks[j])
                if side_name in norms:
                    rec[f"curvature_norm_{side_name}"] = out(norms[side_name][j])


def scao_diagnostics(
    state: Any,
    *,
    warmup_steps: int = SCAO_DEFAULTS["warmup_steps"],
    blend_steps: int = SCAO_DEFAULTS["blend_steps"],
    min_precond_updates: int = SCAO_DEFAULTS["min_precond_updates"],
    blend_shape: str = SCAO_DEFAULTS["blend_shape"],
    rho: float = SCAO_DEFAULTS["rho"],
    stat_freq: int = SCAO_DEFAULTS["stat_freq"],
    codec: Codec | None = None,
    float32_below: int = SCAO_DEFAULTS["float32_below"],
    names: Sequence[str] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
    curvature_norms: bool = True,
    as_tensors: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per-leaf diagnostics of a SCAO functional state, either form (see the module docs for the keys).

    Seed form: ``blend`` and ``phase`` come from the blend weight the state records at every
    step; the ramp's settings below are only used for states that do not record it. Eigenbasis
    form: the ramp's settings are not used (it has no ramp: ``phase`` is ``"adam"`` after step 1
    and ``"precond"`` from step 2 on, ``blend`` 0.0 then 1.0; see the module docs). In both,
    ``rho``, ``stat_freq``, ``codec`` and ``float32_below`` must be the ones the state was built
    with (they are not stored in the state); the :class:`scao_fx.SCAO` optimizer passes them for
    you (``opt.diagnostics()``).

    Args:
        state: the functional state (e.g. of ``sf.scao(...)``, either form).
        warmup_steps, blend_steps, min_precond_updates, blend_shape: the seed form's blend ramp's
            settings.
        rho: the curvature EMA decay (for the debiased factor norms; a sketch's norm is that of
            its low-rank part).
        stat_freq: the steps between accumulations of the statistics (for their debiasing).
        codec: the curvature storage codec (default: int8 with ``scao_precondition``'s default
            ``block_size``; pass ``fp32_codec()`` for ``use_int8_ema=False``).
        float32_below: the sides kept in float32 whatever ``codec`` says (see
            :func:`~scao_fx.curvature_ema`; default: SCAO's).
        names: one name per leaf of the parameter tree (default: ``"0"``, ``"1"``, ...).
        shapes: the leaves' shapes (to fill ``shape`` for leaves without curvature).
        curvature_norms: decode the factors to report their norms (costs a decode per factor).
        as_tensors: return 0-d tensors instead of Python numbers (no device synchronisation).

    Returns:
        ``{name: record}`` for every leaf of the tree.

    Raises:
        ValueError: if ``state`` holds no SCAO preconditioner state, or ``names`` has the wrong
            length.

    Example:
        >>> import torch, scao_fx as sf
        >>> params = [torch.zeros(4, 3), torch.zeros(3)]
        >>> tx = sf.scao(form="seed", warmup_steps=0, precond_freq=1, min_precond_updates=0)
        >>> state = tx.init(params)
        >>> _, state = tx.update([torch.randn(4, 3), torch.randn(3)], state, params=params)
        >>> d = sf.scao_diagnostics(state, warmup_steps=0, min_precond_updates=0)
        >>> d["0"]["sides"], d["1"]["phase"]
        ('both', 'adam')
        >>> tx = sf.scao()  # the eigenbasis form (the default)
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     _, state = tx.update([torch.randn(4, 3), torch.randn(3)], state, params=params)
        >>> d = sf.scao_diagnostics(state)
        >>> d["0"]["phase"], d["0"]["blend"], d["0"]["rank_left"], d["0"]["rank_right"]
        ('precond', 1.0, 4, 3)
    """
    warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
    blend_steps = check_int("blend_steps", blend_steps, low=0)
    min_precond_updates = check_int("min_precond_updates", min_precond_updates, low=0)
    check_choice("blend_shape", blend_shape, ("linear", "cosine"))
    rho = check_float("rho", rho, low=0.0, high=1.0, high_inclusive=False)
    stat_freq = check_int("stat_freq", stat_freq, low=1)
    ramp, inner = _preconditioner(state)
    if ramp is not None:
        blend, phase = _ramp_schedule(ramp, warmup_steps, blend_steps, min_precond_updates, blend_shape)
        step = ramp.count
    else:
        blend, phase = _eigenbasis_schedule(inner)
        step = inner.count

    n = _num_leaves(state)
    if n is None:
        n = max((int(i) for g in inner.groups for i in g.leaves.tolist()), default=-1) + 1
        if names is not None:
            n = max(n, len(names))
    if names is not None and len(names) != n:
        raise ValueError(f"names must have one entry per leaf ({n}), got {len(names)}")
    labels = [str(i) for i in range(n)] if names is None else [str(x) for x in names]
    readers = None
    if curvature_norms:
        readers = (curvature_ema(rho, codec=_default_codec() if codec is None else codec, float32_below=float32_below),
                   curvature_sketch(rho=rho))

    def out(x: Any) -> Any:
        if as_tensors or x is None:
            return x
        if isinstance(x, torch.Tensor):
            return x.item()
        return x

    records: dict[str, dict[str, Any]] = {}
    for i, label in enumerate(labels):
        shape = None
        if shapes is not None and shapes[i] is not None and len(shapes[i]) >= 2:
            shape = (int(shapes[i][0]), int(torch.Size(shapes[i][1:]).numel()))
        records[label] = adam_record(shape, blend=out(blend), refreshes=out(inner.refreshes), step=out(step))
    updates = statistics_schedule(inner.count, stat_freq)[1]
    _group_records(records, labels, inner.groups, updates, phase=phase, readers=readers, out=out)
    return records


def summarize_diagnostics(records: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Aggregate per-leaf records into a few scalars (for loggers).

    Returns:
        ``{"preconditioned_leaves", "rank_mean", "blend", "refreshes", "solver_fallbacks",
        "phase_warmup", "phase_ramp", "phase_precond", "curvature_norm_max"}`` (counts of leaves per
        phase; ``rank_mean`` over preconditioned sides). Empty records give an empty dict. In
        the eigenbasis form the matrices are in phase ``"adam"`` at step 1 (counted in none of
        the ``phase_*``) and ``"precond"`` afterwards.
    """
    if not records:
        return {}
    pre = [r for r in records.values() if r["sides"] != "none"]
    ranks = [r[k] for r in pre for k in ("rank_left", "rank_right") if r[k] is not None]
    falls = [r[k] for r in pre for k in ("fallbacks_left", "fallbacks_right") if r[k] is not None]
    norms = [r[k] for r in pre for k in ("curvature_norm_left", "curvature_norm_right") if r[k] is not None]
    first = next(iter(records.values()))
    out = {
        "preconditioned_leaves": float(len(pre)),
        "rank_mean": float(sum(float(x) for x in ranks) / len(ranks)) if ranks else 0.0,
        "blend": float(max((float(r["blend"]) for r in pre), default=float(first["blend"]))),
        "refreshes": float(max(float(r["refreshes"]) for r in records.values())),
        "solver_fallbacks": float(sum(float(x) for x in falls)),
        "curvature_norm_max": float(max((float(x) for x in norms), default=0.0)),
    }
    for phase in ("warmup", "ramp", "precond"):
        out[f"phase_{phase}"] = float(sum(1 for r in pre if r["phase"] == phase))
    return out
