r"""Curvature statistics of Kronecker factors.

For a matrix leaf :math:`W \in \mathbb{R}^{m\times n}` with gradient :math:`G`, the curvature
EMA keeps

.. math::
    L_t = \rho L_{t-1} + (1-\rho)\,G G^\top,\qquad R_t = \rho R_{t-1} + (1-\rho)\,G^\top G,

started at zero and debiased by :math:`1-\rho^t` when read, so the estimate is exact from the
first step (the classic ``eps0 * I`` start is replaced by a Tikhonov term relative to the
factor's own trace at refresh time, which keeps the update independent of the loss scale).
The diagonal is kept in float32 (``d`` floats per factor) and only the off-diagonal part goes
through a :class:`~scao_fx.codecs.Codec` (int8 with block scales by default;
one fused decode-lerp-encode pass per step). Curvature factors are diagonally dominant, so a
block holding a diagonal entry would otherwise get a scale several times coarser than its
neighbours; splitting the diagonal out measurably lowers the re-quantisation noise that an EMA
accumulates (see ``docs/scao.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .._validation import check_float
from ..base import register_state
from ..codecs import Codec, EncodedTensor, int8_blockwise

__all__ = ["CurvatureEMA", "FactorStatistic", "curvature_ema"]


@register_state
class FactorStatistic(NamedTuple):
    """A stack of ``B`` EMA factors: off-diagonal part encoded flat ``(B, d*d)``, diagonal ``(B, d)`` float32."""

    offdiag: EncodedTensor
    diag: torch.Tensor


@dataclass(frozen=True)
class CurvatureEMA:
    """EMA of Kronecker factors stored through a codec. Build with :func:`curvature_ema`.

    Attributes:
        rho: EMA decay in [0, 1).
        codec: storage codec of the factors.

    Example:
        >>> import torch, scao_fx as sf
        >>> curv = sf.curvature_ema(0.9, codec=sf.fp32_codec())
        >>> stat = curv.accumulate(curv.init(1, 2), torch.eye(2)[None])
        >>> curv.factor(stat, torch.tensor(1), 2)[0]
        tensor([[1., 0.],
                [0., 1.]])
    """

    rho: float = 0.999
    codec: Codec = field(default_factory=int8_blockwise)

    def init(self, batch: int, dim: int, device: Any = None) -> FactorStatistic:
        """Zero statistics for ``batch`` stacked ``dim x dim`` factors."""
        return FactorStatistic(
            self.codec.zeros((batch, dim * dim), device=device),
            torch.zeros(batch, dim, dtype=torch.float32, device=device),
        )

    def accumulate(self, stat: FactorStatistic, gram: torch.Tensor, seed: Any = 0, *, inplace: bool = False) -> FactorStatistic:
        r"""One EMA step :math:`S \leftarrow \rho S + (1-\rho)\,\mathrm{gram}` for a stack ``(batch, d, d)``."""
        diag_new = torch.diagonal(gram, dim1=-2, dim2=-1).to(torch.float32)
        off = gram - torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))
        offdiag = self.codec.ema(stat.offdiag, off.reshape(gram.shape[0], -1), self.rho, seed, inplace=inplace)
        diag = stat.diag.lerp_(diag_new, 1.0 - self.rho) if inplace else stat.diag.lerp(diag_new, 1.0 - self.rho)
        return FactorStatistic(offdiag, diag)

    def factor(self, stat: FactorStatistic, count: torch.Tensor, dim: int) -> torch.Tensor:
        r"""The debiased, symmetrised factors :math:`\tfrac{1}{1-\rho^t}\,\mathrm{sym}(S)` as float32 ``(batch, d, d)``."""
        x = self.codec.decode(stat.offdiag).reshape(-1, dim, dim)
        x = 0.5 * (x + x.transpose(-1, -2)) + torch.diag_embed(stat.diag)
        bias = 1.0 - self.rho ** count.to(torch.float64)
        return x / bias.clamp(min=1e-30).to(x.dtype)

    def state_bytes(self, dim: int) -> float:
        """Bytes one ``dim x dim`` factor costs in storage (codes, scales and the float32 diagonal)."""
        return dim * dim * self.codec.bytes_per_entry + 4.0 * dim


def curvature_ema(rho: float = 0.999, codec: Codec | None = None) -> CurvatureEMA:
    r"""The curvature EMA of Kronecker factors (SCAO part 1).

    Args:
        rho: EMA decay, in [0, 1). 0.99 was as good or better for runs under ~1k steps.
        codec: how factors are stored; default :func:`int8_blockwise` (block 32, stochastic
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
