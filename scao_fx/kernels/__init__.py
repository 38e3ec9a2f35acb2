"""Fused kernels for the SCAO hot paths, with a pure-PyTorch reference they must match.

Public functions (each dispatches to :mod:`scao_fx.kernels.reference`, its compiled form or the Triton kernels,
see :func:`backend`):

- :func:`quantize_blockwise` / :func:`dequantize_blockwise`: block-wise symmetric int8 codec.
- :func:`int8_ema_update`: decode, EMA with a fresh statistic, re-encode, in one pass.
- :func:`adam_epilogue`: blend + Adam moments + bias correction + decoupled weight decay +
  parameter write, in one pass, in place.

All of them accept stacked same-shape groups (leading dimensions), never synchronise with the
host, and take Python numbers or 0-d tensors for the per-step scalars (``rho``, ``seed``,
``lr``, ``step``, ``blend``). See ``docs/kernels.md``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import _common as _C
from ._dispatch import BACKENDS, ENV_VAR, backend, triton_available
from ._dispatch import implementation as _impl

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "backend",
    "triton_available",
    "quantize_blockwise",
    "dequantize_blockwise",
    "int8_ema_update",
    "adam_epilogue",
]

Scalar = Union[float, torch.Tensor]


def quantize_blockwise(
    x: torch.Tensor,
    block_size: int = 256,
    *,
    stochastic: bool = False,
    seed: Union[int, torch.Tensor] = 0,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Block-wise symmetric int8 quantization along the last dimension.

    ``x`` has shape ``(..., N)``; the leading dimensions are a stack of independent rows (e.g.
    ``(B, m*m)`` for B same-shape factors). Each row is cut into consecutive blocks of
    ``block_size`` elements (the last block of a row may be partial; blocks never straddle
    rows). Per block, in float32:

    .. math::
        s = \max_i |x_i| / 127, \qquad q_i = x_i \cdot (1 / s), \qquad
        c_i = \mathrm{clamp}(\lfloor q_i \rfloor + r_i, -127, 127)

    with ``r_i = [frac(q_i) >= 0.5]`` (nearest, ties upward) or, with ``stochastic=True``,
    ``r_i = [u_i < frac(q_i)]`` where ``u_i`` in [0, 1) is a deterministic hash of the element's
    global flat index in ``x`` and ``seed`` (see ``scao_fx.kernels._common.hash_uniform``), so
    ``E[c_i s] = x_i`` (unbiased rounding). An all-zero block has ``s = 0`` and codes 0; a block
    whose absmax is below ``127 / FLT_MAX`` (~3.7e-37, where ``1 / s`` overflows) encodes as
    zeros. All arithmetic is float32 with correctly rounded operations, so the reference and
    the Triton kernel produce bit-identical codes and scales.

    Non-finite input: a block holding a NaN gets ``s = NaN``, one holding an inf (and no NaN)
    gets ``s = inf``; all codes of such a block are 0, so it decodes to NaN everywhere. Other
    blocks are unaffected; nothing raises.

    Args:
        x: float tensor (fp32/fp16/bf16/fp64) of shape ``(..., N)``.
        block_size: elements per block (the Triton backend accepts up to 8192).
        stochastic: unbiased stochastic rounding instead of round-to-nearest.
        seed: Python int or one-element integer tensor (read on the device, e.g. a step
            counter); change it every call so successive roundings are independent.
        out: optional preallocated ``(codes, scales)`` to write into.
        backend: ``"reference"``, ``"compiled"``, ``"triton"`` or ``None`` (automatic, see :func:`backend`).

    Returns:
        ``(codes, scales)``: int8 of shape ``(..., N)`` and float32 of shape
        ``(..., ceil(N / block_size))``.
    """
    _C.check_float("x", x)
    _C.check_block_size(block_size)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (blocks run along the last)")
    nb = _C.n_blocks(x.shape[-1], block_size)
    _C.check_out_pair(out, x.shape, (*x.shape[:-1], nb), x.device)
    return _impl(x.device, backend, x.numel()).quantize_blockwise(
        x, block_size, stochastic=stochastic, seed=seed, out=out)


def dequantize_blockwise(
    codes: torch.Tensor,
    scales: torch.Tensor,
    block_size: int = 256,
    *,
    dtype: torch.dtype = torch.float32,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Decode :func:`quantize_blockwise`'s output: ``x = code * scale`` in fp32, cast to ``dtype``.

    Args:
        codes: int8 ``(..., N)``.
        scales: float32 ``(..., ceil(N / block_size))``.
        block_size: the block size used to encode.
        dtype: output dtype (ignored when ``out`` is given: ``out``'s dtype is used).
        out: optional preallocated output of shape ``(..., N)``.
        backend: see :func:`backend`.
    """
    _C.check_block_size(block_size)
    _C.check_codes(codes, scales, block_size)
    if out is not None:
        _C.check_float("out", out)
        if tuple(out.shape) != tuple(codes.shape) or out.device != codes.device:
            raise ValueError(f"out must have shape {tuple(codes.shape)} on {codes.device}")
    return _impl(codes.device, backend, codes.numel()).dequantize_blockwise(
        codes, scales, block_size, dtype=dtype, out=out)


def int8_ema_update(
    codes: torch.Tensor,
    scales: torch.Tensor,
    update: torch.Tensor,
    rho: Scalar,
    *,
    block_size: int = 256,
    stochastic: bool = True,
    seed: Union[int, torch.Tensor] = 0,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Fused EMA of an int8 block-quantized statistic: ``x <- rho x + (1 - rho) update``.

    Decodes ``(codes, scales)``, computes in fp32 ``x = decoded * rho + update * (1 - rho)``
    and re-encodes ``x`` with fresh block scales exactly as :func:`quantize_blockwise` would
    (same rounding and hash), in one pass over the factor (the Triton kernel reads codes,
    scales and update once and writes codes and scales once).

    Stochastic rounding is the default: with ``rho = 0.999`` the per-step change of an entry is
    far below one quantization step and round-to-nearest would freeze the EMA. Pass a
    different ``seed`` each step (e.g. the step counter as a tensor).

    Args:
        codes, scales: the current statistic (int8 ``(..., N)``, float32 ``(..., nb)``).
        update: float tensor with ``codes.numel()`` elements (e.g. ``G @ G.mT`` of shape
            ``(B, m, m)`` for codes ``(B, m*m)``); it is reshaped to ``codes.shape``.
        rho: EMA decay, Python float or 0-d tensor.
        block_size, stochastic, seed: as in :func:`quantize_blockwise`.
        out: ``(codes_out, scales_out)`` to write into; ``out=(codes, scales)`` updates the
            statistic in place (safe: every block is fully read before it is written).
            Without ``out`` new tensors are returned and the inputs are untouched.
        backend: see :func:`backend`.

    Returns:
        The new ``(codes, scales)`` (the ``out`` tensors when given).
    """
    _C.check_block_size(block_size)
    _C.check_codes(codes, scales, block_size)
    _C.check_float("update", update)
    if update.numel() != codes.numel():
        raise ValueError(
            f"update has {update.numel()} elements, codes has {codes.numel()}")
    if update.device != codes.device:
        raise ValueError("update must be on the same device as codes")
    _C.check_out_pair(out, codes.shape, scales.shape, codes.device)
    return _impl(codes.device, backend, codes.numel()).int8_ema_update(
        codes, scales, update, rho, block_size=block_size, stochastic=stochastic, seed=seed,
        out=out)


def adam_epilogue(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
    exp_avg_sq: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: Scalar,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: Scalar,
    precond: Optional[torch.Tensor] = None,
    blend: Scalar = 1.0,
    moment_block_size: int = 256,
    seed: Union[int, torch.Tensor] = 0,
    backend: Optional[str] = None,
):
    r"""Fused blend + Adam + decoupled weight decay, in place.

    In fp32 (whatever the storage dtypes), element-wise:

    .. math::
        g &= b\,P + (1-b)\,G \quad(\text{or } G \text{ without } P) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \theta &\leftarrow \theta (1 - \eta\lambda)
            - \eta\,\frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}

    computed as ``theta*decay - (m*step_size) / (sqrt(v)/sqrt(1-beta2^t) + eps)`` with
    ``decay = 1 - lr*wd`` and ``step_size = lr / (1-beta1^t)``. ``param``, ``exp_avg`` and
    ``exp_avg_sq`` are updated in place (each read and written once by the Triton kernel);
    moments may be stored in any float dtype (fp32 recommended) and are computed in fp32.
    A Python ``blend`` of exactly 1.0 does not read ``grad``; exactly 0.0 does not read
    ``precond``.

    **8-bit moments.** ``exp_avg`` and/or ``exp_avg_sq`` may be ``(codes, scales)`` pairs of the
    block-wise int8 codec (codes of shape ``(..., N)`` with ``param.numel()`` elements, blocks of
    ``moment_block_size`` along the last dimension, matched to ``param`` by flat index).
    ``exp_avg`` stores ``m``; ``exp_avg_sq`` stores **sqrt(v)** (a linear int8 code of ``v``
    itself would lose every entry below 1/127 of its block maximum; the square root halves the
    dynamic range in log terms). The step is computed from the fp32 moments (decoded state
    updated with the new gradient); the new state is then re-encoded with fresh block scales and
    stochastic rounding (hash of the flat index and ``seed``; the ``v`` stream xors the seed
    term with ``0x68E31DA4``), so an EMA change far below one quantization step is not lost.
    Pass a different ``seed`` every step. Zero state: codes 0 and scales 0.

    Args:
        param, grad: float tensors with the same number of elements on one device (any
            shapes, e.g. a stacked group ``(B, m, n)``).
        exp_avg, exp_avg_sq: float tensors like ``param``, or ``(codes, scales)`` pairs.
        lr: learning rate (Python float or 0-d tensor).
        beta1, beta2, eps, weight_decay: Python floats.
        step: the 1-based step count used for bias correction (number or 0-d tensor).
        precond: optional preconditioned gradient to blend in.
        blend: blend factor ``b`` (Python float or 0-d tensor); used only with ``precond``.
        moment_block_size: block size of 8-bit moments.
        seed: stochastic-rounding seed of 8-bit moments (int or integer tensor).
        backend: see :func:`backend`.

    Returns:
        ``(param, exp_avg, exp_avg_sq)``, the same objects, updated.
    """
    _C.check_adam_tensors(param, grad, exp_avg, exp_avg_sq, precond, moment_block_size)
    return _impl(param.device, backend).adam_epilogue(
        param, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, step=step, precond=precond, blend=blend,
        moment_block_size=moment_block_size, seed=seed)
