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

The memory of these statistics is :math:`O(d^2)` per side; :mod:`scao_fx.precond.sketch` has a
low-rank one, :math:`O(d\,\ell)`. Both speak the same small interface to the Kronecker link
(:func:`~scao_fx.kronecker_precondition`): ``init(batch, dim, device)``,
``accumulate_outer(stat, x, scale, seed, count)`` (one step of :math:`F \leftarrow \rho F +
(1-\rho)\,\mathrm{scale}\,X X^\top` from the side's data :math:`X`: :math:`G` for the left
factor, :math:`G^\top` for the right), ``top_eigenpairs(stat, count, basis, first, ...)`` (what a
refresh reads), ``directions(dim)``, ``basis_dtype_for(dim)`` (the storage of the preconditioner
basis they fill) and ``exact(dim)`` (whether the side's state and rotations stay float32).

**Small sides stay exact.** With ``float32_below=d0`` (SCAO's default: 64), a side shorter than
``d0`` keeps its factor and its basis in float32 whatever the codec and ``basis_dtype`` say, and
the eigenbasis form rotates a matrix with such a side in float32: its factor has fewer than
``d0**2`` entries (4096 at 64, the size under which 8-bit optimizers such as bitsandbytes also
keep float32 state), so compressing it saves little memory and costs accuracy exactly where a
small layer's curvature is often the most ill-conditioned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .._validation import check_float, check_int
from ..base import register_state
from ..codecs import Codec, EncodedTensor, fp32_codec, int8_blockwise
from .eigen import factor_eigenpairs

_FP32 = fp32_codec()

__all__ = ["CurvatureEMA", "FactorStatistic", "curvature_ema", "gram", "statistics_schedule"]


def gram(x: torch.Tensor, left: bool) -> torch.Tensor:
    r"""Batched Gram matrices in float32: :math:`X X^\top` (``left``) or :math:`X^\top X`.

    A bfloat16 ``x`` (``gram_precision="bfloat16"``) is multiplied as is with float32
    accumulation: on CUDA ``bmm(..., out_dtype=float32)`` (bfloat16 tensor cores, float32
    output); on the CPU a bfloat16 product (oneDNN, float32 accumulation, the result rounded to
    bfloat16: about 3x faster than float32 where the CPU has bfloat16 instructions) widened to
    float32; under ``torch.compile`` off CUDA, the float32 product of its (exactly widened) entries.

    Example:
        >>> import torch
        >>> from scao_fx.precond.kron import gram
        >>> gram(torch.tensor([[[1.0, 2.0]]]), left=True).tolist()
        [[[5.0]]]
    """
    a, b = (x, x.transpose(-1, -2)) if left else (x.transpose(-1, -2), x)
    if x.dtype == torch.float32:
        return torch.matmul(a, b)
    if torch.compiler.is_compiling() or x.dtype != torch.bfloat16:
        return torch.matmul(a.float(), b.float())
    if x.is_cuda:
        return torch.bmm(a, b, out_dtype=torch.float32)
    if x.device.type == "cpu":
        return torch.matmul(a, b).float()
    return torch.matmul(a.float(), b.float())


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
        basis_dtype: storage dtype of the preconditioner basis a refresh fills (float32 or bfloat16).
        float32_below: sides shorter than this store their factor and basis in float32 (0: none).

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
    basis_dtype: torch.dtype = torch.float32
    float32_below: int = 0

    def exact(self, dim: int) -> bool:
        """Whether a ``dim x dim`` factor, its basis and rotations through it stay float32 (``dim < float32_below``)."""
        return dim < self.float32_below

    def codec_for(self, dim: int) -> Codec:
        """The codec of a ``dim x dim`` factor's off-diagonal part: float32 for an :meth:`exact` side."""
        return _FP32 if self.exact(dim) else self.codec

    def basis_dtype_for(self, dim: int) -> torch.dtype:
        """Storage of a ``dim``-long side's basis: float32 for an :meth:`exact` side, else ``basis_dtype``."""
        return torch.float32 if self.exact(dim) else self.basis_dtype

    def init(self, batch: int, dim: int, device: Any = None) -> FactorStatistic:
        """Zero statistics for ``batch`` stacked ``dim x dim`` factors."""
        return FactorStatistic(
            self.codec_for(dim).zeros((batch, dim * dim), device=device),
            torch.zeros(batch, dim, dtype=torch.float32, device=device),
        )

    def accumulate(self, stat: FactorStatistic, gram: torch.Tensor, seed: Any = 0, *, inplace: bool = False) -> FactorStatistic:
        r"""One EMA step :math:`S \leftarrow \rho S + (1-\rho)\,\mathrm{gram}` for a stack ``(batch, d, d)``."""
        return self._accumulate_split(stat, gram.clone(), seed, inplace)

    def _accumulate_split(self, stat: FactorStatistic, gram: torch.Tensor, seed: Any, inplace: bool) -> FactorStatistic:
        """:meth:`accumulate` with a ``gram`` it may overwrite: its diagonal is read out and zeroed
        in place (the off-diagonal part the codec stores): two passes fewer than subtracting a
        ``diag_embed``, with the same bits wherever the diagonal is finite (an inf or NaN on it
        now stays in the float32 diagonal instead of also turning its block's codes to NaN)."""
        diagonal = torch.diagonal(gram, dim1=-2, dim2=-1)
        diag_new = diagonal.to(torch.float32, copy=True)
        off = gram
        diagonal.zero_()
        codec = self.codec_for(gram.shape[-1])
        offdiag = codec.ema(stat.offdiag, off.reshape(gram.shape[0], -1), self.rho, seed, inplace=inplace)
        diag = stat.diag.lerp_(diag_new, 1.0 - self.rho) if inplace else stat.diag.lerp(diag_new, 1.0 - self.rho)
        return FactorStatistic(offdiag, diag)

    def factor(self, stat: FactorStatistic, count: torch.Tensor, dim: int) -> torch.Tensor:
        r"""The debiased, symmetrised factors :math:`\tfrac{1}{1-\rho^t}\,\mathrm{sym}(S)` as float32 ``(batch, d, d)``."""
        x = self.codec_for(dim).decode(stat.offdiag).reshape(-1, dim, dim)
        x = (x + x.transpose(-1, -2)).mul_(0.5)
        x.diagonal(dim1=-2, dim2=-1).add_(stat.diag)  # the stored off-diagonal part's diagonal is 0
        bias = 1.0 - self.rho ** count.to(torch.float64)
        return x.div_(bias.clamp(min=1e-30).to(x.dtype))

    def state_bytes(self, dim: int) -> float:
        """Bytes one ``dim x dim`` factor costs in storage (codes, scales and the float32 diagonal)."""
        return dim * dim * self.codec_for(dim).bytes_per_entry + 4.0 * dim

    # The interface the Kronecker link talks to (shared with CurvatureSketch).

    def directions(self, dim: int) -> int:
        """How many eigen-directions a refresh can read: every one of the ``dim x dim`` factor."""
        return dim

    def accumulate_outer(
        self, stat: FactorStatistic, x: torch.Tensor, scale: torch.Tensor, seed: Any = 0, count: Any = None,
        *, inplace: bool = False,
    ) -> FactorStatistic:
        r"""One EMA step with the side's data ``x`` ``(B, d, c)``: the Gram matrices :math:`\mathrm{scale}\,X X^\top`.

        ``scale`` ``(B,)`` undoes the link's power-of-two normalisation (see
        :func:`~scao_fx.precond.kron.normalize`); ``count`` is unused (the sketch reads it).
        """
        product = gram(x, True).mul_(scale[:, None, None])
        return self._accumulate_split(stat, product, seed, inplace)

    def top_eigenpairs(
        self, stat: FactorStatistic, count: torch.Tensor, basis: torch.Tensor, first: torch.Tensor, *,
        tikhonov: float, eigensolver: str = "auto",
    ) -> tuple[torch.Tensor, ...]:
        """The refresh's eigenpairs of the debiased factor: :func:`~scao_fx.precond.eigen.factor_eigenpairs`."""
        factor = self.factor(stat, count, basis.shape[-2])
        return factor_eigenpairs(factor, basis, first, tikhonov=tikhonov, eigensolver=eigensolver)

    def frobenius_norm(self, stat: FactorStatistic, count: torch.Tensor, dim: int) -> torch.Tensor:
        """``(B,)`` Frobenius norms of the debiased factors (for diagnostics)."""
        return torch.linalg.matrix_norm(self.factor(stat, count, dim))


def curvature_ema(
    rho: float = 0.999, codec: Codec | None = None, *, basis_dtype: torch.dtype = torch.float32, float32_below: int = 0,
) -> CurvatureEMA:
    r"""The curvature EMA of Kronecker factors (SCAO part 1).

    Args:
        rho: EMA decay, in [0, 1). 0.99 was as good or better for runs under ~1k steps.
        codec: how factors are stored; default :func:`int8_blockwise` (block 32, stochastic
            rounding). Pass :func:`fp32_codec` for the full-precision ablation.
        basis_dtype: storage of the eigenbasis a refresh fills: ``torch.float32`` (default) or
            ``torch.bfloat16`` (half the bytes; refreshes and rotations compute in float32 and
            round the stored basis, so its columns are orthonormal to about 4e-3).
        float32_below: sides shorter than this keep their factor and basis in float32 whatever
            ``codec`` and ``basis_dtype`` say (and the eigenbasis form rotates through them in
            float32), >= 0; 0 (default here; SCAO's default is 64): every side as configured.

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
    if basis_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"basis_dtype must be torch.float32 or torch.bfloat16, got {basis_dtype!r}")
    float32_below = check_int("float32_below", float32_below, low=0)
    return CurvatureEMA(rho, codec, basis_dtype, float32_below)


def statistics_schedule(count: torch.Tensor, stat_freq: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    r"""When step ``count`` accumulates the curvature statistics, and how many accumulations steps
    ``1..count`` hold: ``(due, updates)``.

    The statistics are accumulated at step 1 and at every ``stat_freq``-th step
    (``count % stat_freq == 0``), so ``updates = count`` for ``stat_freq = 1`` (``due`` is then
    ``None``: every step) and :math:`1 + \lfloor count / stat\_freq \rfloor` otherwise; the EMA is
    debiased by ``updates`` (``rho`` is a decay per accumulation). ``count`` is a CPU int64 0-d.

    Example:
        >>> import torch
        >>> from scao_fx.precond.curvature import statistics_schedule
        >>> [(bool(d), int(u)) for d, u in (statistics_schedule(torch.tensor(c), 2) for c in (1, 2, 3, 4))]
        [(True, 1), (True, 2), (False, 2), (True, 3)]
    """
    if stat_freq == 1:
        return None, count
    return (count == 1) | ((count % stat_freq) == 0), count // stat_freq + 1
