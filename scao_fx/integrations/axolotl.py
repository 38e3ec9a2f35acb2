"""An axolotl plugin: train with ``scao_fx.SCAO`` and report its diagnostics.

axolotl's ``optimizer:`` key takes the names of ``transformers``' optimizers and of the ones
axolotl wires itself; ``optimizer: scao`` (axolotl 0.21) imports the original ``scao`` package,
and the key takes no class path. axolotl's plugins can reach the ``Trainer`` after it is built
(``post_trainer_create``, called before ``trainer.train()``), so this plugin sets the Trainer's
``optimizer_cls_and_kwargs`` to :class:`scao_fx.SCAO` with the run's learning rate, weight decay,
Adam betas and epsilon (:func:`scao_fx.integrations.hf.scao_optimizer_cls_and_kwargs`), and puts
:class:`~scao_fx.integrations.hf.SCAODiagnosticsCallback` ahead of the ``report_to`` callbacks
(:func:`scao_fx.integrations.hf.add_diagnostics_callback`). axolotl's trainer then builds SCAO
over its own parameter groups (decay, no decay, embeddings, ``lr_groups``, LoRA+)::

    plugins:
      - scao_fx.integrations.axolotl.SCAOPlugin
    learning_rate: 2e-4
    weight_decay: 0.0
    scao_kwargs:            # any keyword of scao_fx.SCAO
      precond_freq: 10
    scao_diagnostics: true  # scao/* metrics to every report_to backend (the default)

Leave ``optimizer:`` unset (or at any ``transformers`` name): the plugin replaces it. This
module imports axolotl and pydantic only as axolotl loads it; its plugin methods work on any
``Trainer`` and mapping config, which is how ``tests/test_hf.py`` runs them without axolotl.
"""

from __future__ import annotations

from typing import Any

from .hf import add_diagnostics_callback, scao_optimizer_cls_and_kwargs

try:  # axolotl calls every hook of BasePlugin on each registered plugin
    from axolotl.integrations.base import BasePlugin as _PluginBase
except ImportError:  # without axolotl (tests, documentation) the hooks below still run
    _PluginBase = object  # type: ignore[assignment,misc]

try:
    from pydantic import BaseModel as _ArgsBase
except ImportError:  # pragma: no cover - axolotl always brings pydantic
    _ArgsBase = None  # type: ignore[assignment,misc]

__all__ = ["SCAOPlugin", "SCAOArgs"]


if _ArgsBase is not None:

    class SCAOArgs(_ArgsBase):  # type: ignore[misc,valid-type]
        """The plugin's keys in an axolotl config (merged into axolotl's config schema)."""

        scao_kwargs: dict[str, Any] | None = None
        scao_diagnostics: bool = True
        scao_diagnostics_per_param: bool = False


class SCAOPlugin(_PluginBase):  # type: ignore[misc,valid-type]
    """axolotl plugin: ``plugins: [scao_fx.integrations.axolotl.SCAOPlugin]``.

    Config keys: ``scao_kwargs`` (keywords of :class:`scao_fx.SCAO`, checked when the trainer is
    built), ``scao_diagnostics`` (default ``True``: add the diagnostics callback ahead of the
    ``report_to`` callbacks) and ``scao_diagnostics_per_param`` (per-parameter scalars too).
    """

    def get_input_args(self) -> str:
        return "scao_fx.integrations.axolotl.SCAOArgs"

    def register(self, cfg: dict) -> None:
        if _get(cfg, "optimizer") == "scao":
            raise ValueError(
                "optimizer: scao makes axolotl import the original 'scao' package; with "
                "scao_fx.integrations.axolotl.SCAOPlugin leave 'optimizer' unset (the plugin sets SCAO)"
            )

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        if getattr(trainer, "optimizer", None) is not None:
            raise ValueError("the trainer already has an optimizer; SCAOPlugin sets it through optimizer_cls_and_kwargs")
        chosen = getattr(trainer, "optimizer_cls_and_kwargs", None)
        if chosen is not None:  # one of axolotl's own optimizers, from its `optimizer:` key
            raise ValueError(
                f"the trainer already builds {getattr(chosen[0], '__name__', chosen[0])} (axolotl's 'optimizer' "
                "setting); with scao_fx.integrations.axolotl.SCAOPlugin leave 'optimizer' unset"
            )
        scao_kwargs = _get(cfg, "scao_kwargs") or {}
        trainer.optimizer_cls_and_kwargs = scao_optimizer_cls_and_kwargs(trainer.args, **scao_kwargs)
        if _get(cfg, "scao_diagnostics", True):
            add_diagnostics_callback(trainer, per_param=bool(_get(cfg, "scao_diagnostics_per_param", False)))


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """A key of axolotl's config (a dict subclass), of a plain dict, or of a namespace."""
    value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    return default if value is None else value
