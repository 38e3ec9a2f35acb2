"""SCAO as a drop-in ``torch.optim`` optimizer (``sf.SCAO``), and the original package's keywords."""

from __future__ import annotations

import functools
import math
import numbers
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import torch

from .._validation import check_int
from ..base import GradientTransformation
from ..parallel import check_process_group
from ..presets import SCAO_ADAM_KEYS, SCAO_DEFAULTS, SCAO_FORM_KEYS, SCAO_GUARD_KEYS, SCAO_PRECONDITION_KEYS
from ..transforms.finite import apply_if_finite
from .adapter import TransformOptimizer

__all__ = ["SCAO", "COMPAT_KEYWORDS", "INERT_KEYWORDS"]



def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} of type {type(value).__name__}")
    return value


def _reject(name: str, value: Any, neutral: Any, why: str) -> None:
    raise ValueError(
        f"{name}={value!r} is not supported by scao_fx.SCAO (accepted only at its neutral value "
        f"{neutral!r}, which switches the feature off): {why}"
    )


#: Keywords of the original ``scao`` package's ``SCAO.__init__`` that scao_fx accepts for
#: compatibility, with their neutral value and why any other value is rejected. ``None`` as the
#: reason marks keywords accepted at any valid value because they have no effect here.
COMPAT_KEYWORDS: dict[str, tuple[Any, str | None]] = {
    "use_newton_schulz": (
        False,
        "the inverse fourth roots are computed from a (batched, fallback-guarded) "
        "eigendecomposition, which the adaptive rank rule needs anyway; a Newton-Schulz iteration "
        "gives no eigenvalues to choose k from and diverges on ill-conditioned factors",
    ),
    "sparsity": (
        0.0,
        "zeroing a fraction of the preconditioned update throws gradient signal away; the "
        "low-rank-plus-complement preconditioner already keeps the state small",
    ),
    "noise_std_init": (
        0.0,
        "gradient-noise injection made training worse in our measurements and breaks exact, "
        "bit-identical resumes; add noise outside the optimizer if you need it",
    ),
    "lars_coeff": (
        0.0,
        "a LARS trust ratio on top of Adam's per-coordinate scaling and the Frobenius graft "
        "rescales the step a third time; compose sf.chain(...) with your own trust-ratio "
        "transform if you need it",
    ),
    "lookahead_k": (
        0,
        "Lookahead keeps a second copy of every parameter (4 more bytes per parameter) for "
        "no measured gain with SCAO; wrap the optimizer yourself if you need it",
    ),
    "dynamic_sparsity": (
        False,
        "per-layer adaptive sparsity of the update is a heuristic on top of sparsity, which is "
        "not supported (see sparsity)",
    ),
    "adaptive_warmup": (
        False,
        "ending warmup on a gradient-norm stability test makes the switch point depend on "
        "noise and needs a host sync per step; use warmup_steps and min_precond_updates",
    ),
    "lazy_precond": (
        False,
        "event-driven refreshes need a host sync per step to decide; refreshes run every "
        "precond_freq steps, which keeps the step free of device synchronisation",
    ),
    "use_gsnr_clip": (
        False,
        "element-wise signal-to-noise masking zeroes most of a small-batch update; use "
        "clipping on the gradient (torch.nn.utils.clip_grad_norm_) instead",
    ),
    "adaptive_rank": (
        False,
        "the rank is already adaptive: epsilon_sparse picks the smallest k holding 1 - "
        "epsilon_sparse of the spectral mass at every refresh; the extra gradient-norm-ratio "
        "heuristic is not implemented",
    ),
    "curvature_mode": ("dense", "only dense Kronecker factors are implemented"),
    "curvature_rank": (None, "only dense Kronecker factors are implemented (curvature_mode='dense')"),
    "update_rule": ("adamw", "SCAO runs Adam with decoupled weight decay on the preconditioned gradient"),
    # torch.optim.AdamW's keywords, so that replacing the class name is the only change.
    "amsgrad": (False, "AMSGrad's running maximum of the second moment is not implemented"),
    "maximize": (False, "maximization is not implemented; minimise the negated objective"),
    "capturable": (
        False,
        "the step counters live on the CPU (so schedules never wait for the GPU), which a CUDA "
        "graph cannot capture",
    ),
    "differentiable": (False, "differentiating through the optimizer step is not supported"),
}

#: Keywords accepted at any valid value: they have no effect here (documented per keyword).
INERT_KEYWORDS: dict[str, Any] = {
    # No effect in the original package either (validated there, never read by its step).
    "beta3": 0.99,
    # The refresh runs inline and deterministically; there is no side stream to enable.
    "async_precond": True,
    # Settings of features that are off (noise_std_init=0, lookahead_k=0, adaptive_warmup=False,
    # lazy_precond=False, use_gsnr_clip=False): meaningless while their feature is off.
    "noise_anneal": 0.998,
    "noise_relative": False,
    "lookahead_alpha": 0.5,
    "warmup_stability_threshold": 0.05,
    "warmup_patience": 5,
    "lazy_delta_threshold": 0.1,
    "lazy_max_skip": 50,
    "gsnr_threshold": 0.5,
    # torch.optim.AdamW's implementation choices. Given to SCAO(...) they select the arithmetic
    # of the Adam link for the whole optimizer (see SCAO and _adam_kernel_for); in a param group
    # (add_param_group, a checkpoint) they are validated and ignored.
    "foreach": None,
    "fused": None,
}

#: The positional keywords of :class:`SCAO` (the original package's core signature).
_SCAO_CORE = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "precond_freq",
    "epsilon_sparse",
    "k_min",
    "k_max",
    "rho",
    "tau",
    "warmup_steps",
    "blend_steps",
    "min_precond_updates",
    "max_precond_dim",
    "use_int8_ema",
    "preconditioner_enabled",
    "factor_mode",
)

#: Extra keywords of :func:`scao_fx.scao_precondition` that the facade passes through
#: (``block_size``, ``complement``, ``graft``, ``blend_shape``, ``tikhonov``, ``grouped``, ...),
#: with their defaults (from :data:`scao_fx.presets.SCAO_DEFAULTS`).
PRECONDITION_EXTRAS: Mapping[str, Any] = MappingProxyType(
    {k: SCAO_DEFAULTS[k] for k in SCAO_PRECONDITION_KEYS + SCAO_FORM_KEYS if k not in _SCAO_CORE}
)

#: Extra keywords of the Adam part (``moments``: the storage of Adam's moments, see
#: :func:`scao_fx.scao`), with their defaults (from :data:`scao_fx.alias.SCAO_DEFAULTS`).
ADAM_EXTRAS: Mapping[str, Any] = MappingProxyType({k: SCAO_DEFAULTS[k] for k in SCAO_ADAM_KEYS if k not in _SCAO_CORE})

#: Keywords of the non-finite guard (:func:`scao_fx.apply_if_finite`) and their defaults; the
#: guard wraps every group's chain, plain-AdamW groups included.
GUARD_KEYWORDS: Mapping[str, Any] = MappingProxyType({k: SCAO_DEFAULTS[k] for k in SCAO_GUARD_KEYS})


#: Every keyword of the original package (and of ``torch.optim.AdamW``) that the facade only
#: validates: none of them is a hyperparameter, none is stored in a param group.
_COMPAT_NAMES = frozenset(COMPAT_KEYWORDS) | frozenset(INERT_KEYWORDS)


def _check_compat(values: Mapping[str, Any]) -> None:
    """Validate the original package's keywords present in ``values`` (see
    :data:`COMPAT_KEYWORDS` and :data:`INERT_KEYWORDS`); a keyword left out is at its neutral
    value."""
    for name, (neutral, why) in COMPAT_KEYWORDS.items():
        if name not in values:
            continue
        value = values[name]
        if isinstance(neutral, bool):
            _check_bool(name, value)
        elif isinstance(neutral, int) and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
        elif isinstance(neutral, float) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
        if not (value is neutral or (neutral is not None and value is not None and value == neutral)):
            _reject(name, value, neutral, why)  # type: ignore[arg-type]
    # Inert keywords: validated like the original validates them, otherwise ignored.
    if "beta3" in values:
        b3 = values["beta3"]
        if isinstance(b3, bool) or not isinstance(b3, numbers.Real) or not 0.0 <= b3 < 1.0:
            raise ValueError(f"beta3 must be a real number in [0, 1), got {b3!r}")
    for name in ("async_precond", "noise_relative"):
        if name in values:
            _check_bool(name, values[name])
    for name in ("foreach", "fused"):
        if values.get(name) is not None:
            _check_bool(name, values[name])
    for name, low, high in (
        ("noise_anneal", 0.0, 1.0),
        ("lookahead_alpha", 0.0, 1.0),
        ("warmup_stability_threshold", 0.0, math.inf),
        ("lazy_delta_threshold", 0.0, math.inf),
        ("gsnr_threshold", 0.0, math.inf),
    ):
        if name not in values:
            continue
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not low <= v <= high:
            raise ValueError(f"{name} must be a real number in [{low}, {high}], got {v!r}")
    for name in ("warmup_patience", "lazy_max_skip"):
        if name not in values:
            continue
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be an integer in [1, inf), got {v!r}")


def _split_compat(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` without the original package's keywords, which are validated first."""
    _check_compat({k: v for k, v in values.items() if k in _COMPAT_NAMES})
    return {k: v for k, v in values.items() if k not in _COMPAT_NAMES}


def _adam_kernel_for(foreach: bool | None, fused: bool | None) -> str:
    """The Adam arithmetic (:data:`scao_fx.transforms.adam.ADAM_KERNELS`) that torch.optim's
    ``foreach=``/``fused=`` keywords ask for: ``fused=True`` torch's fused Adam kernel,
    ``foreach=False`` the per-leaf loop, otherwise the multi-tensor (foreach) ops."""
    if foreach and fused:
        raise ValueError("foreach=True and fused=True cannot be given together (as in torch.optim.AdamW)")
    if fused:
        return "fused"
    if foreach is False:
        return "loop"
    return "foreach"


def _scao_factory(adam_kernel: str = "foreach", **hp: Any) -> GradientTransformation:
    """Build one param group's transform from its hyperparameters; ``adam_kernel`` (not a
    hyperparameter: ``SCAO(foreach=..., fused=...)``) picks the Adam link's arithmetic."""
    from ..transforms.adam import adam_kernel as kernel_scope

    with kernel_scope(adam_kernel):
        return _build_scao(hp)


def _build_scao(hp: dict) -> GradientTransformation:
    from ..alias import _adamw_stored

    enabled = _check_bool("preconditioner_enabled", hp["preconditioner_enabled"])
    factor_mode = hp["factor_mode"]
    if factor_mode not in ("full", "wide"):
        raise ValueError(f"factor_mode must be one of ('full', 'wide'), got {factor_mode!r}")
    if factor_mode == "wide":
        if hp["sides"] not in ("both", "wide"):
            raise ValueError(f"sides must be one of ('both', 'wide'), got {hp['sides']!r}")
        hp = {**hp, "sides": "wide"}
    skip = _check_bool("skip_nonfinite", hp["skip_nonfinite"])
    max_skips = check_int("max_consecutive_skips", hp["max_consecutive_skips"], low=1)
    if not enabled:
        tx = _adamw_stored(hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"], None, None, hp["moments"],
                           hp["second_moment"])
    else:
        tx = _scao_chain(hp)
    return apply_if_finite(tx, max_skips, host_sync=hp["host_sync"], skip_overflow=True) if skip else tx


def _scao_chain(hp: Mapping[str, Any]) -> GradientTransformation:
    """The group's ``sf.scao`` chain (without the non-finite guard, added by the factory)."""
    from ..alias import scao

    extras = {k: hp[k] for k in PRECONDITION_EXTRAS}
    return scao(
        hp["lr"],
        hp["betas"],
        hp["eps"],
        hp["weight_decay"],
        precond_freq=hp["precond_freq"],
        epsilon_sparse=hp["epsilon_sparse"],
        k_min=hp["k_min"],
        k_max=hp["k_max"],
        rho=hp["rho"],
        tau=hp["tau"],
        warmup_steps=hp["warmup_steps"],
        blend_steps=hp["blend_steps"],
        min_precond_updates=hp["min_precond_updates"],
        max_precond_dim=hp["max_precond_dim"],
        use_int8_ema=hp["use_int8_ema"],
        moments=hp["moments"],
        second_moment=hp["second_moment"],
        process_group=hp.get("process_group"),  # SCAO(process_group=...): not a hyperparameter
        skip_nonfinite=False,
        **extras,
    )


#: What a param group saved before a keyword existed ran with (see ``SCAO._saved_group_values``).
_SAVED_BEFORE: Mapping[str, Any] = MappingProxyType(
    {"form": "seed", "basis_storage": "float32", "float32_below": 0, "moments": "float32", "second_moment": "full"}
)


class SCAO(TransformOptimizer):
    r"""SCAO as a drop-in ``torch.optim`` optimizer (replaces ``torch.optim.AdamW`` in one line).

    Each param group runs ``sf.scao(...)``: by default Adam runs in the eigenbases of each
    matrix parameter's Kronecker factors (int8 statistics, bfloat16 bases, refreshed every 5
    steps; ``form="seed"``: the original formula, low-rank preconditioning with an Adam warmup and
    a blend ramp, then AdamW), with decoupled weight decay. Vectors and scalars (biases, norms)
    get plain AdamW. Every hyperparameter can be set per param group; a group
    with ``preconditioner_enabled=False`` runs plain AdamW (e.g. for huge embeddings). The
    defaults are ``scao_fx.presets.SCAO_DEFAULTS`` (the same as :func:`~scao_fx.scao`'s).

    Args:
        params: parameters, ``(name, parameter)`` pairs or param-group dicts (as ``torch.optim``).
        lr: learning rate (SOAP-family optimizers usually take a larger one than AdamW; see
            ``docs/switch-from-adamw.md``).
        betas: Adam's ``(beta1, beta2)``.
        eps: Adam's epsilon.
        weight_decay: decoupled weight decay.
        precond_freq: steps between eigenbasis refreshes.
        epsilon_sparse: spectral mass the adaptive rank may discard, in [0, 1) (0 with ``k_max=None``: every direction).
        k_min, k_max: clamp of the adaptive rank (``k_max=None``: no cap).
        rho: curvature EMA decay.
        tau: optional cap of the preconditioned gradient's norm relative to the raw one's (only
            with ``graft="none"``).
        warmup_steps: steps of plain AdamW before the ramp (``form="seed"`` only).
        blend_steps: length of the ramp into the preconditioned gradient (``form="seed"`` only).
        min_precond_updates: curvature updates required before the ramp.
        max_precond_dim: sides longer than this are not preconditioned (one-sided or AdamW).
        use_int8_ema: keep curvature factors in block-wise int8 (False: float32).
        preconditioner_enabled: False runs the group as plain AdamW.
        factor_mode: ``"full"`` (both sides) or ``"wide"`` (only the longer side of non-square
            matrices, for LoRA adapters: same as ``sides="wide"``).
        process_group: a ``torch.distributed`` process group: basis refreshes are spread over
            its ranks (see ``docs/distributed.md``). Not a hyperparameter: it is not saved in
            ``state_dict()``, and an optimizer holding one cannot be pickled.
        **compat: the other keywords of the original ``scao`` package's ``SCAO`` (see
            :data:`COMPAT_KEYWORDS`, :data:`INERT_KEYWORDS`), each accepted at its neutral value
            and rejected with a ``ValueError`` explaining why otherwise; ``moments``: the storage
            of Adam's moments, ``"bfloat16"`` (default: 4 bytes per parameter, stochastically
            rounded), ``"float32"`` (8 bytes) or ``"int8"`` (8-bit Adam, about 2.1 instead of 8 bytes per parameter; see
            :func:`~scao_fx.scao`), per param group too (a group with
            ``preconditioner_enabled=False`` then runs bf16 or 8-bit AdamW); ``second_moment``:
            ``"auto"`` (default: factored in the eigenbasis form, full in the seed form and in
            groups with ``preconditioner_enabled=False``), ``"full"`` or ``"factored"``
            (Adafactor's row and column statistics for the matrices, see :func:`~scao_fx.scao`);
            and the extra
            ``scao_precondition`` keywords ``block_size``, ``complement``, ``graft``,
            ``blend_shape``, ``tikhonov``, ``grouped``, ``sides``, ``stat_freq`` (curvature
            statistics at step 1 and every ``stat_freq`` steps; see :func:`~scao_fx.scao_precondition`);
            and the non-finite guard's
            ``skip_nonfinite`` (default True: a step with a NaN/Inf gradient is skipped, leaving
            parameters and state exactly as they were), ``max_consecutive_skips`` (default 10,
            then :class:`~scao_fx.NonFiniteGradientError`) and ``host_sync`` (see
            :func:`~scao_fx.apply_if_finite`). ``foreach``/``fused`` (torch.optim.AdamW's
            keywords) select the arithmetic of the Adam link, for the whole optimizer:
            ``fused=True`` runs torch's fused Adam kernel (``torch._fused_adam_``) on CPU
            float32/float64 moments, about 5x faster than the multi-tensor ops there
            (``docs/examples/adam_kernels.py``) and equal to them to float rounding, not bit
            for bit (other devices and ``torch.compile`` keep the multi-tensor ops);
            ``foreach=False`` the per-leaf loop (the same bits as the default); ``None``
            (default) or ``foreach=True`` the multi-tensor ``torch._foreach_*`` ops (the arithmetic
            of every other scao_fx Adam). Given in a param group they are ignored.

    Raises:
        TypeError: for an unknown keyword (naming it) or a wrongly typed value.
        ValueError: for an out-of-range value or an unsupported feature of the original.

    Example:
        >>> import torch, scao_fx
        >>> model = torch.nn.Linear(16, 8)
        >>> opt = scao_fx.SCAO(model.parameters(), lr=1e-3, weight_decay=0.1)
    """

    # Every link of sf.scao / sf.adamw only reads the updates it is given (Kronecker stacks them,
    # the blend and Adam write new tensors, the guard's skip writes new -0.0 tensors; decay and
    # learning rate then scale Adam's fresh output in place): p.grad goes in without a copy.
    # tests/test_optim.py checks that a step leaves every p.grad bit for bit as it was.
    _copy_grads = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = SCAO_DEFAULTS["lr"],
        betas: tuple[float, float] = SCAO_DEFAULTS["betas"],
        eps: float = SCAO_DEFAULTS["eps"],
        weight_decay: float = SCAO_DEFAULTS["weight_decay"],
        precond_freq: int = SCAO_DEFAULTS["precond_freq"],
        epsilon_sparse: float = SCAO_DEFAULTS["epsilon_sparse"],
        k_min: int = SCAO_DEFAULTS["k_min"],
        k_max: int = SCAO_DEFAULTS["k_max"],
        rho: float = SCAO_DEFAULTS["rho"],
        tau: float | None = SCAO_DEFAULTS["tau"],
        warmup_steps: int = SCAO_DEFAULTS["warmup_steps"],
        blend_steps: int = SCAO_DEFAULTS["blend_steps"],
        min_precond_updates: int = SCAO_DEFAULTS["min_precond_updates"],
        max_precond_dim: int = SCAO_DEFAULTS["max_precond_dim"],
        use_int8_ema: bool = SCAO_DEFAULTS["use_int8_ema"],
        preconditioner_enabled: bool = True,
        factor_mode: str = "full",
        *,
        process_group: Any = None,
        **compat: Any,
    ) -> None:
        known = {**PRECONDITION_EXTRAS, **ADAM_EXTRAS, **GUARD_KEYWORDS}
        unknown = sorted(set(compat) - set(known) - _COMPAT_NAMES)
        if unknown:
            raise TypeError(
                f"SCAO got unexpected keyword argument(s) {unknown}; accepted extra keywords: "
                f"{sorted(set(known) | _COMPAT_NAMES)}"
            )
        kernel = _adam_kernel_for(compat.get("foreach"), compat.get("fused"))
        compat = _split_compat(compat)  # validated once, here: not hyperparameters
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            precond_freq=precond_freq,
            epsilon_sparse=epsilon_sparse,
            k_min=k_min,
            k_max=k_max,
            rho=rho,
            tau=tau,
            warmup_steps=warmup_steps,
            blend_steps=blend_steps,
            min_precond_updates=min_precond_updates,
            max_precond_dim=max_precond_dim,
            use_int8_ema=use_int8_ema,
            preconditioner_enabled=preconditioner_enabled,
            factor_mode=factor_mode,
        )
        for k, v in known.items():
            defaults[k] = compat.get(k, v)
        factory: Any = _scao_factory
        if check_process_group("process_group", process_group) is not None:
            factory = functools.partial(_scao_factory, process_group=process_group)
        if kernel != "foreach":
            factory = functools.partial(factory, adam_kernel=kernel)
        super().__init__(params, factory, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (as ``torch.optim``); the original package's keywords in it (see
        :data:`COMPAT_KEYWORDS`, :data:`INERT_KEYWORDS`) are validated and left out of the group."""
        if isinstance(param_group, dict):  # (in place, as torch.optim fills in the defaults)
            _check_compat({k: v for k, v in param_group.items() if k in _COMPAT_NAMES})
            for name in _COMPAT_NAMES.intersection(param_group):
                del param_group[name]
        super().add_param_group(param_group)

    def _saved_group_values(self, index: int, saved: Mapping[str, Any]) -> dict[str, Any]:
        # Checkpoints of earlier versions hold the original package's keywords in every group:
        # validated (they can only be neutral or inert) and left out. A group saved before a
        # keyword existed ran with that keyword's value of the time (_SAVED_BEFORE), not today's
        # default: the seed form (before ``form``), float32 bases (before ``basis_storage``),
        # every side compressed (before ``float32_below``), float32 moments (before ``moments``).
        values = _split_compat(super()._saved_group_values(index, saved))
        for key, then in _SAVED_BEFORE.items():
            values.setdefault(key, then)
        return values

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)  # a pickle of an earlier version holds the compat keywords too
        if "defaults" in state:
            state["defaults"] = {k: v for k, v in state["defaults"].items() if k not in _COMPAT_NAMES}
        if "param_groups" in state:
            state["param_groups"] = [_split_compat(g) for g in state["param_groups"]]
        super().__setstate__(state)

    def diagnostics(self, *, curvature_norms: bool = True, as_tensors: bool = False) -> dict[str, dict[str, Any]]:
        """Per-parameter diagnostics: rank, phase, blend, curvature norm, refreshes, fallbacks.

        Keys are the parameter names when the optimizer was given ``(name, param)`` pairs
        (``model.named_parameters()``), else the global parameter index as a string (the index
        in ``state_dict()["param_groups"][g]["params"]``). Parameters without state yet (before
        their group's first step, or frozen) are left out. See :mod:`scao_fx.diagnostics` for
        the record's keys. Nothing is computed during ``step()``; this call reads the state
        (and synchronises with the device once, unless ``as_tensors=True``).

        Both forms are read (each group's own ``form``). In the eigenbasis form (the default)
        ``rank_left``/``rank_right`` are the kept widths of the rotation (every direction with
        the default full rank, fewer when ``epsilon_sparse``/``k_max`` truncate), there is no
        warmup or ramp: ``phase`` is ``"adam"`` after the first step (``blend`` 0.0) and
        ``"precond"`` from the second on (``blend`` 1.0).

        Example:
            >>> import torch, scao_fx as sf
            >>> model = torch.nn.Linear(6, 4)
            >>> opt = sf.SCAO(model.named_parameters())
            >>> for _ in range(2):
            ...     model(torch.randn(8, 6)).square().mean().backward()
            ...     opt.step()
            >>> d = opt.diagnostics()
            >>> d["weight"]["phase"], d["weight"]["rank_left"], d["weight"]["rank_right"], d["bias"]["phase"]
            ('precond', 4, 6, 'adam')
        """
        from ..codecs import fp32_codec, int8_blockwise
        from ..diagnostics import adam_record, scao_diagnostics

        records: dict[str, dict[str, Any]] = {}
        for index, group in enumerate(self.param_groups):
            rt = self._runtimes[index]
            if rt.state is None or not rt.active:
                continue
            params = group["params"]
            labels = [self._param_label(index, j) for j in rt.active]
            if not group["preconditioner_enabled"]:
                for j, label, step in zip(rt.active, labels, _adam_counts(rt.state, len(labels))):
                    p = params[j]
                    shape = (int(p.shape[0]), int(p[0].numel())) if p.ndim >= 2 else None
                    records[label] = adam_record(shape, blend=0.0, refreshes=0, step=step if as_tensors else int(step))
                continue
            codec = int8_blockwise(group["block_size"]) if group["use_int8_ema"] else fp32_codec()
            records.update(
                scao_diagnostics(
                    rt.state,
                    warmup_steps=group["warmup_steps"],
                    blend_steps=group["blend_steps"],
                    min_precond_updates=group["min_precond_updates"],
                    blend_shape=group["blend_shape"],
                    rho=group["rho"],
                    stat_freq=group["stat_freq"],
                    codec=codec,
                    float32_below=group["float32_below"],
                    names=labels,
                    shapes=[tuple(params[j].shape) for j in rt.active],
                    curvature_norms=curvature_norms,
                    as_tensors=as_tensors,
                )
            )
        return records

    def synchronize_precond(self) -> None:
        """Compatibility with the original package: a no-op here.

        The original refreshes bases on a side stream (``async_precond``) and needs this before
        checkpoints; scao_fx refreshes inline, deterministically, so there is nothing to wait for.
        """

    def current_ranks(self) -> dict[str, tuple[int | None, int | None]]:
        """``{param: (rank_left, rank_right)}`` of the preconditioned parameters (``None`` for a
        side that is not preconditioned; 0 before the first refresh; in the eigenbasis form, the
        kept widths of the rotation)."""
        return {
            name: (rec["rank_left"], rec["rank_right"])
            for name, rec in self.diagnostics(curvature_norms=False).items()
            if rec["sides"] != "none"
        }


def _adam_counts(state: Any, n: int) -> list:
    """The per-leaf Adam step counters of a group's state (``n`` zeros without an Adam state)."""
    from .._tree import find_nodes, flatten
    from ..transforms.adam import ScaleByAdamState

    found = find_nodes(state, ScaleByAdamState)
    if not found:
        return [torch.zeros((), dtype=torch.int64)] * n
    count = found[0].count
    return [count] * n if isinstance(count, torch.Tensor) else flatten(count)[0]
