"""Optimizer aliases: plain chains of the library's transforms."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import optree
import torch

from ._validation import check_betas, check_bool, check_choice, check_dtype, check_float, check_int, check_scalar_or_schedule
from .base import GradientTransformation
from .codecs import bf16_codec, fp32_codec, int8_blockwise
from .precond.curvature import curvature_ema
from .precond.orthogonal import NS_COEFFICIENTS
from .precond.rank import full_rank, spectral_mass_rank
from .precond.sketch import curvature_sketch
from .transforms.adam import add_decayed_weights, scale_by_adam
from .transforms.blend import blend_ramp
from .transforms.combinators import chain, partition
from .transforms.eigenbasis import kronecker_eigenbasis
from .transforms.finite import apply_if_finite
from .transforms.kronecker import kronecker_precondition
from .transforms.momentum import scale_by_momentum
from .transforms.orthogonal import check_coefficients, scale_by_newton_schulz
from .transforms.scale import scale_by_learning_rate

__all__ = ["adam", "adamw", "muon", "scao_precondition", "scao", "soap", "SCAO_DEFAULTS"]

#: SCAO's default hyperparameters, the one place they are written: :func:`scao_precondition`,
#: :func:`scao` and :class:`scao_fx.SCAO` take their defaults from here (read-only).
SCAO_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        # the Adam part (sf.adamw(lr, betas, eps, weight_decay) after the preconditioner)
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.01,
        # the preconditioner (scao_precondition)
        "rho": 0.999,
        "precond_freq": 20,
        "warmup_steps": 100,
        "blend_steps": 50,
        "min_precond_updates": 10,
        "epsilon_sparse": 0.05,
        "k_min": 8,
        "k_max": 128,
        "max_precond_dim": 4096,
        "tau": None,
        "use_int8_ema": True,
        "block_size": 32,
        "complement": "mean_tail",
        "graft": "frobenius",
        "blend_shape": "linear",
        "tikhonov": 1e-4,
        "grouped": True,
        "sides": "both",
        "eigensolver": "auto",
        "gram_precision": "float32",
        "curvature": "ema",
        "sketch_rank": 128,
        "sketch_storage": "bfloat16",
        "form": "seed",
        # the non-finite guard (apply_if_finite around the chain)
        "skip_nonfinite": True,
        "max_consecutive_skips": 10,
        "host_sync": None,
    }
)

#: Which keys of :data:`SCAO_DEFAULTS` belong to which part.
SCAO_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay")
SCAO_GUARD_KEYS = ("skip_nonfinite", "max_consecutive_skips", "host_sync")
SCAO_PRECONDITION_KEYS = tuple(k for k in SCAO_DEFAULTS if k not in SCAO_ADAM_KEYS + SCAO_GUARD_KEYS)


class _NotGiven(float):
    """A float default that marks its argument as not given by the caller (it prints as, and
    equals, the default value), so an alias can tell "left at the default" from "passed"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return float.__repr__(self)


def _statistic(curvature: str, rho: float, use_int8_ema: bool, block_size: int, sketch_rank: int, sketch_storage: str):
    """The curvature statistic SCAO's keywords describe (``curvature``, ``use_int8_ema``, ...)."""
    if not isinstance(use_int8_ema, bool):
        raise TypeError(f"use_int8_ema must be a bool, got {use_int8_ema!r}")
    check_choice("curvature", curvature, ("ema", "sketch"))
    check_choice("sketch_storage", sketch_storage, ("bfloat16", "int8", "float32"))
    if curvature == "sketch":
        frame = {"bfloat16": bf16_codec(), "int8": int8_blockwise(block_size), "float32": fp32_codec()}[sketch_storage]
        basis_dtype = torch.float32 if sketch_storage == "float32" else torch.bfloat16
        return curvature_sketch(sketch_rank, rho, frame, basis_dtype=basis_dtype)
    return curvature_ema(rho, codec=int8_blockwise(block_size) if use_int8_ema else fp32_codec())


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
    b1, b2 = check_betas("betas", betas)
    check_scalar_or_schedule("lr", lr)
    check_float("eps", eps, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, moment_dtype=moment_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(lr),
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


def scao_precondition(
    rho: float = SCAO_DEFAULTS["rho"],
    precond_freq: int = SCAO_DEFAULTS["precond_freq"],
    warmup_steps: int = SCAO_DEFAULTS["warmup_steps"],
    blend_steps: int = SCAO_DEFAULTS["blend_steps"],
    min_precond_updates: int = SCAO_DEFAULTS["min_precond_updates"],
    epsilon_sparse: float = _NotGiven(SCAO_DEFAULTS["epsilon_sparse"]),
    k_min: int = SCAO_DEFAULTS["k_min"],
    k_max: int = SCAO_DEFAULTS["k_max"],
    max_precond_dim: int = SCAO_DEFAULTS["max_precond_dim"],
    tau: float | None = SCAO_DEFAULTS["tau"],
    use_int8_ema: bool = SCAO_DEFAULTS["use_int8_ema"],
    *,
    block_size: int = SCAO_DEFAULTS["block_size"],
    complement: str = SCAO_DEFAULTS["complement"],
    graft: str = SCAO_DEFAULTS["graft"],
    blend_shape: str = SCAO_DEFAULTS["blend_shape"],
    tikhonov: float = SCAO_DEFAULTS["tikhonov"],
    grouped: bool = SCAO_DEFAULTS["grouped"],
    rank_eps: float | None = None,
    sides: str = SCAO_DEFAULTS["sides"],
    eigensolver: str = SCAO_DEFAULTS["eigensolver"],
    gram_precision: str = SCAO_DEFAULTS["gram_precision"],
    process_group: Any = None,
    curvature: str = SCAO_DEFAULTS["curvature"],
    sketch_rank: int = SCAO_DEFAULTS["sketch_rank"],
    sketch_storage: str = SCAO_DEFAULTS["sketch_storage"],
    form: str = SCAO_DEFAULTS["form"],
) -> GradientTransformation:
    r"""SCAO's preconditioner, built from its five named parts.

    It is exactly::

        blend_ramp(
            kronecker_precondition(
                curvature=curvature_ema(rho, codec=int8_blockwise(block_size)),   # 1 + 2
                rank=spectral_mass_rank(epsilon_sparse, k_min, k_max),          # 3
                precond_freq=precond_freq, max_precond_dim=max_precond_dim,
                complement=complement, graft=graft, tau=tau),                   # 4
            warmup_steps=warmup_steps, blend_steps=blend_steps,
            min_precond_updates=min_precond_updates, shape=blend_shape)         # 5

    Follow it with :func:`adamw` (part 6), or use :func:`scao`. Each part is one edit away from
    its ablation (see the docs' ablation table). The defaults are SCAO's, from
    ``scao_fx.alias.SCAO_DEFAULTS`` (shared with :func:`scao` and :class:`~scao_fx.SCAO`).

    Args:
        rho: curvature EMA decay, in [0, 1).
        precond_freq: steps between basis refreshes, >= 1.
        warmup_steps: steps of plain gradient before the ramp, >= 0.
        blend_steps: ramp length, >= 0.
        min_precond_updates: curvature updates required before the ramp, >= 0.
        epsilon_sparse: spectral mass that may be discarded, in [0, 1) (alias ``rank_eps``).
        k_min: smallest rank, >= 1.
        k_max: largest rank, >= k_min.
        max_precond_dim: longest preconditioned side, >= 2.
        tau: optional cap on :math:`\lVert P(G)\rVert / \lVert G\rVert` (with ``graft="none"``).
        use_int8_ema: store curvature in block-wise int8 (False: float32).
        block_size: int8 block size, >= 8.
        complement: ``"mean_tail"``, ``"kth"`` or ``"none"`` (see :func:`kronecker_precondition`).
        graft: ``"frobenius"`` or ``"none"``.
        blend_shape: ``"linear"`` or ``"cosine"``.
        tikhonov: relative Tikhonov factor, >= 0.
        grouped: stack same-shape leaves (False: per-leaf loop).
        sides: ``"both"``, or ``"wide"`` (only the longer side of non-square matrices: LoRA).
        eigensolver: ``"auto"``, ``"eigh"`` or ``"subspace"`` (see :func:`kronecker_precondition`).
        gram_precision: ``"float32"`` or ``"bfloat16"`` inputs of the curvature's Gram products
            (see :func:`kronecker_precondition`).
        process_group: spread basis refreshes over this ``torch.distributed`` group (see
            :func:`kronecker_precondition` and ``docs/distributed.md``); ``None``: local.
        rank_eps: alternative name of ``epsilon_sparse``.
        curvature: ``"ema"`` (full factors, :func:`curvature_ema`) or ``"sketch"`` (low-rank
            frequent-directions sketches, :func:`curvature_sketch`: :math:`O((m+n)\ell)` memory per
            matrix; ``use_int8_ema`` then does not apply).
        sketch_rank: the sketch's width :math:`\ell` per side, >= 2 (``curvature="sketch"``).
        sketch_storage: storage of the sketch's frame and of the preconditioner basis
            (``curvature="sketch"``): ``"bfloat16"`` (both bf16), ``"int8"`` (frame int8 with
            ``block_size`` blocks, basis bf16) or ``"float32"``.
        form: ``"seed"`` (this preconditioner, followed by Adam). ``"eigenbasis"`` runs Adam
            *inside* the preconditioner (:func:`~scao_fx.kronecker_eigenbasis`), so it is a form
            of the whole optimizer: ask :func:`scao` for it; here it is a ``ValueError``.

    Returns:
        A ``GradientTransformation`` with state ``BlendRampState(KroneckerPreconditionState, count)``.

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.chain(sf.scao_precondition(rank_eps=0.05, precond_freq=20, warmup_steps=100),
        ...               sf.adamw(lr=3.5e-4, weight_decay=0.1))
    """
    given = not isinstance(epsilon_sparse, _NotGiven)
    if rank_eps is not None:
        if given and epsilon_sparse != rank_eps:
            raise ValueError(f"give either epsilon_sparse or rank_eps, not both ({epsilon_sparse!r} vs {rank_eps!r})")
        epsilon_sparse = rank_eps
    elif not given:
        epsilon_sparse = SCAO_DEFAULTS["epsilon_sparse"]  # the plain float
    # Validated here under the names the caller used (the parts call them epsilon and shape).
    check_float("rank_eps" if rank_eps is not None else "epsilon_sparse", epsilon_sparse, low=0.0, high=1.0,
                high_inclusive=False)
    check_choice("blend_shape", blend_shape, ("linear", "cosine"))
    if check_choice("form", form, ("seed", "eigenbasis")) == "eigenbasis":
        raise ValueError(
            "form='eigenbasis' runs Adam inside the preconditioner: build the whole optimizer with "
            "sf.scao(..., form='eigenbasis') (or sf.kronecker_eigenbasis(...)), not scao_precondition"
        )
    statistic = _statistic(curvature, rho, use_int8_ema, block_size, sketch_rank, sketch_storage)
    return blend_ramp(
        kronecker_precondition(
            curvature=statistic,
            rank=spectral_mass_rank(epsilon_sparse, k_min, k_max),
            precond_freq=precond_freq,
            max_precond_dim=max_precond_dim,
            complement=complement,
            graft=graft,
            tau=tau,
            tikhonov=tikhonov,
            grouped=grouped,
            sides=sides,
            eigensolver=eigensolver,
            gram_precision=gram_precision,
            process_group=process_group,
        ),
        warmup_steps=warmup_steps,
        blend_steps=blend_steps,
        shape=blend_shape,
        min_precond_updates=min_precond_updates,
    )


def scao(
    lr=SCAO_DEFAULTS["lr"],
    betas: tuple[float, float] = SCAO_DEFAULTS["betas"],
    eps: float = SCAO_DEFAULTS["eps"],
    weight_decay: float = SCAO_DEFAULTS["weight_decay"],
    *,
    mask: Any = None,
    moment_dtype: torch.dtype | None = None,
    skip_nonfinite: bool = SCAO_DEFAULTS["skip_nonfinite"],
    max_consecutive_skips: int = SCAO_DEFAULTS["max_consecutive_skips"],
    host_sync: bool | None = SCAO_DEFAULTS["host_sync"],
    **precondition_kwargs: Any,
) -> GradientTransformation:
    r"""SCAO: ``apply_if_finite(chain(scao_precondition(**kw), adamw(lr, betas, eps, weight_decay)))``.

    Adam's moments track the blended, preconditioned gradient; weight decay is decoupled.

    ``form="eigenbasis"`` builds instead ``apply_if_finite(chain(kronecker_eigenbasis(
    scale_by_adam(b1, b2, eps), curvature=<SCAO's statistic>, rank=spectral_mass_rank(
    epsilon_sparse, k_min, k_max), precond_freq=..., ...), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(lr)))``: Adam runs in the eigenbases of SCAO's (int8, adaptive-rank)
    factors, Adam in the original coordinates on the complement of the kept subspace
    (see :func:`~scao_fx.kronecker_eigenbasis`). There is no warmup or ramp: the bases are
    refreshed at step 1. The keywords of the seed form only (``warmup_steps``, ``blend_steps``,
    ``min_precond_updates``, ``tau``, ``complement``, ``graft``, ``blend_shape``) must then stay
    at their defaults (``ValueError`` otherwise).
    Published guidance: start from about 1.17x your AdamW learning rate. A step whose gradients
    hold a NaN or Inf, or an entry so large its square would overflow the statistics, is skipped
    for the whole tree, leaving parameters and state exactly as they were
    (:func:`~scao_fx.apply_if_finite` with ``skip_overflow=True``); ``skip_nonfinite=False``
    drops that guard and returns the bare chain.

    Args:
        lr: learning rate (float, 0-d tensor or schedule).
        betas: Adam betas, each in [0, 1).
        eps: Adam epsilon, >= 0.
        weight_decay: decoupled weight decay, >= 0.
        mask: weight-decay mask (tree of bools or callable).
        moment_dtype: dtype of Adam's moments (default: at least float32).
        skip_nonfinite: wrap the chain in :func:`~scao_fx.apply_if_finite` (default True).
        max_consecutive_skips: consecutive non-finite steps tolerated before
            :class:`~scao_fx.NonFiniteGradientError`, >= 1.
        host_sync: how the finite flag reaches the host (see :func:`~scao_fx.apply_if_finite`).
        **precondition_kwargs: any argument of :func:`scao_precondition`, and ``form``:
            ``"seed"`` (default) or ``"eigenbasis"``.

    Returns:
        ``ApplyIfFiniteState`` around the two-link chain state ``(scao_precondition state,
        adamw state)``; with ``skip_nonfinite=False``, the chain state itself.

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.scao(lr=1e-3, warmup_steps=50, precond_freq=10)
    """
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")
    check_int("max_consecutive_skips", max_consecutive_skips, low=1)
    form = check_choice("form", precondition_kwargs.pop("form", SCAO_DEFAULTS["form"]), ("seed", "eigenbasis"))
    if form == "eigenbasis":
        b1, b2 = check_betas("betas", betas)
        check_scalar_or_schedule("lr", lr)
        check_float("eps", eps, low=0.0)
        check_float("weight_decay", weight_decay, low=0.0)
        tx = chain(
            _scao_eigenbasis(scale_by_adam(b1, b2, eps, moment_dtype=moment_dtype), precondition_kwargs),
            add_decayed_weights(weight_decay, mask),
            scale_by_learning_rate(lr),
        )
    else:
        tx = chain(
            scao_precondition(**precondition_kwargs),
            adamw(lr, betas, eps, weight_decay, mask=mask, moment_dtype=moment_dtype),
        )
    if not skip_nonfinite:
        return tx
    return apply_if_finite(tx, max_consecutive_skips, host_sync=host_sync, skip_overflow=True)


#: Keywords of :func:`scao_precondition` that only the seed form reads (its power, complement
#: gain, graft and blend ramp); the eigenbasis form requires them at their defaults.
_SEED_ONLY_KEYS = ("warmup_steps", "blend_steps", "min_precond_updates", "tau", "complement", "graft", "blend_shape")


def _scao_eigenbasis(inner: GradientTransformation, kw: dict[str, Any]) -> GradientTransformation:
    """``kronecker_eigenbasis(inner, ...)`` from :func:`scao_precondition`'s keywords (``form="eigenbasis"``)."""
    kw = dict(kw)
    unknown = sorted(set(kw) - set(SCAO_PRECONDITION_KEYS) - {"rank_eps", "process_group"})
    if unknown:
        raise TypeError(f"scao got unexpected keyword argument(s) {unknown}")
    if kw.get("process_group") is not None:
        raise ValueError("form='eigenbasis' does not support process_group yet: pass process_group=None")
    kw.pop("process_group", None)
    rank_eps = kw.pop("rank_eps", None)
    if rank_eps is not None:
        if "epsilon_sparse" in kw and kw["epsilon_sparse"] != rank_eps:
            raise ValueError(f"give either epsilon_sparse or rank_eps, not both ({kw['epsilon_sparse']!r} vs {rank_eps!r})")
        kw["epsilon_sparse"] = rank_eps
    hp = {k: kw.get(k, SCAO_DEFAULTS[k]) for k in SCAO_PRECONDITION_KEYS}
    for key in _SEED_ONLY_KEYS:
        if hp[key] != SCAO_DEFAULTS[key]:
            raise ValueError(
                f"{key} applies to form='seed' only; with form='eigenbasis' leave it at its default "
                f"{SCAO_DEFAULTS[key]!r}, got {hp[key]!r}"
            )
    check_float("epsilon_sparse" if rank_eps is None else "rank_eps", hp["epsilon_sparse"], low=0.0, high=1.0,
                high_inclusive=False)
    statistic = _statistic(hp["curvature"], hp["rho"], hp["use_int8_ema"], hp["block_size"], hp["sketch_rank"],
                           hp["sketch_storage"])
    return kronecker_eigenbasis(
        inner,
        curvature=statistic,
        rank=spectral_mass_rank(hp["epsilon_sparse"], hp["k_min"], hp["k_max"]),
        precond_freq=hp["precond_freq"],
        max_precond_dim=hp["max_precond_dim"],
        tikhonov=hp["tikhonov"],
        grouped=hp["grouped"],
        sides=hp["sides"],
        eigensolver=hp["eigensolver"],
        gram_precision=hp["gram_precision"],
    )


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

    Returns:
        The chain ``(kronecker_eigenbasis, add_decayed_weights, scale_by_learning_rate)``.

    Example:
        >>> import torch, scao_fx as sf
        >>> params = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
        >>> tx = sf.soap(lr=3e-3)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.ones(4, 3), "b": torch.ones(3)}, state, params=params)
    """
    b1, b2 = check_betas("betas", betas)
    check_scalar_or_schedule("lr", lr)
    check_float("eps", eps, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    rho = b2 if shampoo_beta is None else check_float("shampoo_beta", shampoo_beta, low=0.0, high=1.0,
                                                      high_inclusive=False)
    return chain(
        kronecker_eigenbasis(
            scale_by_adam(b1, b2, eps, moment_dtype=moment_dtype),
            curvature=curvature_ema(rho, codec=fp32_codec()),
            rank=full_rank(),
            precond_freq=precond_freq,
            max_precond_dim=max_precond_dim,
            grouped=grouped,
            eigensolver=check_choice("eigensolver", eigensolver, ("power", "eigh")),
            skip_first=skip_first,
        ),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(lr),
    )
