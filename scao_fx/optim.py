"""``torch.optim`` facades: run any chain of the library as a ``torch.optim.Optimizer``.

:class:`TransformOptimizer` wraps a *transform factory* (``**hyperparameters ->
GradientTransformation``) so that a functional chain behaves like a regular PyTorch optimizer:
param groups with their own hyperparameters, learning-rate schedulers, ``closure``,
``zero_grad``, gradient clipping, AMP's ``GradScaler``, checkpoints through ``state_dict()``.

How it maps the functional protocol onto ``torch.optim``:

* one transform and one functional state per **param group** (not per parameter): the tree is
  the list of the group's trainable parameters, so transforms that stack same-shape leaves
  (SCAO's grouped execution) see the whole group at once;
* the learning rate is a 0-d float64 CPU tensor per group, refilled from ``group["lr"]`` before
  every step (LR schedulers work, the chain is never rebuilt for an LR change, no host sync);
  any other hyperparameter changed in ``group`` rebuilds that group's transform (state kept);
* the state is created lazily at the first ``step()`` (like ``torch.optim``), for the group's
  parameters that require grad at that moment; frozen parameters get no state at all (LoRA:
  only the adapters cost memory);
* ``step()`` reads ``p.grad`` (never writes it), skips parameters whose grad is ``None``, and
  adds the update to ``p`` in place under ``torch.no_grad()``.

Checkpoints: ``state_dict()`` holds plain tensors in plain dicts and lists (``torch.load(...,
weights_only=True)`` loads it); ``load_state_dict`` puts every tensor back with its saved dtype
(int8 codes stay int8, float32 statistics of bf16 parameters stay float32, int64 counters stay
int64) on the device the freshly initialised state would use (step counters on the CPU, the
rest next to its parameter), so resuming is bit-identical to not stopping.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import numbers
from typing import Any, Callable, Iterable, Mapping

import optree
import torch

from ._validation import check_int
from .base import GradientTransformation, check_transform
from .distributed import check_process_group
from .transforms.finite import apply_if_finite

__all__ = ["TransformOptimizer", "SCAO", "COMPAT_KEYWORDS", "INERT_KEYWORDS"]

_FORMAT = "scao_fx.TransformOptimizer"
_FORMAT_VERSION = 1
# Group keys that are never hyperparameters of the transform.
_NON_HYPER = ("params", "param_names")


def _same_value(a: Any, b: Any) -> bool:
    """Hyperparameter equality that never raises on tensors (identity for tensors)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # pragma: no cover - exotic values without a usable __eq__
        return False


class _GroupRuntime:
    """Per-group bookkeeping: the built transform, its lr tensor, the functional state."""

    __slots__ = ("transform", "built_with", "lr", "state", "active")

    def __init__(self) -> None:
        self.transform: GradientTransformation | None = None
        self.built_with: dict | None = None
        self.lr: torch.Tensor | None = None
        self.state: Any = None  # functional state, None until the first step
        self.active: list[int] | None = None  # positions (in group["params"]) of the state's leaves


class TransformOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs a functional chain over each param group.

    Args:
        params: an iterable of parameters, of ``(name, parameter)`` pairs (names are then used
            by :meth:`diagnostics`), or of param-group dicts, exactly as for ``torch.optim``.
        transform_factory: a callable ``(**hyperparameters) -> GradientTransformation``, called
            once per param group with that group's values of every key of ``defaults``. If
            ``defaults`` has an ``"lr"`` key, the factory receives ``lr`` as a 0-d float64 CPU
            tensor that the optimizer refills from ``group["lr"]`` before each step; pass it on
            to :func:`scao_fx.scale_by_learning_rate` (or any alias taking ``lr``).
        defaults: the hyperparameters and their default values (a mapping of str keys). Group
            keys outside ``defaults`` (for example ``initial_lr`` added by LR schedulers) are
            kept in the group but not passed to the factory.
        missing_grad: what the transform sees for a trainable parameter whose ``grad`` is
            ``None`` at a step: ``"none"`` (default) passes ``None`` (every transform of the
            library skips such leaves, SCAO's grouped preconditioner included: state untouched);
            ``"zero"`` passes a zero gradient, for transforms that need every leaf at every step;
            the parameter itself is left unchanged either way.

    Raises:
        TypeError: if ``transform_factory`` is not callable, ``defaults`` is not a mapping with
            str keys, or the factory does not return a ``GradientTransformation``.
        ValueError: if a group's ``lr`` is negative or NaN (and whatever the factory raises for
            invalid hyperparameters, noted with the group it came from).

    Example:
        >>> import torch, scao_fx as sf
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sf.TransformOptimizer(
        ...     model.parameters(),
        ...     lambda lr, weight_decay: sf.adamw(lr=lr, weight_decay=weight_decay),
        ...     {"lr": 1e-3, "weight_decay": 0.01},
        ... )
        >>> model(torch.randn(3, 4)).sum().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[Any],
        transform_factory: Callable[..., GradientTransformation],
        defaults: Mapping[str, Any],
        *,
        missing_grad: str = "none",
    ) -> None:
        if missing_grad not in ("none", "zero"):
            raise ValueError(f"missing_grad must be one of ('none', 'zero'), got {missing_grad!r}")
        self._missing_grad = missing_grad
        if not callable(transform_factory):
            raise TypeError(
                f"transform_factory must be a callable (**hyperparameters) -> GradientTransformation, "
                f"got {type(transform_factory).__name__}"
            )
        if not isinstance(defaults, Mapping):
            raise TypeError(f"defaults must be a mapping of hyperparameter names to values, got {type(defaults).__name__}")
        for key in defaults:
            if not isinstance(key, str):
                raise TypeError(f"defaults keys must be str, got {key!r}")
            if key in _NON_HYPER:
                raise ValueError(f"defaults must not contain the reserved key {key!r}")
        self._transform_factory = transform_factory
        self._runtimes: list[_GroupRuntime] = []
        super().__init__(params, dict(defaults))

    # ------------------------------------------------------------------ groups and transforms

    def _hyperparams(self, group: dict) -> dict:
        return {k: group[k] for k in self.defaults}

    def _check_lr(self, index: int, group: dict) -> None:
        if "lr" not in self.defaults:
            return
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"param_groups[{index}]['lr'] must be a number or a 1-element tensor, got shape {tuple(lr.shape)}")
            return
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
            raise TypeError(f"param_groups[{index}]['lr'] must be a real number, got {lr!r}")
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"param_groups[{index}]['lr'] must be in [0, inf), got {lr!r}")

    def _build(self, index: int) -> None:
        """(Re)build group ``index``'s transform from its current hyperparameters."""
        group = self.param_groups[index]
        rt = self._runtimes[index]
        self._check_lr(index, group)
        hyper = self._hyperparams(group)
        kwargs = dict(hyper)
        if "lr" in hyper:
            if rt.lr is None:
                rt.lr = torch.zeros((), dtype=torch.float64)
            self._fill_lr(rt.lr, hyper["lr"])
            kwargs["lr"] = rt.lr
        try:
            tx = self._transform_factory(**kwargs)
        except Exception as err:
            err.add_note(f"(raised while building the transform of param_groups[{index}] with {sorted(kwargs)})")
            raise
        check_transform("transform_factory(...)", tx)
        rt.transform = tx
        # Snapshot (not references): a list or dict hyperparameter mutated in place is seen.
        rt.built_with = {
            k: v if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in hyper.items() if k != "lr"
        }

    @staticmethod
    def _fill_lr(buf: torch.Tensor, lr: Any) -> None:
        if isinstance(lr, torch.Tensor):
            buf.copy_(lr.detach().reshape(()))
        else:
            buf.fill_(float(lr))

    def _refresh(self, index: int) -> _GroupRuntime:
        """Before a step: refill the lr tensor, rebuild if another hyperparameter changed."""
        group = self.param_groups[index]
        rt = self._runtimes[index]
        stale = rt.transform is None or any(
            not _same_value(group[k], v) for k, v in rt.built_with.items()  # type: ignore[union-attr]
        )
        if stale:
            self._build(index)
        elif rt.lr is not None:
            self._check_lr(index, group)
            self._fill_lr(rt.lr, group["lr"])
        return rt

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (as ``torch.optim``); its transform is built (and validated) now,
        its state at its first step."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        for j, p in enumerate(self.param_groups[index]["params"]):
            if p.is_complex():
                raise TypeError(
                    f"param_groups[{index}]['params'][{j}] is complex ({p.dtype}); scao_fx "
                    "optimizers support real floating-point parameters only (use torch.view_as_real)"
                )
            if not p.is_floating_point():
                raise TypeError(f"param_groups[{index}]['params'][{j}] has dtype {p.dtype}; only floating-point parameters can be optimized")
        self._runtimes.append(_GroupRuntime())
        try:
            self._build(index)
        except BaseException:
            self._runtimes.pop()
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------------ stepping

    def _gather_grads(self, index: int, rt: _GroupRuntime) -> list[torch.Tensor | None] | None:
        """The group's gradients as a list aligned with ``rt.active`` (None where missing)."""
        params = self.param_groups[index]["params"]
        if rt.active is None:
            rt.active = [j for j, p in enumerate(params) if p.requires_grad or p.grad is not None]
        active_set = set(rt.active)
        for j, p in enumerate(params):
            if p.grad is not None and j not in active_set:
                raise ValueError(
                    f"param_groups[{index}]['params'][{j}] has a gradient but did not require grad when "
                    "this optimizer's state was created, so it has no optimizer state; put newly "
                    "unfrozen parameters in a new group with add_param_group()"
                )
        grads: list[torch.Tensor | None] = []
        for j in rt.active:
            g = params[j].grad
            if g is None:
                grads.append(None)
                continue
            if g.is_sparse or g.layout != torch.strided:
                raise RuntimeError(
                    f"param_groups[{index}]['params'][{j}] has a sparse gradient ({g.layout}); scao_fx "
                    "optimizers need dense gradients (use torch.nn.Embedding(sparse=False))"
                )
            if g.is_complex():
                raise TypeError(f"param_groups[{index}]['params'][{j}] has a complex gradient ({g.dtype}); only real gradients are supported")
            grads.append(g.detach().clone(memory_format=torch.contiguous_format))
        return grads

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step on every param group.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss (run
                with gradients enabled).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for index, group in enumerate(self.param_groups):
            rt = self._refresh(index)
            params = group["params"]
            grads = self._gather_grads(index, rt)
            if not rt.active or all(g is None for g in grads):
                continue
            tree = [params[j] for j in rt.active]
            missing = [g is None for g in grads]
            if self._missing_grad == "zero" and any(missing):
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(tree, grads)]
            work.append((rt, tree, grads, missing, bool(group.get("skip_nonfinite", False))))
        with self._skip_together(work):
            for rt, tree, grads, missing, _ in work:
                if rt.state is None:
                    rt.state = rt.transform.init(tree)
                updates, rt.state = rt.transform.update(grads, rt.state, params=tree, inplace=True)
                for p, u, skip in zip(tree, updates, missing):
                    if u is not None and not skip:
                        p.add_(u.to(p.dtype))
        return loss

    @staticmethod
    def _skip_together(work: list) -> contextlib.AbstractContextManager:
        """With several guarded param groups, one finite check over all their gradients, used by
        every group's :func:`~scao_fx.apply_if_finite`: a NaN in one group skips every group
        (each guard alone would see only its own group). No host sync: the flag stays on the
        device."""
        guarded = [grads for *_, grads, _missing, guard in work if guard]
        if len(guarded) < 2:
            return contextlib.nullcontext()
        from .transforms.finite import _shared_finite_flag, all_finite

        return _shared_finite_flag(all_finite(guarded, overflow_safe=True))  # the check each guard makes

    # ------------------------------------------------------------------ inspection

    def functional_state(self, group: int = 0) -> Any:
        """The functional state of param group ``group`` (None before its first step).

        It is the state of the group's transform over the list of the group's trainable
        parameters (in ``group["params"]`` order, frozen ones left out)."""
        if not 0 <= group < len(self._runtimes):
            raise IndexError(f"group must be in [0, {len(self._runtimes) - 1}], got {group}")
        return self._runtimes[group].state

    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients so far.

        Counted by :func:`~scao_fx.apply_if_finite` (on by default in :class:`SCAO`, where a
        non-finite gradient in any param group skips every group); the largest count over the
        groups. Reading it synchronises with the device once."""
        from .transforms.finite import skipped_steps

        return max((skipped_steps(rt.state) for rt in self._runtimes if rt.state is not None), default=0)

    def transform(self, group: int = 0) -> GradientTransformation:
        """The ``GradientTransformation`` currently built for param group ``group``."""
        if not 0 <= group < len(self._runtimes):
            raise IndexError(f"group must be in [0, {len(self._runtimes) - 1}], got {group}")
        self._refresh(group)
        return self._runtimes[group].transform  # type: ignore[return-value]

    def _param_label(self, index: int, j: int) -> str:
        group = self.param_groups[index]
        names = group.get("param_names")
        if names is not None:
            return str(names[j])
        start = sum(len(g["params"]) for g in self.param_groups[:index])
        return str(start + j)

    # ------------------------------------------------------------------ copy / pickle

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_transform_factory"] = self._transform_factory
        state["_missing_grad"] = self._missing_grad
        # Transforms are closures over this optimizer's lr tensors: rebuilt on the other side.
        state["_runtimes"] = [(rt.state, rt.active) for rt in self._runtimes]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        saved = state.pop("_runtimes", [])
        had_differentiable = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if not had_differentiable:  # torch adds it; it is not a hyperparameter of the factory
            self.defaults.pop("differentiable", None)
        self._runtimes = []
        for index, (fstate, active) in enumerate(saved):
            rt = _GroupRuntime()
            rt.state, rt.active = fstate, active
            self._runtimes.append(rt)
            self._build(index)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state as plain dicts, lists, numbers and tensors.

        Layout (``torch.optim``-like; ``state`` is empty because the state is per group)::

            {"state": {},
             "param_groups": [{...hyperparameters, "params": [global indices]}, ...],
             "transform_state": [None | {"active": [positions in the group],
                                         "treespec": str, "leaves": [tensor | None, ...]}],
             "format": "scao_fx.TransformOptimizer", "version": 1}

        The tensors are the live state tensors (as ``torch.optim`` does): ``torch.save`` it or
        ``copy.deepcopy`` it to keep a snapshot. Loads with ``torch.load(weights_only=True)``.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        groups = []
        start = 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(packed)
        tstates: list[dict | None] = []
        for rt in self._runtimes:
            if rt.state is None:
                tstates.append(None)
                continue
            leaves, spec = optree.tree_flatten(rt.state, none_is_leaf=True)
            for leaf in leaves:
                if leaf is not None and not isinstance(leaf, torch.Tensor):
                    raise TypeError(
                        f"the functional state holds a {type(leaf).__name__} leaf; states must hold "
                        "tensors only to be saved (see scao_fx.base)"
                    )
            tstates.append({"active": list(rt.active or []), "treespec": str(spec), "leaves": leaves})
        state_dict: dict[str, Any] = {
            "state": {},
            "param_groups": groups,
            "transform_state": tstates,
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; every state tensor keeps its saved dtype exactly.

        Each tensor is copied onto the device that a fresh ``init`` puts it on (step counters
        stay on the CPU even if ``torch.load`` mapped everything to a GPU). Hyperparameters in
        the saved groups replace the current ones (as ``torch.optim`` does) and the transforms
        are rebuilt from them.

        Raises:
            ValueError: if ``state_dict`` was not produced by a ``TransformOptimizer``, or its
                groups, parameter counts, state structure, shapes or dtypes do not match this
                optimizer (the message says which).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if state_dict.get("format") != _FORMAT or "transform_state" not in state_dict:
            raise ValueError(
                "state_dict was not produced by a scao_fx TransformOptimizer (no 'transform_state' "
                "entry); a torch.optim optimizer's state cannot be loaded into it"
            )
        if state_dict.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported state_dict version {state_dict.get('version')!r}; this scao_fx reads version {_FORMAT_VERSION}")
        saved_groups = state_dict["param_groups"]
        tstates = state_dict["transform_state"]
        if len(saved_groups) != len(self.param_groups) or len(tstates) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param_groups[{i}] has {len(group['params'])} parameters, the state_dict's has {len(saved['params'])}"
                )

        new_states = []
        for i, (group, tstate) in enumerate(zip(self.param_groups, tstates)):
            if tstate is None:
                new_states.append((None, None))
                continue
            active = [int(j) for j in tstate["active"]]
            if any(not 0 <= j < len(group["params"]) for j in active):
                raise ValueError(f"transform_state[{i}]['active'] has positions outside param_groups[{i}]")
            new_states.append((active, tstate))

        # Hyperparameters: saved values replace current ones (params and names stay ours).
        for saved, group in zip(saved_groups, self.param_groups):
            for k, v in saved.items():
                if k not in _NON_HYPER:
                    group[k] = v
        for i in range(len(self.param_groups)):
            self._build(i)

        for i, (active, tstate) in enumerate(new_states):
            rt = self._runtimes[i]
            if tstate is None:
                rt.state, rt.active = None, None
                continue
            rt.state = self._restore_state(i, rt, active, tstate)
            rt.active = active

        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _restore_state(self, index: int, rt: _GroupRuntime, active: list[int], tstate: Mapping) -> Any:
        params = self.param_groups[index]["params"]
        template = rt.transform.init([params[j] for j in active])  # type: ignore[union-attr]
        t_leaves, t_spec = optree.tree_flatten(template, none_is_leaf=True)
        s_leaves = list(tstate["leaves"])
        if str(t_spec) != tstate["treespec"] or len(s_leaves) != len(t_leaves):
            raise ValueError(
                f"transform_state[{index}] does not match this optimizer's transform for param_groups[{index}] "
                f"(were the hyperparameters or the model changed?):\n  saved: {tstate['treespec']}\n  "
                f"now:   {t_spec}"
            )
        paths = optree.tree_paths(template, none_is_leaf=True)
        out = []
        for path, t, s in zip(paths, t_leaves, s_leaves):
            where = f"transform_state[{index}] leaf {'.'.join(map(str, path))}"
            if t is None or s is None:
                if (t is None) != (s is None):
                    raise ValueError(f"{where}: saved {type(s).__name__}, expected {type(t).__name__}")
                out.append(None)
                continue
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"{where}: expected a tensor, got {type(s).__name__}")
            if s.dtype != t.dtype:
                raise ValueError(f"{where}: saved dtype {s.dtype}, this optimizer keeps {t.dtype} there")
            if s.shape != t.shape:
                raise ValueError(f"{where}: saved shape {tuple(s.shape)}, expected {tuple(t.shape)}")
            out.append(s.detach().to(device=t.device, copy=True))
        return optree.tree_unflatten(t_spec, out)


# ============================================================================================
# SCAO: the drop-in AdamW replacement


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
    # torch.optim.AdamW's implementation choices: the library picks its own kernels.
    "foreach": None,
    "fused": None,
}

def _precondition_extras() -> dict[str, Any]:
    """The keyword-only arguments of :func:`scao_fx.scao_precondition` (beyond the original
    package's), with their current defaults, read from its signature so the facade and the
    functional alias can never disagree on a default."""
    import inspect

    from .alias import scao_precondition

    out = {}
    for name, param in inspect.signature(scao_precondition).parameters.items():
        if param.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("rank_eps", "process_group"):
            out[name] = param.default
    return out


#: Extra keywords of :func:`scao_fx.scao_precondition` that the facade passes through
#: (``block_size``, ``complement``, ``graft``, ``blend_shape``, ``tikhonov``, ``grouped``, ...).
PRECONDITION_EXTRAS: dict[str, Any] = _precondition_extras()

#: Keywords of the non-finite guard (:func:`scao_fx.apply_if_finite`) and their defaults; the
#: guard wraps every group's chain, plain-AdamW groups included.
GUARD_KEYWORDS: dict[str, Any] = {"skip_nonfinite": True, "max_consecutive_skips": 10, "host_sync": None}


def _check_compat(values: Mapping[str, Any]) -> None:
    """Validate the original package's compatibility keywords (see :data:`COMPAT_KEYWORDS`)."""
    for name, (neutral, why) in COMPAT_KEYWORDS.items():
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
    b3 = values["beta3"]
    if isinstance(b3, bool) or not isinstance(b3, numbers.Real) or not 0.0 <= b3 < 1.0:
        raise ValueError(f"beta3 must be a real number in [0, 1), got {b3!r}")
    for name in ("async_precond", "noise_relative"):
        _check_bool(name, values[name])
    for name in ("foreach", "fused"):
        if values[name] is not None:
            _check_bool(name, values[name])
    for name, low, high in (
        ("noise_anneal", 0.0, 1.0),
        ("lookahead_alpha", 0.0, 1.0),
        ("warmup_stability_threshold", 0.0, math.inf),
        ("lazy_delta_threshold", 0.0, math.inf),
        ("gsnr_threshold", 0.0, math.inf),
    ):
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not low <= v <= high:
            raise ValueError(f"{name} must be a real number in [{low}, {high}], got {v!r}")
    for name in ("warmup_patience", "lazy_max_skip"):
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be an integer in [1, inf), got {v!r}")


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


def _scao_factory(**hp: Any) -> GradientTransformation:
    """Build one param group's transform from its hyperparameters."""
    from .alias import adamw

    _check_compat(hp)
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
        tx = adamw(hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"])
    else:
        tx = _scao_chain(hp)
    return apply_if_finite(tx, max_skips, host_sync=hp["host_sync"], skip_overflow=True) if skip else tx


def _scao_chain(hp: Mapping[str, Any]) -> GradientTransformation:
    """The group's ``sf.scao`` chain (without the non-finite guard, added by the factory)."""
    from .alias import scao

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
        process_group=hp.get("process_group"),  # SCAO(process_group=...): not a hyperparameter
        skip_nonfinite=False,
        **extras,
    )


class SCAO(TransformOptimizer):
    r"""SCAO as a drop-in ``torch.optim`` optimizer (replaces ``torch.optim.AdamW`` in one line).

    Each param group runs ``sf.scao(...)``: the gradient of every matrix parameter is
    preconditioned by low-rank Kronecker factors (plain Adam during ``warmup_steps``, then a
    ``blend_steps`` ramp), and Adam with decoupled weight decay runs on top. Vectors and scalars
    (biases, norms) get plain AdamW. Every hyperparameter can be set per param group; a group
    with ``preconditioner_enabled=False`` runs plain AdamW (e.g. for huge embeddings).

    Args:
        params: parameters, ``(name, parameter)`` pairs or param-group dicts (as ``torch.optim``).
        lr: learning rate (start from about 1.17x your AdamW learning rate).
        betas: Adam's ``(beta1, beta2)``.
        eps: Adam's epsilon.
        weight_decay: decoupled weight decay.
        precond_freq: steps between eigenbasis refreshes.
        epsilon_sparse: spectral mass the adaptive rank may discard, in [0, 1).
        k_min, k_max: clamp of the adaptive rank.
        rho: curvature EMA decay.
        tau: optional cap of the preconditioned gradient's norm relative to the raw one's (only
            with ``graft="none"``).
        warmup_steps: steps of plain AdamW before the ramp.
        blend_steps: length of the linear (or cosine) ramp into the preconditioned gradient.
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
            and rejected with a ``ValueError`` explaining why otherwise; and the extra
            ``scao_precondition`` keywords ``block_size``, ``complement``, ``graft``,
            ``blend_shape``, ``tikhonov``, ``grouped``, ``sides``; and the non-finite guard's
            ``skip_nonfinite`` (default True: a step with a NaN/Inf gradient is skipped, leaving
            parameters and state exactly as they were), ``max_consecutive_skips`` (default 10,
            then :class:`~scao_fx.NonFiniteGradientError`) and ``host_sync`` (see
            :func:`~scao_fx.apply_if_finite`).

    Raises:
        TypeError: for an unknown keyword (naming it) or a wrongly typed value.
        ValueError: for an out-of-range value or an unsupported feature of the original.

    Example:
        >>> import torch, scao_fx
        >>> model = torch.nn.Linear(16, 8)
        >>> opt = scao_fx.SCAO(model.parameters(), lr=1e-3, weight_decay=0.1)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precond_freq: int = 20,
        epsilon_sparse: float = 0.05,
        k_min: int = 8,
        k_max: int = 128,
        rho: float = 0.999,
        tau: float | None = None,
        warmup_steps: int = 100,
        blend_steps: int = 50,
        min_precond_updates: int = 10,
        max_precond_dim: int = 4096,
        use_int8_ema: bool = True,
        preconditioner_enabled: bool = True,
        factor_mode: str = "full",
        *,
        process_group: Any = None,
        **compat: Any,
    ) -> None:
        known = {k: v[0] for k, v in COMPAT_KEYWORDS.items()}
        known.update(INERT_KEYWORDS)
        known.update(PRECONDITION_EXTRAS)
        known.update(GUARD_KEYWORDS)
        unknown = sorted(set(compat) - set(known))
        if unknown:
            raise TypeError(
                f"SCAO got unexpected keyword argument(s) {unknown}; accepted extra keywords: {sorted(known)}"
            )
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
        factory = _scao_factory
        if check_process_group("process_group", process_group) is not None:
            factory = functools.partial(_scao_factory, process_group=process_group)
        super().__init__(params, factory, defaults)

    def diagnostics(self, *, curvature_norms: bool = True, as_tensors: bool = False) -> dict[str, dict[str, Any]]:
        """Per-parameter diagnostics: rank, phase, blend, curvature norm, refreshes, fallbacks.

        Keys are the parameter names when the optimizer was given ``(name, param)`` pairs
        (``model.named_parameters()``), else the global parameter index as a string (the index
        in ``state_dict()["param_groups"][g]["params"]``). Parameters without state yet (before
        their group's first step, or frozen) are left out. See :mod:`scao_fx.diagnostics` for
        the record's keys. Nothing is computed during ``step()``; this call reads the state
        (and synchronises with the device once, unless ``as_tensors=True``).
        """
        from .diagnostics import adam_record, scao_diagnostics
        from .transforms.quantization import fp32_codec, int8_blockwise

        records: dict[str, dict[str, Any]] = {}
        for index, group in enumerate(self.param_groups):
            rt = self._runtimes[index]
            if rt.state is None or not rt.active:
                continue
            params = group["params"]
            labels = [self._param_label(index, j) for j in rt.active]
            if not group["preconditioner_enabled"]:
                step = _adam_count(rt.state)
                for j, label in zip(rt.active, labels):
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
                    codec=codec,
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
        side that is not preconditioned; 0 before the first refresh)."""
        return {
            name: (rec["rank_left"], rec["rank_right"])
            for name, rec in self.diagnostics(curvature_norms=False).items()
            if rec["sides"] != "none"
        }


def _adam_count(state: Any) -> torch.Tensor:
    from ._tree import find_nodes
    from .transforms.adam import ScaleByAdamState

    found = find_nodes(state, ScaleByAdamState)
    return found[0].count if found else torch.zeros((), dtype=torch.int64)
