"""Triton implementations of the kernels (same signatures and semantics as :mod:`.reference`).

Import this module only through :mod:`scao_fx.kernels` (it imports Triton). To run the
kernels on the CPU, ``TRITON_INTERPRET=1`` must be set before this module is first imported
(Triton decides interpretation when the kernels are decorated).

All kernels are launched with ``enable_fp_fusion=False`` (no multiply-add contraction) and use
correctly rounded division/sqrt (``div_rn``/``sqrt_rn``), so fp32 arithmetic follows the
reference's operation order exactly; that is what makes the int8 codes bit-identical.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _common as C
from .reference import _blend_usage

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _env_pow2(name: str, default: int) -> int:
    v = int(os.environ.get(name, default))
    if v < 16 or v & (v - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    return v


# Tuning knobs (module attributes, read at every launch; the environment sets the defaults).
#: Elements handled by one program of the codec kernels (whole blocks, at least one block).
CODEC_TILE = _env_pow2("SCAO_FX_CODEC_TILE", 2048)
#: Elements per program of the Adam epilogue.
ADAM_BLOCK = _env_pow2("SCAO_FX_ADAM_BLOCK", 2048)
_INT32_LIMIT = 2**31 - 1


@triton.jit
def _hash_uniform(idx, seedterm):
    """Same mixing hash as ``_common.hash_uniform``, in uint32 arithmetic."""
    h = idx.to(tl.uint32) * 0x9E3779B1 + seedterm
    h = h ^ (h >> 15)
    h = h * 0x2C1B3C6D
    h = h ^ (h >> 12)
    h = h * 0x297A2D39
    h = h ^ (h >> 15)
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _cast_out(x, ptr):
    """Cast fp32 ``x`` to ``ptr``'s element type, rounding to nearest even.

    bf16 is rounded with integer bit arithmetic (NaN kept a quiet NaN): the Triton interpreter
    truncates fp32 -> bf16 casts, and this gives the same bits on every backend.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def _tile(pid, total_blocks, nb, n, bs, BPP: tl.constexpr, BLOCK: tl.constexpr,
          I64: tl.constexpr):
    """Offsets of the [BPP, BLOCK] tile of whole blocks handled by program ``pid``."""
    if I64:
        b = pid.to(tl.int64) * BPP + tl.arange(0, BPP).to(tl.int64)
    else:
        b = pid * BPP + tl.arange(0, BPP)
    bmask = b < total_blocks
    row = b // nb
    blk = b - row * nb
    j = tl.arange(0, BLOCK)
    col = blk[:, None] * bs + j[None, :]
    emask = bmask[:, None] & (j[None, :] < bs) & (col < n)
    offs = row[:, None] * n + col
    return b, bmask, offs, emask


@triton.jit
def _encode(x, emask, offs, seedterm, STOCH: tl.constexpr):
    """fp32 tile [BPP, BLOCK] -> (int8 codes, per-block scales); see reference._encode."""
    isnan = x != x
    ax = tl.where(emask & (~isnan), tl.abs(x), 0.0)
    amax = tl.max(ax, axis=1)
    anynan = tl.max(tl.where(emask & isnan, 1, 0), axis=1) > 0
    scale = tl.math.div_rn(amax, 127.0)
    scale = tl.where(anynan, float("nan"), scale)
    pos = scale > 0
    inv = tl.math.div_rn(1.0, tl.where(pos, scale, 1.0))
    q = x * inv[:, None]
    fl = tl.floor(q)
    frac = q - fl
    if STOCH:
        u = _hash_uniform(offs, seedterm)
        up = u < frac
    else:
        up = frac >= 0.5
    code = fl + tl.where(up, 1.0, 0.0)
    code = tl.minimum(tl.maximum(code, -127.0), 127.0)
    ok = pos[:, None] & (q == q) & (tl.abs(q) < float("inf"))
    code = tl.where(ok, code, 0.0)
    return code.to(tl.int8), scale


@triton.jit(do_not_specialize=["seed"])
def _quantize_kernel(x_ptr, codes_ptr, scales_ptr, seed, total_blocks, nb, n, bs,
                     STOCH: tl.constexpr, SEED_PTR: tl.constexpr, BPP: tl.constexpr,
                     BLOCK: tl.constexpr, I64: tl.constexpr):
    pid = tl.program_id(0)
    b, bmask, offs, emask = _tile(pid, total_blocks, nb, n, bs, BPP, BLOCK, I64)
    x = tl.load(x_ptr + offs, mask=emask, other=0.0).to(tl.float32)
    st = _scalar(seed, SEED_PTR).to(tl.uint32)
    codes, scale = _encode(x, emask, offs, st, STOCH)
    tl.store(codes_ptr + offs, codes, mask=emask)
    tl.store(scales_ptr + b, scale, mask=bmask)


@triton.jit
def _dequantize_kernel(codes_ptr, scales_ptr, out_ptr, total_blocks, nb, n, bs,
                       BPP: tl.constexpr, BLOCK: tl.constexpr, I64: tl.constexpr):
    pid = tl.program_id(0)
    b, bmask, offs, emask = _tile(pid, total_blocks, nb, n, bs, BPP, BLOCK, I64)
    c = tl.load(codes_ptr + offs, mask=emask, other=0).to(tl.float32)
    s = tl.load(scales_ptr + b, mask=bmask, other=0.0)
    x = c * s[:, None]
    tl.store(out_ptr + offs, _cast_out(x, out_ptr), mask=emask)


@triton.jit(do_not_specialize=["seed"])
def _ema_kernel(codes_ptr, scales_ptr, upd_ptr, out_codes_ptr, out_scales_ptr, rho, omr, seed,
                total_blocks, nb, n, bs,
                RHO_PTR: tl.constexpr, STOCH: tl.constexpr, SEED_PTR: tl.constexpr,
                BPP: tl.constexpr, BLOCK: tl.constexpr, I64: tl.constexpr):
    pid = tl.program_id(0)
    b, bmask, offs, emask = _tile(pid, total_blocks, nb, n, bs, BPP, BLOCK, I64)
    c = tl.load(codes_ptr + offs, mask=emask, other=0).to(tl.float32)
    s = tl.load(scales_ptr + b, mask=bmask, other=0.0)
    u = tl.load(upd_ptr + offs, mask=emask, other=0.0).to(tl.float32)
    if RHO_PTR:
        r = tl.load(rho)
        om = 1.0 - r
    else:
        r = rho
        om = omr
    dec = c * s[:, None]
    x = dec * r + u * om
    x = tl.where(emask, x, 0.0)
    st = _scalar(seed, SEED_PTR).to(tl.uint32)
    codes, scale = _encode(x, emask, offs, st, STOCH)
    tl.store(out_codes_ptr + offs, codes, mask=emask)
    tl.store(out_scales_ptr + b, scale, mask=bmask)


@triton.jit
def _scalar(x, IS_PTR: tl.constexpr):
    """A kernel scalar given either by value or by a pointer to a 0-d tensor."""
    if IS_PTR:
        v = tl.load(x)
    else:
        v = x
    return v


@triton.jit
def _blended_grad(g_ptr, pc_ptr, offs, mask, blend, omblend,
                  USE_G: tl.constexpr, USE_PC: tl.constexpr, BLEND_PTR: tl.constexpr):
    """``b * P(G) + (1 - b) * G`` in float32 (just ``P(G)`` or ``G`` when only one is given)."""
    if USE_PC:
        pc = tl.load(pc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if BLEND_PTR:
            bl = tl.load(blend)
            obl = 1.0 - bl
        else:
            bl = blend
            obl = omblend
        g_eff = pc * bl
        if USE_G:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g_eff = g_eff + g * obl
    else:
        g_eff = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return g_eff


@triton.jit
def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, pc_ptr, n,
                 decay, step_size, sbc2, blend, omblend, beta1, omb1, beta2, omb2, eps,
                 USE_G: tl.constexpr, USE_PC: tl.constexpr,
                 DECAY_PTR: tl.constexpr, SS_PTR: tl.constexpr, SBC2_PTR: tl.constexpr,
                 BLEND_PTR: tl.constexpr, BLOCK: tl.constexpr, I64: tl.constexpr):
    pid = tl.program_id(0)
    if I64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dc = _scalar(decay, DECAY_PTR)
    ss = _scalar(step_size, SS_PTR)
    sb = _scalar(sbc2, SBC2_PTR)
    g_eff = _blended_grad(g_ptr, pc_ptr, offs, mask, blend, omblend, USE_G, USE_PC, BLEND_PTR)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m * beta1 + g_eff * omb1
    v = v * beta2 + (g_eff * g_eff) * omb2
    denom = tl.math.div_rn(tl.sqrt_rn(v), sb) + eps
    upd = tl.math.div_rn(m * ss, denom)
    p = p * dc - upd
    tl.store(m_ptr + offs, _cast_out(m, m_ptr), mask=mask)
    tl.store(v_ptr + offs, _cast_out(v, v_ptr), mask=mask)
    tl.store(p_ptr + offs, _cast_out(p, p_ptr), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _adam8_kernel(p_ptr, g_ptr, pc_ptr, m_ptr, ms_ptr, v_ptr, vs_ptr, seed,
                  total_blocks, nb, n, bs,
                  decay, step_size, sbc2, blend, omblend, beta1, omb1, beta2, omb2, eps,
                  M8: tl.constexpr, V8: tl.constexpr, USE_G: tl.constexpr, USE_PC: tl.constexpr,
                  DECAY_PTR: tl.constexpr, SS_PTR: tl.constexpr, SBC2_PTR: tl.constexpr,
                  BLEND_PTR: tl.constexpr, SEED_PTR: tl.constexpr, BPP: tl.constexpr,
                  BLOCK: tl.constexpr, I64: tl.constexpr):
    """Adam with block-wise int8 moments (m, and sqrt(v)); see reference._adam8."""
    pid = tl.program_id(0)
    b, bmask, offs, emask = _tile(pid, total_blocks, nb, n, bs, BPP, BLOCK, I64)
    dc = _scalar(decay, DECAY_PTR)
    ss = _scalar(step_size, SS_PTR)
    sb = _scalar(sbc2, SBC2_PTR)
    g = _blended_grad(g_ptr, pc_ptr, offs, emask, blend, omblend, USE_G, USE_PC, BLEND_PTR)
    if M8:
        cm = tl.load(m_ptr + offs, mask=emask, other=0).to(tl.float32)
        sm = tl.load(ms_ptr + b, mask=bmask, other=0.0)
        m = cm * sm[:, None]
    else:
        m = tl.load(m_ptr + offs, mask=emask, other=0.0).to(tl.float32)
    if V8:
        cv = tl.load(v_ptr + offs, mask=emask, other=0).to(tl.float32)
        sv = tl.load(vs_ptr + b, mask=bmask, other=0.0)
        r = cv * sv[:, None]
        v = r * r
    else:
        v = tl.load(v_ptr + offs, mask=emask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=emask, other=0.0).to(tl.float32)
    m = m * beta1 + g * omb1
    v = v * beta2 + (g * g) * omb2
    rv = tl.sqrt_rn(v)
    denom = tl.math.div_rn(rv, sb) + eps
    p = p * dc - tl.math.div_rn(m * ss, denom)
    tl.store(p_ptr + offs, _cast_out(p, p_ptr), mask=emask)
    if M8 or V8:
        st = _scalar(seed, SEED_PTR).to(tl.uint32)
    if M8:
        cm2, sm2 = _encode(m, emask, offs, st, True)
        tl.store(m_ptr + offs, cm2, mask=emask)
        tl.store(ms_ptr + b, sm2, mask=bmask)
    else:
        tl.store(m_ptr + offs, _cast_out(m, m_ptr), mask=emask)
    if V8:
        cv2, sv2 = _encode(rv, emask, offs, st ^ 0x68E31DA4, True)
        tl.store(v_ptr + offs, cv2, mask=emask)
        tl.store(vs_ptr + b, sv2, mask=bmask)
    else:
        tl.store(v_ptr + offs, _cast_out(v, v_ptr), mask=emask)


# ----------------------------------------------------------------------------- launchers


def _check_device(*ts: torch.Tensor) -> None:
    for t in ts:
        if t is None:
            continue
        if t.device.type == "cpu" and not INTERPRET:
            raise RuntimeError(
                "the triton backend got a CPU tensor but TRITON_INTERPRET=1 was not set before "
                "scao_fx.kernels loaded Triton; use backend='reference' on the CPU"
            )


def _codec_config(n: int, block_size: int, total_elems: int):
    if block_size > C.MAX_TRITON_BLOCK:
        raise ValueError(
            f"the triton codec supports block_size <= {C.MAX_TRITON_BLOCK}, got {block_size}"
        )
    block = triton.next_power_of_2(block_size)
    bpp = max(1, CODEC_TILE // block)
    i64 = total_elems + bpp * block > _INT32_LIMIT
    return block, bpp, i64


def _num_warps(tile: int) -> int:
    """About 8 elements per thread: 4 warps for 1024 elements, 8 for 2048, 16 from 4096."""
    return max(4, min(16, tile // 256))


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _seed_arg(seed, device):
    st = C.seed_term(seed, device)
    if isinstance(st, torch.Tensor):
        return st, True
    return st, False


def quantize_blockwise(x, block_size=256, *, stochastic=False, seed=0, out=None):
    _check_device(x)
    shape = tuple(x.shape)
    n = shape[-1]
    nb = C.n_blocks(n, block_size)
    if out is None:
        codes = torch.empty(shape, dtype=torch.int8, device=x.device)
        scales = torch.empty((*shape[:-1], nb), dtype=torch.float32, device=x.device)
    else:
        codes, scales = out
    if x.numel() == 0:
        return codes, scales
    xc = _contig(x)
    oc, os_ = _contig(codes), _contig(scales)
    total_blocks = xc.numel() // n * nb
    block, bpp, i64 = _codec_config(n, block_size, xc.numel())
    st, seed_ptr = _seed_arg(seed, x.device) if stochastic else (0, False)
    grid = (triton.cdiv(total_blocks, bpp),)
    _quantize_kernel[grid](xc, oc, os_, st, total_blocks, nb, n, block_size,
                           STOCH=bool(stochastic), SEED_PTR=seed_ptr, BPP=bpp, BLOCK=block,
                           I64=i64, num_warps=_num_warps(bpp * block), enable_fp_fusion=False)
    if oc is not codes:
        codes.copy_(oc)
    if os_ is not scales:
        scales.copy_(os_)
    return codes, scales


def dequantize_blockwise(codes, scales, block_size=256, *, dtype=torch.float32, out=None):
    _check_device(codes)
    shape = tuple(codes.shape)
    n = shape[-1]
    nb = C.n_blocks(n, block_size)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=codes.device)
    if codes.numel() == 0:
        return out
    cc, sc, oc = _contig(codes), _contig(scales), _contig(out)
    total_blocks = cc.numel() // n * nb
    block, bpp, i64 = _codec_config(n, block_size, cc.numel())
    grid = (triton.cdiv(total_blocks, bpp),)
    _dequantize_kernel[grid](cc, sc, oc, total_blocks, nb, n, block_size, BPP=bpp, BLOCK=block,
                             I64=i64, num_warps=_num_warps(bpp * block),
                             enable_fp_fusion=False)
    if oc is not out:
        out.copy_(oc)
    return out


def int8_ema_update(codes, scales, update, rho, *, block_size=256, stochastic=True, seed=0,
                    out=None):
    _check_device(codes, update)
    shape = tuple(codes.shape)
    n = shape[-1]
    nb = C.n_blocks(n, block_size)
    if out is None:
        oc = torch.empty(shape, dtype=torch.int8, device=codes.device)
        os_ = torch.empty((*shape[:-1], nb), dtype=torch.float32, device=codes.device)
    else:
        oc, os_ = out
    if codes.numel() == 0:
        return oc, os_
    cc, sc = _contig(codes), _contig(scales)
    uc = _contig(update.reshape(shape))
    occ, osc = _contig(oc), _contig(os_)
    r, omr = C.ema_scalars(rho, codes.device)
    rho_ptr = isinstance(r, torch.Tensor)
    st, seed_ptr = _seed_arg(seed, codes.device) if stochastic else (0, False)
    total_blocks = cc.numel() // n * nb
    block, bpp, i64 = _codec_config(n, block_size, cc.numel())
    grid = (triton.cdiv(total_blocks, bpp),)
    _ema_kernel[grid](cc, sc, uc, occ, osc, r, 0.0 if rho_ptr else omr, st,
                      total_blocks, nb, n, block_size,
                      RHO_PTR=rho_ptr, STOCH=bool(stochastic), SEED_PTR=seed_ptr, BPP=bpp,
                      BLOCK=block, I64=i64, num_warps=_num_warps(bpp * block),
                      enable_fp_fusion=False)
    if occ is not oc:
        oc.copy_(occ)
    if osc is not os_:
        os_.copy_(osc)
    return oc, os_


def adam_epilogue(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay,
                  step, precond=None, blend=1.0, moment_block_size=256, seed=0):
    _check_device(param)
    s = C.adam_scalars(lr, beta1, beta2, eps, weight_decay, step, blend, param.device)
    use_pc, use_g = _blend_usage(precond, blend)
    n = param.numel()
    if n == 0:
        return param, exp_avg, exp_avg_sq
    q8m, q8v = isinstance(exp_avg, tuple), isinstance(exp_avg_sq, tuple)
    pc_ = _contig(param)
    gc = _contig(grad) if use_g else pc_
    pcc = _contig(precond) if use_pc else pc_

    def arg(v):
        return (v, True) if isinstance(v, torch.Tensor) else (float(v), False)

    decay, decay_ptr = arg(s["decay"])
    ss, ss_ptr = arg(s["step_size"])
    sbc2, sbc2_ptr = arg(s["sbc2"])
    blend_v, blend_ptr = arg(s["blend"])
    omblend = 0.0 if blend_ptr else float(s["omblend"])
    consts = (s["beta1"], s["omb1"], s["beta2"], s["omb2"], s["eps"])
    flags = dict(USE_G=use_g, USE_PC=use_pc, DECAY_PTR=decay_ptr, SS_PTR=ss_ptr,
                 SBC2_PTR=sbc2_ptr, BLEND_PTR=blend_ptr)

    if q8m or q8v:
        cshape = (exp_avg if q8m else exp_avg_sq)[0].shape
        nn = cshape[-1]
        nb = C.n_blocks(nn, moment_block_size)
        total_blocks = n // nn * nb
        block, bpp, i64 = _codec_config(nn, moment_block_size, n)
        mc = tuple(_contig(t) for t in exp_avg) if q8m else _contig(exp_avg)
        vc = tuple(_contig(t) for t in exp_avg_sq) if q8v else _contig(exp_avg_sq)
        m_codes, m_scales = mc if q8m else (mc, mc)
        v_codes, v_scales = vc if q8v else (vc, vc)
        st, seed_ptr = _seed_arg(seed, param.device)
        grid = (triton.cdiv(total_blocks, bpp),)
        _adam8_kernel[grid](pc_, gc, pcc, m_codes, m_scales, v_codes, v_scales, st,
                            total_blocks, nb, nn, moment_block_size,
                            decay, ss, sbc2, blend_v, omblend, *consts,
                            M8=q8m, V8=q8v, SEED_PTR=seed_ptr, BPP=bpp, BLOCK=block, I64=i64,
                            num_warps=_num_warps(bpp * block), enable_fp_fusion=False, **flags)
        pairs = [(pc_, param)]
        pairs += list(zip(mc, exp_avg)) if q8m else [(mc, exp_avg)]
        pairs += list(zip(vc, exp_avg_sq)) if q8v else [(vc, exp_avg_sq)]
    else:
        mc, vc = _contig(exp_avg), _contig(exp_avg_sq)
        block = ADAM_BLOCK
        i64 = n + block > _INT32_LIMIT
        grid = (triton.cdiv(n, block),)
        _adam_kernel[grid](pc_, gc, mc, vc, pcc, n, decay, ss, sbc2, blend_v, omblend, *consts,
                           BLOCK=block, I64=i64, num_warps=_num_warps(block),
                           enable_fp_fusion=False, **flags)
        pairs = [(pc_, param), (mc, exp_avg), (vc, exp_avg_sq)]
    for src, dst in pairs:
        if src is not dst:
            dst.copy_(src)
    return param, exp_avg, exp_avg_sq
