"""Pure-PyTorch reference implementations of the kernels.

These define the semantics the Triton kernels must reproduce, and they are the path used on
the CPU (and wherever Triton is unavailable). Every function works on any device, never
synchronises with the host, and accepts stacked same-shape groups (leading dimensions).

The floating-point operation order is written out explicitly (no ``lerp``/``addcmul``, which
may fuse multiply-adds) so that the Triton kernels, launched with FMA contraction disabled,
produce bit-identical int8 codes.
"""

from __future__ import annotations

import threading
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


def _block_absmax(x2: torch.Tensor, block_size: int, ax: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
    """(rows, N) -> (rows, nb) absolute maxima of the blocks; NaN propagates (beats inf).

    ``ax``: an optional (rows, N) float32 buffer for ``|x2|`` (it is overwritten)."""
    rows, n = x2.shape
    nb = C.n_blocks(n, block_size)
    ax = x2.abs() if ax is None else torch.abs(x2, out=ax)
    pad = nb * block_size - n
    if pad:
        ax = torch.nn.functional.pad(ax, (0, pad))
    return ax.reshape(rows, nb, block_size).amax(dim=-1)


def _mul_per_block(x2: torch.Tensor, values: torch.Tensor, block_size: int,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x2 (rows, N) * values (rows, nb)`` with each block's value applied to its columns.

    Eager mode with whole blocks: a broadcast over a (rows, nb, block) view (no gathered copy of
    the values); otherwise an ``index_select`` by the column's block (the form torch.compile
    gets right in partial blocks). Same products either way, so the same bits.
    """
    rows, n = x2.shape
    nb = values.shape[1]
    if n == nb * block_size and not torch.compiler.is_compiling():
        x3 = x2.reshape(rows, nb, block_size)
        if out is None:
            return (x3 * values.unsqueeze(-1)).reshape(rows, n)
        torch.mul(x3, values.unsqueeze(-1), out=out.view(rows, nb, block_size))
        return out
    v = values.index_select(1, _block_of_column(n, block_size, values.device))
    return x2 * v if out is None else torch.mul(x2, v, out=out)


def _encode_piece(x2: torch.Tensor, block_size: int, stochastic: bool, seedterm,
                  row_start: int = 0, offset: int = 0, ws=None):
    """Encode fp32 rows (rows, N) -> (codes (rows, N) int8, scales (rows, nb) fp32).

    Per block: scale = absmax / 127 (NaN if the block holds a NaN, inf if it holds an inf,
    0 for an all-zero block); q = x * (1 / scale) (one division per block; a block whose
    absmax is below 127 / FLT_MAX ~ 3.7e-37 has an infinite reciprocal and encodes as zeros);
    q is 0 wherever it is not finite or scale is not > 0. The rounding is done in 24-bit fixed
    point: ``Q = trunc(q * 2**24)`` (int32; exact whenever q has no bits below 2**-24, e.g.
    whenever |q| >= 0.5), then

        nearest:     code = (Q + 2**23) >> 24                 (= floor(q) + [frac(q) >= 0.5])
        stochastic:  code = (Q + (2**24 - 1 - U)) >> 24      (= floor(Q / 2**24) + [U < Q mod 2**24])

    with ``>>`` the arithmetic (flooring) shift and U the 24 hash bits of the flat index
    (row_start + row) * N + col + offset (:func:`~scao_fx.kernels._common.row_hash_bits`); clamped to [-127, 127].
    ``x2`` is not modified. Returns the int32 codes (the caller casts them to int8; with a
    workspace ``ws`` (:func:`_workspace`) they live in it) and the scales.

    Everything element-wise is done in the (rows, N) layout (per-block values gathered per
    column) rather than on a padded (rows, nb, bs) view: besides saving the padded copies, the
    pad -> reduce -> reshape-back pattern is miscompiled by torch.compile's CPU backend in
    torch 2.13 (garbage in the partial last block), and this layout is not. All element-wise
    steps after ``q`` are in place, on three full-size buffers in all (``|x|`` then q, the
    codes, the hash, whose scratch is q's buffer once the codes are taken), taken from the
    workspace on the CPU. No comparison masks either: boolean temporaries cost several integer
    ops on the CPU.
    """
    rows, n = x2.shape
    if ws is None:
        ax = torch.empty(x2.shape, dtype=torch.float32, device=x2.device)
        code = h = None
    else:
        ax, code, h = (_ws_view(ws[i], rows, n) for i in (0, 2, 3))
    scale = _true_div(_block_absmax(x2, block_size, ax), C.QMAX)
    pos = scale > 0
    inv = torch.where(pos, _true_div(torch.ones_like(scale), scale),
                      torch.zeros((), dtype=scale.dtype, device=scale.device))
    q = _mul_per_block(x2, inv, block_size, out=ax)
    q = torch.nan_to_num_(q, nan=0.0, posinf=0.0, neginf=0.0).mul_(C.FIX_ONE)
    code = q.to(torch.int32) if code is None else code.copy_(q)  # truncation either way
    if stochastic:
        bits = C.row_hash_bits(rows, n, seedterm, x2.device, row_start, offset,
                               scratch=q.view(torch.int32), out=h)
        code.sub_(bits).add_(C.FIX_ONE - 1)
    else:
        code.add_(C.FIX_HALF)
    code.bitwise_right_shift_(C.FIX_BITS).clamp_(-C.QMAX_INT, C.QMAX_INT)
    return code, scale


#: Elements per piece of the CPU codec loops (whole blocks or whole rows, see :func:`_pieces`).
CPU_PIECE = 1 << 18

_LOCAL = threading.local()


def _workspace(numel: int):
    """Per-thread CPU scratch reused across calls: float32, float32, int32, int32 flat buffers
    of at least ``numel`` elements; None above ``2 * CPU_PIECE`` (not worth keeping around).

    Fresh large temporaries are expensive on the CPU: glibc serves them with new pages that are
    faulted in (and zeroed by the kernel) on first touch, on every call.
    """
    if numel > 2 * CPU_PIECE:
        return None
    ws = getattr(_LOCAL, "codec_ws", None)
    if ws is None or ws[0].numel() < numel:
        ws = tuple(torch.empty(numel, dtype=dt) for dt in
                   (torch.float32, torch.float32, torch.int32, torch.int32))
        _LOCAL.codec_ws = ws
    return ws


def _ws_view(buf: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    return buf[: rows * n].view(rows, n)


def _pieces(rows: int, n: int, block_size: int, device):
    """How the CPU encode and EMA loop over a (rows, N) tensor; None off the CPU.

    Each piece is a contiguous run of whole blocks, so it is encoded independently with the
    same bits: ``("flat", c0, c1)``, elements c0..c1 of the flattened tensor when N is a
    multiple of the block (blocks then never straddle the flat cut), else ``("rows", r0, r1)``.
    About ``CPU_PIECE`` elements each (a single piece for smaller tensors), so that the
    element-wise temporaries of a piece fit in a reused per-thread workspace
    (:func:`_workspace`) and mostly in the cache. None (one piece, no workspace) on
    accelerators and under torch.compile (the compiler fuses the element-wise chain itself).
    """
    total = rows * n
    if device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if total <= CPU_PIECE:
        return [("rows", 0, rows)]
    if n % block_size == 0:
        step = max(block_size, CPU_PIECE // block_size * block_size)
        return [("flat", c, min(c + step, total)) for c in range(0, total, step)]
    per = max(1, CPU_PIECE // n)
    return [("rows", r, min(r + per, rows)) for r in range(0, rows, per)]


def _take(t2: torch.Tensor, piece, block_size: int = 0):
    """The (rows', N') view of the (rows, N) tensor ``t2`` for ``piece``; with ``block_size``
    ``t2`` holds per-block values (rows, nb) and the piece's blocks are taken."""
    kind, a, b = piece
    if kind == "rows":
        return t2[a:b]
    if block_size:
        a, b = a // block_size, C.n_blocks(b, block_size)
    return t2.reshape(1, -1)[:, a:b]


def _piece_start(piece):
    """``(row_start, offset)`` of the hash index of ``piece``'s element (0, 0)."""
    kind, a, _ = piece
    return (a, 0) if kind == "rows" else (0, a)


def _encode(x2: torch.Tensor, block_size: int, stochastic: bool, seedterm, out=None):
    """Encode fp32 rows (rows, N) -> (codes (rows, N) int8, scales (rows, nb) fp32), see
    :func:`_encode_piece`; on the CPU piece by piece (:func:`_pieces`), same bits."""
    rows, n = x2.shape
    pieces = _pieces(rows, n, block_size, x2.device)
    if pieces is None:
        code, scale = _encode_piece(x2, block_size, stochastic, seedterm)
        return code.to(torch.int8), scale
    codes, scales = out if out is not None else _empty_pair(rows, n, block_size, x2.device)
    for piece in pieces:
        xp = _take(x2, piece)
        code, scale = _encode_piece(xp, block_size, stochastic, seedterm, *_piece_start(piece),
                                    ws=_workspace(xp.numel()))
        _take(codes, piece).copy_(code)
        _take(scales, piece, block_size).copy_(scale)
    return codes, scales


def _empty_pair(rows: int, n: int, block_size: int, device):
    return (torch.empty((rows, n), dtype=torch.int8, device=device),
            torch.empty((rows, C.n_blocks(n, block_size)), dtype=torch.float32, device=device))


def _decode(codes: torch.Tensor, scales: torch.Tensor, block_size: int,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(…, N) int8 codes and (…, nb) scales -> (rows, N) fp32 ``code * scale`` (in ``out``, a
    contiguous (rows, N) float32 tensor, if given)."""
    c2 = _rows(codes)
    s2 = scales.reshape(c2.shape[0], -1) if c2.shape[0] else scales.reshape(0, 0)
    if c2.shape[0] == 0 or c2.shape[1] == 0:
        return torch.zeros(c2.shape, dtype=torch.float32, device=codes.device)
    c = c2.to(torch.float32) if out is None else out.copy_(c2)
    return _mul_per_block(c, s2, block_size, out=c)


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
    in fp32), re-quantize with fresh block scales and the same rounding hash."""
    shape = tuple(codes.shape)
    r, omr = C.ema_scalars(rho, codes.device)
    st = C.seed_term(seed, codes.device) if stochastic else 0
    c2 = _rows(codes)
    u2 = _rows(update.reshape(shape))
    pieces = _pieces(c2.shape[0], c2.shape[1], block_size, codes.device)
    if pieces is None:
        x = _ema_mix(c2, scales, u2, r, omr, block_size)
        codes2, scales2 = _encode(x, block_size, stochastic, st)
        return _write(out, codes2, scales2, shape)
    # CPU: decode, mix and encode piece by piece in the workspace (each piece is read before it
    # is written, so out=(codes, scales) is safe); the same bits as one piece
    s2 = scales.reshape(c2.shape[0], -1)
    direct = out is not None and out[0].is_contiguous() and out[1].is_contiguous()
    if direct:
        oc, os_ = _rows(out[0]), out[1].reshape(c2.shape[0], -1)
    else:
        oc, os_ = _empty_pair(c2.shape[0], c2.shape[1], block_size, codes.device)
    for piece in pieces:
        cp = _take(c2, piece)
        ws = _workspace(cp.numel())
        x = _ema_mix(cp, _take(s2, piece, block_size), _take(u2, piece), r, omr, block_size, ws)
        code, scale = _encode_piece(x, block_size, stochastic, st, *_piece_start(piece), ws=ws)
        _take(oc, piece).copy_(code)
        _take(os_, piece, block_size).copy_(scale)
    if direct:
        return out[0], out[1]
    return _write(out, oc, os_, shape)


def _ema_mix(c2, s2, u2, r, omr, block_size, ws=None):
    """``(c * s) * rho + u * (1 - rho)`` in float32, each op rounded: a (rows, N) tensor (in
    the workspace's second float32 buffer if given; the first one is used as scratch)."""
    if ws is None:
        dec = _decode(c2, s2, block_size)
        return dec.mul_(r).add_(u2.to(torch.float32) * omr)
    rows, n = c2.shape
    dec = _decode(c2, s2, block_size, out=_ws_view(ws[1], rows, n))
    uo = _ws_view(ws[0], rows, n).copy_(u2).mul_(omr)
    return dec.mul_(r).add_(uo)


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
