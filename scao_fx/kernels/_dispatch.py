"""Backend selection: ``reference`` (pure PyTorch), ``compiled`` (the reference compiled for
the CPU by ``torch.compile``) or ``triton``.

Order of precedence, first match wins:

1. the per-call ``backend=`` argument (``"reference"``, ``"compiled"`` or ``"triton"``);
2. the environment variable ``SCAO_FX_KERNELS`` (``reference``, ``compiled`` or ``triton``;
   ``auto`` or empty means unset), read at every call;
3. auto: ``triton`` for CUDA tensors when Triton is importable; ``compiled`` for plain CPU
   tensors (not a DTensor, not inside a ``torch.func`` transform) of at least
   ``_compiled.MIN_NUMEL`` entries (eager code only: inside a ``torch.compile``d step the
   reference is traced into the step's own graph) until compiling has failed once;
   ``reference`` otherwise.

``compiled`` forced for a non-CPU tensor runs the reference.

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

from . import _compiled

BACKENDS = ("reference", "compiled", "triton")
ENV_VAR = "SCAO_FX_KERNELS"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton is importable (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _plain(t: torch.Tensor) -> bool:
    """A plain tensor: not a subclass (a DTensor) and not inside a ``torch.func`` transform."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and not torch._C._functorch.is_functorch_wrapped_tensor(t)


def _requested(backend: Optional[str]) -> Optional[str]:
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        return backend
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be 'reference', 'compiled', 'triton' or 'auto', got {env!r}")
    return env


def backend(device: Union[torch.device, str, torch.Tensor, None] = None,
            requested: Optional[str] = None, numel: Optional[int] = None) -> str:
    """The backend a kernel call would use for tensors on ``device``.

    Args:
        device: a device, a device string or a tensor (its device and, unless ``numel`` is
            given, its number of entries); ``None`` means the current CUDA device if CUDA is
            available, else the CPU.
        requested: the per-call ``backend=`` argument (``None`` for automatic).
        numel: entries the call processes (automatic choice on the CPU); ``None``: the tensor's,
            or 0 for a device.

    Returns:
        ``"reference"``, ``"compiled"`` or ``"triton"``.

    Raises:
        RuntimeError: ``triton`` is forced but cannot run on that device.
    """
    plain = True
    if isinstance(device, torch.Tensor):
        numel = device.numel() if numel is None else numel
        plain = _plain(device)
        device = device.device
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    want = _requested(requested)
    if want == "reference":
        return "reference"
    if want == "compiled":
        return "compiled" if device.type == "cpu" else "reference"
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
    if device.type == "cpu" and plain and (numel or 0) >= _compiled.MIN_NUMEL and _compiled.available() \
            and not torch.compiler.is_compiling():
        return "compiled"
    return "reference"


def implementation(device, requested: Optional[str], numel: Optional[int] = None) -> ModuleType:
    """The module implementing the chosen backend."""
    name = backend(device, requested, numel)
    if name == "triton":
        from . import _triton

        return _triton
    if name == "compiled":
        return _compiled
    from . import reference

    return reference


def compiled_for(tensor: torch.Tensor) -> bool:
    """Whether a CPU op with no Triton kernel (the bfloat16 codec's rounding) on ``tensor`` runs
    compiled: ``compiled`` forced, or the automatic choice of :func:`backend` for its size; any
    other forced backend keeps the reference."""
    want = _requested(None)
    if want not in (None, "compiled") or tensor.device.type != "cpu":
        return False
    return backend(tensor, want) == "compiled"
