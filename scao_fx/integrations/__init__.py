"""Integrations with training frameworks.

* :mod:`scao_fx.integrations.hf`: a Hugging Face ``TrainerCallback`` that logs SCAO's
  diagnostics, and a TensorBoard helper (``torch.utils.tensorboard``).

Each integration imports its framework lazily: ``import scao_fx`` never needs them.
"""
