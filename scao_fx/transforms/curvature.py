r"""Curvature statistics of Kronecker factors.

For a matrix leaf :math:`W \in \mathbb{R}^{m\times n}` with gradient :math:`G`, the curvature
EMA keeps

.. math::
    L_t = \rho L_{t-1} + (1-\rho)\,G G^\top,\qquad R_t = \rho R_{t-1} + (1-\rho)\,G^\top G,

started at zero and debiased by :math:`1-\rho^t` when read, so the estimate is exact from the
first step (the classic ``eps0 * I`` start is replaced by a Tikhonov term relative to the
factor's own trace at refresh time, which keeps the update independent of the loss scale).
The factors are stored through a :class:`~scao_fx.transforms.quantization.Codec` (int8 with
block scales by default); the EMA update is one fused decode-lerp-encode pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .._validation import check_float
from .quantization import Codec, EncodedTensor, int8_blockwise

__all__ = ["CurvatureEMA", "curvature_ema"]


@dataclass(frozen=True)
class CurvatureEMA:
    """EMA of Kronecker factors stored through a codec. Build with :func:`curvature_ema`.

    Attributes:
        rho: EMA decay in [0, 1).
        codec: storage codec of the factors.
    """

    rho: float = 0.999
    codec: Codec = field(default_factory=int8_blockwise)

    def init(self, batch: int, dim: int, device: Any = None) -> EncodedTensor:
        """Zero statistics for ``batch`` stacked ``dim x dim`` factors (stored flat, ``(batch, dim*dim)``)."""
        return self.codec.zeros((batch, dim * dim), device=device)

    def accumulate(self, stat: EncodedTensor, gram: torch.Tensor, seed: Any = 0, *, inplace: bool = False) -> EncodedTensor:
        r"""One EMA step :math:`S \leftarrow \rho S + (1-\rho)\,\mathrm{gram}` for a stack ``(batch, d, d)``."""
        return self.codec.ema(stat, gram.reshape(gram.shape[0], -1), self.rho, seed, inplace=inplace)

    def factor(self, stat: EncodedTensor, count: torch.Tensor, dim: int) -> torch.Tensor:
        r"""The debiased, symmetrised factors :math:`\tfrac{1}{1-\rho^t}\,\mathrm{sym}(S)` as float32 ``(batch, d, d)``."""
        x = self.codec.decode(stat).reshape(-1, dim, dim)
        x = 0.5 * (x + x.transpose(-1, -2))
        bias = 1.0 - self.rho ** count.to(torch.float64)
        return x / bias.clamp(min=1e-30).to(x.dtype)

    def state_bytes(self, dim: int) -> float:
        """Bytes one ``dim x dim`` factor costs in storage."""
        return dim * dim * self.codec.bytes_per_entry


def curvature_ema(rho: float = 0.999, codec: Codec | None = None) -> CurvatureEMA:
    r"""The curvature EMA of Kronecker factors (SCAO part 1).

    Args:
        rho: EMA decay, in [0, 1). 0.99 was as good or better for runs under ~1k steps.
        codec: how factors are stored; default :func:`int8_blockwise` (block 256, stochastic
            rounding). Pass :func:`fp32_codec` for the full-precision ablation.

    Returns:
        A :class:`CurvatureEMA` to pass to :func:`kronecker_precondition`.

    Example:
        >>> import scao_fx as sf
        >>> curv = sf.curvature_ema(0.99, codec=sf.fp32_codec())
    """
    rho = check_float("rho", rho, low=0.0, high=1.0, high_inclusive=False)
    if codec is None:
        codec = int8_blockwise()
    if not isinstance(codec, Codec):
        raise TypeError(f"codec must be a Codec (fp32_codec(), bf16_codec(), int8_blockwise()), got {codec!r}")
    return CurvatureEMA(rho, codec)
