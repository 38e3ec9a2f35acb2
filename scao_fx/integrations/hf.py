"""Hugging Face ``Trainer`` integration and TensorBoard logging of SCAO diagnostics.

``scao_fx.SCAO`` is a regular ``torch.optim.Optimizer``, so it goes into a ``Trainer`` as is::

    opt = scao_fx.SCAO(model.parameters(), lr=3e-4, weight_decay=0.01)
    trainer = Trainer(model, args, train_dataset=ds, optimizers=(opt, None))
    # or let the Trainer build it (its two weight-decay groups included):
    trainer = Trainer(model, args, train_dataset=ds,
                      optimizer_cls_and_kwargs=(scao_fx.SCAO, {"lr": 1e-3}))

    # or from the TrainingArguments (learning rate, weight decay, Adam betas and epsilon):
    trainer = Trainer(model, args, train_dataset=ds,
                      optimizer_cls_and_kwargs=scao_optimizer_cls_and_kwargs(args, precond_freq=10))

Checkpoints (``save_steps``) and ``resume_from_checkpoint`` work: the optimizer's state dict is
plain tensors and loads with ``torch.load(weights_only=True)``, as the Trainer loads it.

:class:`SCAODiagnosticsCallback` adds SCAO's diagnostics to the Trainer's logs at every logging
step and, given a ``torch.utils.tensorboard.SummaryWriter``, writes them to TensorBoard.
:func:`add_diagnostics_callback` puts it ahead of the Trainer's ``report_to`` callbacks, so
TensorBoard, W&B, ... receive the ``scao/*`` metrics with the loss. :func:`log_diagnostics`
does the same outside a Trainer.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from ..diagnostics import summarize_diagnostics

try:  # the callback base class; the helpers below work without transformers
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - exercised only without transformers installed
    _CallbackBase = object  # type: ignore[assignment,misc]

__all__ = [
    "SCAODiagnosticsCallback",
    "add_diagnostics_callback",
    "diagnostic_scalars",
    "log_diagnostics",
    "scao_optimizer_cls_and_kwargs",
    "unwrap_optimizer",
]

_PER_PARAM_KEYS = (
    "rank_left",
    "rank_right",
    "blend",
    "curvature_norm_left",
    "curvature_norm_right",
    "fallbacks_left",
    "fallbacks_right",
)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer with a ``diagnostics()`` method inside wrappers (accelerate's
    ``AcceleratedOptimizer`` keeps it in ``.optimizer``), or ``None``."""
    seen = 0
    while optimizer is not None and not hasattr(optimizer, "diagnostics") and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if optimizer is not None and hasattr(optimizer, "diagnostics") else None


def diagnostic_scalars(
    optimizer: Any, *, prefix: str = "scao", per_param: bool = False, curvature_norms: bool = True
) -> dict[str, float]:
    """Flatten an optimizer's diagnostics into ``{"prefix/key": float}`` scalars.

    Args:
        optimizer: a :class:`scao_fx.SCAO` (or a wrapper around one).
        prefix: prefix of every key.
        per_param: also emit ``prefix/<param>/<key>`` for every numeric per-parameter value
            (rank, blend, curvature norms, fallbacks of preconditioned parameters).
        curvature_norms: decode the curvature factors to report their norms.

    Returns:
        The scalars (empty if the optimizer has no state yet or no diagnostics), including
        ``prefix/skipped_steps``: steps skipped for non-finite gradients.
    """
    opt = unwrap_optimizer(optimizer)
    if opt is None:
        return {}
    records = opt.diagnostics(curvature_norms=curvature_norms)
    scalars = {f"{prefix}/{k}": float(v) for k, v in summarize_diagnostics(records).items()}
    if scalars and callable(getattr(opt, "skipped_steps", None)):
        scalars[f"{prefix}/skipped_steps"] = float(opt.skipped_steps())  # non-finite steps skipped
    if per_param:
        for name, rec in records.items():
            if rec["sides"] == "none":
                continue
            for key in _PER_PARAM_KEYS:
                value = rec[key]
                if value is not None:
                    scalars[f"{prefix}/{name}/{key}"] = float(value)
    return scalars


def log_diagnostics(optimizer: Any, writer: Any, step: int, **kwargs: Any) -> dict[str, float]:
    """Write :func:`diagnostic_scalars` to a TensorBoard ``SummaryWriter`` (``add_scalar``).

    Args:
        optimizer: a :class:`scao_fx.SCAO` (or a wrapper around one).
        writer: a ``torch.utils.tensorboard.SummaryWriter`` or any object with
            ``add_scalar(tag, value, global_step)``.
        step: the global step to log at.
        **kwargs: passed to :func:`diagnostic_scalars`.

    Returns:
        The scalars written.
    """
    if not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(f"writer must have an add_scalar(tag, value, step) method (a SummaryWriter), got {type(writer).__name__}")
    scalars = diagnostic_scalars(optimizer, **kwargs)
    for tag, value in scalars.items():
        if math.isfinite(value):
            writer.add_scalar(tag, value, step)
    return scalars


class SCAODiagnosticsCallback(_CallbackBase):  # type: ignore[misc,valid-type]
    """A ``transformers.TrainerCallback`` logging SCAO's diagnostics at every logging step.

    At each ``on_log`` it reads ``optimizer.diagnostics()`` (no cost inside the optimizer step),
    adds the summary scalars (``scao/rank_mean``, ``scao/blend``, ``scao/refreshes``,
    ``scao/solver_fallbacks``, ``scao/phase_*``, ``scao/curvature_norm_max``, ...) to the logged
    dict and to ``state.log_history``, keeps them in :attr:`history`, and writes them to
    ``writer`` (a ``SummaryWriter``) if one is given. Both forms of SCAO are read: with the
    eigenbasis form (the default) ``scao/blend`` is 0 at step 1 and 1 afterwards (no ramp) and
    ``scao/phase_precond`` counts the rotated matrices from step 2 on (see
    :mod:`scao_fx.diagnostics`).

    The Trainer calls its callbacks in order, and its ``report_to`` callbacks (TensorBoard, W&B,
    MLflow, ...) come before those passed as ``callbacks=[...]``: added that way, the scalars
    reach ``log_history`` and the printed logs but not the ``report_to`` backends (a warning
    says so once). :func:`add_diagnostics_callback` puts the callback first, so every backend
    receives them.

    Args:
        writer: optional ``torch.utils.tensorboard.SummaryWriter`` (anything with
            ``add_scalar``).
        per_param: also log per-parameter values (``scao/<param>/rank_left``, ...).
        prefix: prefix of the logged keys.
        curvature_norms: decode curvature factors for their norms (one decode per factor per
            logging step; turn off for very large models).

    Example:
        >>> from scao_fx.integrations.hf import SCAODiagnosticsCallback
        >>> cb = SCAODiagnosticsCallback()          # Trainer(..., callbacks=[cb])
    """

    def __init__(self, writer: Any = None, *, per_param: bool = False, prefix: str = "scao", curvature_norms: bool = True):
        if _CallbackBase is object:  # pragma: no cover
            raise ImportError("SCAODiagnosticsCallback needs transformers: pip install transformers")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer must have an add_scalar(tag, value, step) method (a SummaryWriter), got {type(writer).__name__}")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty str, got {prefix!r}")
        self.writer = writer
        self.per_param = bool(per_param)
        self.prefix = prefix
        self.curvature_norms = bool(curvature_norms)
        self.history: list[dict[str, float]] = []
        #: set by :func:`add_diagnostics_callback`: the callback runs before the reporters.
        self.ahead_of_reporters = False
        self._warned_order = False

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):  # noqa: D401 - HF signature
        scalars = diagnostic_scalars(
            optimizer, prefix=self.prefix, per_param=self.per_param, curvature_norms=self.curvature_norms
        )
        if not scalars:
            return control
        if logs is not None:
            logs.update(scalars)
        if not self.ahead_of_reporters and not self._warned_order and _reporting_backends(args):
            self._warned_order = True
            warnings.warn(
                "SCAODiagnosticsCallback runs after the Trainer's report_to callbacks "
                f"{_reporting_backends(args)}, so the {self.prefix}/* metrics reach state.log_history "
                "but not those backends; use scao_fx.integrations.hf.add_diagnostics_callback(trainer) "
                "instead of callbacks=[...]",
                stacklevel=2,
            )
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)
        self.history.append({"step": state.global_step, **scalars})
        if self.writer is not None:
            for tag, value in scalars.items():
                if math.isfinite(value):
                    self.writer.add_scalar(tag, value, state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None and callable(getattr(self.writer, "flush", None)):
            self.writer.flush()
        return control


def _reporting_backends(args: Any) -> list[str]:
    """The ``report_to`` integrations of a ``TrainingArguments`` (``"none"`` left out)."""
    report_to = getattr(args, "report_to", None)
    if report_to is None:
        return []
    if isinstance(report_to, str):
        report_to = [report_to]
    return [name for name in report_to if name != "none"]


def add_diagnostics_callback(trainer: Any, callback: SCAODiagnosticsCallback | None = None, **kwargs: Any) -> SCAODiagnosticsCallback:
    """Add a :class:`SCAODiagnosticsCallback` to a ``Trainer`` ahead of its other callbacks.

    ``transformers``' ``CallbackHandler`` calls the callbacks in the order of its list, which
    starts with the flow callback and the ``report_to`` integrations (``TensorBoardCallback``,
    ...); ``Trainer(callbacks=[...])`` and ``trainer.add_callback`` append after them. Placed
    first, the callback adds the ``scao/*`` scalars to the ``logs`` dict before any reporter
    reads it, so they reach every ``report_to`` backend (under the reporter's own naming:
    TensorBoard shows ``train/scao/blend``), ``state.log_history`` and the printed logs.

    Args:
        trainer: a ``transformers.Trainer`` (anything with a ``callback_handler.callbacks`` list).
        callback: the callback to add; by default a new one built from ``kwargs``.
        **kwargs: keywords of :class:`SCAODiagnosticsCallback` (``writer``, ``per_param``,
            ``prefix``, ``curvature_norms``) when ``callback`` is not given.

    Returns:
        The callback. A :class:`SCAODiagnosticsCallback` already in the Trainer (say from
        ``callbacks=[...]``) is taken out, so the metrics are computed once per logging step.

    Example:
        >>> from scao_fx.integrations.hf import add_diagnostics_callback
        >>> # trainer = Trainer(model, args, ...); add_diagnostics_callback(trainer)
    """
    if callback is None:
        callback = SCAODiagnosticsCallback(**kwargs)
    elif kwargs:
        raise TypeError("pass either a callback or the keywords to build one, not both")
    elif not isinstance(callback, SCAODiagnosticsCallback):
        raise TypeError(f"callback must be a SCAODiagnosticsCallback, got {type(callback).__name__}")
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", None)
    if not isinstance(callbacks, list):
        raise TypeError(f"trainer must be a transformers Trainer (with callback_handler.callbacks), got {type(trainer).__name__}")
    callbacks[:] = [cb for cb in callbacks if not isinstance(cb, SCAODiagnosticsCallback)]
    callbacks.insert(0, callback)
    callback.ahead_of_reporters = True
    return callback


def scao_optimizer_cls_and_kwargs(args: Any, **scao_kwargs: Any) -> tuple[type, dict[str, Any]]:
    """``(scao_fx.SCAO, keywords)`` for ``Trainer(optimizer_cls_and_kwargs=...)``, read from the
    training arguments.

    ``lr`` is ``args.learning_rate``, ``weight_decay`` is ``args.weight_decay``, ``betas`` is
    ``(args.adam_beta1, args.adam_beta2)`` and ``eps`` is ``args.adam_epsilon`` (each taken only
    where ``args`` has it); ``scao_kwargs`` (SCAO's own keywords: ``precond_freq``,
    ``warmup_steps``, ``k_max``, ...) are added and win. ``args.warmup_steps`` is the learning-rate
    schedule's warmup and is not passed on: SCAO's ``warmup_steps`` (the seed form's AdamW phase) is another
    setting. The keywords are checked here, by building an SCAO over a one-element tensor, so a
    misspelt name or a bad value fails before the model trains.

    Args:
        args: a ``transformers.TrainingArguments`` or any object with ``learning_rate`` and
            ``weight_decay`` attributes.
        **scao_kwargs: further keywords of :class:`scao_fx.SCAO`.

    Returns:
        ``(SCAO, kwargs)``. The Trainer builds ``SCAO(groups, **kwargs)`` with its two
        parameter groups (weights with ``args.weight_decay``, biases and norms with 0).

    Example:
        >>> from types import SimpleNamespace
        >>> from scao_fx.integrations.hf import scao_optimizer_cls_and_kwargs
        >>> cls, kw = scao_optimizer_cls_and_kwargs(
        ...     SimpleNamespace(learning_rate=2e-4, weight_decay=0.0), precond_freq=10)
        >>> cls.__name__, kw
        ('SCAO', {'lr': 0.0002, 'weight_decay': 0.0, 'precond_freq': 10})
    """
    import torch

    from ..optim import SCAO

    kwargs: dict[str, Any] = {"lr": float(args.learning_rate), "weight_decay": float(args.weight_decay)}
    beta1, beta2 = getattr(args, "adam_beta1", None), getattr(args, "adam_beta2", None)
    if beta1 is not None and beta2 is not None:
        kwargs["betas"] = (float(beta1), float(beta2))
    if getattr(args, "adam_epsilon", None) is not None:
        kwargs["eps"] = float(args.adam_epsilon)
    kwargs.update(scao_kwargs)
    SCAO([torch.nn.Parameter(torch.zeros(1))], **kwargs)  # validates names and values now
    return SCAO, kwargs
