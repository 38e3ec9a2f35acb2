"""Shared pieces of the kernel backends: argument checks, the rounding hash, scalar preparation.

Everything here is used identically by :mod:`scao_fx.kernels.reference` and
:mod:`scao_fx.kernels._triton`, so the two backends see exactly the same normalized arguments
(same fp32 scalars, same hash seed term) and can be compared bit for bit where the math allows.
"""

from __future__ import annotations

import math
import struct
from typing import Union

import torch

Scalar = Union[float, int, torch.Tensor]

MASK32 = 0xFFFFFFFF
# Multipliers of the 32-bit mixing hash used for stochastic rounding (see ``hash_uniform``).
HASH_IDX_MUL = 0x9E3779B1
HASH_SEED_MUL = 0x85EBCA77
HASH_MIX1 = 0x2C1B3C6D
HASH_MIX2 = 0x297A2D39
QMAX = 127.0
#: Xor-ed into the seed term for the second-moment stream of the 8-bit Adam epilogue.
ADAM8_V_STREAM = 0x68E31DA4

#: Largest ``block_size`` the Triton codec kernels accept (a whole block lives in registers).
MAX_TRITON_BLOCK = 8192

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def n_blocks(n: int, block_size: int) -> int:
    """Number of (possibly partial) blocks covering ``n`` elements."""
    return -(-n // block_size)


def check_block_size(block_size: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return block_size


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp32/fp16/bf16/fp64), got {t.dtype}")


def check_codes(codes: torch.Tensor, scales: torch.Tensor, block_size: int) -> None:
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8:
        raise TypeError(f"codes must be an int8 tensor, got {getattr(codes, 'dtype', type(codes))}")
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
        raise TypeError(
            f"scales must be a float32 tensor, got {getattr(scales, 'dtype', type(scales))}"
        )
    if codes.dim() < 1:
        raise ValueError("codes must have at least one dimension (blocks run along the last)")
    want = (*codes.shape[:-1], n_blocks(codes.shape[-1], block_size))
    if tuple(scales.shape) != want:
        raise ValueError(
            f"scales has shape {tuple(scales.shape)}, expected {want} for codes of shape "
            f"{tuple(codes.shape)} and block_size={block_size}"
        )
    if codes.device != scales.device:
        raise ValueError("codes and scales must be on the same device")


def check_out_pair(out, shape_codes, shape_scales, device) -> None:
    if out is None:
        return
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("out must be a (codes, scales) pair")
    oc, os_ = out
    if not isinstance(oc, torch.Tensor) or oc.dtype != torch.int8 or tuple(oc.shape) != tuple(
        shape_codes
    ):
        raise ValueError(f"out[0] must be an int8 tensor of shape {tuple(shape_codes)}")
    if not isinstance(os_, torch.Tensor) or os_.dtype != torch.float32 or tuple(
        os_.shape
    ) != tuple(shape_scales):
        raise ValueError(f"out[1] must be a float32 tensor of shape {tuple(shape_scales)}")
    if oc.device != device or os_.device != device:
        raise ValueError("out tensors must be on the same device as the inputs")


def _host_copy_needed(t: torch.Tensor, device) -> bool:
    """A CPU scalar tensor used with data on an accelerator: read it on the host instead.

    Reading a CPU tensor is not a device synchronisation, whereas copying it to the device
    (``.to(device)`` from pageable memory) makes PyTorch wait for the stream. Under
    ``torch.compile`` tracing the tensor is kept (and copied) so no graph break happens.
    """
    return (t.device.type == "cpu" and torch.device(device).type != "cpu"
            and not torch.compiler.is_compiling())


def seed_term(seed: Scalar, device: torch.device) -> Union[int, torch.Tensor]:
    """``seed * HASH_SEED_MUL mod 2**32``: a Python int, or an int64 0-d tensor on ``device``.

    A tensor seed (e.g. the optimizer's step counter) is never read on the host.
    """
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex():
            raise TypeError("a tensor seed must be a one-element integer tensor")
        if _host_copy_needed(seed, device):
            return (int(seed.reshape(()).item()) * HASH_SEED_MUL) & MASK32
        s = seed.reshape(()).to(device=device, dtype=torch.int64) & MASK32
        return mul32(s, HASH_SEED_MUL)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or an integer tensor, got {type(seed).__name__}")
    return (seed * HASH_SEED_MUL) & MASK32


def offset_seed(seed: Scalar, index_offset: int) -> Scalar:
    """The seed whose hash uniforms at flat index ``i`` are ``seed``'s at ``index_offset + i``.

    The hash starts from ``i * 0x9E3779B1 + seed * 0x85EBCA77`` (mod 2**32), and ``0x85EBCA77``
    is odd, so a shift of the index is a shift of the seed by ``index_offset * 0x9E3779B1 *
    0x85EBCA77**-1`` (mod 2**32): a shard of a tensor, encoded on its own with this seed, rounds
    exactly as the same entries of the whole tensor do. ``seed`` may be an int or an integer tensor.
    """
    if isinstance(index_offset, bool) or not isinstance(index_offset, int) or index_offset < 0:
        raise ValueError(f"index_offset must be a non-negative int, got {index_offset!r}")
    shift = (index_offset * HASH_IDX_MUL * _HASH_SEED_MUL_INV) & MASK32
    if shift == 0:
        return seed
    if isinstance(seed, torch.Tensor):
        return (seed.to(torch.int64) & MASK32) + shift
    return (seed & MASK32) + shift


_HASH_SEED_MUL_INV = pow(HASH_SEED_MUL, -1, 1 << 32)


def mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """``(a * c) mod 2**32`` for int64 ``a`` in [0, 2**32) without int64 overflow.

    The constant is split into 16-bit halves so every intermediate stays below 2**49.
    """
    lo, hi = c & 0xFFFF, c >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & MASK32


def hash_uniform(index: torch.Tensor, seedterm: Union[int, torch.Tensor]) -> torch.Tensor:
    """Deterministic uniforms in [0, 1) from global flat element indices (torch reference).

    With all arithmetic modulo 2**32 (``i`` is the element's flat index in the whole tensor,
    taken modulo 2**32)::

        h = i * 0x9E3779B1 + seed * 0x85EBCA77
        h ^= h >> 15;  h *= 0x2C1B3C6D
        h ^= h >> 12;  h *= 0x297A2D39
        h ^= h >> 15
        u = (h >> 8) * 2**-24

    ``u`` takes the 2**24 values k / 2**24; the Triton kernels compute the same bits with
    uint32 arithmetic.
    """
    h = (mul32(index & MASK32, HASH_IDX_MUL) + seedterm) & MASK32
    h = h ^ (h >> 15)
    h = mul32(h, HASH_MIX1)
    h = h ^ (h >> 12)
    h = mul32(h, HASH_MIX2)
    h = h ^ (h >> 15)
    return (h >> 8).to(torch.float32) * (2.0**-24)


def _to_i32(v):
    """A value in [0, 2**32) (int or int64 tensor) as the int32 with the same 32 bits."""
    if isinstance(v, torch.Tensor):
        return ((v & MASK32) ^ 0x80000000) - 0x80000000
    v &= MASK32
    return v - (1 << 32) if v >= 1 << 31 else v


def row_hash24(rows: int, n: int, seedterm, device, row_start: int = 0) -> torch.Tensor:
    """The hash's 24 kept bits as int32 ``k`` of shape (rows, n): :func:`row_uniforms` is
    ``k * 2**-24`` (element (r, j) hashes the flat index ``(row_start + r) * n + j``).

    Computed in int32 with wrap-around multiplication (what the CPU and CUDA integer units do)
    and masked arithmetic shifts standing in for logical ones: 3-4x cheaper than the
    overflow-free int64 formulation; the tests check that the two agree, also past 2**31 and
    2**32. Callers that compare a uniform with a fraction ``f`` in [0, 1) can compare ``k`` with
    ``f * 2**24`` instead (both sides exact: the same decisions, one pass fewer).
    """
    r = torch.arange(row_start, row_start + rows, device=device, dtype=torch.int64)
    if n >= 2**31:
        c = torch.arange(n, device=device, dtype=torch.int64).view(1, n)
        return (hash_uniform(r.view(rows, 1) * n + c, seedterm) * 2.0**24).to(torch.int32)
    base = _to_i32(r * n)
    h = base.to(torch.int32).view(rows, 1) + torch.arange(n, device=device,
                                                         dtype=torch.int32).view(1, n)
    h.mul_(_to_i32(HASH_IDX_MUL))
    st = _to_i32(seedterm)
    h.add_(st.to(torch.int32) if isinstance(st, torch.Tensor) else st)
    h.bitwise_xor_((h >> 15).bitwise_and_(0x1FFFF))
    h.mul_(_to_i32(HASH_MIX1))
    h.bitwise_xor_((h >> 12).bitwise_and_(0xFFFFF))
    h.mul_(_to_i32(HASH_MIX2))
    h.bitwise_xor_((h >> 15).bitwise_and_(0x1FFFF))
    return h.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF)


def row_uniforms(rows: int, n: int, seedterm, device, row_start: int = 0) -> torch.Tensor:
    """Hash uniforms of shape (rows, n): element (r, j) gets ``hash((row_start + r) * n + j)``,
    the same bits as :func:`hash_uniform` (``row_hash24(...) * 2**-24``)."""
    return row_hash24(rows, n, seedterm, device, row_start).to(torch.float32).mul_(2.0**-24)


def as_scalar(x: Scalar, device: torch.device, name: str) -> Union[float, torch.Tensor]:
    """A Python float, or a float32 0-d tensor on ``device`` (never read on the host)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar (one-element tensor), got shape {tuple(x.shape)}")
        if _host_copy_needed(x, device):
            return float(x.reshape(()).item())
        return x.reshape(()).to(device=device, dtype=torch.float32)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(x).__name__}")
    return float(x)


def f32(v: float) -> float:
    """Round a Python float to the nearest float32 value."""
    return struct.unpack("f", struct.pack("f", v))[0]


def one_minus(r: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
    """``1 - r`` rounded exactly as float32 arithmetic does, for a float or a float32 tensor.

    A Python ``r`` is first rounded to float32, so a float and the equal float32 tensor give
    bit-identical results.
    """
    if isinstance(r, torch.Tensor):
        return 1.0 - r
    return f32(1.0 - f32(r))


def ema_scalars(rho: Scalar, device: torch.device):
    """``(rho, 1 - rho)`` as Python floats (float32-exact) or float32 0-d tensors."""
    r = as_scalar(rho, device, "rho")
    if not isinstance(r, torch.Tensor):
        r = f32(r)
    return r, one_minus(r)


def adam_scalars(lr: Scalar, beta1: float, beta2: float, eps: float, weight_decay: float,
                 step: Scalar, blend: Scalar, device: torch.device) -> dict:
    """Per-call scalars of the Adam epilogue, shared by both backends.

    Returns a dict with ``decay = 1 - lr*wd``, ``step_size = lr / (1 - beta1**step)``,
    ``sbc2 = sqrt(1 - beta2**step)``, ``blend``, ``omblend = 1 - blend`` (each a Python float,
    or a float32 0-d tensor when it depends on a tensor argument) and the constants ``beta1``,
    ``omb1 = 1 - beta1``, ``beta2``, ``omb2 = 1 - beta2``, ``eps`` (Python floats). Bias
    corrections use ``-expm1(step * log(beta))`` in float64, accurate at step 1.
    """
    for name, v in (("beta1", beta1), ("beta2", beta2), ("eps", eps),
                    ("weight_decay", weight_decay)):
        if isinstance(v, torch.Tensor) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a Python float")
    beta1, beta2, eps, weight_decay = float(beta1), float(beta2), float(eps), float(weight_decay)
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must be in [0, 1), got ({beta1}, {beta2})")

    if isinstance(lr, torch.Tensor) and lr.numel() == 1 and _host_copy_needed(lr, device):
        lr = float(lr.reshape(()).item())
    if isinstance(step, torch.Tensor) and step.numel() == 1 and _host_copy_needed(step, device):
        step = step.reshape(()).item()
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("lr must be a scalar")
        lr_t = lr.reshape(()).to(device=device, dtype=torch.float64)
    else:
        lr_t = float(as_scalar(lr, device, "lr"))

    if isinstance(step, torch.Tensor):
        if step.numel() != 1:
            raise ValueError("step must be a scalar")
        st = step.reshape(()).to(device=device, dtype=torch.float64)
        bc1 = -torch.expm1(st * math.log(beta1)) if beta1 > 0 else torch.ones_like(st)
        bc2 = -torch.expm1(st * math.log(beta2)) if beta2 > 0 else torch.ones_like(st)
        sbc2 = bc2.sqrt()
    else:
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            raise TypeError("step must be a number or a 0-d tensor")
        st = float(step)
        bc1 = -math.expm1(st * math.log(beta1)) if beta1 > 0 else 1.0
        bc2 = -math.expm1(st * math.log(beta2)) if beta2 > 0 else 1.0
        sbc2 = math.sqrt(bc2)

    decay = 1.0 - lr_t * weight_decay
    step_size = lr_t / bc1

    b = as_scalar(blend, device, "blend")
    if not isinstance(b, torch.Tensor):
        b = f32(b)
    omb = one_minus(b)

    def cast(v):
        return v.to(torch.float32) if isinstance(v, torch.Tensor) else float(v)

    return dict(decay=cast(decay), step_size=cast(step_size), sbc2=cast(sbc2), blend=b,
                omblend=omb, beta1=beta1, omb1=1.0 - beta1, beta2=beta2, omb2=1.0 - beta2,
                eps=eps)


def check_adam_tensors(param, grad, exp_avg, exp_avg_sq, precond,
                       moment_block_size: int = 256) -> None:
    check_float("param", param)
    n = param.numel()
    qshape = None
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if isinstance(t, tuple):
            if len(t) != 2:
                raise TypeError(f"an 8-bit {name} must be a (codes, scales) pair")
            check_block_size(moment_block_size)
            check_codes(t[0], t[1], moment_block_size)
            if t[0].numel() != n:
                raise ValueError(f"{name} codes have {t[0].numel()} elements, param has {n}")
            if t[0].device != param.device:
                raise ValueError(f"{name} is on {t[0].device}, param on {param.device}")
            if qshape is not None and tuple(t[0].shape) != qshape:
                raise ValueError("8-bit exp_avg and exp_avg_sq must have the same codes shape")
            qshape = tuple(t[0].shape)
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                    ("precond", precond)):
        if isinstance(t, tuple):
            continue
        if t is None:
            if name == "precond":
                continue
            raise TypeError(f"{name} must be a tensor")
        check_float(name, t)
        if t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} elements, param has {n}")
        if t.device != param.device:
            raise ValueError(f"{name} is on {t.device}, param on {param.device}")
