"""The ``compiled`` backend: the reference kernels compiled by ``torch.compile`` for the CPU.

Inductor (PyTorch's own compiler) turns each reference function into one fused C++ loop nest
instead of the reference's two dozen whole-tensor passes (decode, EMA, block maxima, scaling,
the rounding hash's integer mixing, clamping, the int8 cast). The arithmetic is the
reference's, operation for operation, so the codes and scales are bit-identical (tested); only
the memory traffic changes (about 5x faster for the fine-tuning workload's 1536 x 1536 factors;
``docs/examples/codec_backends.py`` and docs/performance.md have the measurements).

Used automatically (:func:`~scao_fx.kernels.backend`) for CPU tensors of at least
:data:`MIN_NUMEL` entries: below that the reference's passes mostly stay in the caches and the
one-time compile does not pay. Each function is compiled once per process, with symbolic
shapes. Where
compiling fails (no C++ compiler, an unsupported platform) the backend warns once and the
reference runs from then on. Per-step scalars are passed as 0-d tensors (float32 ``rho``: the
same bits as the Python float, see ``_common.one_minus``; int64 ``seed``: the same hash), so a
new step never recompiles.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional, Tuple, Union

import torch

from . import reference

#: Smallest number of entries (of the codes, or of ``x``) for which the automatic choice on the
#: CPU is the compiled backend: 2^22 (16 MB of float32, past the CPU's caches). Compiling costs
#: about 5-13 s once per process (the first call; Inductor's disk cache makes later processes'
#: cheaper). Against the whole-tensor reference the compiled code saved about 2 ms per million
#: entries below this size and 20 ms per million above it; the reference's EMA update now runs
#: large stacks in cache-sized chunks (``reference.CHUNKED_FROM``) and is about as fast as the
#: compiled one there, while the compiled bfloat16 rounding stays about 5x faster.
MIN_NUMEL = 1 << 22

_state = {"failed": None}


def available() -> bool:
    """False once compiling has failed in this process (the reference runs instead)."""
    return _state["failed"] is None


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    return torch.compile(getattr(reference, name), dynamic=True, fullgraph=True)


def _run(name: str, *args, **kwargs):
    """The compiled ``reference.<name>``; the reference itself if compiling failed."""
    if available():
        try:
            return _compiled(name)(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as exc:  # a failed compile (e.g. no C++ compiler),
            _state["failed"] = f"{type(exc).__name__}: {exc}"  # not an error of the computation itself
            warnings.warn(
                "scao_fx: compiling the CPU codec with torch.compile failed; the eager reference runs "
                f"instead from now on (about 3-8x slower for large statistics). Cause: {_state['failed'][:300]}",
                RuntimeWarning, stacklevel=3)
    return getattr(reference, name)(*args, **kwargs)


def _seed(seed: Union[int, torch.Tensor], device) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or an integer tensor, got {type(seed).__name__}")
    return torch.tensor(seed, dtype=torch.int64, device=device)


def _scalar(x, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.tensor(float(x), dtype=torch.float32, device=device)


def quantize_blockwise(x: torch.Tensor, block_size: int = 256, *, stochastic: bool = False,
                       seed: Union[int, torch.Tensor] = 0,
                       out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`scao_fx.kernels.reference.quantize_blockwise`, compiled."""
    return _run("quantize_blockwise", x, block_size, stochastic=stochastic, seed=_seed(seed, x.device), out=out)


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, block_size: int = 256, *,
                         dtype: torch.dtype = torch.float32, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`scao_fx.kernels.reference.dequantize_blockwise`, compiled."""
    return _run("dequantize_blockwise", codes, scales, block_size, dtype=dtype, out=out)


def int8_ema_update(codes: torch.Tensor, scales: torch.Tensor, update: torch.Tensor, rho, *,
                    block_size: int = 256, stochastic: bool = True, seed: Union[int, torch.Tensor] = 0,
                    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`scao_fx.kernels.reference.int8_ema_update`, compiled."""
    return _run("int8_ema_update", codes, scales, update, _scalar(rho, codes.device), block_size=block_size,
                stochastic=stochastic, seed=_seed(seed, codes.device), out=out)


def bf16_stochastic(x: torch.Tensor, seed: Union[int, torch.Tensor] = 0) -> torch.Tensor:
    """:func:`scao_fx.kernels.reference.bf16_stochastic`, compiled."""
    return _run("bf16_stochastic", x, _seed(seed, x.device))


#: The reference's Adam epilogue is not compiled (the links do not use it on the CPU).
adam_epilogue = reference.adam_epilogue
