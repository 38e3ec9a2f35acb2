r"""A low-rank curvature statistic: the frequent-directions sketch of a Kronecker factor.

The full-factor EMA (:mod:`scao_fx.precond.curvature`) keeps every :math:`d \times d` factor,
:math:`O(d^2)` bytes per side. The sketch keeps, per side, an orthonormal *frame*
:math:`Q \in \mathbb{R}^{d\times\ell}` and a small symmetric *core* :math:`C \in \mathbb{R}^{\ell\times\ell}`
with

.. math::
    F_t = \sum_{s\le t} \rho^{t-s}(1-\rho)\,X_s X_s^\top \;\approx\; Q\,C\,Q^\top + \sigma\,I,

(:math:`X = G` for the left factor, :math:`G^\top` for the right), plus two scalars per factor: the
exact trace :math:`\tau_t = \sum_s \rho^{t-s}(1-\rho)\lVert X_s\rVert_F^2 = \mathrm{tr}\,F_t` and the
frequent-directions shrinkage :math:`\sigma`. Memory: :math:`d\,\ell` frame entries (through a
:class:`~scao_fx.codecs.Codec`) :math:`+\ \ell^2 + 2` float32 per side, i.e. :math:`O((m+n)\ell)`
per matrix.

**Every step** (no eigendecomposition, no host synchronisation): the core takes the data's
projection onto the frame, :math:`C \leftarrow \rho C + (1-\rho)\,(Q^\top X)(Q^\top X)^\top`, and
:math:`\tau \leftarrow \rho\tau + (1-\rho)\lVert X\rVert_F^2`, :math:`\sigma \leftarrow \rho\sigma`.
This is exact for the part of :math:`F` inside the frame; what falls outside only enters
:math:`\tau`.

**Every** ``compress_every`` **steps** (before that step's data; a small ``eigh`` of the core, which
synchronises on CUDA like a refresh): a frequent-directions step (Liberty 2013; as in
"Sketchy", Feinberg et al. 2023) on the frame. With :math:`C = W\,\mathrm{diag}(\mu)\,W^\top`
(:math:`\mu` decreasing), keep the top :math:`w = \ell - q` directions :math:`V = Q W_{:w}`, shrink
them by the largest dropped value, :math:`\lambda_i = \mu_i - \mu_{w+1}`, add :math:`\mu_{w+1}` to
:math:`\sigma`, and renew the other :math:`q` columns with *probes* of the current data: the new
frame is :math:`\mathrm{qr}([V,\ X\Omega])` with :math:`\Omega` a :math:`c \times q` Rademacher
matrix (a deterministic hash of the step, so runs resume bit for bit); the core becomes
:math:`\mathrm{diag}(\lambda)` in it. The shrinkage is what lets a direction that keeps coming
back displace a weaker kept one (without it an EMA sketch locks in its first directions); the
probes' energy is then accumulated exactly for ``compress_every`` steps before the next
selection. When :math:`\ell \ge d` the frame is the whole space, nothing is shrunk and the
statistic is the exact factor (in a rotating basis).

**At a refresh** the core is diagonalised, :math:`C = W\mathrm{diag}(\mu)W^\top`, and the link
reads the debiased top ``cap`` eigenpairs :math:`(\mu_i + \sigma',\ Q W_{:,i})` with
:math:`\sigma' = \min(\sigma, E/cap)`, :math:`E = \tau - \sum_{i\le cap}\mu_i` (frequent directions'
bound :math:`QCQ^\top \preceq F \preceq QCQ^\top + \sigma I`), and the remaining mass
:math:`E - cap\,\sigma'` spread evenly over the other :math:`d - cap` directions as the tail
eigenvalue, so the spectral-mass rank rule and the complement gain work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .._validation import check_float, check_int
from ..base import register_state
from ..codecs import Codec, EncodedTensor, fp32_codec
from .eigen import TIKHONOV_FLOOR, branch, robust_eigh

__all__ = ["CurvatureSketch", "SketchStatistic", "curvature_sketch"]


@register_state
class SketchStatistic(NamedTuple):
    """A stack of ``B`` sketches of ``d x d`` EMA factors (see the module docs).

    Attributes:
        frame: the orthonormal frame :math:`Q`, ``(B, d * width)`` through the sketch's codec.
        core: ``(B, width, width)`` float32 :math:`C`, the EMA of the data projected on the frame
            (not debiased).
        trace: ``(B,)`` float32 :math:`\\tau`, the factor's exact trace (not debiased).
        shrink: ``(B,)`` float32 :math:`\\sigma`, the frequent-directions shrinkage (not debiased).
    """

    frame: EncodedTensor
    core: torch.Tensor
    trace: torch.Tensor
    shrink: torch.Tensor


def _symmetric(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.transpose(-1, -2))


def _rademacher(rows: int, cols: int, seed: Any, device: Any) -> torch.Tensor:
    """A ``rows x cols`` matrix of +-1 from the codecs' index hash of ``seed`` (no host sync)."""
    from ..kernels import _common as C

    u = C.row_uniforms(rows, cols, C.seed_term(seed, device), device)
    return torch.where(u < 0.5, -1.0, 1.0)


@dataclass(frozen=True)
class CurvatureSketch:
    r"""Frequent-directions sketches of Kronecker factors. Build with :func:`curvature_sketch`.

    Attributes:
        rank: columns :math:`\ell` of the frame (the basis of a refresh is at most this wide).
        rho: EMA decay in [0, 1).
        codec: storage codec of the frame.
        probes: frame columns renewed from the data at each compression (``None``: ``rank // 4``).
        compress_every: steps between frequent-directions compressions.
        basis_dtype: storage dtype of the preconditioner basis a refresh fills (float32 or bfloat16).

    Example:
        >>> import torch, scao_fx as sf
        >>> sk = sf.curvature_sketch(rank=2, rho=0.5, probes=1)
        >>> x = torch.tensor([[[3.0], [0.0], [0.0]]])  # one column: the factor is 9 e1 e1^T
        >>> stat = sk.accumulate_outer(sk.init(1, 3), x, torch.ones(1), seed=0, count=torch.tensor(1))
        >>> vals, vecs, ok, rest, eps = sk.top_eigenpairs(stat, torch.tensor(1), torch.zeros(1, 3, 1),
        ...                                               torch.tensor(True), tikhonov=0.0)
        >>> round(float(vals[0, 0]), 4), vecs[0, :, 0].abs().tolist()
        (9.0, [1.0, 0.0, 0.0])
    """

    rank: int = 128
    rho: float = 0.999
    codec: Codec = field(default_factory=fp32_codec)
    probes: int | None = None
    compress_every: int = 20
    basis_dtype: torch.dtype = torch.float32

    def exact(self, dim: int) -> bool:
        """Always ``False``: a sketch side is stored as configured whatever its length."""
        return False

    def basis_dtype_for(self, dim: int) -> torch.dtype:
        """Storage of a side's basis: ``basis_dtype`` (every length)."""
        return self.basis_dtype

    def width(self, dim: int) -> int:
        """Frame width for a ``dim x dim`` factor: ``min(rank, dim)``."""
        return min(self.rank, dim)

    def directions(self, dim: int) -> int:
        """How many eigen-directions a refresh can read (the frame width)."""
        return self.width(dim)

    def num_probes(self, dim: int) -> int:
        """Frame columns renewed at a compression (0 when the frame is the whole space)."""
        p = self.width(dim)
        if p >= dim:
            return 0
        q = max(1, self.rank // 4) if self.probes is None else self.probes
        return min(q, p - 1)

    def init(self, batch: int, dim: int, device: Any = None) -> SketchStatistic:
        """Empty sketches for ``batch`` stacked ``dim x dim`` factors."""
        p = self.width(dim)
        return SketchStatistic(
            frame=self.codec.zeros((batch, dim * p), device=device),
            core=torch.zeros(batch, p, p, dtype=torch.float32, device=device),
            trace=torch.zeros(batch, dtype=torch.float32, device=device),
            shrink=torch.zeros(batch, dtype=torch.float32, device=device),
        )

    def frame(self, stat: SketchStatistic, dim: int) -> torch.Tensor:
        """The decoded frame :math:`Q`, ``(B, dim, width)`` float32."""
        return self.codec.decode(stat.frame).reshape(-1, dim, self.width(dim))

    def _compress(self, stat: SketchStatistic, x: torch.Tensor, seed: Any) -> SketchStatistic:
        """One frequent-directions step on the frame (see the module docs); ``x`` ``(B, d, c)``."""
        d, c = x.shape[-2], x.shape[-1]
        p, q = self.width(d), self.num_probes(d)
        w = p - q
        frame = self.frame(stat, d)
        mu, vecs, ok = robust_eigh(_symmetric(stat.core), retry_float64=False)  # decreasing
        delta = mu[:, w].clamp(min=0) if q > 0 else torch.zeros_like(stat.shrink)
        lam = (mu[:, :w] - delta[:, None]).clamp(min=0)
        kept = torch.matmul(frame, vecs[..., :w])
        omega = _rademacher(c, p, seed, x.device)
        sample = torch.matmul(x, omega)  # (B, d, p): the data's range, Omega random
        # A frame that never held data (zero core) is started from the data's range alone.
        empty = torch.diagonal(stat.core, dim1=-2, dim2=-1).sum(-1) == 0
        kept = torch.where(empty[:, None, None], sample[..., q:], kept)
        new_frame, _ = torch.linalg.qr(torch.cat([kept, sample[..., :q]], dim=-1))
        t = torch.matmul(new_frame.transpose(-1, -2), kept)  # (B, p, w): the kept directions in it
        core = torch.matmul(t * lam[:, None, :], t.transpose(-1, -2))
        ok = ok & torch.isfinite(new_frame).flatten(1).all(-1)
        new_frame = torch.where(ok[:, None, None], new_frame, frame)
        core = torch.where(ok[:, None, None], _symmetric(core), stat.core)
        shrink = torch.where(ok, stat.shrink + delta, stat.shrink)
        encoded = self.codec.encode(new_frame.reshape(new_frame.shape[0], -1), seed)
        return SketchStatistic(encoded, core, stat.trace.clone(), shrink)

    def accumulate_outer(
        self, stat: SketchStatistic, x: torch.Tensor, scale: torch.Tensor, seed: Any = 0, count: Any = None,
        *, inplace: bool = False,
    ) -> SketchStatistic:
        r"""One step :math:`F \leftarrow \rho F + (1-\rho)\,\mathrm{scale}\,X X^\top` on the sketch.

        Args:
            stat: the sketches.
            x: ``(B, d, c)`` the side's data (the link's normalised gradients, or their transpose).
            scale: ``(B,)`` factor of the data's Gram matrices (the link's power-of-two scale).
            seed: step seed of the probes and of the frame codec's rounding.
            count: the step (CPU int64 0-d, from 1): a compression runs first when
                ``(count - 1) % compress_every == 0``.
            inplace: update the core and scalars in place.

        Returns:
            The updated :class:`SketchStatistic`.
        """
        if count is None:
            raise ValueError("count (the step, from 1) is required: it schedules the sketch's compressions")
        x = x.to(torch.float32)
        due = ((torch.as_tensor(count) - 1) % self.compress_every) == 0

        def compress(*ops):
            return tuple(_leaves(self._compress(_stat(ops), x, seed)))

        def keep(*ops):
            return tuple(o.clone() for o in ops) if torch.compiler.is_compiling() else ops

        stat = _stat(branch(due, compress, keep, tuple(_leaves(stat))))
        d = x.shape[-2]
        z = torch.matmul(self.frame(stat, d).transpose(-1, -2), x)  # (B, width, c)
        weight = ((1.0 - self.rho) * scale).to(torch.float32)
        zz = torch.matmul(z, z.transpose(-1, -2)) * weight[:, None, None]
        sq = torch.linalg.vector_norm(x, dim=(-2, -1)).square() * weight
        if inplace:
            core, trace, shrink = stat.core.mul_(self.rho).add_(zz), stat.trace.mul_(self.rho).add_(sq), stat.shrink.mul_(self.rho)
        else:
            core, trace, shrink = stat.core * self.rho + zz, stat.trace * self.rho + sq, stat.shrink * self.rho
        return SketchStatistic(stat.frame, core, trace, shrink)

    def top_eigenpairs(
        self, stat: SketchStatistic, count: torch.Tensor, basis: torch.Tensor, first: torch.Tensor = None, *,
        tikhonov: float, eigensolver: str = "auto",
    ) -> tuple[torch.Tensor, ...]:
        r"""The refresh's top ``cap = basis.shape[-1]`` eigenpairs of the debiased, regularised sketch.

        ``first`` and ``eigensolver`` are unused (the core is small: always a full ``eigh``).

        Returns:
            ``(values (B, cap), vectors (B, d, cap), ok (B,), rest (B, d - cap), eps (B,))`` as
            :func:`~scao_fx.precond.eigen.factor_eigenpairs` returns them: values are
            :math:`\mu_i + \sigma' + \epsilon`, the rest is the remaining trace spread evenly
            :math:`+\ \epsilon`, with :math:`\epsilon = \max(10^{-30}, \mathrm{tikhonov}\,\tau/d)`.
        """
        d, cap = basis.shape[-2], basis.shape[-1]
        bias = (1.0 - self.rho ** count.to(torch.float64)).clamp(min=1e-30).to(torch.float32)
        mu, vecs, ok = robust_eigh(_symmetric(stat.core))
        vecs = torch.matmul(self.frame(stat, d), vecs[..., :cap])
        ok = ok & torch.isfinite(vecs).flatten(1).all(-1)
        top = mu[:, :cap].clamp(min=0) / bias
        trace = stat.trace / bias
        escaped = (trace - top.sum(-1)).clamp(min=0)
        shift = torch.minimum(stat.shrink / bias, escaped / cap)
        rest = ((escaped - cap * shift).clamp(min=0) / max(d - cap, 1))[:, None].expand(-1, d - cap)
        eps = torch.clamp(tikhonov * trace / d, min=TIKHONOV_FLOOR)
        vals = top + (shift + eps)[:, None]
        return vals.contiguous(), vecs.contiguous(), ok, (rest + eps[:, None]).contiguous(), eps

    def frobenius_norm(self, stat: SketchStatistic, count: torch.Tensor, dim: int) -> torch.Tensor:
        """``(B,)`` Frobenius norms of the debiased sketches :math:`Q C Q^\\top` (for diagnostics)."""
        bias = (1.0 - self.rho ** count.to(torch.float64)).clamp(min=1e-30).to(torch.float32)
        return torch.linalg.matrix_norm(stat.core) / bias

    def state_bytes(self, dim: int) -> float:
        """Bytes one ``dim x dim`` factor's sketch costs: the frame (codec), the core and two scalars."""
        p = self.width(dim)
        return dim * p * self.codec.bytes_per_entry + 4.0 * p * p + 8.0


def _leaves(stat: SketchStatistic) -> list[torch.Tensor]:
    return [stat.frame.data, stat.frame.scale, stat.core, stat.trace, stat.shrink]


def _stat(ops) -> SketchStatistic:
    return SketchStatistic(EncodedTensor(ops[0], ops[1]), ops[2], ops[3], ops[4])


def curvature_sketch(
    rank: int = 128,
    rho: float = 0.999,
    codec: Codec | None = None,
    *,
    probes: int | None = None,
    compress_every: int = 20,
    basis_dtype: torch.dtype = torch.float32,
) -> CurvatureSketch:
    r"""A low-rank curvature statistic: frequent-directions sketches, :math:`O(d\,\ell)` per side.

    Pass it as ``kronecker_precondition(curvature=...)`` (or ``scao_precondition(curvature="sketch")``)
    in place of :func:`curvature_ema`; see :mod:`scao_fx.precond.sketch` for the math and
    ``docs/scao.md`` for measurements.

    Args:
        rank: frame columns :math:`\ell` per side, >= 2 (capped at the side's length; at or above
            it the statistic is exact). The preconditioner basis is at most this wide.
        rho: EMA decay, in [0, 1).
        codec: storage of the frame: :func:`fp32_codec` (default), :func:`bf16_codec` or
            :func:`int8_blockwise` (rounded once per compression, not per step).
        probes: frame columns renewed from the data at each compression, in [1, rank - 1]
            (default ``rank // 4``).
        compress_every: steps between compressions, >= 1 (each costs a small ``eigh`` and, on
            CUDA, a host synchronisation, like a refresh).
        basis_dtype: storage of the preconditioner basis a refresh fills: ``torch.float32`` or
            ``torch.bfloat16`` (rounded once per refresh; computed with in float32).

    Returns:
        A :class:`CurvatureSketch`.

    Example:
        >>> import scao_fx as sf
        >>> tx = sf.kronecker_precondition(curvature=sf.curvature_sketch(64, 0.99), rank=sf.spectral_mass_rank(k_max=64))
    """
    rank = check_int("rank", rank, low=2)
    rho = check_float("rho", rho, low=0.0, high=1.0, high_inclusive=False)
    if codec is None:
        codec = fp32_codec()
    if not isinstance(codec, Codec):
        raise TypeError(f"codec must be a Codec (fp32_codec(), bf16_codec(), int8_blockwise()), got {codec!r}")
    if codec.square_root:
        raise ValueError("codec must not be a square_root codec (the frame has signed entries)")
    if probes is not None:
        probes = check_int("probes", probes, low=1, high=rank - 1)
    compress_every = check_int("compress_every", compress_every, low=1)
    if basis_dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"basis_dtype must be torch.float32 or torch.bfloat16, got {basis_dtype!r}")
    return CurvatureSketch(rank, rho, codec, probes, compress_every, basis_dtype)
