"""The ``torch.optim`` adapter: run any chain of the library as a ``torch.optim.Optimizer``.

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
* ``torch.compile(opt.step, fullgraph=True)`` traces the whole step: a changed ``lr`` is traced
  as a number filling the lr tensor (no recompilation per value), and a rebuild, which is eager
  Python, never happens in a traced step: after changing another hyperparameter, call
  :meth:`TransformOptimizer.transform` for the group eagerly (a compiled step that finds the
  change raises a ``RuntimeError`` naming it);
* the state is created lazily at the first ``step()`` (like ``torch.optim``), for the group's
  parameters that require grad at that moment; frozen parameters get no state at all (LoRA:
  only the adapters cost memory); a frozen parameter unfrozen later gets its state at its first
  gradient (the group's state grows, see :mod:`scao_fx.optim.regroup`);
* ``step()`` reads ``p.grad`` (never writes it), skips parameters whose grad is ``None``, and
  adds the update to ``p`` in place under ``torch.no_grad()``.

Checkpoints: ``state_dict()`` holds plain tensors in plain dicts and lists (``torch.load(...,
weights_only=True)`` loads it); ``load_state_dict`` puts every tensor back with its saved dtype
(int8 codes stay int8, float32 statistics of bf16 parameters stay float32, int64 counters stay
int64) on the device the freshly initialised state would use (step counters on the CPU, the
rest next to its parameter), so resuming is bit-identical to not stopping. The format itself
lives in :mod:`scao_fx.optim.checkpoint`.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Any, Callable, Iterable, Mapping

import torch

from .. import _treemath
from ..base import GradientTransformation, check_transform
from ..transforms.finite import FiniteGuard, all_finite, skipped_steps
from . import checkpoint, regroup

__all__ = ["TransformOptimizer", "dcp_state_dict"]

# Group keys that are never hyperparameters of the transform.
_NON_HYPER = ("params", "param_names")


def _same_value(a: Any, b: Any) -> bool:
    """Hyperparameter equality that never raises on tensors (identity for tensors)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b) and _value_type(a) is _value_type(b)
    except Exception:  # pragma: no cover - exotic values without a usable __eq__
        return False


def _value_type(x: Any) -> type:
    """``type(x)``, with a number traced by ``torch.compile`` (a changed float or int becomes a
    ``SymFloat``/``SymInt``) counted as the Python number it stands for."""
    if isinstance(x, torch.SymFloat):
        return float
    if isinstance(x, torch.SymInt):
        return int
    return type(x)


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

    #: Whether ``step()`` gives the transforms copies of the gradients. The protocol lets a link
    #: write into the updates it is given under ``inplace=True`` (``scale``,
    #: ``add_decayed_weights``, ``clip_by_global_norm`` do), and ``p.grad`` must stay as autograd
    #: left it, so the transforms of an arbitrary factory get copies. A subclass whose transforms
    #: only read their input updates (:class:`~scao_fx.optim.scao.SCAO`) sets it to False and
    #: saves one gradient-sized copy per step.
    _copy_grads: bool = True

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
        if torch.compiler.is_compiling():
            # A torch.compile'd step whose lr changed between calls traces it as a symbolic
            # number (Dynamo's automatic dynamic), whose value only the graph knows: checked by
            # the eager calls (construction, add_param_group, an eager step, transform()).
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
        rt = self._runtimes[index]
        rt.transform, rt.built_with, rt.lr = self._make(index, self.param_groups[index], rt.lr)

    def _make(self, index: int, group: Mapping[str, Any], lr_buf: torch.Tensor | None) -> tuple:
        """Build a transform from ``group``'s hyperparameters without touching the optimizer.

        Returns ``(transform, built_with, lr buffer)``; the buffer is ``lr_buf`` refilled (a new
        one when ``lr_buf`` is None)."""
        self._check_lr(index, group)
        hyper = self._hyperparams(group)
        kwargs = dict(hyper)
        if "lr" in hyper:
            if lr_buf is None:
                lr_buf = torch.zeros((), dtype=torch.float64)
            self._fill_lr(lr_buf, hyper["lr"])
            kwargs["lr"] = lr_buf
        try:
            tx = self._transform_factory(**kwargs)
        except Exception as err:
            if not torch.compiler.is_compiling():  # Dynamo cannot trace add_note
                err.add_note(f"(raised while building the transform of param_groups[{index}] with {sorted(kwargs)})")
            raise
        check_transform("transform_factory(...)", tx)
        # Snapshot (not references): a list or dict hyperparameter mutated in place is seen.
        built_with = {
            k: v if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in hyper.items() if k != "lr"
        }
        return tx, built_with, lr_buf

    @staticmethod
    def _fill_lr(buf: torch.Tensor, lr: Any) -> None:
        if torch.compiler.is_compiling():
            # Traced: written through a 1-element view (torch 2.13's AOT autograd drops a write
            # to a 0-d float64 CPU graph input written directly: the compiled step would keep the
            # first lr); lr may be symbolic (it changed between calls): float() would specialise
            # the graph on its value.
            target = buf.view(1)
            if isinstance(lr, torch.Tensor):
                target.copy_(lr.detach().reshape(1))
            else:
                target.fill_(lr)
        elif isinstance(lr, torch.Tensor):
            buf.copy_(lr.detach().reshape(()))
        else:
            buf.fill_(float(lr))

    def _refresh(self, index: int) -> _GroupRuntime:
        """Before a step: refill the lr tensor, rebuild if another hyperparameter changed.

        A rebuilt transform must fit the group's existing state: if the changed hyperparameters
        shape the state (``use_int8_ema``, ``k_max``, ``preconditioner_enabled``, ...), a
        ``ValueError`` names them and the group keeps its previous transform."""
        group = self.param_groups[index]
        rt = self._runtimes[index]
        stale = rt.transform is None or any(
            not _same_value(group[k], v) for k, v in rt.built_with.items()  # type: ignore[union-attr]
        )
        if stale and torch.compiler.is_compiling():
            self._raise_stale_compiled(index, rt)
        if stale and rt.state is None:
            self._build(index)
        elif stale:
            # a fresh lr buffer: the current transform (kept if the new one does not fit) holds rt.lr
            tx, built_with, lr_buf = self._make(index, group, None)
            self._check_fits(index, rt, tx, built_with)
            rt.transform, rt.built_with, rt.lr = tx, built_with, lr_buf
        elif rt.lr is not None:
            self._check_lr(index, group)
            self._fill_lr(rt.lr, group["lr"])
        return rt

    def _raise_stale_compiled(self, index: int, rt: _GroupRuntime) -> None:
        """A traced step found a hyperparameter changed since the group's transform was built.

        Building a transform (validation, closures) is eager Python that a graph cannot hold:
        under ``torch.compile`` the step only runs the transforms built before it, and a change
        is rebuilt by the next eager :meth:`transform` (or eager ``step()``)."""
        old = rt.built_with or {}
        group = self.param_groups[index]
        changed = [k for k in old if not _same_value(group[k], old[k])]
        raise RuntimeError(
            f"param_groups[{index}]: {changed or 'a hyperparameter'} changed since the group's transform "
            f"was built, and a torch.compile'd step cannot rebuild it; call opt.transform({index}) "
            "(eagerly, outside the compiled function) after changing a hyperparameter other than lr"
        )

    def _template(self, index: int, tx: GradientTransformation, active: list[int]) -> Any:
        """A fresh state of ``tx`` over the parameters at ``active``, built on the meta device
        (no memory) when the transform allows it, else on the parameters themselves."""
        params = [self.param_groups[index]["params"][j] for j in active]
        try:
            return tx.init([torch.empty_like(p, device="meta") for p in params])
        except Exception:  # noqa: BLE001 - any transform whose init needs real data
            return tx.init(params)

    def _check_fits(self, index: int, rt: _GroupRuntime, tx: GradientTransformation, built_with: dict) -> None:
        """Raise a ``ValueError`` naming the changed keys if ``tx`` cannot use ``rt.state``."""
        why = checkpoint.state_mismatch(self._template(index, tx, rt.active or []), rt.state)
        if why is None:
            return
        old = rt.built_with or {}
        changed = sorted(k for k in built_with if k in old and not _same_value(built_with[k], old[k]))
        what = ", ".join(f"{k!r} ({old[k]!r} -> {built_with[k]!r})" for k in changed) or "a hyperparameter"
        raise ValueError(
            f"param_groups[{index}]: changing {what} changes the shape of the group's optimizer state "
            f"({why.splitlines()[0]}), so the existing state cannot be used with it. Set "
            f"{'it' if len(changed) == 1 else 'them'} back to the previous value, or build a new optimizer "
            "with the new value (its state starts afresh); the group keeps its previous transform meanwhile"
        )

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
        unfrozen = [j for j, p in enumerate(params) if p.grad is not None and j not in active_set]
        if unfrozen:  # frozen when the state was created, trained from now on
            self._grow(index, rt, unfrozen)
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
            g = g.detach()
            if self._copy_grads:
                grads.append(g.clone(memory_format=torch.contiguous_format))
            else:
                grads.append(g if g.is_contiguous() else g.contiguous())
        return grads

    def _grow(self, index: int, rt: _GroupRuntime, unfrozen: list[int]) -> None:
        """Progressive unfreezing: add the parameters at ``unfrozen`` to the group's state.

        The group's state is initialised afresh over the enlarged active set and the old
        state is carried over (:func:`scao_fx.optim.regroup.carry_over`): every old parameter
        keeps its per-parameter state (Adam moments, counters) exactly, shared counters keep
        their values, a shape group of the preconditioner keeps its curvature if its members
        are unchanged and restarts otherwise; the new parameters start fresh."""
        new_active = sorted(set(rt.active or []) | set(unfrozen))
        if rt.state is None:
            rt.active = new_active
            return
        params = self.param_groups[index]["params"]
        fresh = rt.transform.init([params[j] for j in new_active])  # type: ignore[union-attr]
        rt.state = regroup.carry_over(rt.state, fresh, rt.active or [], new_active)
        rt.active = new_active

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
            work.append((rt, tree, grads, missing))
        verdict = self._shared_verdict(work)
        for rt, tree, grads, missing in work:
            if rt.state is None:
                rt.state = rt.transform.init(tree)
            if verdict is not None and isinstance(rt.transform, FiniteGuard):
                updates, rt.state = rt.transform.update(grads, rt.state, params=tree, inplace=True, finite=verdict)
            else:
                updates, rt.state = rt.transform.update(grads, rt.state, params=tree, inplace=True)
            applied = [None if skip else u for u, skip in zip(updates, missing)]
            _treemath.add_scaled(tree, applied, inplace=True)
        return loss

    @staticmethod
    def _shared_verdict(work: list) -> torch.Tensor | None:
        """With several guarded param groups (:func:`~scao_fx.apply_if_finite` at the top of
        their transforms), one finite check over all their gradients, passed to every group's
        guard as its ``finite=`` argument: a NaN in one group skips every group (each guard
        alone would see only its own group). ``None`` with fewer than two guarded groups. No
        host sync: the flag stays on the device."""
        guarded = [grads for rt, _tree, grads, _missing in work if isinstance(rt.transform, FiniteGuard)]
        if len(guarded) < 2:
            return None
        return all_finite(guarded, overflow_safe=True)  # the check each guard makes

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

        Layout (version 2, see :mod:`scao_fx.optim.checkpoint` and ``docs/checkpointing.md``)::

            {"state": {global index: {"step": float32 tensor, "exp_avg": ..., "exp_avg_sq": ...}},
             "param_groups": [{...hyperparameters, "params": [global indices]}, ...],
             "transform_state": [None | {"active": [positions in the group], "treespec": str,
                                         "leaves": [tensor | None | "state/<index>/<name>", ...]}],
             "format": "scao_fx.TransformOptimizer", "version": 2}

        ``state`` is ``torch.optim.AdamW``'s layout: ``AdamW.load_state_dict`` carries the moments.
        The tensors are the live state tensors (as ``torch.optim`` does): ``torch.save`` it or
        ``copy.deepcopy`` it to keep a snapshot. Loads with ``torch.load(weights_only=True)``.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = checkpoint.pack(self.param_groups, [(rt.active, rt.state) for rt in self._runtimes])
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
        are rebuilt from them. Checkpoints of the previous format (version 1) load too.

        A ``torch.optim.Adam``/``AdamW`` state dict warm-starts the optimizer: its hyperparameters
        replace the current ones, its ``exp_avg``/``exp_avg_sq`` become the Adam moments and its
        ``step`` the step counts; everything else (SCAO's curvature, blend and guard) starts
        fresh (see ``docs/checkpointing.md``).

        The load is atomic: everything is checked (and every group's state built) before
        anything is changed, so a rejected checkpoint leaves the optimizer exactly as it was.

        Raises:
            ValueError: if ``state_dict`` was produced by neither a ``TransformOptimizer`` nor
                ``torch.optim.Adam``/``AdamW``, or its groups, parameter counts, state
                structure, shapes or dtypes do not match this optimizer (the message says which).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        foreign = checkpoint.is_torch_layout(state_dict)
        if foreign:
            saved_states: list = checkpoint.unpack_torch(state_dict, self.param_groups)
        else:
            saved_states = checkpoint.unpack(state_dict, self.param_groups)
        # Stage: new group values, transforms and states, without touching the optimizer.
        staged = []
        for index, (saved, saved_state) in enumerate(zip(state_dict["param_groups"], saved_states)):
            group = self.param_groups[index]
            values = self._saved_group_values(index, saved)
            tx, built_with, lr_buf = self._make(index, {**group, **values}, None)
            params = group["params"]
            if foreign:
                if not saved_state:  # no saved state for this group: it starts at its first step
                    active, state = None, None
                else:
                    active = sorted({j for j, p in enumerate(params) if p.requires_grad} | set(saved_state))
                    state = checkpoint.warm_start(index, tx.init([params[j] for j in active]), active, saved_state)
            elif saved_state is None:
                active, state = None, None
            else:
                active, entry = saved_state
                state = checkpoint.restore(index, tx.init([params[j] for j in active]), entry)
            staged.append((values, tx, built_with, lr_buf, active, state))
        # Commit: nothing below can fail.
        for index, (values, tx, built_with, lr_buf, active, state) in enumerate(staged):
            rt = self._runtimes[index]
            self.param_groups[index].update(values)
            rt.transform, rt.built_with, rt.lr = tx, built_with, lr_buf
            rt.state, rt.active = state, active
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _saved_group_values(self, index: int, saved: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of a saved param group that replace the current group's values.

        Tensors (a tensor learning rate, say) are copied, as ``torch.optim`` does: an optimizer
        loaded from another's ``state_dict()`` never shares a hyperparameter tensor with it (a
        scheduler on one would otherwise change the other's)."""
        return {
            k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in saved.items()
            if k not in _NON_HYPER
        }


def dcp_state_dict(optimizer: Any) -> dict:
    """An optimizer's ``state_dict()`` with every param group's state created: the target
    (and source) of ``torch.distributed.checkpoint``.

    A fresh optimizer creates its state at its first step; ``dcp.load`` needs tensors of the
    right shapes to load into, so this creates each missing group state now, exactly as the
    first step would (for the parameters that require grad). Save with
    ``dcp.save({"optim": sf.dcp_state_dict(opt), ...})``; load with ``sd = {"optim":
    sf.dcp_state_dict(opt), ...}; dcp.load(sd); opt.load_state_dict(sd["optim"])``.

    Args:
        optimizer: a :class:`~scao_fx.TransformOptimizer` (e.g. :class:`~scao_fx.SCAO`).

    Returns:
        ``optimizer.state_dict()`` (its tensors are the live state tensors).

    Example:
        >>> import torch, scao_fx as sf
        >>> opt = sf.SCAO(torch.nn.Linear(4, 2).parameters())
        >>> sd = sf.dcp_state_dict(opt)
        >>> sd["transform_state"][0]["active"]
        [0, 1]
    """
    if not isinstance(optimizer, TransformOptimizer):
        raise TypeError(f"optimizer must be a scao_fx TransformOptimizer (e.g. SCAO), got {type(optimizer).__name__}")
    for index, group in enumerate(optimizer.param_groups):
        rt = optimizer._refresh(index)
        if rt.state is None:  # what the first step() does
            params = group["params"]
            rt.active = [j for j, p in enumerate(params) if p.requires_grad]
            if rt.active:
                rt.state = rt.transform.init([params[j] for j in rt.active])
    return optimizer.state_dict()
