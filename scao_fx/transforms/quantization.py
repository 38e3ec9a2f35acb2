r"""State quantization: codecs and the :func:`quantize_state` combinator.

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
one pass, a Triton kernel on CUDA) used by the curvature EMA.

:func:`quantize_state` wraps *any* transform so that its floating state tensors are stored
through codecs between steps: ``quantize_state(scale_by_adam(), int8_adam_codecs())`` is 8-bit
Adam (first moment linear int8, second moment stored as its square root; plain linear int8 of
the second moment rounds small entries to zero and diverges).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import optree
import torch

from .._validation import check_int
from ..base import GradientTransformation, check_transform, increment, register_state, step_count
from .adam import ScaleByAdamState

__all__ = [
    "Codec",
    "EncodedTensor",
    "fp32_codec",
    "bf16_codec",
    "int8_blockwise",
    "quantize_state",
    "QuantizedState",
    "int8_adam_codecs",
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

    def encode(self, x: torch.Tensor, seed: Any = 0) -> EncodedTensor:
        """Store ``x`` (shape ``(..., N)``)."""
        if self.kind == "fp32":
            return EncodedTensor(x.to(torch.float32), _empty(x))
        if self.kind == "bf16":
            data = _bf16_stochastic(x, seed) if self.stochastic else x.to(torch.bfloat16)
            return EncodedTensor(data, _empty(x))
        from ..kernels import quantize_blockwise

        x = x.to(torch.float32)
        if self.square_root:
            x = x.clamp(min=0).sqrt()
        codes, scales = quantize_blockwise(x, self.block_size, stochastic=self.stochastic, seed=_seed_arg(seed))
        return EncodedTensor(codes, scales)

    def decode(self, enc: EncodedTensor) -> torch.Tensor:
        """The float32 tensor ``enc`` stands for."""
        if self.kind != "int8":
            return enc.data.to(torch.float32)
        from ..kernels import dequantize_blockwise

        y = dequantize_blockwise(enc.data, enc.scale, self.block_size, dtype=torch.float32)
        if not self.square_root:
            return y
        # A zero code means sqrt(x) < one step: decode it as half a step, never as 0, so that a
        # second moment never becomes 0 where its first moment is not (that would turn
        # m / (sqrt(v) + eps) into m / eps).
        half_step = 0.5 * dequantize_blockwise(torch.ones_like(enc.data), enc.scale, self.block_size, dtype=torch.float32)
        return torch.maximum(y, half_step).square()

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
            from ..kernels import int8_ema_update

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
    """Round float32 ``x`` to bfloat16 stochastically (unbiased), with the codec's index hash.

    The 16 low bits of the float32 pattern are dropped after adding a 16-bit hash of the element
    index and ``seed``: the magnitude rounds up with probability equal to the dropped fraction.
    """
    from ..kernels import _common as C

    x = x.to(torch.float32).contiguous()
    rows = x.numel() // x.shape[-1] if x.dim() else 1
    n = x.shape[-1] if x.dim() else 1
    u = C.row_uniforms(rows, n, C.seed_term(_seed_arg(seed), x.device), x.device).view(x.shape)
    noise = (u * 65536.0).to(torch.int32)  # 16 random low bits
    bits = (x.view(torch.int32) + noise) & -65536
    rounded = bits.view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


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


@register_state
class QuantizedState(NamedTuple):
    """State of :func:`quantize_state`: the inner state with large float tensors encoded, and a step seed."""

    inner_state: Any
    count: torch.Tensor


def _map_codecs(tree: Any, codecs: Any, fn) -> Any:
    """Apply ``fn(codec, subtree)`` where ``codecs`` (a prefix of ``tree``) holds a Codec; keep
    subtrees whose codec entry is ``None``."""
    if codecs is None:
        return tree
    if isinstance(codecs, Codec):
        return fn(codecs, tree)
    if isinstance(codecs, dict) and isinstance(tree, dict):
        return {k: _map_codecs(v, codecs.get(k), fn) for k, v in tree.items()}
    if isinstance(codecs, (tuple, list)) and isinstance(tree, (tuple, list)) and len(codecs) == len(tree):
        items = [_map_codecs(t, c, fn) for t, c in zip(tree, codecs)]
        return tree._make(items) if hasattr(tree, "_make") else type(tree)(items)
    raise ValueError(
        f"codec must be a Codec or a prefix of the inner state's tree; got {type(codecs).__name__} "
        f"where the state has {type(tree).__name__}"
    )


def int8_adam_codecs(block_size: int = 64) -> ScaleByAdamState:
    """Codecs for :func:`scale_by_adam`'s state: 8-bit Adam with :func:`quantize_state`.

    The first moment is stored linearly, the second as its square root
    (``int8_blockwise(block_size, square_root=True)``): linear int8 rounds small second-moment
    entries to zero while their first moment is not, and ``m / (sqrt(v) + eps)`` explodes.

    Args:
        block_size: entries per scale block, >= 8.

    Returns:
        A :class:`~scao_fx.transforms.adam.ScaleByAdamState` of codecs (``count``: not encoded),
        to pass as ``codec`` to :func:`quantize_state` around :func:`scale_by_adam`.

    Example:
        >>> import scao_fx as sf
        >>> adam8 = sf.chain(sf.quantize_state(sf.scale_by_adam(), sf.int8_adam_codecs()),
        ...                  sf.add_decayed_weights(0.01), sf.scale_by_learning_rate(1e-3))
    """
    return ScaleByAdamState(
        mu=int8_blockwise(block_size), nu=int8_blockwise(block_size, square_root=True), count=None
    )


def quantize_state(inner: GradientTransformation, codec: Any, *, min_size: int = 4096) -> GradientTransformation:
    """Store ``inner``'s float32 state tensors through codecs between steps.

    Float32 tensors with at least ``min_size`` entries are encoded as :class:`EncodedTensor`
    (codes keep the tensor's shape; blocks run over its flattened entries); smaller tensors,
    other dtypes and counters stay as they are. Each step decodes the state, runs ``inner``,
    and encodes the new state again with a fresh stochastic-rounding seed.

    Args:
        inner: any transform (of this library or torchopt) whose state holds float32 tensors.
        codec: one :class:`Codec` for every tensor, or a prefix of the inner state's tree with a
            codec (or ``None``: not encoded) per sub-tree, e.g. :func:`int8_adam_codecs` for
            :func:`scale_by_adam` (plain linear int8 is *not* suitable for Adam's second moment).
        min_size: smallest tensor (in entries) worth encoding, >= 1.

    Returns:
        A ``GradientTransformation`` with state :class:`QuantizedState`.

    Example:
        >>> import scao_fx as sf
        >>> adam8 = sf.chain(sf.quantize_state(sf.scale_by_adam(), sf.int8_adam_codecs()),
        ...                  sf.scale_by_learning_rate(1e-3))
    """
    check_transform("inner", inner)
    if not isinstance(codec, (Codec, tuple, list, dict)):
        raise TypeError(
            "codec must be a Codec (fp32_codec(), bf16_codec(), int8_blockwise()) or a prefix tree of "
            f"them (e.g. int8_adam_codecs()), got {codec!r}"
        )
    min_size = check_int("min_size", min_size, low=1)

    def encode_with(c: Codec, tree: Any, seed: Any) -> Any:
        def enc(x):
            if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.numel() >= min_size:
                e = c.encode(x.reshape(-1), seed)
                return EncodedTensor(e.data.view(x.shape), e.scale)
            return x

        return optree.tree_map(enc, tree, none_is_leaf=True)

    def decode_with(c: Codec, tree: Any) -> Any:
        def dec(x):
            if isinstance(x, EncodedTensor):
                return c.decode(EncodedTensor(x.data.reshape(-1), x.scale)).view(x.data.shape)
            return x

        return optree.tree_map(dec, tree, is_leaf=lambda x: isinstance(x, EncodedTensor), none_is_leaf=True)

    def init(params):
        state = _map_codecs(inner.init(params), codec, lambda c, t: encode_with(c, t, 0))
        return QuantizedState(state, step_count())

    def update(updates, state, *, params=None, inplace=True):
        count = increment(state.count)
        inner_state = _map_codecs(state.inner_state, codec, decode_with)
        updates, inner_state = inner.update(updates, inner_state, params=params, inplace=inplace)
        return updates, QuantizedState(_map_codecs(inner_state, codec, lambda c, t: encode_with(c, t, count)), count)

    return GradientTransformation(init, update)
