"""Pure-PyTorch reference implementations of the kernels.

These define the semantics the Triton kernels must reproduce, and they are the path used on
the CPU (and wherever Triton is unavailable). Every function works on any device, never
synchronises with the host, and accepts stacked same-shape groups (leading dimensions).

The floating-point operation order is written out explicitly (no ``lerp``/``addcmul``, which
may fuse multiply-adds) so that the Triton kernels, launched with FMA contraction disabled,
produce bit-identical int8 codes.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import torch

from . import _common as C

__all__ = [
    "quantize_blockwise",
    "dequantize_blockwise",
    "int8_ema_update",
    "adam_epilogue",
]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View/copy ``t`` as (rows, N): leading dims flattened."""
    rows = 1
    for d in t.shape[:-1]:
        rows *= d
    return t.reshape(rows, t.shape[-1])


def _true_div(a: torch.Tensor, b) -> torch.Tensor:
    """``a / b`` correctly rounded on every device (a new tensor).

    PyTorch's CUDA division by a Python number (or a CPU 0-d tensor) computes ``a * (1 / b)``,
    which is off by one ulp for some inputs; the divisor is made a 0-d tensor on ``a``'s
    device instead, so CUDA divides like the CPU and like the kernels' ``div_rn``.
    """
    if not isinstance(b, torch.Tensor) or (b.device != a.device and b.dim() == 0):
        b = torch.full((), float(b), dtype=a.dtype, device=a.device)
    return a / b


def _block_of_column(n: int, block_size: int, device) -> torch.Tensor:
    """Block index of every column, ``floor(j / block_size)``.

    Computed by float64 division (exact for j < 2**52) rather than integer ``//``: in torch
    2.13 Inductor's CPU backend tiles ``arange(n) // b`` by ``b`` and never writes the columns
    past the last full block, so a compiled step went wrong exactly in partial blocks.
    """
    j = torch.arange(n, device=device, dtype=torch.float64)
    return _true_div(j, block_size).floor_().long()


def _block_absmax(x2: torch.Tensor, block_size: int) -> torch.Tensor:
    """(rows, N) -> (rows, nb) absolute maxima of the blocks; NaN propagates (beats inf)."""
    rows, n = x2.shape
    nb = C.n_blocks(n, block_size)
    ax = x2.abs()
    pad = nb * block_size - n
    if pad:
        ax = torch.nn.functional.pad(ax, (0, pad))
    return ax.reshape(rows, nb, block_size).amax(dim=-1)


def _mul_per_block(x2: torch.Tensor, values: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x2 (rows, N) * values (rows, nb)`` with each block's value applied to its columns.

    Eager mode with whole blocks: a broadcast over a (rows, nb, block) view (no gathered copy of
    the values); otherwise an ``index_select`` by the column's block (the form torch.compile
    gets right in partial blocks). Same products either way, so the same bits.
    """
    rows, n = x2.shape
    nb = values.shape[1]
    if n == nb * block_size and not torch.compiler.is_compiling():
        return (x2.reshape(rows, nb, block_size) * values.unsqueeze(-1)).reshape(rows, n)
    return x2 * values.index_select(1, _block_of_column(n, block_size, values.device))


def _encode(x2: torch.Tensor, block_size: int, stochastic: bool, seedterm, row_start: int = 0):
    """Encode fp32 rows (rows, N) -> (codes (rows, N) int8, scales (rows, nb) fp32).

    Per block: scale = absmax / 127 (NaN if the block holds a NaN, inf if it holds an inf,
    0 for an all-zero block); q = x * (1 / scale) (one division per block; a block whose
    absmax is below 127 / FLT_MAX ~ 3.7e-37 has an infinite reciprocal and encodes as zeros);
    nearest: code = floor(q) + (frac(q) >= 0.5) (ties upward); stochastic:
    code = floor(q) + (u < frac(q)) with u the hash uniform of the flat index row * N + col;
    clamped to [-127, 127]; 0 wherever q is not finite or scale is not > 0. ``x2`` is not
    modified. ``row_start``: ``x2`` is rows ``row_start..`` of a larger tensor (the hash reads
    their flat indices there).

    Everything element-wise is done in the (rows, N) layout (per-block values gathered per
    column) rather than on a padded (rows, nb, bs) view: besides saving the padded copies, the
    pad -> reduce -> reshape-back pattern is miscompiled by torch.compile's CPU backend in
    torch 2.13 (garbage in the partial last block), and this layout is not.
    """
    rows, n = x2.shape
    scale = _true_div(_block_absmax(x2, block_size), C.QMAX)
    pos = scale > 0
    inv = torch.where(pos, _true_div(torch.ones_like(scale), scale),
                      torch.zeros((), dtype=scale.dtype, device=scale.device))
    q = _mul_per_block(x2, inv, block_size)
    q = torch.nan_to_num_(q, nan=0.0, posinf=0.0, neginf=0.0)
    fl = torch.floor(q)
    frac = q.sub_(fl)
    if stochastic:
        # u < frac with u = k / 2**24, compared as k < frac * 2**24 (both exact: the same decisions)
        up = C.row_hash24(rows, n, seedterm, x2.device, row_start) < frac.mul_(2.0**24)
    else:
        up = frac >= 0.5
    code = fl.add_(up).clamp_(-C.QMAX, C.QMAX)
    return code.to(torch.int8), scale


def _decode(codes: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    """(…, N) int8 codes and (…, nb) scales -> (rows, N) fp32 ``code * scale``."""
    c2 = _rows(codes)
    s2 = scales.reshape(c2.shape[0], -1) if c2.shape[0] else scales.reshape(0, 0)
    if c2.shape[0] == 0 or c2.shape[1] == 0:
        return torch.zeros(c2.shape, dtype=torch.float32, device=codes.device)
    return _mul_per_block(c2.to(torch.float32), s2, block_size)


def _write(out, codes2, scales2, shape):
    codes = codes2.reshape(shape)
    scales = scales2.reshape(*shape[:-1], scales2.shape[-1])
    if out is None:
        return codes.contiguous(), scales.contiguous()
    out[0].copy_(codes)
    out[1].copy_(scales)
    return out[0], out[1]


def quantize_blockwise(
    x: torch.Tensor,
    block_size: int = 256,
    *,
    stochastic: bool = False,
    seed: Union[int, torch.Tensor] = 0,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference block-wise int8 quantization; see :func:`scao_fx.kernels.quantize_blockwise`."""
    shape = tuple(x.shape)
    x2 = _rows(x).to(torch.float32)
    st = C.seed_term(seed, x.device) if stochastic else 0
    codes2, scales2 = _encode(x2, block_size, stochastic, st)
    return _write(out, codes2, scales2, shape)


def dequantize_blockwise(
    codes: torch.Tensor,
    scales: torch.Tensor,
    block_size: int = 256,
    *,
    dtype: torch.dtype = torch.float32,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference decode ``x = code * scale`` (computed in fp32, cast to ``dtype``)."""
    x = _decode(codes, scales, block_size).reshape(codes.shape)
    if out is None:
        return x.to(dtype)
    out.copy_(x)
    return out


#: Entries of a chunk of :func:`int8_ema_update`'s eager CPU path: its ~30 passes then run over
#: 512 KB of float32 at a time, which stays in the cache (a whole stack of factors does not).
CHUNK_ENTRIES = 1 << 17

#: Smallest stack (entries) :func:`int8_ema_update` chunks: 2^20 (4 MB of float32). Below, the
#: whole stack stays in the cache anyway and the chunks' per-call overhead would cost more.
CHUNKED_FROM = 1 << 20


@functools.lru_cache(maxsize=None)
def _chunk_width(n: int, block_size: int) -> int:
    """The row length to view ``(rows, n)`` as for chunking: ``n`` itself when a row fits a
    chunk or is not made of whole blocks, else the longest run of whole blocks that divides ``n``
    and fits :data:`CHUNK_ENTRIES` (the view keeps every entry's flat index and every block)."""
    if n <= CHUNK_ENTRIES or n % block_size:
        return n
    blocks = n // block_size
    return next(k for k in range(min(blocks, CHUNK_ENTRIES // block_size), 0, -1) if blocks % k == 0) * block_size


def _chunked(t: torch.Tensor) -> bool:
    """Whether :func:`int8_ema_update` goes through ``t`` in cache-sized chunks: on the CPU, in
    eager code, for a plain tensor (not while compiling, where Inductor fuses the passes itself;
    not inside a ``torch.func`` transform; not a tensor subclass such as a DTensor)."""
    return (t.device.type == "cpu" and not torch.compiler.is_compiling() and type(t) is torch.Tensor
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def int8_ema_update(
    codes: torch.Tensor,
    scales: torch.Tensor,
    update: torch.Tensor,
    rho,
    *,
    block_size: int = 256,
    stochastic: bool = True,
    seed: Union[int, torch.Tensor] = 0,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference fused EMA: dequantize, ``x = rho*x + (1-rho)*update`` (as ``(x*rho) + (u*(1-rho))``
    in fp32), re-quantize with fresh block scales and the same rounding hash.

    On the CPU (eager, plain tensors, stacks of :data:`CHUNKED_FROM` entries or more) the entries
    go through in chunks of whole blocks of about :data:`CHUNK_ENTRIES` entries, each encoded on
    its own with the hash of its entries' flat indices: the same bits, 2-6x faster on 2M- to
    28M-entry stacks (``docs/examples/codec_backends.py``)."""
    shape = tuple(codes.shape)
    r, omr = C.ema_scalars(rho, codes.device)
    st = C.seed_term(seed, codes.device) if stochastic else 0
    c2 = _rows(codes)
    rows, n = c2.shape
    chunked = _chunked(codes) and rows * n >= CHUNKED_FROM and (out is None or all(
        _chunked(o) and o.is_contiguous() for o in out))
    width = _chunk_width(n, block_size) if chunked else n
    c2 = c2.reshape(-1, width) if rows * n else c2
    s2 = scales.reshape(c2.shape[0], -1) if c2.shape[0] else scales.reshape(0, 0)
    u2 = update.reshape(c2.shape)

    def chunk(lo: int, hi: int):
        x = _decode(c2[lo:hi], s2[lo:hi], block_size)
        x = x.mul_(r).add_(u2[lo:hi].to(torch.float32) * omr)  # (c*s)*rho + u*(1-rho), each rounded in fp32
        return _encode(x, block_size, stochastic, st, lo)

    if not chunked:
        codes2, scales2 = chunk(0, c2.shape[0])
        return _write(out, codes2, scales2, shape)
    if out is None:
        out = (torch.empty(shape, dtype=torch.int8), torch.empty(scales.shape, dtype=torch.float32))
    # chunk by chunk into the result, which may be the input itself: a chunk's entries are read
    # before they are written, and no other chunk reads them
    oc, os_ = out[0].view(c2.shape), out[1].view(s2.shape)
    step = max(1, CHUNK_ENTRIES // width)
    for lo in range(0, c2.shape[0], step):
        hi = min(c2.shape[0], lo + step)
        codes_c, scales_c = chunk(lo, hi)
        oc[lo:hi].copy_(codes_c)
        os_[lo:hi].copy_(scales_c)
    return out[0], out[1]


def bf16_stochastic(x: torch.Tensor, seed: Union[int, torch.Tensor] = 0) -> torch.Tensor:
    """Round float32 ``x`` to bfloat16 stochastically (unbiased), NaN kept.

    The 16 low bits of the float32 pattern are dropped after adding 16 hash bits of the element's
    flat index and ``seed`` (the top 16 of :func:`~scao_fx.kernels._common.row_hash24`'s 24,
    ``floor(u * 2**16)`` of the uniform ``u``): the magnitude rounds up with probability equal to
    the dropped fraction.
    """
    x = x.to(torch.float32).contiguous()
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 1
    n = x.shape[-1] if x.dim() else 1
    bits = C.row_hash24(rows, n, C.seed_term(seed, x.device), x.device).view(x.shape)
    bits.bitwise_right_shift_(8).add_(x.view(torch.int32)).bitwise_and_(-65536)
    rounded = bits.view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded, out=rounded).to(torch.bfloat16)


def adam_epilogue(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg,
    exp_avg_sq,
    *,
    lr,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step,
    precond: Optional[torch.Tensor] = None,
    blend=1.0,
    moment_block_size: int = 256,
    seed: Union[int, torch.Tensor] = 0,
):
    """Reference fused Adam epilogue (in place); see :func:`scao_fx.kernels.adam_epilogue`."""
    s = C.adam_scalars(lr, beta1, beta2, eps, weight_decay, step, blend, param.device)
    use_pc, use_g = _blend_usage(precond, blend)
    q8m, q8v = isinstance(exp_avg, tuple), isinstance(exp_avg_sq, tuple)
    if q8m or q8v:
        return _adam8(param, grad, exp_avg, exp_avg_sq, precond, s, use_pc, use_g, q8m, q8v,
                      moment_block_size, seed)
    shape = param.shape
    g_eff = _g_eff(lambda t: t.reshape(shape).to(torch.float32), grad, precond, s, use_pc,
                   use_g)
    m = exp_avg.reshape(shape).to(torch.float32)
    v = exp_avg_sq.reshape(shape).to(torch.float32)
    m = m * s["beta1"] + g_eff * s["omb1"]
    v = v * s["beta2"] + (g_eff * g_eff) * s["omb2"]
    denom = _true_div(_sqrt_rn(v), s["sbc2"]) + s["eps"]
    upd = (m * s["step_size"]) / denom
    p = param.to(torch.float32) * s["decay"] - upd

    exp_avg.copy_(m.reshape(exp_avg.shape))
    exp_avg_sq.copy_(v.reshape(exp_avg_sq.shape))
    param.copy_(p)
    return param, exp_avg, exp_avg_sq


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root.

    PyTorch's vectorized CPU ``sqrt`` for float32 is not always correctly rounded (off by one
    ulp for ~0.7 % of inputs); the square root taken in float64 and rounded once to float32
    is (53 >= 2*24 + 2 bits, so the double rounding is innocuous). The Triton kernels use
    ``sqrt_rn``, so both backends agree bit for bit.
    """
    return x.double().sqrt_().float()


def _g_eff(view, grad, precond, s, use_pc, use_g):
    """Blended gradient in fp32: ``precond*blend + grad*(1-blend)`` (or one of them)."""
    if use_pc:
        g_eff = view(precond) * s["blend"]
        if use_g:
            g_eff = g_eff + view(grad) * s["omblend"]
        return g_eff
    return view(grad)


def _adam8(param, grad, exp_avg, exp_avg_sq, precond, s, use_pc, use_g, q8m, q8v, bs, seed):
    """Adam with block-wise int8 moments: m as the codec stores it, v stored as sqrt(v).

    Works on the (rows, N) layout of the codes' shape (..., N); param/grad/precond are matched
    by flat index. The step uses the fp32 moments computed from the decoded state and the new
    gradient; the new state is then re-encoded with stochastic rounding (hash of the flat
    index and ``seed``; the v stream xors the seed term with ``ADAM8_V_STREAM``).
    """
    cshape = (exp_avg if q8m else exp_avg_sq)[0].shape
    if param.numel() == 0:
        return param, exp_avg, exp_avg_sq
    n = cshape[-1]
    rows = param.numel() // n

    def view(t):
        return t.reshape(rows, n).to(torch.float32)

    g = _g_eff(view, grad, precond, s, use_pc, use_g)
    m_prev = _decode(exp_avg[0], exp_avg[1], bs) if q8m else view(exp_avg)
    if q8v:
        r_prev = _decode(exp_avg_sq[0], exp_avg_sq[1], bs)
        v_prev = r_prev * r_prev
    else:
        v_prev = view(exp_avg_sq)
    m = m_prev * s["beta1"] + g * s["omb1"]
    v = v_prev * s["beta2"] + (g * g) * s["omb2"]
    rv = _sqrt_rn(v)
    denom = _true_div(rv, s["sbc2"]) + s["eps"]
    upd = (m * s["step_size"]) / denom
    p = view(param) * s["decay"] - upd

    param.copy_(p.reshape(param.shape))
    st = C.seed_term(seed, param.device)
    if q8m:
        codes, scales = _encode(m, bs, True, st)
        exp_avg[0].copy_(codes.reshape(exp_avg[0].shape))
        exp_avg[1].copy_(scales.reshape(exp_avg[1].shape))
    else:
        exp_avg.copy_(m.reshape(exp_avg.shape))
    if q8v:
        codes, scales = _encode(rv, bs, True, st ^ C.ADAM8_V_STREAM)
        exp_avg_sq[0].copy_(codes.reshape(exp_avg_sq[0].shape))
        exp_avg_sq[1].copy_(scales.reshape(exp_avg_sq[1].shape))
    else:
        exp_avg_sq.copy_(v.reshape(exp_avg_sq.shape))
    return param, exp_avg, exp_avg_sq


def _blend_usage(precond, blend):
    """Which inputs the epilogue reads: (use precond, use grad).

    A Python ``blend`` of exactly 1.0 with ``precond`` given skips ``grad`` (g_eff = precond);
    exactly 0.0 skips ``precond`` (g_eff = grad). A tensor ``blend`` always reads both.
    """
    if precond is None:
        return False, True
    if not isinstance(blend, torch.Tensor):
        if float(blend) == 1.0:
            return True, False
        if float(blend) == 0.0:
            return False, True
    return True, True
