"""Integrations with training frameworks.

* :mod:`scao_fx.integrations.hf`: a Hugging Face ``TrainerCallback`` that logs SCAO's
  diagnostics (and :func:`~scao_fx.integrations.hf.add_diagnostics_callback` to reach the
  ``report_to`` backends), ``optimizer_cls_and_kwargs`` from ``TrainingArguments``, and a
  TensorBoard helper (``torch.utils.tensorboard``).
* :mod:`scao_fx.integrations.axolotl`: an axolotl plugin setting SCAO and the diagnostics.

Each integration imports its framework lazily: ``import scao_fx`` never needs them.
"""
