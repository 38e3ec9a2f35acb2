r"""Storage formats of optimizer state: the codecs.

A *codec* stores a float tensor of shape ``(..., N)`` as a pair of plain tensors
``(data, scale)`` and gives it back:

* :func:`fp32_codec` — ``data`` float32, no scale (exact; the ablation of int8).
* :func:`bf16_codec` — ``data`` bfloat16, no scale (2 bytes/entry).
* :func:`int8_blockwise` — symmetric int8 with one float32 scale per block of ``block_size``
  consecutive entries: :math:`s_b = \max_{i\in b}|x_i| / 127`, :math:`q_i = \mathrm{round}(x_i/s_b)`.
  Rounding is stochastic by default (a deterministic hash of the element index and a step seed,
  so runs and resumes are exactly reproducible): an EMA whose increments are far below one
  quantization step then stays unbiased instead of freezing.

Codecs have a fused :meth:`Codec.ema` (decode, :math:`x \leftarrow \rho x + (1-\rho)u`, encode:
one pass, a Triton kernel on CUDA) used by the curvature EMA. The combinator that stores any
transform's state through codecs is :func:`scao_fx.transforms.quantization.quantize_state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ._validation import check_int
from .base import register_state

__all__ = [
    "Codec",
    "EncodedTensor",
    "fp32_codec",
    "bf16_codec",
    "int8_blockwise",
]


@register_state
class EncodedTensor(NamedTuple):
    """A tensor stored through a codec: ``data`` (codes or values) and per-block ``scale``.

    ``scale`` is an empty float32 tensor for codecs without scales. ``shape`` of the decoded
    tensor is ``data.shape``.
    """

    data: torch.Tensor
    scale: torch.Tensor


def _seed_arg(seed: Any) -> Any:
    """Step seeds are CPU tensors; give kernels a Python int when not tracing (no device sync)."""
    if isinstance(seed, torch.Tensor) and not torch.compiler.is_compiling():
        return int(seed)
    return seed


@dataclass(frozen=True)
class Codec:
    r"""How a float tensor is stored. Build one with :func:`fp32_codec`, :func:`bf16_codec` or
    :func:`int8_blockwise`.

    Attributes:
        kind: ``"fp32"``, ``"bf16"`` or ``"int8"``.
        block_size: entries per scale block (int8 only).
        stochastic: stochastic rounding (int8 and bf16).
        square_root: store :math:`\sqrt{x}` of a non-negative tensor (int8 only; for second
            moments, see :func:`int8_blockwise`).

    Example:
        >>> import torch, scao_fx as sf
        >>> codec = sf.int8_blockwise(32)
        >>> enc = codec.encode(torch.tensor([0.5, -1.0, 0.25]))
        >>> enc.data.dtype, enc.scale.shape
        (torch.int8, torch.Size([1]))
    """

    kind: str = "fp32"
    block_size: int = 32
    stochastic: bool = True
    square_root: bool = False

    @property
    def bytes_per_entry(self) -> float:
        """Storage cost of one entry, scales included."""
        return {"fp32": 4.0, "bf16": 2.0}.get(self.kind, 1.0 + 4.0 / self.block_size)

    def encode(self, x: torch.Tensor, seed: Any = 0, *, index_offset: int = 0) -> EncodedTensor:
        """Store ``x`` (shape ``(..., N)``).

        ``index_offset``: the flat index of ``x``'s first entry in a larger tensor that ``x`` is
        a part of (a shard); stochastic rounding then draws the same random bits for each entry
        as encoding the whole tensor would (block scales are still ``x``'s own).
        """
        if index_offset:
            from .kernels import _common

            seed = _common.offset_seed(_seed_arg(seed), index_offset)
        if self.kind == "fp32":
            return EncodedTensor(x.to(torch.float32), _empty(x))
        if self.kind == "bf16":
            data = _bf16_stochastic(x, seed) if self.stochastic else x.to(torch.bfloat16)
            return EncodedTensor(data, _empty(x))
        from .kernels import quantize_blockwise

        x = x.to(torch.float32)
        if self.square_root:
            x = x.clamp(min=0).sqrt_()
        codes, scales = quantize_blockwise(x, self.block_size, stochastic=self.stochastic, seed=_seed_arg(seed))
        return EncodedTensor(codes, scales)

    def decode(self, enc: EncodedTensor) -> torch.Tensor:
        """The float32 tensor ``enc`` stands for."""
        if self.kind != "int8":
            return enc.data.to(torch.float32)
        from .kernels import dequantize_blockwise

        y = dequantize_blockwise(enc.data, enc.scale, self.block_size, dtype=torch.float32)
        if not self.square_root:
            return y
        # A zero code means sqrt(x) < one step: decode it as half a step, never as 0, so that a
        # second moment never becomes 0 where its first moment is not (that would turn
        # m / (sqrt(v) + eps) into m / eps).
        half_step = dequantize_blockwise(torch.ones_like(enc.data), enc.scale, self.block_size, dtype=torch.float32)
        return torch.maximum(y, half_step.mul_(0.5), out=y).square_()  # in place: fewer temporaries

    def zeros(self, shape: tuple[int, ...], device: torch.device | str | None = None) -> EncodedTensor:
        """Encoded zeros of ``shape``."""
        if self.kind == "int8":
            n = shape[-1]
            nblocks = -(-n // self.block_size)
            return EncodedTensor(
                torch.zeros(shape, dtype=torch.int8, device=device),
                torch.zeros((*shape[:-1], nblocks), dtype=torch.float32, device=device),
            )
        dtype = torch.float32 if self.kind == "fp32" else torch.bfloat16
        return EncodedTensor(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(0, device=device))

    def ema(self, enc: EncodedTensor, new: torch.Tensor, rho: float, seed: Any = 0, *, inplace: bool = False) -> EncodedTensor:
        r"""Return the encoding of :math:`\rho\,x + (1-\rho)\,u` where ``x`` is ``enc`` decoded."""
        if self.kind == "int8":
            if self.square_root:
                raise ValueError("Codec.ema does not support square_root=True codecs (use them with quantize_state)")
            from .kernels import int8_ema_update

            codes, scales = int8_ema_update(
                enc.data,
                enc.scale,
                new,
                rho,
                block_size=self.block_size,
                stochastic=self.stochastic,
                seed=_seed_arg(seed),
                out=(enc.data, enc.scale) if inplace else None,
            )
            return EncodedTensor(codes, scales)
        data = enc.data
        if self.kind == "bf16" and self.stochastic:
            mixed = _bf16_stochastic(data.float().lerp(new.float(), 1.0 - rho), seed)
            return EncodedTensor(data.copy_(mixed) if inplace else mixed, enc.scale)
        if inplace:
            data.lerp_(new.to(data.dtype), 1.0 - rho)
        else:
            data = data.lerp(new.to(data.dtype), 1.0 - rho)
        return EncodedTensor(data, enc.scale)


def _bf16_stochastic(x: torch.Tensor, seed: Any) -> torch.Tensor:
    """Round float32 ``x`` to bfloat16 stochastically (unbiased), with the codec's index hash
    (:func:`scao_fx.kernels.reference.bf16_stochastic`; compiled for large CPU tensors)."""
    from .kernels import _compiled, _dispatch, reference

    x = x.to(torch.float32).contiguous()
    if _dispatch.compiled_for(x):
        return _compiled.bf16_stochastic(x, _seed_arg(seed))
    return reference.bf16_stochastic(x, _seed_arg(seed))


def _empty(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.float32, device=like.device)


def fp32_codec() -> Codec:
    """Store in float32 (exact): the 'no quantization' choice (the ablation of int8).

    Returns:
        A :class:`Codec` of kind ``"fp32"`` (4 bytes per entry).

    Example:
        >>> import scao_fx as sf
        >>> curv = sf.curvature_ema(0.999, codec=sf.fp32_codec())
    """
    return Codec("fp32")


def bf16_codec(*, stochastic: bool = True) -> Codec:
    """Store in bfloat16 (2 bytes per entry, 8 mantissa bits).

    Args:
        stochastic: round stochastically (unbiased, the same deterministic index hash as
            :func:`int8_blockwise`). Round-to-nearest (False) loses EMA increments smaller than
            half a bf16 step, so with ``rho`` close to 1 (0.999) a nearest-rounded EMA stops
            moving.

    Returns:
        A :class:`Codec` of kind ``"bf16"``.

    Example:
        >>> import scao_fx as sf
        >>> adam_bf16 = sf.quantize_state(sf.scale_by_adam(), sf.bf16_codec())
    """
    if not isinstance(stochastic, bool):
        raise TypeError(f"stochastic must be a bool, got {stochastic!r}")
    return Codec("bf16", stochastic=stochastic)


def int8_blockwise(block_size: int = 32, *, stochastic: bool = True, square_root: bool = False) -> Codec:
    r"""Symmetric int8 with a float32 scale per block of ``block_size`` consecutive entries.

    Cost: :math:`1 + 4/\text{block\_size}` bytes per entry. The default 32 was chosen by
    measurement: with the curvature diagonal kept in float32 it is the largest block tried that
    keeps int8 curvature within 6 % of float32 on every rounding stream (64 sits at 6 %, see
    ``docs/scao.md``).

    Args:
        block_size: entries per block, >= 8.
        stochastic: unbiased stochastic rounding (deterministic hash of index and step).
        square_root: for a non-negative statistic such as Adam's second moment: store
            :math:`\sqrt{x}` (twice the dynamic range in decades) and decode a zero code as half a
            step, so small entries never decode to exactly 0.

    Returns:
        A :class:`Codec` of kind ``"int8"``.

    Example:
        >>> import torch, scao_fx as sf
        >>> codec = sf.int8_blockwise(64)
        >>> enc = codec.encode(torch.linspace(-1, 1, 100))
        >>> bool((codec.decode(enc) - torch.linspace(-1, 1, 100)).abs().max() < 0.02)
        True
    """
    block_size = check_int("block_size", block_size, low=8)
    if not isinstance(stochastic, bool):
        raise TypeError(f"stochastic must be a bool, got {stochastic!r}")
    if not isinstance(square_root, bool):
        raise TypeError(f"square_root must be a bool, got {square_root!r}")
    return Codec("int8", block_size, stochastic, square_root)
