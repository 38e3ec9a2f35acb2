"""Optimizer aliases: plain chains of the library's transforms.

SCAO's table of defaults (``SCAO_DEFAULTS`` and its key groups) and the preconditioner preset
``scao_precondition`` live in :mod:`scao_fx.presets`; their names are importable from here too.
"""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch

from ._validation import check_betas, check_bool, check_choice, check_dtype, check_float, check_int, check_scalar_or_schedule
from .base import GradientTransformation
from .codecs import fp32_codec
from .precond.curvature import curvature_ema
from .precond.orthogonal import NS_COEFFICIENTS
from .precond.rank import full_rank
from .presets import (  # noqa: F401 - re-exported
    SCAO_ADAM_KEYS,
    SCAO_DEFAULTS,
    SCAO_FORM_KEYS,
    SCAO_GUARD_KEYS,
    SCAO_PRECONDITION_KEYS,
    scao_eigenbasis_precondition,
    scao_precondition,
)
from .transforms.adam import ScaleByAdamState, add_decayed_weights, scale_by_adam
from .transforms.combinators import chain, partition
from .transforms.eigenbasis import kronecker_eigenbasis
from .transforms.finite import apply_if_finite
from .transforms.momentum import scale_by_momentum
from .transforms.orthogonal import check_coefficients, scale_by_newton_schulz
from .transforms.quantization import bf16_adam_codecs, int8_adam_codecs, quantize_state
from .transforms.scale import scale_by_learning_rate

__all__ = ["adam", "adamw", "muon", "scao_precondition", "scao", "soap", "SCAO_DEFAULTS"]


#: Accepted values of SCAO's ``moments`` keyword (the storage of Adam's two moments): float32
#: (8 bytes per parameter), bfloat16 (4: stored with stochastic rounding, Adam's arithmetic in
#: float32) or block-wise int8 (about 2.1).
SCAO_MOMENTS = ("float32", "bfloat16", "int8")

#: Accepted values of SCAO's ``second_moment`` keyword: ``"full"`` (Adam's), ``"factored"``
#: (Adafactor's row and column statistics for matrices, ``scale_by_adam(factored=True)``) or
#: ``"auto"`` (factored in the eigenbasis form, full in the seed form and for plain AdamW groups).
SCAO_SECOND_MOMENTS = ("auto", "full", "factored")


def _scale_by_adam_stored(b1: float, b2: float, eps: float, moments: str, moment_dtype: torch.dtype | None,
                          second_moment: str):
    """``scale_by_adam`` with its moments stored as ``moments`` says: ``"float32"`` (the plain
    transform), ``"bfloat16"`` or ``"int8"`` (``quantize_state(scale_by_adam(), codecs,
    leafwise=True)`` with :func:`_moment_codecs`: decoded a chunk of leaves at a time; tensors
    under 4096 entries stay float32); ``second_moment="factored"``: Adafactor's statistics for
    the matrices (:func:`scale_by_adam` with ``factored=True``; ``"auto"`` keeps the full one
    here: this Adam runs in the original coordinates)."""
    moment_dtype = _stored_moment_dtype(moments, moment_dtype)
    factored = _factored(second_moment, "seed")
    if moments == "float32":
        return scale_by_adam(b1, b2, eps, moment_dtype=moment_dtype, factored=factored)
    return quantize_state(scale_by_adam(b1, b2, eps, factored=factored), _moment_codecs(moments), leafwise=True)


def _factored(second_moment: str, form: str) -> bool:
    """Whether ``second_moment`` (checked against :data:`SCAO_SECOND_MOMENTS`) is factored in
    ``form``: ``"auto"`` factors in the eigenbasis form only, where the rotated second moment is
    close to rank one (measured); Adam in the original coordinates (the seed form, plain AdamW
    groups) keeps the full one."""
    choice = check_choice("second_moment", second_moment, SCAO_SECOND_MOMENTS)
    return choice == "factored" or (choice == "auto" and form == "eigenbasis")


def _moment_codecs(moments: str) -> ScaleByAdamState:
    """The codecs of Adam's moments for ``moments="bfloat16"`` (:func:`bf16_adam_codecs`) or
    ``"int8"`` (:func:`int8_adam_codecs`). A factored second moment goes through the same rule
    as any other state tensor: encoded if it has 4096 entries or more (``m + n >= 4096``, e.g.
    an embedding's), float32 otherwise."""
    return bf16_adam_codecs() if moments == "bfloat16" else int8_adam_codecs()


def _stored_moment_dtype(moments: str, moment_dtype: torch.dtype | None) -> torch.dtype | None:
    """The ``moment_dtype`` of the Adam link for ``moments`` (checked): ``moments`` other than
    ``"float32"`` fix the storage, so ``moment_dtype`` must then be left at ``None``."""
    check_choice("moments", moments, SCAO_MOMENTS)
    if moments == "float32":
        return moment_dtype
    if moment_dtype is not None:
        raise ValueError(f"moments={moments!r} sets the moments' storage; moment_dtype must be None, got {moment_dtype!r} "
                         f"(moment_dtype applies to moments='float32')")
    return None


def _adamw_stored(lr, betas, eps, weight_decay, mask, moment_dtype, moments: str,
                  second_moment: str) -> GradientTransformation:
    """:func:`adamw` with its moments stored as ``moments`` says (the same chain, and the same
    state, as ``adamw`` for ``"float32"`` and ``second_moment="full"``)."""
    if check_choice("moments", moments, SCAO_MOMENTS) == "float32" and not _factored(second_moment, "seed"):
        return adamw(lr, betas, eps, weight_decay, mask=mask, moment_dtype=moment_dtype)
    return _decayed_adam_chain(
        lambda b1, b2: _scale_by_adam_stored(b1, b2, eps, moments, moment_dtype, second_moment), lr, betas, eps,
        weight_decay, mask
    )


def _decayed_adam_chain(
    adam_link: Callable[[float, float], GradientTransformation],
    lr: Any, betas: Any, eps: float, weight_decay: float, mask: Any,
) -> GradientTransformation:
    """``chain(adam_link(b1, b2), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))``
    after checking the Adam arguments (betas, lr, eps, weight decay): the one body of
    :func:`adam`, :func:`adamw`, 8-bit moments and the eigenbasis forms."""
    b1, b2 = check_betas("betas", betas)
    check_scalar_or_schedule("lr", lr)
    check_float("eps", eps, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    return chain(adam_link(b1, b2), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))


def adam(
    lr=1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    eps_root: float = 0.0,
    mask: Any = None,
    moment_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    r"""Adam with (optional) decoupled weight decay.

    ``chain(scale_by_adam(b1, b2, eps, eps_root), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(lr))``, i.e.
    :math:`\theta \leftarrow \theta - \eta\,(\hat m / (\sqrt{\hat v} + \epsilon) + \lambda\theta)`.

    Args:
        lr: learning rate: float >= 0, 0-d tensor, or schedule ``count -> lr``.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: denominator epsilon, >= 0.
        weight_decay: decoupled weight decay, >= 0 (default 0: plain Adam).
        eps_root: epsilon inside the square root, >= 0.
        mask: tree of bools (or callable) selecting the leaves that are decayed.
        moment_dtype: dtype of the moments (default: at least float32).

    Returns:
        A three-link chain (state: a tuple of three link states).

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.adam(lr=1e-3)
    """
    return _decayed_adam_chain(
        lambda b1, b2: scale_by_adam(b1, b2, eps, eps_root, moment_dtype=moment_dtype), lr, betas, eps, weight_decay, mask
    )


def adamw(
    lr=1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    *,
    eps_root: float = 0.0,
    mask: Any = None,
    moment_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    r"""AdamW: :func:`adam` with ``weight_decay=0.01`` by default (``torch.optim.AdamW``'s default).

    Matches ``torch.optim.AdamW`` (same hyperparameters) to rounding.

    Args:
        lr: learning rate: float >= 0, 0-d tensor, or schedule ``count -> lr``.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: denominator epsilon, >= 0.
        weight_decay: decoupled weight decay, >= 0 (default 0.01).
        eps_root: epsilon inside the square root, >= 0.
        mask: tree of bools (or callable) selecting the leaves that are decayed.
        moment_dtype: dtype of the moments (default: at least float32).

    Returns:
        The chain ``(scale_by_adam, add_decayed_weights, scale_by_learning_rate)``.

    Example:
        >>> import torch, scao_fx as sf
        >>> params = {"w": torch.zeros(3)}
        >>> tx = sf.adamw(lr=1e-3, weight_decay=0.1)
        >>> state = tx.init(params)
    """
    return adam(lr, betas, eps, weight_decay, eps_root=eps_root, mask=mask, moment_dtype=moment_dtype)


def _muon_labels(muon_mask: Any) -> Any:
    """``partition`` labels (``"muon"`` / ``"adamw"``) from :func:`muon`'s ``muon_mask``."""
    if muon_mask is None:
        return lambda p: "muon" if p.ndim >= 2 else "adamw"
    if callable(muon_mask):

        def label(p):
            chosen = muon_mask(p)
            if not isinstance(chosen, bool):
                raise TypeError(
                    "muon_mask, when callable, is called on each parameter leaf and must return a bool, "
                    f"got {chosen!r} of type {type(chosen).__name__}"
                )
            return "muon" if chosen else "adamw"

        return label
    leaves, spec = optree.tree_flatten(muon_mask, none_is_leaf=True)
    for x in leaves:
        if not isinstance(x, (bool, type(None))):
            raise TypeError(
                "muon_mask must be None, a callable leaf -> bool, or a tree of bools with the parameters' "
                f"structure; found a leaf {x!r} of type {type(x).__name__}"
            )
    return optree.tree_unflatten(spec, [None if x is None else ("muon" if x else "adamw") for x in leaves])


def muon(
    lr=1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
    *,
    adamw_lr=None,
    adamw_betas: tuple[float, float] = (0.9, 0.999),
    adamw_eps: float = 1e-8,
    adamw_weight_decay: float | None = None,
    muon_mask: Any = None,
    ns_dtype: torch.dtype | None = torch.bfloat16,
    grouped: bool = False,
    moment_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    r"""Muon on the matrix leaves, AdamW on the others: ``torch.optim.Muon`` + ``torch.optim.AdamW``.

    It is exactly::

        partition({
            "muon": chain(scale_by_momentum(momentum, nesterov),
                          scale_by_newton_schulz(ns_steps, ns_coefficients, eps, adjust_lr),
                          add_decayed_weights(weight_decay),
                          scale_by_learning_rate(lr)),
            "adamw": adamw(adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay),
        }, labels)

    so that a matrix :math:`W` (``m x n``) moves by

    .. math::
        m_t = \mu\, m_{t-1} + (1-\mu)\, g_t,\quad
        \tilde m_t = (1-\mu) g_t + \mu m_t \ \text{(nesterov)},\\
        W_t = W_{t-1} - \eta\,\big(s(m, n)\,\mathrm{NS}_k(\tilde m_t) + \lambda W_{t-1}\big)

    which is ``torch.optim.Muon``'s step (it applies ``W *= 1 - lr * weight_decay`` before
    adding the orthogonalised update, both from :math:`W_{t-1}`; the decay uses the unadjusted
    learning rate). The arguments before ``*`` and their defaults are ``torch.optim.Muon``'s, in
    its order. Leaves of two or more dimensions go to Muon (trailing dimensions flattened,
    as :func:`~scao_fx.scale_by_newton_schulz` does), the others to AdamW; pass ``muon_mask``
    to send embeddings and output heads to AdamW too.

    Args:
        lr: Muon's learning rate: float >= 0, 0-d tensor, or schedule ``count -> lr``.
        weight_decay: Muon's decoupled weight decay, >= 0 (parameters shrink by
            ``lr * weight_decay`` per step).
        momentum: momentum decay :math:`\mu`, in [0, 1).
        nesterov: Nesterov look-ahead (see :func:`~scao_fx.scale_by_momentum`).
        ns_coefficients: ``(a, b, c)`` of the Newton-Schulz polynomial.
        eps: floor of each matrix's norm in Newton-Schulz, > 0.
        ns_steps: Newton-Schulz iterations, >= 1.
        adjust_lr_fn: the shape factor :math:`s(m, n)`: ``None`` or ``"original"``
            (:math:`\sqrt{\max(1, m/n)}`), or ``"match_rms_adamw"`` (:math:`0.2\sqrt{\max(m, n)}`).
        adamw_lr: AdamW's learning rate (float, 0-d tensor or schedule); default ``lr``.
        adamw_betas: AdamW's ``(beta1, beta2)``, each in [0, 1).
        adamw_eps: AdamW's epsilon, >= 0.
        adamw_weight_decay: AdamW's decoupled weight decay, >= 0; default ``weight_decay``.
        muon_mask: which leaves Muon trains: ``None`` (every leaf of two or more dimensions), a
            tree of bools with the parameters' structure, or a callable ``leaf -> bool`` called
            on each parameter (as :func:`~scao_fx.partition`'s labels). A selected leaf must have
            two or more dimensions.
        ns_dtype: dtype of the Newton-Schulz iteration (default bfloat16, as ``torch.optim.Muon``);
            ``None``: the update's dtype.
        grouped: batch the Newton-Schulz products over leaves of one matrix shape (see
            :func:`~scao_fx.scale_by_newton_schulz`; default False: ``torch.optim.Muon``'s exact
            per-matrix operations).
        moment_dtype: dtype of the momentum and of Adam's moments (default: at least float32).

    Returns:
        A ``GradientTransformation`` with state ``PartitionState({"adamw": adamw state,
        "muon": (ScaleByMomentumState, EmptyState(), EmptyState(), EmptyState())})``.

    Raises:
        ValueError: at ``init`` if ``muon_mask`` selects a leaf of fewer than two dimensions.

    Example:
        >>> import torch, scao_fx as sf
        >>> params = {"embed": torch.zeros(100, 16), "w": torch.zeros(16, 32), "b": torch.zeros(32)}
        >>> tx = sf.muon(lr=0.02, adamw_lr=3e-4, muon_mask={"embed": False, "w": True, "b": False})
        >>> state = tx.init(params)
        >>> sorted(state.inner_states), len(state.inner_states["muon"][0].mu)   # "w" only
        (['adamw', 'muon'], 1)
    """
    check_scalar_or_schedule("lr", lr)
    check_float("weight_decay", weight_decay, low=0.0)
    check_float("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    check_bool("nesterov", nesterov)
    check_coefficients("ns_coefficients", ns_coefficients)
    check_float("eps", eps, low=0.0, low_inclusive=False)
    check_int("ns_steps", ns_steps, low=1)
    check_dtype("ns_dtype", ns_dtype)
    check_bool("grouped", grouped)
    check_choice("adjust_lr_fn", adjust_lr_fn, (None, "original", "match_rms_adamw"))
    if adamw_lr is None:
        adamw_lr = lr
    else:
        check_scalar_or_schedule("adamw_lr", adamw_lr)
    adamw_b1, adamw_b2 = check_betas("adamw_betas", adamw_betas)
    check_float("adamw_eps", adamw_eps, low=0.0)
    if adamw_weight_decay is None:
        adamw_weight_decay = weight_decay
    else:
        check_float("adamw_weight_decay", adamw_weight_decay, low=0.0)
    labels = _muon_labels(muon_mask)
    tx = partition(
        {
            "muon": chain(
                scale_by_momentum(momentum, nesterov, moment_dtype=moment_dtype),
                scale_by_newton_schulz(
                    ns_steps, ns_coefficients, eps, adjust_lr_fn or "original", dtype=ns_dtype, grouped=grouped
                ),
                add_decayed_weights(weight_decay),
                scale_by_learning_rate(lr),
            ),
            "adamw": adam(adamw_lr, (adamw_b1, adamw_b2), adamw_eps, adamw_weight_decay, moment_dtype=moment_dtype),
        },
        labels,
    )

    def init(params):
        state = tx.init(params)  # checks the mask's tree structure first
        leaves = optree.tree_leaves(params, none_is_leaf=True)
        labs = [None if p is None else labels(p) for p in leaves] if callable(labels) else optree.tree_leaves(
            labels, none_is_leaf=True
        )
        for i, (p, lab) in enumerate(zip(leaves, labs)):
            if lab == "muon" and p is not None and p.ndim < 2:
                raise ValueError(
                    f"muon_mask selects parameter leaf {i} of shape {tuple(p.shape)}; Muon trains leaves of "
                    "two or more dimensions, the others go to AdamW"
                )
        return state

    return GradientTransformation(init, tx.update)


def scao(
    lr=SCAO_DEFAULTS["lr"],
    betas: tuple[float, float] = SCAO_DEFAULTS["betas"],
    eps: float = SCAO_DEFAULTS["eps"],
    weight_decay: float = SCAO_DEFAULTS["weight_decay"],
    *,
    moments: str = SCAO_DEFAULTS["moments"],
    second_moment: str = SCAO_DEFAULTS["second_moment"],
    mask: Any = None,
    moment_dtype: torch.dtype | None = None,
    skip_nonfinite: bool = SCAO_DEFAULTS["skip_nonfinite"],
    max_consecutive_skips: int = SCAO_DEFAULTS["max_consecutive_skips"],
    host_sync: bool | None = SCAO_DEFAULTS["host_sync"],
    **precondition_kwargs: Any,
) -> GradientTransformation:
    r"""SCAO: Adam in the eigenbases of int8 Kronecker factors, guarded against non-finite steps.

    The default form (``form="eigenbasis"``) is ``apply_if_finite(chain(kronecker_eigenbasis(
    scale_by_adam(b1, b2, eps, factored=True), curvature=curvature_ema(rho, int8_blockwise(block_size),
    basis_dtype=bfloat16), rank=full_rank(), precond_freq, eigensolver="eigh",
    skip_first=True), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr)))``:
    for every matrix, Adam runs in the eigenbases of its two factors (SOAP's form), with the
    factors' statistics in block-wise int8, the bases in bfloat16 and Adam's second moment
    factored (row and column statistics) for every rotated matrix with both sides at least 128;
    step 1 only builds the first bases. ``epsilon_sparse > 0`` or an integer ``k_max`` truncate the bases adaptively (Adam in the
    original coordinates on the complement; see :func:`~scao_fx.kronecker_eigenbasis`). The seed
    form's keywords (``warmup_steps``, ``blend_steps``, ``min_precond_updates``, ``tau``,
    ``complement``, ``graft``, ``blend_shape``) must then stay at their defaults (``ValueError``
    otherwise).

    ``form="seed"`` builds the original SCAO formula instead:
    ``apply_if_finite(chain(scao_precondition(**kw), adamw(lr, betas, eps, weight_decay)))``,
    Adam's moments tracking the blended, low-rank preconditioned gradient.

    Both forms take ``process_group`` (refreshes spread over its ranks) and FSDP2's DTensor
    updates (see ``docs/distributed.md``). The defaults (``scao_fx.presets.SCAO_DEFAULTS``) were
    chosen on the project's GPT benchmark (``docs/scao.md``, "The default, how it was chosen").

    A step whose gradients hold a NaN or Inf, or an entry so large its square would overflow the statistics, is skipped
    for the whole tree, leaving parameters and state exactly as they were
    (:func:`~scao_fx.apply_if_finite` with ``skip_overflow=True``); ``skip_nonfinite=False``
    drops that guard and returns the bare chain.

    Args:
        lr: learning rate (float, 0-d tensor or schedule).
        betas: Adam betas, each in [0, 1).
        eps: Adam epsilon, >= 0.
        weight_decay: decoupled weight decay, >= 0.
        moments: storage of Adam's two moments: ``"bfloat16"`` (the default; 4 bytes per
            parameter: both moments stored in bfloat16 with stochastic rounding,
            which is unbiased, so they do not stall where a step is below bfloat16's resolution,
            e.g. the second moment with ``beta2=0.999``; Adam's arithmetic in float32),
            ``"float32"`` (8 bytes) or ``"int8"`` (8-bit Adam: block-wise int8 with one float32 scale per 64 entries, the
            second moment stored as its square root; about 2.1 bytes per parameter). Tensors
            under 4096 entries stay float32. Seed form: ``quantize_state(scale_by_adam(...),
            codecs)``; eigenbasis form: ``kronecker_eigenbasis(..., moment_codecs=codecs)``, which
            decodes the moments a group of matrices at a time, just before that group's Adam
            step and its refresh, so the step's peak stays near the float32 moments' (see
            docs/memory.md). With
            ``"bfloat16"`` or ``"int8"``, ``moment_dtype`` must be ``None``.
        second_moment: ``"auto"`` (default: ``"factored"`` in the eigenbasis form, ``"full"`` in
            the seed form), ``"full"`` (Adam's second moment, one entry per parameter) or
            ``"factored"``: for every matrix whose sides are both at least 128 (in the eigenbasis
            form: every rotated matrix of such a size), Adafactor's row and column means of the
            squared (rotated) gradient, read as :math:`\hat v = \max(r c^\top / \mathrm{mean}(r),
            (1-\beta_2) g^2)` (:func:`~scao_fx.scale_by_adam` with ``factored=True``): ``m + n``
            float32 entries instead of ``m n`` (stored as ``moments`` says where ``m + n >=
            4096``). In the eigenbasis the factors' Kronecker structure makes the rotated
            gradient's second moment close to rank one, which is what the factored form models;
            on the GPT benchmark it ended level with the full second moment at the same learning
            rate (five paired seeds, ``docs/benchmarks.md``). In the seed form Adam runs in the
            original coordinates, where it was not measured. Requires ``moment_at_refresh``
            "rotate" or "keep" in the eigenbasis form.
        mask: weight-decay mask (tree of bools or callable).
        moment_dtype: dtype of Adam's moments (default: at least float32).
        skip_nonfinite: wrap the chain in :func:`~scao_fx.apply_if_finite` (default True).
        max_consecutive_skips: consecutive non-finite steps tolerated before
            :class:`~scao_fx.NonFiniteGradientError`, >= 1.
        host_sync: how the finite flag reaches the host (see :func:`~scao_fx.apply_if_finite`).
        **precondition_kwargs: any argument of :func:`scao_precondition`, ``form``:
            ``"eigenbasis"`` (default) or ``"seed"``, and ``skip_first`` (the eigenbasis form's
            step-1 rule, default True; see :func:`~scao_fx.kronecker_eigenbasis`).

    Returns:
        ``ApplyIfFiniteState`` around the chain state (eigenbasis form: ``(kronecker_eigenbasis
        state, decay state, learning-rate state)``; seed form: ``(scao_precondition state, adamw
        state)``); with ``skip_nonfinite=False``, the chain state itself.

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.scao(lr=3e-3, precond_freq=10)
        >>> seed = sf.scao(lr=1e-3, form="seed", warmup_steps=50, precond_freq=10)
    """
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")
    check_int("max_consecutive_skips", max_consecutive_skips, low=1)
    form = check_choice("form", precondition_kwargs.pop("form", SCAO_DEFAULTS["form"]), ("seed", "eigenbasis"))
    check_choice("moments", moments, SCAO_MOMENTS)
    factored = _factored(second_moment, form)
    check_bool("skip_first", precondition_kwargs.get("skip_first", SCAO_DEFAULTS["skip_first"]))
    if form == "seed" and precondition_kwargs.pop("skip_first", SCAO_DEFAULTS["skip_first"]) != SCAO_DEFAULTS["skip_first"]:
        raise ValueError(f"skip_first applies to form='eigenbasis' only; with form='seed' leave it at its default "
                         f"{SCAO_DEFAULTS['skip_first']!r}")
    if form == "eigenbasis":
        def eigenbasis(inner: GradientTransformation, b2: float) -> GradientTransformation:
            # Adam is leafwise; compressed moments are decoded a group at a time, inside the link
            return scao_eigenbasis_precondition(
                inner, precondition_kwargs, leafwise_inner=True,
                moment_codecs=None if moments == "float32" else _moment_codecs(moments))

        tx = _adam_in_eigenbasis(eigenbasis, lr, betas, eps, weight_decay, mask,
                                 _stored_moment_dtype(moments, moment_dtype), factored=factored)
    else:
        tx = chain(
            scao_precondition(**precondition_kwargs),
            _adamw_stored(lr, betas, eps, weight_decay, mask, moment_dtype, moments, second_moment),
        )
    if not skip_nonfinite:
        return tx
    return apply_if_finite(tx, max_consecutive_skips, host_sync=host_sync, skip_overflow=True)


def soap(
    lr=3e-3,
    betas: tuple[float, float] = (0.95, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    *,
    shampoo_beta: float | None = None,
    precond_freq: int = 10,
    max_precond_dim: int = 10000,
    mask: Any = None,
    moment_dtype: torch.dtype | None = None,
    grouped: bool = True,
    eigensolver: str = "power",
    skip_first: bool = True,
    process_group: Any = None,
) -> GradientTransformation:
    r"""SOAP: Adam in the eigenbases of full-rank, float32 Kronecker factors, with decoupled weight decay.

    ``chain(kronecker_eigenbasis(scale_by_adam(b1, b2, eps), curvature=curvature_ema(shampoo_beta,
    fp32_codec()), rank=full_rank(), precond_freq=precond_freq, max_precond_dim=max_precond_dim,
    eigensolver=eigensolver, skip_first=skip_first), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(lr))``: for a matrix leaf,

    .. math::
        L \leftarrow \beta_s L + (1-\beta_s) G G^\top,\quad R \leftarrow \beta_s R + (1-\beta_s) G^\top G,\qquad
        u = Q_L\,\mathrm{Adam}(Q_L^\top G Q_R)\,Q_R^\top,\qquad \theta \leftarrow \theta - \eta\,(u + \lambda\theta),

    where :math:`Q_L, Q_R` are the eigenbases of :math:`L, R`: exact (``eigh``) after step 1,
    then refreshed every ``precond_freq`` steps by one power iteration warm-started from the
    previous basis, each column keeping its position (``eigensolver="power"``; ``"eigh"``
    recomputes them exactly, sorted by eigenvalue). Step 1 only initialises the factors and
    bases: its update is zero (``skip_first=True``) and Adam's first step is step 2, in the
    eigenbasis. Adam's first moment follows the basis at a refresh (the same as keeping it in
    the original coordinates), the second is carried position by position (SOAP, Vyas et al.
    2024). Vectors and scalars get plain Adam (from step 2 with ``skip_first``); sides longer
    than ``max_precond_dim`` are not rotated. Known differences from the reference
    implementation: leaves of more than two dimensions are viewed as ``(shape[0],
    prod(shape[1:]))`` (the reference keeps one factor per dimension), the refresh adds a
    relative Tikhonov term of ``1e-4`` of the mean eigenvalue (eigenvectors unchanged), Adam's
    denominator is :math:`\sqrt{\hat v} + \epsilon` (:func:`scale_by_adam`), and step 1 still
    applies the decoupled weight decay.

    Args:
        lr: learning rate: float >= 0, 0-d tensor, or schedule ``count -> lr``.
        betas: Adam's ``(beta1, beta2)``, each in [0, 1).
        eps: Adam's epsilon, >= 0.
        weight_decay: decoupled weight decay, >= 0.
        shampoo_beta: decay of the factors' EMA, in [0, 1); ``None``: ``betas[1]``.
        precond_freq: steps between basis refreshes, >= 1.
        max_precond_dim: longest side that is rotated, >= 2.
        mask: weight-decay mask (tree of bools or callable).
        moment_dtype: dtype of Adam's moments (default: at least float32).
        grouped: stack same-shape leaves (False: per-leaf loop).
        eigensolver: ``"power"`` (default) or ``"eigh"`` (see :func:`kronecker_eigenbasis`).
        skip_first: zero update at step 1 (default), or plain Adam at step 1 (False).
        process_group: a ``torch.distributed`` process group over which the basis refreshes
            are spread (each factor refreshed by one owner rank, the bases broadcast; same result
            as ``None``); ``None``: every process refreshes everything itself. FSDP2's DTensor
            updates are supported with or without it (see :func:`kronecker_eigenbasis` and
            ``docs/distributed.md``).

    Returns:
        The chain ``(kronecker_eigenbasis, add_decayed_weights, scale_by_learning_rate)``.

    Example:
        >>> import torch, scao_fx as sf
        >>> params = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
        >>> tx = sf.soap(lr=3e-3)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.ones(4, 3), "b": torch.ones(3)}, state, params=params)
    """
    def eigenbasis(inner: GradientTransformation, b2: float) -> GradientTransformation:
        rho = b2 if shampoo_beta is None else check_float("shampoo_beta", shampoo_beta, low=0.0, high=1.0,
                                                          high_inclusive=False)
        return kronecker_eigenbasis(
            inner,
            curvature=curvature_ema(rho, codec=fp32_codec()),
            rank=full_rank(),
            precond_freq=precond_freq,
            max_precond_dim=max_precond_dim,
            grouped=grouped,
            eigensolver=check_choice("eigensolver", eigensolver, ("power", "eigh")),
            skip_first=skip_first,
            process_group=process_group,
            leafwise_inner=True,  # Adam treats every leaf on its own
        )

    return _adam_in_eigenbasis(eigenbasis, lr, betas, eps, weight_decay, mask, moment_dtype)


def _adam_in_eigenbasis(
    eigenbasis: Callable[[GradientTransformation, float], GradientTransformation],
    lr: Any, betas: Any, eps: float, weight_decay: float, mask: Any, moment_dtype: torch.dtype | None,
    factored: bool = False,
) -> GradientTransformation:
    """``chain(eigenbasis(scale_by_adam(b1, b2, eps), b2), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(lr))`` after checking the Adam arguments (the eigenbasis forms of
    :func:`scao` and :func:`soap`)."""
    return _decayed_adam_chain(
        lambda b1, b2: eigenbasis(scale_by_adam(b1, b2, eps, moment_dtype=moment_dtype, factored=factored), b2), lr,
        betas, eps, weight_decay, mask
    )
