r"""State quantization: the :func:`quantize_state` combinator.

:func:`quantize_state` wraps *any* transform so that its floating state tensors are stored
through codecs (:mod:`scao_fx.codecs`) between steps: ``quantize_state(scale_by_adam(),
int8_adam_codecs())`` is 8-bit Adam (first moment linear int8, second moment stored as its
square root; plain linear int8 of the second moment rounds small entries to zero and diverges).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import optree
import torch

from .._tree import flatten, unflatten
from .._treemath import chunks_by_size
from .._validation import check_bool, check_int
from ..base import GradientTransformation, check_transform, increment, register_state, step_count
from ..codecs import Codec, EncodedTensor, bf16_codec, int8_blockwise
from ..parallel import from_row_shard, is_dtensor, row_shard
from .adam import ScaleByAdamState

__all__ = ["quantize_state", "QuantizedState", "int8_adam_codecs", "bf16_adam_codecs"]


@register_state
class QuantizedState(NamedTuple):
    """State of :func:`quantize_state`: the inner state with large float tensors encoded, and a step seed."""

    inner_state: Any
    count: torch.Tensor


def _map_codecs(tree: Any, codecs: Any, fn, *rest: Any) -> Any:
    """Apply ``fn(codec, subtree, *the same subtree of each of rest)`` where ``codecs`` (a prefix
    of ``tree``) holds a Codec; keep subtrees whose codec entry is ``None``."""
    if codecs is None:
        return tree
    if isinstance(codecs, Codec):
        return fn(codecs, tree, *rest)
    if isinstance(codecs, dict) and isinstance(tree, dict):
        return {k: _map_codecs(v, codecs.get(k), fn, *(r[k] for r in rest)) for k, v in tree.items()}
    if isinstance(codecs, (tuple, list)) and isinstance(tree, (tuple, list)) and len(codecs) == len(tree):
        items = [_map_codecs(t, c, fn, *(r[i] for r in rest)) for i, (t, c) in enumerate(zip(tree, codecs))]
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


def bf16_adam_codecs() -> ScaleByAdamState:
    """Codecs for :func:`scale_by_adam`'s state: both moments in bfloat16 with stochastic
    rounding (:func:`~scao_fx.bf16_codec`), with :func:`quantize_state`.

    Unbiased rounding keeps a moment moving where its step is below bfloat16's resolution (about
    0.4 % of its value), e.g. the second moment with ``beta2=0.999``, which rounding to nearest
    would stall. 4 bytes per entry instead of 8; Adam's arithmetic stays float32.

    Returns:
        A :class:`~scao_fx.transforms.adam.ScaleByAdamState` of codecs (``count``: not encoded).

    Example:
        >>> import scao_fx as sf
        >>> adam16 = sf.chain(sf.quantize_state(sf.scale_by_adam(0.9, 0.999), sf.bf16_adam_codecs()),
        ...                   sf.scale_by_learning_rate(1e-3))
    """
    return ScaleByAdamState(mu=bf16_codec(), nu=bf16_codec(), count=None)


#: Smallest float32 state tensor (in entries) that is stored through a codec by default: smaller
#: ones (biases, norms' scales) stay float32, where a block scale would cost more than it saves.
MIN_ENCODED_SIZE = 4096

#: Entries of state a leafwise :func:`quantize_state` decodes at once (whole leaves: a larger
#: leaf is a chunk of its own). 2^24 float32 entries are 64 MB per moment.
DECODE_CHUNK = 1 << 24


def quantize_state(inner: GradientTransformation, codec: Any, *,
                   min_size: int = MIN_ENCODED_SIZE, leafwise: bool = False) -> GradientTransformation:
    """Store ``inner``'s float32 state tensors through codecs between steps.

    Float32 tensors with at least ``min_size`` entries are encoded as :class:`EncodedTensor`
    (codes keep the tensor's shape; blocks run over its flattened entries); smaller tensors,
    other dtypes and counters stay as they are. A DTensor split along dimension 0 (an FSDP2
    shard) is encoded by each rank on its own rows, blocks running along each row, as an int8
    DTensor of the same layout; other DTensors stay float32 (docs/distributed.md). Each step decodes the state, runs ``inner``,
    and encodes the new state again with a fresh stochastic-rounding seed.

    With ``leafwise=True`` the step runs ``inner`` a chunk of leaves at a time (up to
    :data:`DECODE_CHUNK` entries; a larger leaf alone), decoding only that chunk's state and
    writing its new codes back into the stored ones right after, so that the step holds the
    float32 state of one chunk instead of the whole tree's: the same results, bit for bit, as
    one call. It requires an ``inner`` that treats every leaf on its own, whose state under
    each codec is a tree shaped like the updates and counts its steps per leaf, as
    :func:`scale_by_adam` does (``int8_adam_codecs()``, ``bf16_adam_codecs()``).

    Args:
        inner: any transform (of this library or torchopt) whose state holds float32 tensors.
        codec: one :class:`Codec` for every tensor, or a prefix of the inner state's tree with a
            codec (or ``None``: not encoded) per sub-tree, e.g. :func:`int8_adam_codecs` for
            :func:`scale_by_adam` (plain linear int8 is *not* suitable for Adam's second moment).
        min_size: smallest tensor (in entries) worth encoding, >= 1.
        leafwise: run ``inner`` a chunk of leaves at a time (see above).

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
    leafwise = check_bool("leafwise", leafwise)

    def encode_with(c: Codec, tree: Any, seed: Any) -> Any:
        return optree.tree_map(lambda x: encode_tensor(c, x, seed, min_size), tree, none_is_leaf=True)

    def decode_with(c: Codec, tree: Any) -> Any:
        return optree.tree_map(lambda x: decode_tensor(c, x), tree,
                               is_leaf=lambda x: isinstance(x, EncodedTensor), none_is_leaf=True)

    def init(params):
        state = _map_codecs(inner.init(params), codec, lambda c, t: encode_with(c, t, 0))
        return QuantizedState(state, step_count())

    def update(updates, state, *, params=None, inplace=True):
        count = increment(state.count)
        if leafwise:
            return update_by_chunks(updates, state.inner_state, count, params, inplace)
        inner_state = _map_codecs(state.inner_state, codec, decode_with)
        updates, inner_state = inner.update(updates, inner_state, params=params, inplace=inplace)
        return updates, QuantizedState(_map_codecs(inner_state, codec, lambda c, t: encode_with(c, t, count)), count)

    def update_by_chunks(updates, inner_state, count, params, inplace):
        leaves, spec = flatten(updates)
        live = [i for i, g in enumerate(leaves) if g is not None]
        out = [None] * len(leaves)
        for chunk in chunks_by_size([leaves[i] for i in live], DECODE_CHUNK):
            mask = [False] * len(leaves)
            for j in chunk:
                mask[live[j]] = True
            part = unflatten(spec, [g if on else None for g, on in zip(leaves, mask)])
            opened = _map_codecs(inner_state, codec, lambda c, t: open_encoded(c, t, mask))
            part, new_state = inner.update(part, opened, params=params, inplace=inplace)
            inner_state = _map_codecs(
                new_state, codec,
                lambda c, t, old: store_encoded(c, t, old, mask, count, inplace=inplace, min_size=min_size),
                inner_state)
            for i, u in enumerate(flatten(part)[0]):
                if mask[i]:
                    out[i] = u
        return unflatten(spec, out), QuantizedState(inner_state, count)

    return GradientTransformation(init, update)


def _flat_encoded(tree: Any) -> tuple:
    """The leaves of ``tree`` (an :class:`EncodedTensor` is one leaf, ``None`` kept) and its spec."""
    return optree.tree_flatten(tree, is_leaf=lambda x: isinstance(x, EncodedTensor), none_is_leaf=True)


def open_encoded(c: Codec, tree: Any, live: list) -> Any:
    """``tree`` (a state shaped like the updates) with its encoded leaves decoded where ``live``
    (a flag per leaf) and ``None`` elsewhere: a transform that neither reads nor changes the
    state of a leaf whose update is ``None`` (Adam) then sees only what it updates, decoded."""
    leaves, spec = _flat_encoded(tree)
    if len(leaves) != len(live):
        raise ValueError(f"a state stored leaf by leaf must be shaped like the updates: {len(leaves)} state leaves "
                         f"for {len(live)} updates (use leafwise=False for this transform)")
    return optree.tree_unflatten(spec, [
        decode_tensor(c, x) if on else (None if isinstance(x, EncodedTensor) else x) for x, on in zip(leaves, live)
    ])


def store_encoded(c: Codec, new: Any, old: Any, live: list | None, seed: Any, *, inplace: bool = False,
                  min_size: int = MIN_ENCODED_SIZE) -> Any:
    """Inverse of :func:`open_encoded`: ``new``'s leaves encoded (with ``seed``) where ``live``
    (``None``: every leaf), ``old``'s stored leaves elsewhere. ``inplace``: new codes are copied
    into ``old``'s encoded tensors (a leaf's new codes are alive only while they are copied)."""
    leaves, spec = _flat_encoded(new)
    stored, _ = _flat_encoded(old)
    out = []
    for i, (x, kept) in enumerate(zip(leaves, stored)):
        if live is not None and not live[i]:
            out.append(kept)
            continue
        enc = encode_tensor(c, x, seed, min_size)
        if inplace and isinstance(kept, EncodedTensor) and isinstance(enc, EncodedTensor):
            kept.data.copy_(enc.data)
            kept.scale.copy_(enc.scale)
            enc = kept
        out.append(enc)
    return optree.tree_unflatten(spec, out)


def encode_tensor(c: Codec, x: Any, seed: Any, min_size: int = MIN_ENCODED_SIZE) -> Any:
    """``x`` stored through ``c`` as an :class:`EncodedTensor` whose codes keep ``x``'s shape
    (blocks run over its flattened entries; an FSDP2 row shard by each rank on its own rows), or
    ``x`` itself when it is not a float32 tensor of at least ``min_size`` entries."""
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.numel() >= min_size):
        return x
    if is_dtensor(x):
        return _encode_row_shard(c, x, seed)
    flat, step = x.reshape(-1), _slice_length(c)
    if flat.numel() <= step:
        e = c.encode(flat, seed)
        return EncodedTensor(e.data.view(x.shape), e.scale)
    # a slice at a time (whole blocks; the stochastic rounding's bits of the slice's flat
    # indices): the codes and scales of encoding the whole tensor, without its temporaries
    out = c.zeros((flat.numel(),), device=flat.device)
    for start in range(0, flat.numel(), step):
        e = c.encode(flat[start:start + step], seed, index_offset=start)
        out.data[start:start + step].copy_(e.data)
        if e.scale.numel():
            first = start // c.block_size
            out.scale[first:first + e.scale.numel()].copy_(e.scale)
    return EncodedTensor(out.data.view(x.shape), out.scale)


def decode_tensor(c: Codec, x: Any) -> Any:
    """Inverse of :func:`encode_tensor`: the float32 tensor an :class:`EncodedTensor` stands for
    (anything else is returned as it is)."""
    if not isinstance(x, EncodedTensor):
        return x
    if is_dtensor(x.data):
        return _decode_row_shard(c, x)
    codes, step = x.data.reshape(-1), _slice_length(c)
    if c.kind != "int8" or codes.numel() <= step:  # (bfloat16 decodes in one cast, no temporaries)
        return c.decode(EncodedTensor(codes, x.scale)).view(x.data.shape)
    out = torch.empty(codes.numel(), dtype=torch.float32, device=codes.device)
    for start in range(0, codes.numel(), step):
        first = start // c.block_size
        part = codes[start:start + step]
        scales = x.scale[first:first + -(-part.numel() // c.block_size)]
        out[start:start + step].copy_(c.decode(EncodedTensor(part, scales)))
    return out.view(x.data.shape)


#: Entries a codec encodes or decodes at once (whole blocks) in :func:`encode_tensor` and
#: :func:`decode_tensor`: the rounding's float32 temporaries cover a slice of a large tensor,
#: not all of it (2^22 entries: 16 MB); the codes are the same.
CODEC_SLICE = 1 << 22


def _slice_length(c: Codec) -> int:
    """:data:`CODEC_SLICE` rounded down to whole blocks of ``c`` (an int8 codec's scale blocks)."""
    block = c.block_size if c.kind == "int8" else 1
    return max(CODEC_SLICE // block, 1) * block


def _encode_row_shard(c: Codec, x: Any, seed: Any) -> Any:
    """Encode this rank's rows of a DTensor (an FSDP2 shard) on their own, blocks running along
    each row: codes laid out as ``x``, scales ``(rows, blocks per row)`` laid out the same way.

    Stochastic rounding draws the bits of the rows' global flat indices, so where a row's length
    is a multiple of the block size the codes and scales are those of encoding the whole tensor.
    A DTensor split along another dimension stays float32 (nothing lost, no memory saved)."""
    found = row_shard(x) if x.dim() >= 2 else None
    if found is None:
        return x
    local, first = found
    row = math.prod(x.shape[1:])
    e = c.encode(local.reshape(local.shape[0], row), seed, index_offset=first * row)
    # a codec without scales (bfloat16) keeps its empty scale as a plain tensor
    scale = from_row_shard(e.scale, x, x.shape[0]) if e.scale.numel() else e.scale
    return EncodedTensor(from_row_shard(e.data.view(local.shape), x, x.shape[0]), scale)


def _decode_row_shard(c: Codec, x: EncodedTensor) -> Any:
    """Inverse of :func:`_encode_row_shard`: the float32 DTensor laid out as the codes."""
    codes = x.data.to_local()
    scale = x.scale.to_local() if is_dtensor(x.scale) else x.scale
    y = c.decode(EncodedTensor(codes.reshape(codes.shape[0], -1), scale)).view(codes.shape)
    return from_row_shard(y, x.data, x.data.shape[0])
