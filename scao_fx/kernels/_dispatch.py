"""Backend selection: ``reference`` (pure PyTorch) or ``triton``.

Order of precedence, first match wins:

1. the per-call ``backend=`` argument (``"reference"`` or ``"triton"``);
2. the environment variable ``SCAO_FX_KERNELS`` (``reference`` or ``triton``; ``auto`` or
   empty means unset), read at every call;
3. auto: ``triton`` for CUDA tensors when Triton is importable, ``reference`` otherwise.

A CPU tensor only runs the Triton kernels when ``triton`` is forced (argument or environment)
*and* ``TRITON_INTERPRET=1`` was set before Triton was first imported; forcing ``triton`` where
it cannot run raises ``RuntimeError`` instead of silently falling back.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType
from typing import Optional, Union

import torch

BACKENDS = ("reference", "triton")
ENV_VAR = "SCAO_FX_KERNELS"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton is importable (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _requested(backend: Optional[str]) -> Optional[str]:
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        return backend
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be 'reference', 'triton' or 'auto', got {env!r}")
    return env


def backend(device: Union[torch.device, str, torch.Tensor, None] = None,
            requested: Optional[str] = None) -> str:
    """The backend a kernel call would use for tensors on ``device``.

    Args:
        device: a device, a device string or a tensor (its device); ``None`` means the current
            CUDA device if CUDA is available, else the CPU.
        requested: the per-call ``backend=`` argument (``None`` for automatic).

    Returns:
        ``"reference"`` or ``"triton"``.

    Raises:
        RuntimeError: ``triton`` is forced but cannot run on that device.
    """
    if isinstance(device, torch.Tensor):
        device = device.device
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    want = _requested(requested)
    if want == "reference":
        return "reference"
    if want == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was forced but Triton is not importable")
        if device.type == "cpu" and not _interpret():
            raise RuntimeError(
                "backend 'triton' was forced for CPU tensors; set TRITON_INTERPRET=1 before "
                "importing Triton to run the kernels in the interpreter, or use 'reference'"
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"the triton backend does not support device {device}")
        return "triton"
    if device.type == "cuda" and triton_available():
        return "triton"
    return "reference"


def implementation(device, requested: Optional[str]) -> ModuleType:
    """The module implementing the chosen backend."""
    name = backend(device, requested)
    if name == "triton":
        from . import _triton

        return _triton
    from . import reference

    return reference
