"""SCAO's one table of defaults and the preconditioner preset built from it.

:data:`SCAO_DEFAULTS` is the one place SCAO's defaults are written: :func:`scao_precondition`
(here), :func:`~scao_fx.scao` and :class:`~scao_fx.SCAO` take theirs from it. The names are also
importable from :mod:`scao_fx.alias`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from ._validation import check_choice, check_float, check_int
from .base import GradientTransformation
from .codecs import bf16_codec, fp32_codec, int8_blockwise
from .precond.curvature import curvature_ema
from .precond.rank import RankRule, full_rank, spectral_mass_rank
from .precond.sketch import curvature_sketch
from .transforms.blend import blend_ramp
from .transforms.eigenbasis import kronecker_eigenbasis
from .transforms.kronecker import kronecker_precondition

__all__ = [
    "SCAO_DEFAULTS",
    "SCAO_ADAM_KEYS",
    "SCAO_GUARD_KEYS",
    "SCAO_PRECONDITION_KEYS",
    "SCAO_FORM_KEYS",
    "scao_precondition",
    "scao_eigenbasis_precondition",
]

#: SCAO's default hyperparameters, the one place they are written: :func:`scao_precondition`,
#: :func:`~scao_fx.scao` and :class:`scao_fx.SCAO` take their defaults from here (read-only).
SCAO_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        # the Adam part (sf.adamw(lr, betas, eps, weight_decay) after the preconditioner)
        "lr": 5e-3,
        "betas": (0.9, 0.95),
        "eps": 1e-8,
        "weight_decay": 0.01,
        "moments": "bfloat16",
        "second_moment": "auto",
        # the preconditioner (scao_precondition)
        "rho": 0.95,
        "precond_freq": 5,
        "stat_freq": 1,
        "warmup_steps": 100,
        "blend_steps": 50,
        "min_precond_updates": 10,
        "epsilon_sparse": 0.0,
        "k_min": 8,
        "k_max": None,
        "max_precond_dim": 2048,
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
        "rotation_precision": "bfloat16",
        "moment_at_refresh": "rotate",
        "curvature": "ema",
        "sketch_rank": 128,
        "sketch_storage": "bfloat16",
        "basis_storage": "bfloat16",
        "float32_below": 64,
        "form": "eigenbasis",
        "skip_first": True,
        # the non-finite guard (apply_if_finite around the chain)
        "skip_nonfinite": True,
        "max_consecutive_skips": 10,
        "host_sync": None,
    }
)

#: Which keys of :data:`SCAO_DEFAULTS` belong to which part.
SCAO_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "moments", "second_moment")
SCAO_GUARD_KEYS = ("skip_nonfinite", "max_consecutive_skips", "host_sync")
SCAO_FORM_KEYS = ("form", "skip_first")
SCAO_PRECONDITION_KEYS = tuple(k for k in SCAO_DEFAULTS if k not in SCAO_ADAM_KEYS + SCAO_GUARD_KEYS + SCAO_FORM_KEYS)


class _NotGiven(float):
    """A float default that marks its argument as not given by the caller (it prints as, and
    equals, the default value), so an alias can tell "left at the default" from "passed"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return float.__repr__(self)


def _statistic(curvature: str, rho: float, use_int8_ema: bool, block_size: int, sketch_rank: int, sketch_storage: str,
               basis_storage: str, float32_below: int):
    """The curvature statistic SCAO's keywords describe (``curvature``, ``use_int8_ema``, ...)."""
    if not isinstance(use_int8_ema, bool):
        raise TypeError(f"use_int8_ema must be a bool, got {use_int8_ema!r}")
    check_choice("curvature", curvature, ("ema", "sketch"))
    check_choice("sketch_storage", sketch_storage, ("bfloat16", "int8", "float32"))
    check_choice("basis_storage", basis_storage, ("float32", "bfloat16"))
    float32_below = check_int("float32_below", float32_below, low=0)
    if curvature == "sketch":
        # a sketch stores its frame and basis as sketch_storage says and keeps no side exact
        # (float32_below=0); the default values are accepted, being what the caller did not set
        for key, value, accepted in (("basis_storage", basis_storage, (SCAO_DEFAULTS["basis_storage"],)),
                                     ("float32_below", float32_below, (0, SCAO_DEFAULTS["float32_below"]))):
            if value not in accepted:
                raise ValueError(f"{key} applies to curvature='ema'; with curvature='sketch' the frame and basis are "
                                 f"stored as sketch_storage says (got {key}={value!r})")
        frame = {"bfloat16": bf16_codec(), "int8": int8_blockwise(block_size), "float32": fp32_codec()}[sketch_storage]
        basis_dtype = torch.float32 if sketch_storage == "float32" else torch.bfloat16
        return curvature_sketch(sketch_rank, rho, frame, basis_dtype=basis_dtype)
    return curvature_ema(rho, codec=int8_blockwise(block_size) if use_int8_ema else fp32_codec(),
                         basis_dtype=getattr(torch, basis_storage), float32_below=float32_below)


def _rank_rule(epsilon_sparse: float, k_min: int, k_max: int | None) -> RankRule:
    """SCAO's rank rule: :func:`spectral_mass_rank`, or :func:`full_rank` (every direction, no
    truncation) for ``epsilon_sparse=0`` with ``k_max=None``."""
    check_int("k_min", k_min, low=1)
    if epsilon_sparse == 0 and k_max is None:
        return full_rank()
    return spectral_mass_rank(epsilon_sparse, k_min, k_max)


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
    stat_freq: int = SCAO_DEFAULTS["stat_freq"],
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
    rotation_precision: str = SCAO_DEFAULTS["rotation_precision"],
    moment_at_refresh: str = SCAO_DEFAULTS["moment_at_refresh"],
    process_group: Any = None,
    curvature: str = SCAO_DEFAULTS["curvature"],
    sketch_rank: int = SCAO_DEFAULTS["sketch_rank"],
    sketch_storage: str = SCAO_DEFAULTS["sketch_storage"],
    basis_storage: str = SCAO_DEFAULTS["basis_storage"],
    float32_below: int = SCAO_DEFAULTS["float32_below"],
    form: str = "seed",
) -> GradientTransformation:
    r"""SCAO's preconditioner, built from its five named parts.

    It is exactly::

        blend_ramp(
            kronecker_precondition(
                curvature=curvature_ema(rho, codec=int8_blockwise(block_size),
                                        basis_dtype=basis_storage,
                                        float32_below=float32_below),           # 1 + 2
                rank=spectral_mass_rank(epsilon_sparse, k_min, k_max),          # 3
                precond_freq=precond_freq, max_precond_dim=max_precond_dim,
                complement=complement, graft=graft, tau=tau),                   # 4
            warmup_steps=warmup_steps, blend_steps=blend_steps,
            min_precond_updates=min_precond_updates, shape=blend_shape)         # 5

    with ``rank=full_rank()`` when ``epsilon_sparse=0`` and ``k_max=None``. Follow it with
    :func:`adamw` (part 6), or use :func:`scao`. Each part is one edit away from its ablation (see
    the docs' ablation table). The defaults are SCAO's, from ``scao_fx.presets.SCAO_DEFAULTS``
    (shared with :func:`scao` and :class:`~scao_fx.SCAO`, whose default is the eigenbasis form):
    this seed form then keeps every direction with bfloat16 bases; its earlier defaults were
    ``rho=0.999, precond_freq=20, epsilon_sparse=0.05, k_max=128, basis_storage="float32"``
    (Adam's ``betas=(0.9, 0.999)``).

    Args:
        rho: curvature EMA decay, in [0, 1).
        precond_freq: steps between basis refreshes, >= 1.
        stat_freq: steps between accumulations of the curvature statistics (at step 1 and every
            ``stat_freq``-th step; ``rho`` is a decay per accumulation), >= 1.
        warmup_steps: steps of plain gradient before the ramp, >= 0.
        blend_steps: ramp length, >= 0.
        min_precond_updates: curvature updates required before the ramp, >= 0.
        epsilon_sparse: spectral mass that may be discarded, in [0, 1) (alias ``rank_eps``).
        k_min: smallest rank, >= 1.
        k_max: largest rank, >= k_min; ``None``: no cap. ``epsilon_sparse=0`` with ``k_max=None``
            keeps every direction (:func:`full_rank`).
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
        eigensolver: ``"auto"``, ``"eigh"`` or ``"subspace"`` (see :func:`kronecker_precondition`);
            the eigenbasis form with every direction kept also takes ``"power"`` (see
            :func:`~scao_fx.kronecker_eigenbasis`); there ``"auto"`` is an exact ``eigh``.
        gram_precision: ``"float32"`` or ``"bfloat16"`` inputs of the curvature's Gram products
            (see :func:`kronecker_precondition`).
        rotation_precision: ``"float32"`` or ``"bfloat16"`` rotations into and out of the
            eigenbasis: the eigenbasis form's (:func:`~scao_fx.kronecker_eigenbasis`); this
            seed form requires the default.
        moment_at_refresh: how Adam's moments follow the bases at a refresh in the eigenbasis
            form (see :func:`~scao_fx.kronecker_eigenbasis`); this seed form requires the default.
        process_group: spread basis refreshes over this ``torch.distributed`` group (see
            :func:`kronecker_precondition` and ``docs/distributed.md``; the eigenbasis form of
            :func:`scao` takes it too); ``None``: local.
        rank_eps: alternative name of ``epsilon_sparse``.
        curvature: ``"ema"`` (full factors, :func:`curvature_ema`) or ``"sketch"`` (low-rank
            frequent-directions sketches, :func:`curvature_sketch`: :math:`O((m+n)\ell)` memory per
            matrix; ``use_int8_ema`` then does not apply).
        sketch_rank: the sketch's width :math:`\ell` per side, >= 2 (``curvature="sketch"``).
        sketch_storage: storage of the sketch's frame and of the preconditioner basis
            (``curvature="sketch"``): ``"bfloat16"`` (both bf16), ``"int8"`` (frame int8 with
            ``block_size`` blocks, basis bf16) or ``"float32"``.
        basis_storage: storage of the eigenbases with ``curvature="ema"``: ``"float32"`` or
            ``"bfloat16"`` (half the bytes; see :func:`curvature_ema`).
        float32_below: sides shorter than this keep their factor and basis in float32 whatever
            ``use_int8_ema`` and ``basis_storage`` say (and the eigenbasis form rotates a matrix
            with such a side in float32), >= 0; 0: every side compressed as configured. With
            ``curvature="sketch"`` it does not apply: only its default or 0 are accepted.
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
    for key, value in (("rotation_precision", rotation_precision), ("moment_at_refresh", moment_at_refresh)):
        if value != SCAO_DEFAULTS[key]:
            raise ValueError(f"{key} applies to form='eigenbasis' (the default form of sf.scao and sf.SCAO) "
                             f"only; the seed form requires {SCAO_DEFAULTS[key]!r}, got {value!r}")
    statistic = _statistic(curvature, rho, use_int8_ema, block_size, sketch_rank, sketch_storage, basis_storage,
                           float32_below)
    return blend_ramp(
        kronecker_precondition(
            curvature=statistic,
            rank=_rank_rule(epsilon_sparse, k_min, k_max),
            precond_freq=precond_freq,
            stat_freq=stat_freq,
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

#: Keywords of :func:`scao_precondition` that only the seed form reads (its power, complement
#: gain, graft and blend ramp); the eigenbasis form requires them at their defaults.
_SEED_ONLY_KEYS = ("warmup_steps", "blend_steps", "min_precond_updates", "tau", "complement", "graft", "blend_shape")


def scao_eigenbasis_precondition(inner: GradientTransformation, kw: dict[str, Any], *,
                                 leafwise_inner: bool | None = None,
                                 moment_codecs: Any = None) -> GradientTransformation:
    """``kronecker_eigenbasis(inner, ..., leafwise_inner=leafwise_inner, moment_codecs=moment_codecs)``
    from :func:`scao_precondition`'s keywords (``sf.scao(form="eigenbasis")``, whose ``inner`` is
    :func:`~scao_fx.scale_by_adam`: leafwise)."""
    kw = dict(kw)
    unknown = sorted(set(kw) - set(SCAO_PRECONDITION_KEYS) - {"rank_eps", "process_group", "skip_first"})
    if unknown:
        raise TypeError(f"scao got unexpected keyword argument(s) {unknown}")
    process_group = kw.pop("process_group", None)
    rank_eps = kw.pop("rank_eps", None)
    if rank_eps is not None:
        if "epsilon_sparse" in kw and kw["epsilon_sparse"] != rank_eps:
            raise ValueError(f"give either epsilon_sparse or rank_eps, not both ({kw['epsilon_sparse']!r} vs {rank_eps!r})")
        kw["epsilon_sparse"] = rank_eps
    hp = {k: kw.get(k, SCAO_DEFAULTS[k]) for k in SCAO_PRECONDITION_KEYS}
    for key in _SEED_ONLY_KEYS:
        if hp[key] != SCAO_DEFAULTS[key]:
            raise ValueError(
                f"{key} applies to form='seed' only (got {hp[key]!r}): pass form='seed' to use it, or leave "
                f"it at its default {SCAO_DEFAULTS[key]!r} with form='eigenbasis' (the default form)"
            )
    check_float("epsilon_sparse" if rank_eps is None else "rank_eps", hp["epsilon_sparse"], low=0.0, high=1.0,
                high_inclusive=False)
    statistic = _statistic(hp["curvature"], hp["rho"], hp["use_int8_ema"], hp["block_size"], hp["sketch_rank"],
                           hp["sketch_storage"], hp["basis_storage"], hp["float32_below"])
    rank = _rank_rule(hp["epsilon_sparse"], hp["k_min"], hp["k_max"])
    return kronecker_eigenbasis(
        inner,
        curvature=statistic,
        rank=rank,
        precond_freq=hp["precond_freq"],
        stat_freq=hp["stat_freq"],
        max_precond_dim=hp["max_precond_dim"],
        tikhonov=hp["tikhonov"],
        grouped=hp["grouped"],
        sides=hp["sides"],
        # "auto": an exact eigh for full-width bases, measured better than the power refresh on
        # the GPT benchmark (docs/scao.md, "The default, how it was chosen")
        eigensolver=hp["eigensolver"],
        gram_precision=hp["gram_precision"],
        rotation_precision=hp["rotation_precision"],
        moment_at_refresh=hp["moment_at_refresh"],
        skip_first=kw.get("skip_first", SCAO_DEFAULTS["skip_first"]),
        process_group=process_group,
        leafwise_inner=leafwise_inner,
        moment_codecs=moment_codecs,
    )
