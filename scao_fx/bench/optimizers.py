"""The benchmark's optimizer registry, and the SCAO ablation mapping (in one place).

Every entry is an :class:`OptimizerSpec`: a name, a factory ``(params, lr, weight_decay) ->``
a ``torch.optim.Optimizer``-like object (``step()``, ``zero_grad()``), a default learning rate,
an availability check (a missing peer package or a CUDA-only optimizer on a CPU run is
*reported and skipped*, never an error) and an optional state-bytes function.

Functional ``scao_fx`` chains run through :class:`scao_fx.TransformOptimizer`, so any chain of
the library becomes a registry entry with one line (see :func:`register_chain`).

Entries that need the parameters' names (``muon``, which splits the model into Muon's weight
matrices and AdamW's rest) set ``named_params``: their factory receives ``(name, tensor)`` pairs.

Default learning rates: the best final validation loss of ``scao-fx bench --sweep-only`` on
the default workload (``small`` preset, 500 steps, seed 0) over the grid 2.5e-4 ... 8e-3 (factors
of 2; SOAP 3.75e-4 ... 1.2e-2); docs/benchmarks.md lists the sweep. ``sf-adamw`` and
``torchopt-adamw`` compute AdamW's update, so they take AdamW's. ``--lr-sweep`` re-tunes on any
workload over ``default_lr x LR_GRID``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..presets import SCAO_DEFAULTS
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
    "variant",
    "VARIANT_SEPARATOR",
    "parse_options",
    "parse_value",
    "available",
    "state_bytes",
    "package_version",
    "OptimizerSet",
    "muon_split",
    "scao_option_keys",
    "check_scao_options",
    "BASELINE_CANDIDATES",
]

#: The AdamW variants the baseline is chosen from: the one with the lower mean final validation
#: loss is the baseline of every ratio (AdamW tuned over beta2 as well as the learning rate).
BASELINE_CANDIDATES: tuple[str, ...] = ("adamw", "adamw-b95")

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
        requires: importable module names the factory needs (missing -> skipped);
            ``"module:attr"`` also needs the attribute (e.g. ``"torch.optim:Muon"``).
        cuda_only: skip on non-CUDA devices.
        state_bytes_fn: ``optimizer -> bytes``; default :func:`state_bytes`' generic count.
        extra: free-form metadata recorded with results (e.g. the ablation's arguments).
        takes_options: the factory accepts keyword options (``--scao-opt KEY=VALUE`` reaches the
            SCAO entries this way).
        option_set: which of the run's option sets reaches a ``takes_options`` factory:
            ``"scao"`` (``--scao-opt``) or ``"muon"`` (``--muon-adamw-lr``).
        named_params: the factory receives ``(name, tensor)`` pairs instead of tensors.
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
    option_set: str = "scao"
    named_params: bool = False

    def unavailable_reason(self, device: torch.device | str = "cpu") -> str | None:
        """``None`` if the optimizer can run on ``device``, else why not (one line)."""
        if self.cuda_only and torch.device(device).type != "cuda":
            return "needs a CUDA device"
        for need in self.requires:
            module, _, attr = need.partition(":")
            try:
                mod = importlib.import_module(module)
            except Exception as exc:  # ImportError, or a broken install raising anything else
                return f"package {module!r} not importable ({type(exc).__name__}: {exc})".splitlines()[0]
            if attr and not hasattr(mod, attr):
                version = getattr(mod, "__version__", None) or package_version(module.split(".")[0])
                return f"{module}.{attr} does not exist here ({module.split('.')[0]} {version})"
        return None

    def make(self, params: Iterable[Any], lr: float, weight_decay: float, options: dict | None = None):
        """Build the optimizer over ``params`` (tensors, or ``(name, tensor)`` pairs when
        :attr:`named_params`); ``options`` reach the factory only when :attr:`takes_options`."""
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
    """The registered entry ``name``, or the variant it names (:func:`variant`); ``KeyError``
    listing the registered names for an unknown one, ``ValueError`` for a malformed variant."""
    if VARIANT_SEPARATOR in name:
        return variant(name)
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown optimizer {name!r}; registered: {', '.join(REGISTRY)}") from None


#: ``BASE@KEY=VALUE[+KEY=VALUE...]`` names a variant of a registered SCAO entry (:func:`variant`).
VARIANT_SEPARATOR = "@"


def parse_value(text: str) -> Any:
    """A command-line option value: ``true``/``false``, ``none``, an int, a float, a tuple of
    those written with commas (``betas=0.95,0.95``), else the text."""
    if "," in text:
        return tuple(parse_value(part) for part in text.split(","))
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_options(items: Iterable[str], flag: str) -> dict:
    """``KEY=VALUE`` items as a dict of parsed values; ``ValueError`` naming ``flag`` otherwise."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        if not key.strip():
            raise ValueError(f"{flag}: empty key in {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def variant(name: str) -> OptimizerSpec:
    """The entry ``BASE@KEY=VALUE[+KEY=VALUE...]``: the SCAO entry ``BASE`` (one that takes
    ``--scao-opt`` keys) with these keys set, e.g. ``scao@precond_freq=10+stat_freq=2``. It runs
    at ``BASE``'s learning rate (unless ``--lr`` names the variant) and its own keys override
    ``--scao-opt``'s. So several settings of one optimizer run side by side in one interleaved run.

    Raises:
        KeyError: ``BASE`` is not registered.
        ValueError: ``BASE`` takes no SCAO keys, or a key is malformed or unknown.
    """
    base, _, text = name.partition(VARIANT_SEPARATOR)
    spec = get(base)
    if not (spec.takes_options and spec.option_set == "scao"):
        takes = [n for n, s in REGISTRY.items() if s.takes_options and s.option_set == "scao"]
        raise ValueError(f"optimizer variant {name!r}: {base!r} takes no SCAO keys; variants exist of {', '.join(takes)}")
    options = parse_options(text.split("+") if text else [], f"optimizer variant {name!r}")
    if not options:
        raise ValueError(f"optimizer variant {name!r}: give at least one KEY=VALUE after {VARIANT_SEPARATOR!r}")
    check_scao_options(options, f"optimizer variant {name!r}")
    factory = spec.factory

    def build(params, lr, weight_decay, **given):
        return factory(params, lr, weight_decay, **{**given, **options})

    settings = ", ".join(f"{k}={v!r}" for k, v in options.items())
    return dataclasses.replace(spec, name=name, factory=build, description=f"{spec.description}; with {settings}",
                               extra={**spec.extra, "variant_of": base, "variant_options": options})


def available(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """``name -> None`` (runs here) or the reason it is skipped, for every registered entry."""
    return {name: spec.unavailable_reason(device) for name, spec in REGISTRY.items()}


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or ``None``."""
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

    :class:`OptimizerSet` (e.g. ``muon``'s Muon + AdamW pair): the sum over its parts, each
    counted as below.

    ``scao_fx.TransformOptimizer``: the functional states of every param group, through the
    library's accounting function when it exports one (else every tensor of the state is
    counted once). Anything else: :func:`metrics.optimizer_state_bytes` (torch.optim state
    dicts, torchopt's ``state_groups``).
    """
    if isinstance(optimizer, OptimizerSet):
        return sum(state_bytes(part) for part in optimizer.parts.values())
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


# ------------------------------------------------------------------------ several optimizers as one


class OptimizerSet:
    """Several ``torch.optim`` optimizers over disjoint parameter sets, stepped as one.

    ``step()`` and ``zero_grad()`` call every part in order; ``param_groups`` lists every
    part's groups (the parts' own dicts, so a scheduler that edits them reaches the parts);
    ``parts`` maps a label (e.g. ``"muon"``, ``"adamw"``) to the optimizer. The benchmark's
    :func:`state_bytes` counts the state of every part.

    Args:
        parts: ``label -> optimizer``, at least one.
    """

    def __init__(self, parts: dict[str, Any]) -> None:
        if not parts:
            raise ValueError("OptimizerSet needs at least one optimizer")
        self.parts = dict(parts)

    @property
    def param_groups(self) -> list[dict]:
        """The param groups of every part, in order."""
        return [g for opt in self.parts.values() for g in opt.param_groups]

    @property
    def state(self) -> dict:
        """Every part's per-parameter state in one dict (the parameter sets are disjoint)."""
        merged: dict = {}
        for opt in self.parts.values():
            merged.update(opt.state)
        return merged

    def step(self, closure: Callable[[], Any] | None = None):
        """Step every part; a ``closure`` is evaluated once, before the parts step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.parts.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``zero_grad`` of every part."""
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """``{label: part.state_dict()}``."""
        return {label: opt.state_dict() for label, opt in self.parts.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load ``{label: state_dict}`` as written by :meth:`state_dict` (same labels)."""
        if set(state_dict) != set(self.parts):
            raise ValueError(f"state_dict labels {sorted(state_dict)} do not match {sorted(self.parts)}")
        for label, opt in self.parts.items():
            opt.load_state_dict(state_dict[label])


def muon_split(named_params: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split the benchmark GPT's parameters for Muon: ``(muon_params, adamw_params)``.

    Muon takes the 2-D weight matrices of the transformer blocks (parameters named
    ``blocks.*`` with two dimensions: attention ``qkv``/``proj`` and the MLP's ``fc``/``out``;
    in the fine-tuning workload, the 2-D matrices of the encoder's layers, ``*.layer.N.*``, LoRA
    factors included);
    AdamW takes the rest: token and position embeddings, the output head, LayerNorm weights and
    every bias (the usual Muon recipe: hidden matrices only).

    Raises:
        TypeError: if ``named_params`` holds plain tensors instead of ``(name, tensor)`` pairs.
        ValueError: if no parameter qualifies for Muon (not the benchmark's model).
    """
    muon, rest = [], []
    for item in named_params:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError("muon_split needs (name, parameter) pairs, e.g. model.named_parameters()")
        name, p = item
        hidden = name.startswith("blocks.") or ".layer." in name  # the GPT's blocks, a BERT encoder's layers
        (muon if p.ndim == 2 and hidden else rest).append(p)
    if not muon:
        raise ValueError("muon: no 2-D weight matrix under 'blocks.' or '*.layer.N.' (Muon's split is written for the "
                         "benchmark's models)")
    return muon, rest


# ------------------------------------------------------------------------ factories


def _torch_adamw(params, lr, wd):
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=True)


def _torch_adamw_b95(params, lr, wd):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=wd, foreach=True)


#: Learning rate of the AdamW part of ``muon`` (embeddings, head, norms, biases) unless
#: ``--muon-adamw-lr`` sets it: AdamW's registry default.
MUON_ADAMW_LR = 1e-3


def _muon(params, lr, wd, adamw_lr: float | None = None):
    """``torch.optim.Muon`` (lr ``lr``, its default ``adjust_lr_fn``) on the blocks' weight
    matrices and ``torch.optim.AdamW`` (lr ``adamw_lr``) on the rest; see :func:`muon_split`."""
    adamw_lr = MUON_ADAMW_LR if adamw_lr is None else float(adamw_lr)
    if not (adamw_lr > 0 and adamw_lr < float("inf")):
        raise ValueError(f"muon: the AdamW part's learning rate must be positive and finite, got {adamw_lr}")
    matrices, rest = muon_split(params)
    parts = {"muon": torch.optim.Muon(matrices, lr=lr, weight_decay=wd)}
    if rest:
        parts["adamw"] = torch.optim.AdamW(rest, lr=adamw_lr, weight_decay=wd, foreach=True)
    return OptimizerSet(parts)


def _pto_soap(params, lr, wd):
    import pytorch_optimizer

    return pytorch_optimizer.SOAP(params, lr=lr, weight_decay=wd)


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


register(OptimizerSpec("adamw", _torch_adamw, 1e-3, "torch.optim.AdamW (foreach), betas (0.9, 0.999)", kind="baseline"))
register(
    OptimizerSpec(
        "adamw-b95", _torch_adamw_b95, 1e-3, "torch.optim.AdamW (foreach), betas (0.9, 0.95)", kind="baseline",
    )
)
register(
    OptimizerSpec(
        "muon", _muon, 0.02,
        "torch.optim.Muon on the blocks' weight matrices + torch.optim.AdamW (lr --muon-adamw-lr) on the rest",
        kind="peer", requires=("torch.optim:Muon",), takes_options=True, option_set="muon", named_params=True,
    )
)
register(
    OptimizerSpec(
        "scao", _scao_facade, SCAO_DEFAULTS["lr"],
        "scao_fx SCAO, its defaults (Adam in the eigenbases of int8 Kronecker factors, bfloat16 bases)",
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
        "soap-pto", _pto_soap, 3e-3, "pytorch-optimizer SOAP, package defaults (lr untuned)",
        kind="peer", requires=("pytorch_optimizer",),
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
    "adamw", "adamw-b95", "scao", "muon", "sf-adamw", "torchopt-adamw", "scao-orig", "soap", "soap-pto",
    "adamw8bit-torchao", "adamw8bit-bnb",
)


# ------------------------------------------------------------------------ --scao-opt keys

#: Arguments of the SCAO entries that the benchmark itself sets (not ``--scao-opt`` keys).
_SCAO_RESERVED = frozenset({"self", "params", "lr", "weight_decay", "process_group", "precondition_kwargs"})


def scao_option_keys() -> list[str]:
    """The keys ``--scao-opt`` accepts: the named arguments of ``scao_fx.SCAO``, ``scao_fx.scao``
    and ``scao_fx.scao_precondition`` (what the ``scao`` entry and the ablations pass them to),
    less those the benchmark sets itself (``lr``, ``weight_decay``, ...)."""
    import inspect

    import scao_fx as sf

    keys: set[str] = set()
    for fn in (getattr(sf, "SCAO", None), getattr(sf, "scao", None), getattr(sf, "scao_precondition", None)):
        if fn is None:
            continue
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                keys.add(p.name)
    return sorted(keys - _SCAO_RESERVED)


def check_scao_options(options: dict, where: str = "--scao-opt") -> None:
    """``ValueError`` naming the first key of ``options`` that ``--scao-opt`` does not accept,
    with the accepted keys listed; ``where`` names what gave the keys."""
    valid = scao_option_keys()
    for key in options:
        if key not in valid:
            raise ValueError(f"{where}: unknown key {key!r}; valid keys: {', '.join(valid)}")


# ------------------------------------------------------------------------ ablations
#
# The ablation table: SCAO with one part removed or changed, each expressed as arguments of
# ``scao_fx.scao``, or as the chain without the preconditioner.
# Each variant runs at SCAO's learning rate. This mapping is the single source of truth: the
# CLI's --ablate, the docs' ablation table and the tests read it.

ABLATIONS: dict[str, dict[str, Any]] = {
    "scao-seed-form": dict(
        removed="eigenbasis", kwargs=dict(form="seed"),
        note="the seed form: low-rank L^-1/4 G R^-1/4, grafting, Adam warmup and blend ramp, then AdamW",
    ),
    "scao-no-int8": dict(
        removed="int8 statistics and bfloat16 bases",
        kwargs=dict(use_int8_ema=False, basis_storage="float32", second_moment="full"),
        note="float32 statistics and bases, Adam's full second moment: sf.soap at SCAO's hyperparameters",
    ),
    "scao-full-second-moment": dict(
        removed="the factored second moment", kwargs=dict(second_moment="full"),
        note="Adam's full second moment in the eigenbasis (the default until 2026-12-07)",
    ),
    "scao-fp32-basis": dict(
        removed="bfloat16 bases", kwargs=dict(basis_storage="float32"),
        note="eigenbases stored in float32",
    ),
    "scao-no-skip-first": dict(
        removed="step-1 skip", kwargs=dict(skip_first=False),
        note="plain Adam at step 1, its second moment carried into the eigenbasis",
    ),
    "scao-power-refresh": dict(
        removed="exact eigh refresh", kwargs=dict(eigensolver="power"),
        note="one warm-started power iteration per refresh, each direction kept at its position (sf.soap's)",
    ),
    "scao-adaptive-rank": dict(
        removed="full rank", kwargs=dict(epsilon_sparse=0.05, k_max=128),
        note="adaptive rank truncation (95 % of the spectral mass, at most 128), Adam on the complement",
    ),
    "scao-no-precond": dict(
        removed="preconditioning entirely", kwargs=None,
        note="sf.adamw at SCAO's learning rate and betas",
    ),
}


def _ablation_builder(kwargs: dict | None):
    def build(lr, weight_decay, **options):
        import scao_fx as sf

        if kwargs is None:
            return sf.adamw(lr=lr, betas=SCAO_DEFAULTS["betas"], weight_decay=weight_decay)
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

    # the hyperparameters HeavyBall's SOAP ("soap") runs at by default, so the two compare like for like
    return sf.soap(lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), shampoo_beta=0.95, precond_freq=2,
                   max_precond_dim=2048)


def _sf_scao_eigenbasis(lr, weight_decay, **options):
    import scao_fx as sf

    return sf.scao(lr=lr, weight_decay=weight_decay, **{**options, "form": "eigenbasis"})


register_chain("sf-soap", _sf_soap, 3e-3, "scao_fx soap at HeavyBall SOAP's defaults (betas 0.9/0.95, refresh every 2 steps)", kind="ours")
register_chain(
    "scao-eigenbasis", _sf_scao_eigenbasis, 1e-3,
    "scao_fx scao(form='eigenbasis'): Adam in the eigenbases of SCAO's int8 adaptive-rank factors",
    kind="ours", takes_options=True,
)
