"""The benchmark's optimizer registry, and the SCAO ablation mapping (in one place).

Every entry is an :class:`OptimizerSpec`: a name, a factory ``(params, lr, weight_decay) ->``
a ``torch.optim.Optimizer``-like object (``step()``, ``zero_grad()``), a default learning rate,
an availability check (a missing peer package or a CUDA-only optimizer on a CPU run is
*reported and skipped*, never an error) and an optional state-bytes function.

Functional ``scao_fx`` chains run through :class:`scao_fx.TransformOptimizer`, so any chain of
the library becomes a registry entry with one line (see :func:`register_chain`).

Default learning rates: the best final validation loss of ``scao-fx bench --sweep-only`` on
the default workload (``small`` preset, 500 steps, seed 0) over the grid 2.5e-4 ... 8e-3 (factors
of 2; SOAP 3.75e-4 ... 1.2e-2); docs/benchmarks.md lists the sweep. ``sf-adamw`` and
``torchopt-adamw`` compute AdamW's update, so they take AdamW's. ``--lr-sweep`` re-tunes on any
workload over ``default_lr x LR_GRID``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .metrics import optimizer_state_bytes, tensor_bytes

__all__ = [
    "OptimizerSpec",
    "REGISTRY",
    "ABLATIONS",
    "LR_GRID",
    "DEFAULT_OPTIMIZERS",
    "register",
    "register_chain",
    "get",
    "available",
    "state_bytes",
    "package_version",
]

#: Multipliers of an optimizer's default learning rate tried by ``--lr-sweep``.
LR_GRID: tuple[float, ...] = (0.5, 1.0, 2.0)


@dataclass
class OptimizerSpec:
    """One optimizer of the benchmark.

    Attributes:
        name: registry key (command-line name).
        factory: ``(params, lr, weight_decay) -> optimizer``; ``params`` is a list of tensors.
        default_lr: learning rate used without ``--lr-sweep`` / ``--lr``.
        description: one line for tables and docs.
        kind: ``"baseline"``, ``"ours"``, ``"peer"`` or ``"ablation"``.
        requires: importable module names the factory needs (missing -> skipped).
        cuda_only: skip on non-CUDA devices.
        state_bytes_fn: ``optimizer -> bytes``; default :func:`state_bytes`' generic count.
        extra: free-form metadata recorded with results (e.g. the ablation's arguments).
        takes_options: the factory accepts keyword options (``--scao-opt KEY=VALUE`` reaches the
            SCAO entries this way).
    """

    name: str
    factory: Callable[..., Any]
    default_lr: float
    description: str
    kind: str = "baseline"
    requires: tuple[str, ...] = ()
    cuda_only: bool = False
    state_bytes_fn: Callable[[Any], int] | None = None
    extra: dict = field(default_factory=dict)
    takes_options: bool = False

    def unavailable_reason(self, device: torch.device | str = "cpu") -> str | None:
        """``None`` if the optimizer can run on ``device``, else why not (one line)."""
        if self.cuda_only and torch.device(device).type != "cuda":
            return "needs a CUDA device"
        for module in self.requires:
            try:
                importlib.import_module(module)
            except Exception as exc:  # ImportError, or a broken install raising anything else
                return f"package {module!r} not importable ({type(exc).__name__}: {exc})".splitlines()[0]
        return None

    def make(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float, options: dict | None = None):
        if options and self.takes_options:
            return self.factory(list(params), float(lr), float(weight_decay), **options)
        return self.factory(list(params), float(lr), float(weight_decay))


REGISTRY: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec, *, overwrite: bool = False) -> OptimizerSpec:
    """Add ``spec`` to :data:`REGISTRY` (``ValueError`` on a duplicate name unless ``overwrite``)."""
    if spec.name in REGISTRY and not overwrite:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> OptimizerSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown optimizer {name!r}; registered: {', '.join(REGISTRY)}") from None


def available(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """``name -> None`` (runs here) or the reason it is skipped, for every registered entry."""
    return {name: spec.unavailable_reason(device) for name, spec in REGISTRY.items()}


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------ state accounting


def _sf_accounting() -> Callable[..., Any] | None:
    """The library's own state-memory accounting function, if it exists."""
    import scao_fx

    for name in ("state_bytes", "state_nbytes", "memory_report", "state_memory"):
        fn = getattr(scao_fx, name, None)
        if callable(fn):
            return fn
    return None


def state_bytes(optimizer: Any) -> int:
    """Optimizer-state bytes of ``optimizer``.

    ``scao_fx.TransformOptimizer``: the functional states of every param group, through the
    library's accounting function when it exports one (else every tensor of the state is
    counted once). Anything else: :func:`metrics.optimizer_state_bytes` (torch.optim state
    dicts, torchopt's ``state_groups``).
    """
    fstate = getattr(optimizer, "functional_state", None)
    if callable(fstate):
        states = [fstate(i) for i in range(len(optimizer.param_groups))]
        fn = _sf_accounting()
        if fn is not None:
            try:
                value = fn(states)
                if isinstance(value, dict):
                    value = value.get("total", value.get("bytes"))
                if value is not None:
                    return int(value)
            except Exception:  # accounting is a report, never a reason to fail the benchmark
                pass
        return tensor_bytes(states)
    return optimizer_state_bytes(optimizer)


# ------------------------------------------------------------------------ factories


def _torch_adamw(params, lr, wd):
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=True)


def _chain_optimizer(params, lr, wd, build: Callable[..., Any], **options):
    import scao_fx as sf

    factory = (lambda lr, weight_decay: build(lr=lr, weight_decay=weight_decay, **options)) if options else build
    return sf.TransformOptimizer(params, factory, {"lr": lr, "weight_decay": wd})


def register_chain(
    name: str,
    build: Callable[..., Any],
    default_lr: float,
    description: str,
    *,
    kind: str = "ours",
    extra: dict | None = None,
    takes_options: bool = False,
    overwrite: bool = False,
) -> OptimizerSpec:
    """Register a functional chain: ``build(lr=..., weight_decay=...) -> GradientTransformation``.

    It runs through ``scao_fx.TransformOptimizer`` (the learning rate arrives as a 0-d tensor
    that the optimizer refills; pass it on to the chain's ``lr``). With ``takes_options``,
    ``build`` also receives the run's keyword options.
    """
    return register(
        OptimizerSpec(
            name=name,
            factory=lambda params, lr, wd, **options: _chain_optimizer(params, lr, wd, build, **options),
            default_lr=default_lr,
            description=description,
            kind=kind,
            requires=("scao_fx",),
            extra=dict(extra or {}),
            takes_options=takes_options,
        ),
        overwrite=overwrite,
    )


def _scao_facade(params, lr, wd, **options):
    """``scao_fx.SCAO`` (the drop-in facade) when it exists, else the same chain directly."""
    import scao_fx as sf

    facade = getattr(sf, "SCAO", None)
    if facade is not None:
        return facade(params, lr=lr, weight_decay=wd, **options)
    return _chain_optimizer(params, lr, wd, sf.scao, **options)


def _torchopt_adamw(params, lr, wd):
    import torchopt

    return torchopt.Optimizer(params, torchopt.adamw(lr=lr, weight_decay=wd))


def _scao_original(params, lr, wd):
    import scao

    return scao.SCAO(params, lr=lr, weight_decay=wd)


def _heavyball_soap(params, lr, wd):
    import heavyball
    import heavyball.utils

    # HeavyBall compiles its update with torch.compile(mode="max-autotune-no-cudagraphs") by
    # default: minutes of compilation per shape (which would land in the first steps' timings).
    # Every other optimizer here runs eagerly, so SOAP does too (set globally in HeavyBall).
    heavyball.utils.compile_mode = None
    return heavyball.SOAP(params, lr=lr, weight_decay=wd)


def _torchao_adamw8bit(params, lr, wd):
    from torchao.optim import AdamW8bit

    return AdamW8bit(params, lr=lr, weight_decay=wd)


def _bnb_adamw8bit(params, lr, wd):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=wd)


def _sf_adamw(lr, weight_decay):
    import scao_fx as sf

    return sf.adamw(lr=lr, weight_decay=weight_decay)


register(OptimizerSpec("adamw", _torch_adamw, 1e-3, "torch.optim.AdamW (foreach)", kind="baseline"))
register(
    OptimizerSpec(
        "scao", _scao_facade, 1e-3, "scao_fx SCAO (int8 curvature, adaptive rank, complement, blend ramp)",
        kind="ours", requires=("scao_fx",), takes_options=True,
    )
)
register_chain("sf-adamw", _sf_adamw, 1e-3, "scao_fx adamw chain via TransformOptimizer", kind="ours")
register(
    OptimizerSpec(
        "torchopt-adamw", _torchopt_adamw, 1e-3, "torchopt.adamw via torchopt.Optimizer",
        kind="peer", requires=("torchopt",),
    )
)
register(
    OptimizerSpec(
        "scao-orig", _scao_original, 1e-3, "original SCAO (PyPI scao), package defaults",
        kind="peer", requires=("scao",),
    )
)
register(
    OptimizerSpec(
        "soap", _heavyball_soap, 3e-3, "HeavyBall SOAP (eager, torch.compile off), package defaults",
        kind="peer", requires=("heavyball",),
    )
)
register(
    OptimizerSpec(
        "adamw8bit-torchao", _torchao_adamw8bit, 2e-3, "torchao AdamW8bit",
        kind="peer", requires=("torchao.optim",), cuda_only=True,
    )
)
register(
    OptimizerSpec(
        "adamw8bit-bnb", _bnb_adamw8bit, 2e-3, "bitsandbytes AdamW8bit",
        kind="peer", requires=("bitsandbytes",), cuda_only=True,
    )
)

#: Optimizers run by default (those not available here are reported and skipped).
DEFAULT_OPTIMIZERS: tuple[str, ...] = (
    "adamw", "scao", "sf-adamw", "torchopt-adamw", "scao-orig", "soap", "adamw8bit-torchao", "adamw8bit-bnb",
)


# ------------------------------------------------------------------------ ablations
#
# The ablation table: SCAO with one link of its chain removed, each expressed as arguments of
# ``scao_fx.scao`` (i.e. of ``scao_precondition``), or as the chain without the preconditioner.
# Each variant runs at SCAO's learning rate. This mapping is the single source of truth: the
# CLI's --ablate, the docs' ablation table and the tests read it.

ABLATIONS: dict[str, dict[str, Any]] = {
    "scao-no-blend": dict(
        removed="blend ramp", kwargs=dict(blend_steps=0),
        note="hard switch from Adam to preconditioned gradients at the end of warmup",
    ),
    "scao-no-int8": dict(
        removed="int8 curvature", kwargs=dict(use_int8_ema=False),
        note="curvature EMAs stored in float32",
    ),
    "scao-full-rank": dict(
        removed="adaptive rank", kwargs=dict(epsilon_sparse=0.0, k_min=1, k_max=4096),
        note="keep every eigenvector (no spectral-mass truncation)",
    ),
    "scao-no-complement": dict(
        removed="complement", kwargs=dict(complement="none"),
        note="pure low-rank projection U U^T G V V^T (the original README's formula)",
    ),
    "scao-no-precond": dict(
        removed="preconditioning entirely", kwargs=None,
        note="the chain without scao_precondition: scao_fx adamw at SCAO's learning rate",
    ),
}


def _ablation_builder(kwargs: dict | None):
    def build(lr, weight_decay, **options):
        import scao_fx as sf

        if kwargs is None:
            return sf.adamw(lr=lr, weight_decay=weight_decay)
        return sf.scao(lr=lr, weight_decay=weight_decay, **{**options, **kwargs})

    return build


for _name, _abl in ABLATIONS.items():
    register_chain(
        _name,
        _ablation_builder(_abl["kwargs"]),
        REGISTRY["scao"].default_lr,
        f"SCAO without {_abl['removed']}: {_abl['note']}",
        kind="ablation",
        extra=dict(removed=_abl["removed"], scao_kwargs=_abl["kwargs"]),
        takes_options=True,
    )


# ------------------------------------------------------------------------ the eigenbasis form


def _sf_soap(lr, weight_decay):
    import scao_fx as sf

    return sf.soap(lr=lr, weight_decay=weight_decay)


def _sf_scao_eigenbasis(lr, weight_decay, **options):
    import scao_fx as sf

    return sf.scao(lr=lr, weight_decay=weight_decay, **{**options, "form": "eigenbasis"})


register_chain("sf-soap", _sf_soap, 3e-3, "scao_fx soap: Adam in the eigenbases of full-rank fp32 factors", kind="ours")
register_chain(
    "scao-eigenbasis", _sf_scao_eigenbasis, 1e-3,
    "scao_fx scao(form='eigenbasis'): Adam in the eigenbases of SCAO's int8 adaptive-rank factors",
    kind="ours", takes_options=True,
)
