"""Tests of scao_fx.kernels: reference semantics, Triton == reference, dispatch.

On a machine without CUDA the Triton kernels run in the Triton interpreter on the CPU
(``TRITON_INTERPRET=1`` is set below, before anything imports Triton's kernels). On a CUDA
machine the ``gpu``-marked tests run the compiled kernels on larger inputs::

    pytest tests/test_kernels.py            # CPU: reference + interpreter
    pytest tests/test_kernels.py -m gpu     # GPU: compiled kernels only
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before scao_fx.kernels._triton is imported (Triton picks the interpreter
    # when the kernels are decorated).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import scao_fx.kernels as K  # noqa: E402
from scao_fx.kernels import _common as C  # noqa: E402
from scao_fx.kernels import reference as R  # noqa: E402

HAS_TRITON = K.triton_available()
HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

needs_interp = pytest.mark.skipif(
    not (HAS_TRITON and INTERPRET and not HAS_CUDA),
    reason="Triton interpreter tests run on CPU-only machines with triton installed",
)
gpu = pytest.mark.gpu
# torch.compile's CPU backend (the "compiled" codec) needs a C++ compiler
needs_cxx = pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                               reason="the compiled CPU codec needs a C++ compiler")
needs_gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and Triton")

# Odd sizes: never a multiple of the block, several leading-dim layouts.
SHAPES = [(777,), (3, 517), (2, 3, 300), (5, 33)]
BLOCKS = [256, 64, 100]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def _exact(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    try:
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    except AssertionError as e:  # keep torch's mismatch count and worst difference
        raise AssertionError(f"{msg}: {e}" if msg else str(e)) from None


def _rand(shape, dtype=torch.float32, device="cpu", scale=3.0, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32, device=device) * scale
    # Make blocks of very different magnitude (block-wise scaling must matter).
    x = x * torch.logspace(-3, 3, x.shape[-1], device=device).to(x.dtype)
    return x.to(dtype=dtype)


def _poisoned_pair(shape, nb_shape, device="cpu"):
    # -128 is never produced (codes are clamped to [-127, 127]); NaN scales never either here.
    codes = torch.full(shape, -128, dtype=torch.int8, device=device)
    scales = torch.full(nb_shape, float("nan"), dtype=torch.float32, device=device)
    return codes, scales


def _nb_shape(shape, bs):
    return (*shape[:-1], C.n_blocks(shape[-1], bs))


# --------------------------------------------------------------------------- hash, helpers


def test_mul32_matches_python_integers():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 2**32, (4096,), generator=g, dtype=torch.int64)
    a[:4] = torch.tensor([0, 1, 2**32 - 1, 2**31])
    for c in (C.HASH_IDX_MUL, C.HASH_SEED_MUL, C.HASH_MIX1, C.HASH_MIX2):
        want = torch.tensor([(int(v) * c) % 2**32 for v in a.tolist()], dtype=torch.int64)
        _exact(C.mul32(a, c), want)


def test_hash_uniform_matches_spec_and_is_uniform():
    idx = torch.arange(200_000, dtype=torch.int64)
    u = C.hash_uniform(idx, C.seed_term(5, idx.device))
    assert u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float(u.var()) - 1 / 12) < 0.002
    # spot-check against the written-out formula in Python integers
    M = 2**32
    for i in (0, 1, 12345, 199_999):
        h = (i * 0x9E3779B1 + 5 * 0x85EBCA77) % M
        h ^= h >> 15
        h = (h * 0x2C1B3C6D) % M
        h ^= h >> 12
        h = (h * 0x297A2D39) % M
        h ^= h >> 15
        assert float(u[i]) == (h >> 8) * 2.0**-24
    # a different seed gives different uniforms; a tensor seed gives the same as the int
    u2 = C.hash_uniform(idx, C.seed_term(6, idx.device))
    assert (u2 != u).float().mean() > 0.99
    _exact(C.hash_uniform(idx, C.seed_term(torch.tensor(5), idx.device)), u)


@pytest.mark.parametrize("n,row_start", [(300, 0), (2**20 + 3, 2047), (2**20 + 3, 4095),
                                         (2**20 + 3, 3 * 4096 - 5)])
@pytest.mark.parametrize("seed", [0, 5, 2**31 + 11, -3])
def test_fast_int32_hash_equals_exact_int64_hash(n, row_start, seed):
    """The int32 wrap-around hash used by the reference equals the overflow-free one, also
    where the global index passes 2**31 and 2**32 (rows far down a (rows, 2**20 + 3) tensor)."""
    rows = 3
    for st in (C.seed_term(seed, "cpu"), C.seed_term(torch.tensor(seed), "cpu")):
        fast = C.row_uniforms(rows, n, st, torch.device("cpu"), row_start=row_start)
        r = torch.arange(row_start, row_start + rows, dtype=torch.int64).view(rows, 1) * n
        c = torch.arange(n, dtype=torch.int64).view(1, -1)
        exact = C.hash_uniform(r + c, st)
        _exact(fast, exact)
    if row_start:
        assert int(r.max()) + n > 2**31


# --------------------------------------------------------------------------- reference codec


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bs", BLOCKS)
def test_reference_roundtrip_error_at_most_half_step(shape, bs):
    x = _rand(shape)
    codes, scales = R.quantize_blockwise(x, bs)
    assert codes.shape == x.shape and codes.dtype == torch.int8
    assert scales.shape == _nb_shape(shape, bs) and scales.dtype == torch.float32
    y = R.dequantize_blockwise(codes, scales, bs)
    # per-element scale
    s_el = scales.repeat_interleave(bs, dim=-1)[..., : shape[-1]]
    err = (y - x).abs()
    assert bool((err <= s_el * (0.5 + 1e-5)).all())
    # the block's absmax element is represented exactly up to rounding of the scale
    assert int(codes.abs().max()) == 127


def test_reference_scale_definition_and_partial_block():
    x = torch.tensor([[1.0, -4.0, 2.0, 0.5, 3.0]])
    codes, scales = R.quantize_blockwise(x, 2)
    _exact(scales, torch.tensor([[4.0, 2.0, 3.0]]) / 127)
    _exact(codes, torch.tensor([[32, -127, 127, 32, 127]], dtype=torch.int8))


def test_reference_zeros_stay_zero():
    x = torch.zeros(3, 300)
    x[1, 10] = 2.0  # one non-zero element in one block
    for stochastic in (False, True):
        codes, scales = R.quantize_blockwise(x, 64, stochastic=stochastic, seed=3)
        assert int(scales[0].abs().sum()) == 0 and int(codes[0].abs().sum()) == 0
        nz = codes != 0
        assert nz.sum() == 1 and bool(nz[1, 10])
        y = R.dequantize_blockwise(codes, scales, 64)
        _exact(y, x)


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("c", [2.0**-20, 0.25, 8.0, 2.0**30])
def test_reference_scale_invariance_power_of_two(stochastic, c):
    x = _rand((3, 517))
    c0, s0 = R.quantize_blockwise(x, 100, stochastic=stochastic, seed=11)
    c1, s1 = R.quantize_blockwise(x * c, 100, stochastic=stochastic, seed=11)
    _exact(c1, c0)
    _exact(s1, s0 * c)


def test_reference_stochastic_rounding_is_unbiased():
    x = _rand((1, 512), scale=1.0, seed=4)
    n_seeds = 400
    acc = torch.zeros_like(x, dtype=torch.float64)
    codes_n, scales_n = R.quantize_blockwise(x, 64)
    for seed in range(n_seeds):
        codes, scales = R.quantize_blockwise(x, 64, stochastic=True, seed=seed)
        _exact(scales, scales_n)  # scales do not depend on the rounding
        y = R.dequantize_blockwise(codes, scales, 64)
        # stochastic rounding moves each element to one of its two neighbouring steps
        s_el = scales.repeat_interleave(64, dim=-1)
        assert bool(((y - x).abs() <= s_el * (1 + 1e-5)).all())
        acc += y.double()
    mean = acc / n_seeds
    s_el = scales_n.repeat_interleave(64, dim=-1).double()
    # per element the rounding error has std <= step/2: the mean over n seeds is within
    # 5 sigma = 2.5 step / sqrt(n) of x
    assert bool(((mean - x.double()).abs() <= 2.5 * s_el / math.sqrt(n_seeds)).all())
    # nearest rounding, by contrast, has a systematic per-element error of up to half a step
    y_near = R.dequantize_blockwise(codes_n, scales_n, 64).double()
    assert float((mean - x.double()).abs().mean()) < 0.5 * float((y_near - x.double()).abs().mean())


def test_reference_nonfinite_blocks_are_contained():
    x = _rand((2, 300), scale=1.0)
    x[0, 5] = float("nan")
    x[1, 200] = float("inf")
    x[1, 201] = -float("inf")
    codes, scales = R.quantize_blockwise(x, 64)
    assert math.isnan(float(scales[0, 0])) and math.isinf(float(scales[1, 3]))
    assert int(codes[0, :64].abs().sum()) == 0 and int(codes[1, 192:256].abs().sum()) == 0
    finite_blocks = torch.isfinite(scales)
    assert int(finite_blocks.sum()) == scales.numel() - 2
    y = R.dequantize_blockwise(codes, scales, 64)
    assert bool(torch.isnan(y[0, :64]).all()) and bool(torch.isnan(y[1, 192:256]).all())
    ok = torch.isfinite(y)
    assert int((~ok).sum()) == 128
    # NaN wins over inf inside a block
    z = torch.zeros(1, 64)
    z[0, 0], z[0, 1] = float("inf"), float("nan")
    _, s = R.quantize_blockwise(z, 64)
    assert math.isnan(float(s[0, 0]))


def test_reference_tiny_blocks_encode_as_zero():
    x = torch.zeros(1, 128)
    x[0, :64] = 1e-38     # 1 / scale overflows in float32
    x[0, 64:] = 1e-30     # small but representable
    codes, scales = R.quantize_blockwise(x, 64)
    assert int(codes[0, :64].abs().sum()) == 0 and bool((codes[0, 64:] == 127).all())
    y = R.dequantize_blockwise(codes, scales, 64)
    assert bool((y[0, :64] == 0).all())
    torch.testing.assert_close(y[0, 64:], x[0, 64:], rtol=1e-6, atol=0)


def test_reference_and_triton_leave_inputs_untouched():
    backends = ["reference"] + (["triton"] if (HAS_TRITON and INTERPRET and not HAS_CUDA) else [])
    for be in backends:
        x = _rand((3, 512))  # a multiple of the block: the reference works on a view
        x0 = x.clone()
        codes, scales = K.quantize_blockwise(x, 256, stochastic=True, seed=1, backend=be)
        _exact(x, x0)
        c0, s0 = codes.clone(), scales.clone()
        u = _rand((3, 512), seed=2)
        u0 = u.clone()
        K.int8_ema_update(codes, scales, u, 0.9, backend=be)
        _exact(codes, c0)
        _exact(scales, s0)
        _exact(u, u0)


def test_reference_dequantize_dtype_and_out():
    x = _rand((3, 517))
    codes, scales = R.quantize_blockwise(x, 100)
    f = R.dequantize_blockwise(codes, scales, 100)
    for dt in FLOATS:
        y = R.dequantize_blockwise(codes, scales, 100, dtype=dt)
        assert y.dtype == dt
        _exact(y, f.to(dt))


# --------------------------------------------------------------------------- reference EMA


def test_reference_ema_tracks_fp32_ema_within_a_step():
    x = _rand((3, 517), scale=1.0)
    u = _rand((3, 517), scale=1.0, seed=9)
    codes, scales = R.quantize_blockwise(x, 100)
    dec = R.dequantize_blockwise(codes, scales, 100)
    for stochastic in (False, True):
        c2, s2 = R.int8_ema_update(codes, scales, u, 0.9, block_size=100,
                                   stochastic=stochastic, seed=1)
        want = 0.9 * dec.double() + 0.1 * u.double()
        got = R.dequantize_blockwise(c2, s2, 100).double()
        s_el = s2.repeat_interleave(100, dim=-1)[..., :517].double()
        lim = 0.5 if not stochastic else 1.0
        assert bool(((got - want).abs() <= s_el * (lim + 1e-4)).all())
        # fresh block scales: absmax of the new statistic / 127
        wb = torch.nn.functional.pad(want, (0, 600 - 517)).view(3, 6, 100)
        torch.testing.assert_close(s2.double(), wb.abs().amax(-1) / 127, rtol=1e-6, atol=0)


def test_reference_ema_stochastic_does_not_freeze():
    """rho = 0.999: each increment is far below one quantization step."""
    torch.manual_seed(0)
    n, bs = 2048, 256
    target = torch.rand(1, n) + 0.5          # statistic drifts from 1.0 towards target
    codes, scales = R.quantize_blockwise(torch.ones(1, n), bs)
    codes_nr, scales_nr = codes.clone(), scales.clone()
    exact = torch.ones(1, n, dtype=torch.float64)
    for t in range(800):
        codes, scales = R.int8_ema_update(codes, scales, target, 0.999, block_size=bs,
                                          stochastic=True, seed=t)
        codes_nr, scales_nr = R.int8_ema_update(codes_nr, scales_nr, target, 0.999,
                                                block_size=bs, stochastic=False)
        exact = 0.999 * exact + 0.001 * target.double()
    sr = R.dequantize_blockwise(codes, scales, bs).double()
    nr = R.dequantize_blockwise(codes_nr, scales_nr, bs).double()
    moved = (exact - 1.0).abs().mean()
    assert float(moved) > 0.1
    # unbiased: the signed error averages out over elements (each element carries rounding
    # noise of a couple of quantization steps, ~0.01 here, but no systematic drift)
    assert abs(float((sr - exact).mean())) < 0.02 * float(moved)  # measured <= 0.007
    assert float((sr - exact).abs().mean()) < 0.25 * float(moved)  # measured ~0.17
    # round-to-nearest stays stuck near the start (the documented failure mode)
    assert float((nr - exact).abs().mean()) > 0.5 * float(moved)


def test_reference_ema_inplace_out_and_tensor_scalars():
    x = _rand((2, 3, 300))
    u = _rand((2, 3, 300), seed=3)
    codes, scales = R.quantize_blockwise(x, 64)
    want = R.int8_ema_update(codes, scales, u, 0.95, block_size=64, seed=17)
    c, s = codes.clone(), scales.clone()
    got = R.int8_ema_update(c, s, u, torch.tensor(0.95), block_size=64,
                            seed=torch.tensor(17), out=(c, s))
    assert got[0] is c and got[1] is s
    _exact(c, want[0])
    _exact(s, want[1])
    # update given as (B, m, m) for codes (B, m*m)
    codes2, scales2 = R.quantize_blockwise(_rand((4, 49)), 16)
    u2 = _rand((4, 7, 7), seed=5)
    a = R.int8_ema_update(codes2, scales2, u2, 0.5, block_size=16, seed=1)
    b = R.int8_ema_update(codes2, scales2, u2.reshape(4, 49), 0.5, block_size=16, seed=1)
    _exact(a[0], b[0])


@pytest.mark.parametrize("shape, bs", [
    ((4, 512 * 512), 32),       # rows of 2^18 entries: each row split into runs of whole blocks
    ((2, 1536 * 1536), 64),     # 2^21 + ..., not a power of two: the run is a divisor of the row
    ((3, 400_003), 32),         # a partial last block per row: whole rows per chunk
    ((4096, 300), 32),          # many short rows, a partial block each
])
def test_reference_ema_chunks_give_the_whole_stacks_bits(monkeypatch, shape, bs):
    """Stacks of 2^20 entries or more go through the CPU reference in cache-sized chunks; the
    codes and scales must be those of the whole-stack computation (hash by flat index, blocks
    never split), in place or not, with NaN blocks and tensor seeds."""
    assert shape[0] * shape[1] >= R.CHUNKED_FROM
    x = _rand(shape) * 3
    u = _rand(shape, seed=3)
    u.view(-1)[:: 100_003] = float("nan")
    codes, scales = R.quantize_blockwise(x, bs)
    for seed in (5, torch.tensor(123_456)):
        chunked = R.int8_ema_update(codes, scales, u, 0.95, block_size=bs, seed=seed)
        c, s = codes.clone(), scales.clone()
        inplace = R.int8_ema_update(c, s, u, 0.95, block_size=bs, seed=seed, out=(c, s))
        with monkeypatch.context() as m:
            m.setattr(R, "CHUNKED_FROM", 1 << 62)
            whole = R.int8_ema_update(codes, scales, u, 0.95, block_size=bs, seed=seed)
        assert inplace[0] is c and inplace[1] is s
        for got in (chunked, inplace):
            _exact(got[0], whole[0])
            torch.testing.assert_close(got[1], whole[1], rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- reference Adam


def _adam_inputs(n_shape, pdt, gdt=None, mdt=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    gdt = gdt or pdt

    def rn(f=torch.randn):
        return f(n_shape, generator=g, device=device)

    p = rn().to(dtype=pdt)
    grad = rn().to(dtype=gdt)
    m = (0.1 * rn()).to(dtype=mdt)
    v = (0.01 * rn(torch.rand)).to(dtype=mdt)
    pc = rn().to(dtype=gdt)
    return p, grad, m, v, pc


def test_reference_adam_matches_torch_adamw():
    p, grad, m, v, _ = _adam_inputs((37, 29), torch.float32)
    m.zero_()
    v.zero_()
    p_t = p.clone().requires_grad_(True)
    opt = torch.optim.AdamW([p_t], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for step in range(1, 6):
        gg = grad * (1 + 0.1 * step)
        R.adam_epilogue(p, gg, m, v, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                        weight_decay=0.1, step=step)
        p_t.grad = gg.clone()
        opt.step()
    torch.testing.assert_close(p, p_t.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, opt.state[p_t]["exp_avg"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(v, opt.state[p_t]["exp_avg_sq"], rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("blend", [0.0, 0.3, 1.0])
def test_reference_adam_blend_formula_float64(blend):
    p, grad, m, v, pc = _adam_inputs((513,), torch.float32)
    p0, m0, v0 = p.double(), m.double(), v.double()
    lr, b1, b2, eps, wd, t = 3e-3, 0.9, 0.999, 1e-8, 0.05, 7
    R.adam_epilogue(p, grad, m, v, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                    step=t, precond=pc, blend=blend)
    g = blend * pc.double() + (1 - blend) * grad.double()
    m1 = b1 * m0 + (1 - b1) * g
    v1 = b2 * v0 + (1 - b2) * g * g
    p1 = p0 * (1 - lr * wd) - lr * (m1 / (1 - b1**t)) / ((v1 / (1 - b2**t)).sqrt() + eps)
    torch.testing.assert_close(m.double(), m1, rtol=1e-6, atol=5e-8)
    torch.testing.assert_close(v.double(), v1, rtol=1e-6, atol=5e-10)
    torch.testing.assert_close(p.double(), p1, rtol=1e-6, atol=1e-7)


def test_reference_adam_tensor_scalars_equal_python_scalars():
    a = _adam_inputs((300,), torch.float32)
    b = [t.clone() for t in a]
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    R.adam_epilogue(*a[:4], lr=0.01, step=3, precond=a[4], blend=0.25, **kw)
    R.adam_epilogue(*b[:4], lr=torch.tensor(0.01), step=torch.tensor(3),
                    precond=b[4], blend=torch.tensor(0.25), **kw)
    for x, y in zip(a[:4], b[:4]):
        torch.testing.assert_close(x, y, rtol=2e-7, atol=1e-9)


def test_reference_adam_bf16_param_fp32_statistics():
    p, grad, m, v, _ = _adam_inputs((401,), torch.bfloat16)
    p32, m32, v32 = p.float(), m.clone(), v.clone()
    R.adam_epilogue(p, grad, m, v, lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8,
                    weight_decay=0.0, step=2)
    R.adam_epilogue(p32, grad.float(), m32, v32, lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8,
                    weight_decay=0.0, step=2)
    assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
    _exact(m, m32)
    _exact(v, v32)
    _exact(p, p32.to(torch.bfloat16))


def _lsq_problem(m_=64, n_=96):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(128, m_, generator=g) / math.sqrt(m_) * torch.logspace(0, -1.5, m_)
    B = torch.randn(128, n_, generator=g)
    X0 = torch.randn(m_, n_, generator=g) * 0.1
    return A, B, X0


def _moment_state(kind, shape, bs):
    if kind == "int8":
        return (torch.zeros(shape, dtype=torch.int8),
                torch.zeros((*shape[:-1], C.n_blocks(shape[-1], bs))))
    return torch.zeros(shape)


def test_reference_adam_8bit_moments_track_fp32_moments():
    """Least squares, 100 Adam steps: 8-bit moments end within a few % of fp32 moments."""
    A, B, X0 = _lsq_problem()
    bs = 64
    finals = {}
    for kinds in (("fp32", "fp32"), ("int8", "fp32"), ("fp32", "int8"), ("int8", "int8")):
        X = X0.clone()
        m, v = _moment_state(kinds[0], X.shape, bs), _moment_state(kinds[1], X.shape, bs)
        for t in range(1, 101):
            G = A.t() @ (A @ X - B)
            R.adam_epilogue(X, G, m, v, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                            weight_decay=0.0, step=t, moment_block_size=bs, seed=t)
        finals[kinds] = (0.5 * ((A @ X - B) ** 2).sum().item(), X)
    loss0 = 0.5 * ((A @ X0 - B) ** 2).sum().item()
    ref_loss, ref_x = finals[("fp32", "fp32")]
    assert ref_loss < 0.85 * loss0
    for kinds, (loss, _x) in finals.items():  # measured: within 0.1 % of the loss decrease
        assert abs(loss - ref_loss) < 0.01 * (loss0 - ref_loss), kinds
    # 8-bit m alone stays close to fp32 (measured 2 % of the distance travelled)
    x_m8 = finals[("int8", "fp32")][1]
    assert float((x_m8 - ref_x).norm() / (ref_x - X0).norm()) < 0.05


def test_reference_adam_8bit_state_encodes_m_and_sqrt_v():
    p, grad, _, _, _ = _adam_inputs((3, 200), torch.float32)
    p8 = p.clone()
    m32, v32 = torch.zeros_like(p), torch.zeros_like(p)
    m8, v8 = _moment_state("int8", p.shape, 64), _moment_state("int8", p.shape, 64)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=1)
    R.adam_epilogue(p, grad, m32, v32, **kw)
    R.adam_epilogue(p8, grad, m8, v8, moment_block_size=64, seed=3, **kw)
    # from a zero state the step itself is exact (it uses the fp32 moments)
    _exact(p8, p)
    dm = R.dequantize_blockwise(*m8, 64)
    dr = R.dequantize_blockwise(*v8, 64)
    sm = m8[1].repeat_interleave(64, -1)[:, :200]
    sr = v8[1].repeat_interleave(64, -1)[:, :200]
    assert bool(((dm - m32).abs() <= sm * 1.0001).all())
    assert bool(((dr - v32.sqrt()).abs() <= sr * 1.0001).all())
    assert int(v8[0].min()) >= 0  # sqrt(v) >= 0


@pytest.mark.slow
@pytest.mark.parametrize("n", [300])
def test_reference_path_compiles_fullgraph_and_matches_eager(n):
    """The reference path traces with torch.compile(fullgraph=True) (no graph break, no host
    sync) and the compiled step gives bit-identical codes, scales and parameters, also with a
    partial last block (n = 300, blocks of 64)."""
    def step(codes, scales, u, x, p, g, m, v, m8c, m8s, v8c, v8s, t):
        c, s = K.quantize_blockwise(x, 64, stochastic=True, seed=t)
        K.int8_ema_update(codes, scales, u, 0.999, block_size=64, seed=t, out=(codes, scales))
        d = K.dequantize_blockwise(codes, scales, 64)
        K.adam_epilogue(p, g, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.1, step=t, precond=d.view(p.shape), blend=0.5)
        K.adam_epilogue(p, g, (m8c, m8s), (v8c, v8s), lr=1e-3, beta1=0.9, beta2=0.999,
                        eps=1e-8, weight_decay=0.1, step=t, moment_block_size=64, seed=t)
        return c, s, d

    codes, scales = R.quantize_blockwise(_rand((4, n)), 64)
    m8 = R.quantize_blockwise(_rand((4, n), scale=0.1, seed=1), 64)
    v8 = R.quantize_blockwise(_rand((4, n), seed=2).abs(), 64)
    args = (codes, scales, _rand((4, n), seed=3), _rand((4, n), seed=4), _rand((4, n), seed=5),
            _rand((4, n), seed=6), torch.zeros(4, n), torch.zeros(4, n), *m8, *v8,
            torch.tensor(3))
    torch._dynamo.reset()
    eager_args = [a.clone() for a in args]
    comp_args = [a.clone() for a in args]
    want = step(*eager_args)
    got = torch.compile(step, fullgraph=True)(*comp_args)
    for a, b in zip(got, want):
        _exact(a, b)
    for a, b in zip(comp_args, eager_args):  # in-place updated state and parameters
        _exact(a, b)

    def fresh_state_step(p, g, t):  # zero 8-bit state created inside the compiled graph
        nb = C.n_blocks(n, 64)
        m8 = (torch.zeros(4, n, dtype=torch.int8), torch.zeros(4, nb))
        v8 = (torch.zeros(4, n, dtype=torch.int8), torch.zeros(4, nb))
        K.adam_epilogue(p, g, m8, v8, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.1, step=t, moment_block_size=64, seed=t)
        return p, *m8, *v8

    p0, g0 = _rand((4, n), seed=7), _rand((4, n), seed=8)
    want = fresh_state_step(p0.clone(), g0, torch.tensor(3))
    got = torch.compile(fresh_state_step, fullgraph=True)(p0.clone(), g0, torch.tensor(3))
    for a, b in zip(got, want):
        _exact(a, b)


# --------------------------------------------------------------------------- dispatch


def test_dispatch_rules(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    assert K.backend("cpu") == "reference"
    assert K.backend(torch.zeros(1)) == "reference"
    assert K.backend("cpu", "reference") == "reference"
    if HAS_TRITON:
        assert K.backend(torch.device("cuda")) == "triton"  # auto on CUDA
    monkeypatch.setenv(K.ENV_VAR, "reference")
    assert K.backend(torch.device("cuda")) == "reference"
    monkeypatch.setenv(K.ENV_VAR, "auto")
    assert K.backend("cpu") == "reference"
    monkeypatch.setenv(K.ENV_VAR, "bogus")
    with pytest.raises(ValueError):
        K.backend("cpu")
    monkeypatch.delenv(K.ENV_VAR)
    with pytest.raises(ValueError):
        K.backend("cpu", "cuda")


def test_dispatch_picks_the_compiled_codec_for_large_cpu_tensors(monkeypatch):
    from scao_fx.kernels import _compiled, _dispatch

    monkeypatch.delenv(K.ENV_VAR, raising=False)
    big = torch.empty(_compiled.MIN_NUMEL)
    assert K.backend(big) == "compiled" and _dispatch.compiled_for(big)
    assert K.backend(torch.empty(_compiled.MIN_NUMEL - 1)) == "reference"
    assert K.backend("cpu", numel=_compiled.MIN_NUMEL) == "compiled"
    assert K.backend(big, "reference") == "reference"
    assert K.backend(torch.zeros(3), "compiled") == "compiled"  # forced: any size
    assert K.backend(torch.device("cuda"), "compiled") == "reference"  # a CPU backend
    seen = []
    torch.func.vmap(lambda row: seen.append(K.backend(row.expand(_compiled.MIN_NUMEL))) or row)(torch.zeros(2, 1))
    assert seen == ["reference"]  # inside torch.func: the eager reference, never a compiled graph
    monkeypatch.setenv(K.ENV_VAR, "reference")
    assert K.backend(big) == "reference" and not _dispatch.compiled_for(big)
    monkeypatch.setenv(K.ENV_VAR, "triton")
    assert not _dispatch.compiled_for(big)  # the bfloat16 rounding has no Triton kernel: reference
    monkeypatch.setenv(K.ENV_VAR, "compiled")
    assert K.backend(torch.zeros(3)) == "compiled" and _dispatch.compiled_for(torch.zeros(3))


@needs_cxx
@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("shape, block", [((3, 517), 64), ((777,), 100), ((2, 3, 320), 32), ((4, 64), 32)])
def test_compiled_codec_is_bit_identical_to_the_reference(shape, block, stochastic):
    """torch.compile's CPU code for the reference: the same codes, scales and decodes, with int and
    tensor seeds and non-finite blocks, in place or not (and it did compile: no fallback)."""
    from scao_fx.kernels import _compiled

    x = _rand(shape, seed=7)
    x.view(-1)[5] = float("nan")
    x.view(-1)[-1] = float("inf")
    for seed in (3, torch.tensor(11)):
        want = R.quantize_blockwise(x, block, stochastic=stochastic, seed=seed)
        got = K.quantize_blockwise(x, block, stochastic=stochastic, seed=seed, backend="compiled")
        _exact(got[0], want[0], "codes")
        _exact(got[1], want[1], "scales")
        _exact(K.dequantize_blockwise(*got, block, backend="compiled"), R.dequantize_blockwise(*want, block))
        update = _rand(shape, seed=8)
        for rho in (0.95, torch.tensor(0.9)):
            want_ema = R.int8_ema_update(*want, update, rho, block_size=block, stochastic=stochastic, seed=seed)
            codes, scales = got[0].clone(), got[1].clone()
            got_ema = K.int8_ema_update(codes, scales, update, rho, block_size=block, stochastic=stochastic,
                                        seed=seed, out=(codes, scales), backend="compiled")
            assert got_ema[0] is codes
            _exact(codes, want_ema[0], "EMA codes")
            _exact(scales, want_ema[1], "EMA scales")
    assert _compiled.available(), _compiled._state["failed"]


@needs_cxx
def test_compiled_bfloat16_rounding_is_bit_identical(monkeypatch):
    from scao_fx import codecs

    x = _rand((5, 300), seed=9)
    x[0, 0] = float("nan")
    want = codecs._bf16_stochastic(x, 4)
    monkeypatch.setenv(K.ENV_VAR, "compiled")
    got = codecs._bf16_stochastic(x, 4)
    assert got.dtype == torch.bfloat16
    _exact(got, want)
    _exact(codecs._bf16_stochastic(x, torch.tensor(5)), R.bf16_stochastic(x, 5))


def test_compiled_backend_falls_back_to_the_reference_once_compiling_fails(monkeypatch):
    from scao_fx.kernels import _compiled

    def broken(name):  # what torch.compile raises without a C++ compiler
        def call(*args, **kwargs):
            raise torch._inductor.exc.InductorError(torch._inductor.exc.InvalidCxxCompiler(), None)
        return call

    monkeypatch.setattr(_compiled, "_compiled", broken)
    monkeypatch.setitem(_compiled._state, "failed", None)
    x = _rand((4, 64), seed=1)
    with pytest.warns(RuntimeWarning, match="eager reference runs instead"):
        got = K.quantize_blockwise(x, 32, stochastic=True, seed=2, backend="compiled")
    want = R.quantize_blockwise(x, 32, stochastic=True, seed=2)
    _exact(got[0], want[0])
    assert not _compiled.available()
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    assert K.backend(torch.empty(_compiled.MIN_NUMEL)) == "reference"  # auto stops choosing it


def test_compiled_backend_lets_an_error_of_the_computation_through(monkeypatch):
    """Only a failed compile falls back; any other error (here: out of memory) is raised as it
    is, and the compiled backend stays in use."""
    from scao_fx.kernels import _compiled

    def oom(name):
        def call(*args, **kwargs):
            raise RuntimeError("DefaultCPUAllocator: not enough memory")
        return call

    monkeypatch.setattr(_compiled, "_compiled", oom)
    monkeypatch.setitem(_compiled._state, "failed", None)
    with pytest.raises(RuntimeError, match="not enough memory"):
        K.quantize_blockwise(_rand((4, 64), seed=1), 32, backend="compiled")
    assert _compiled.available()


def test_dispatch_forced_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(K.ENV_VAR, "triton")
    x = torch.randn(10)
    if HAS_TRITON:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            K.quantize_blockwise(x)
    # the per-call argument wins over the environment
    K.quantize_blockwise(x, backend="reference")


def test_argument_validation():
    x = torch.randn(3, 100)
    with pytest.raises(ValueError):
        K.quantize_blockwise(x, 0)
    with pytest.raises(TypeError):
        K.quantize_blockwise(x.to(torch.int32))
    with pytest.raises(ValueError):
        K.quantize_blockwise(torch.tensor(1.0))
    codes, scales = K.quantize_blockwise(x, 32)
    with pytest.raises(ValueError):
        K.dequantize_blockwise(codes, scales, 64)
    with pytest.raises(TypeError):
        K.dequantize_blockwise(codes.float(), scales, 32)
    with pytest.raises(ValueError):
        K.quantize_blockwise(x, 32, out=(codes[:2], scales))
    with pytest.raises(ValueError):
        K.int8_ema_update(codes, scales, torch.randn(3, 99), 0.9, block_size=32)
    with pytest.raises(TypeError):
        K.quantize_blockwise(x, stochastic=True, seed=torch.tensor(1.5))
    with pytest.raises(ValueError):
        K.adam_epilogue(x, x[:2], x.clone(), x.clone(), lr=1e-3, beta1=0.9, beta2=0.99,
                        eps=1e-8, weight_decay=0.0, step=1)
    with pytest.raises(TypeError):
        K.adam_epilogue(x, x, x.clone(), x.clone(), lr=1e-3, beta1=torch.tensor(0.9),
                        beta2=0.99, eps=1e-8, weight_decay=0.0, step=1)


def test_empty_inputs():
    for be in ["reference"] + (["triton"] if (HAS_TRITON and INTERPRET) else []):
        c, s = K.quantize_blockwise(torch.zeros(0, 10), 4, backend=be)
        assert c.shape == (0, 10) and s.shape == (0, 3)
        y = K.dequantize_blockwise(c, s, 4, backend=be)
        assert y.shape == (0, 10)


# --------------------------------------------------------------------------- triton == reference


def _check_quantize(shape, bs, dtype, stochastic, device, seed):
    x = _rand(shape, dtype=dtype, device=device, seed=len(shape) + bs)
    want = R.quantize_blockwise(x, bs, stochastic=stochastic, seed=seed)
    out = _poisoned_pair(shape, _nb_shape(shape, bs), device)
    got = K.quantize_blockwise(x, bs, stochastic=stochastic, seed=seed, out=out,
                               backend="triton")
    assert got[0] is out[0] and got[1] is out[1]
    _exact(got[0], want[0], "codes differ")
    _exact(got[1], want[1], "scales differ")
    fresh = K.quantize_blockwise(x, bs, stochastic=stochastic, seed=seed, backend="triton")
    _exact(fresh[0], want[0])
    return want


@needs_interp
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bs", BLOCKS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_triton_quantize_matches_reference(shape, bs, stochastic):
    _check_quantize(shape, bs, torch.float32, stochastic, "cpu", seed=12345)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stochastic", [False, True])
def test_triton_quantize_half_inputs(dtype, stochastic):
    _check_quantize((3, 517), 64, dtype, stochastic, "cpu", seed=2**40 + 3)


@needs_interp
def test_triton_quantize_tensor_seed_and_large_block():
    x = _rand((2, 5000))
    want = R.quantize_blockwise(x, 4500, stochastic=True, seed=99)
    got = K.quantize_blockwise(x, 4500, stochastic=True, seed=torch.tensor(99),
                               backend="triton")
    _exact(got[0], want[0])
    _exact(got[1], want[1])


@needs_interp
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy inf/inf in the interpreter
def test_triton_quantize_nonfinite_and_noncontiguous():
    x = _rand((300, 4), scale=1.0).t()  # non-contiguous (4, 300)
    x[0, 5] = float("nan")
    x[2, 70] = float("inf")
    for stochastic in (False, True):
        want = R.quantize_blockwise(x, 64, stochastic=stochastic, seed=1)
        got = K.quantize_blockwise(x, 64, stochastic=stochastic, seed=1, backend="triton")
        _exact(got[0], want[0])
        _exact(got[1], want[1])
    assert math.isnan(float(want[1][0, 0])) and math.isinf(float(want[1][2, 1]))


@needs_interp
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_triton_dequantize_matches_reference(shape, dtype):
    bs = 100
    codes, scales = R.quantize_blockwise(_rand(shape), bs)
    want = R.dequantize_blockwise(codes, scales, bs, dtype=dtype)
    out = torch.full(shape, float("nan"), dtype=dtype)
    got = K.dequantize_blockwise(codes, scales, bs, out=out, backend="triton")
    assert got is out
    _exact(got, want)
    _exact(K.dequantize_blockwise(codes, scales, bs, dtype=dtype, backend="triton"), want)


@needs_interp
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bs", [256, 100])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("udtype", [torch.float32, torch.bfloat16])
def test_triton_ema_matches_reference(shape, bs, stochastic, udtype):
    codes, scales = R.quantize_blockwise(_rand(shape), bs)
    u = _rand(shape, dtype=udtype, seed=77)
    want = R.int8_ema_update(codes, scales, u, 0.99, block_size=bs, stochastic=stochastic,
                             seed=5)
    out = _poisoned_pair(shape, scales.shape)
    got = K.int8_ema_update(codes, scales, u, 0.99, block_size=bs, stochastic=stochastic,
                            seed=5, out=out, backend="triton")
    assert got[0] is out[0]
    _exact(got[0], want[0], "codes differ")
    _exact(got[1], want[1], "scales differ")


@needs_interp
def test_triton_ema_inplace_tensor_scalars_and_sequence():
    shape, bs = (4, 333), 64
    codes, scales = R.quantize_blockwise(_rand(shape), bs)
    rc, rs = codes.clone(), scales.clone()
    tc, ts = codes.clone(), scales.clone()
    rho = torch.tensor(0.9)
    for t in range(4):
        u = _rand(shape, seed=t)
        R.int8_ema_update(rc, rs, u, rho, block_size=bs, seed=torch.tensor(t), out=(rc, rs))
        K.int8_ema_update(tc, ts, u.view(4, 9, 37), rho, block_size=bs, seed=torch.tensor(t),
                          out=(tc, ts), backend="triton")
    _exact(tc, rc)
    _exact(ts, rs)
    # a Python rho equal to the float32 tensor gives identical bits
    a = K.int8_ema_update(tc, ts, u, 0.9, block_size=bs, seed=3, backend="triton")
    b = K.int8_ema_update(tc, ts, u, rho, block_size=bs, seed=torch.tensor(3),
                          backend="triton")
    _exact(a[0], b[0])
    _exact(a[1], b[1])


@needs_interp
def test_triton_ema_nonfinite_update_poisons_only_its_block():
    codes, scales = R.quantize_blockwise(_rand((2, 300)), 64)
    u = _rand((2, 300), seed=1)
    u[1, 130] = float("nan")
    want = R.int8_ema_update(codes, scales, u, 0.9, block_size=64, seed=2)
    got = K.int8_ema_update(codes, scales, u, 0.9, block_size=64, seed=2, backend="triton")
    _exact(got[0], want[0])
    _exact(got[1], want[1])
    assert math.isnan(float(got[1][1, 2])) and int(torch.isnan(got[1]).sum()) == 1


ADAM_TOL = {torch.float32: (2e-6, 1e-7), torch.bfloat16: (2**-7, 0.0),
            torch.float16: (2**-10, 1e-7)}


def _check_adam(shape, pdt, mode, scalars, device, mdt=torch.float32, noncontig=False):
    inputs = _adam_inputs(shape, pdt, mdt=mdt, device=device, seed=sum(shape))
    if noncontig:
        inputs = tuple(t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in inputs)
        assert not inputs[0].is_contiguous()
    ref = [t.clone() for t in inputs]
    tri = [t.clone() for t in inputs]
    if scalars == "tensor":
        lr, step, blend = (torch.tensor(0.05, device=device), torch.tensor(4, device=device),
                           torch.tensor(0.3, device=device))
    else:
        lr, step, blend = 0.05, 4, 0.3
    precond = None
    if mode == "blend1":
        blend = 1.0
    if mode != "plain":
        precond = True
    kw = dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=step,
              blend=blend)
    R.adam_epilogue(*ref[:4], precond=ref[4] if precond else None, **kw)
    out = K.adam_epilogue(*tri[:4], precond=tri[4] if precond else None, backend="triton",
                          **kw)
    assert all(a is b for a, b in zip(out, (tri[0], tri[2], tri[3])))
    # (nearly) every element changes, so an element the kernel skipped would be caught (the
    # three stores share one mask). On millions of elements a few float32 ones legitimately
    # stay put (an update below half an ulp); half-precision params often do.
    for i, dt in ((0, pdt), (2, mdt), (3, mdt)):
        changed = float((ref[i] != inputs[i]).float().mean())
        assert changed > (0.999 if dt == torch.float32 else 0.8), (i, changed)
    rtol, atol = ADAM_TOL[pdt]
    torch.testing.assert_close(tri[0], ref[0], rtol=rtol, atol=atol)
    mt = ADAM_TOL[mdt]
    torch.testing.assert_close(tri[2], ref[2], rtol=mt[0], atol=mt[1])
    torch.testing.assert_close(tri[3], ref[3], rtol=mt[0], atol=mt[1])
    # grad and precond are read only
    _exact(tri[1], inputs[1])
    _exact(tri[4], inputs[4])


@needs_interp
@pytest.mark.parametrize("shape", [(777,), (3, 517), (2, 31, 33)])
@pytest.mark.parametrize("pdt", FLOATS)
@pytest.mark.parametrize("mode", ["plain", "blend", "blend1"])
def test_triton_adam_matches_reference(shape, pdt, mode):
    _check_adam(shape, pdt, mode, "python", "cpu")


@needs_interp
@pytest.mark.parametrize("mode", ["plain", "blend"])
def test_triton_adam_tensor_scalars(mode):
    _check_adam((3, 517), torch.float32, mode, "tensor", "cpu")


@needs_interp
def test_triton_adam_bf16_moments_and_noncontiguous():
    _check_adam((40, 37), torch.bfloat16, "blend", "python", "cpu", mdt=torch.bfloat16)
    _check_adam((40, 37), torch.float32, "blend", "tensor", "cpu", noncontig=True)


# --------------------------------------------------------------------------- benchmark


def test_bench_quick_runs_and_writes_json(tmp_path, capsys):
    import json

    from scao_fx.bench import kernels as bench

    path = tmp_path / "k.json"
    rc = bench.main(["--quick", "--device", "cpu", "--layers", "1", "--d-model", "32",
                     "--d-mlp", "64", "--repeats", "1", "--warmup", "0", "--copy-mb", "8",
                     "--no-step", "--json", str(path)])
    assert rc == 0
    rep = json.loads(path.read_text())
    assert rep["copy_bandwidth_gbps"] > 0 and rep["device_type"] == "cpu"
    assert rep["step"] is None  # --no-step
    kernels = {r["kernel"] for r in rep["results"]}
    assert kernels == {"quantize(nearest)", "quantize(stochastic)", "dequantize(fp32)",
                       "int8_ema_update", "adam_epilogue(fp32 param)",
                       "adam_epilogue(bf16 param)", "adam_epilogue(fp32, int8 m/v)",
                       "adam_epilogue(bf16, int8 m/v)"}
    assert {r["backend"] for r in rep["results"]} == {"reference"}
    assert {r["mode"] for r in rep["results"]} == {"grouped", "loop"}
    # factor groups 32^2 (x10) and 64^2 (x2); param groups (32,32) x4, (32,64), (64,32)
    groups = {r["group"] for r in rep["results"]}
    assert groups == {"10x(32x32)", "2x(64x64)", "4x(32x32)", "1x(32x64)", "1x(64x32)"}
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in rep["results"])
    assert "int8_ema_update" in capsys.readouterr().out


def test_bench_whole_step_rows(tmp_path, capsys):
    import json

    from scao_fx.bench import kernels as bench

    path = tmp_path / "s.json"
    rc = bench.main(["--quick", "--no-kernels", "--device", "cpu", "--layers", "1",
                     "--d-model", "32", "--d-mlp", "64", "--step-precond-freq", "3",
                     "--step-windows", "2", "--copy-mb", "8", "--no-progress",
                     "--json", str(path)])
    assert rc == 0
    rep = json.loads(path.read_text())
    # one layer: 6 matrices (4 of 32x32, 32x64, 64x32) and 10 vectors (9 of 32, 1 of 64)
    assert rep["step"] == {"layers": 1, "leaves": 16, "params": 8 * 32 * 32 + 9 * 32 + 64,
                           "precond_freq": 3, "windows": 2}
    rows = {(r["kernel"], r["backend"], r["mode"]): r for r in rep["results"]}
    assert set(rows) == {(k, "reference", m) for k in bench.STEP_ROWS
                         for m in ("grouped", "loop")}
    assert all(r["ms"] > 0 and r["ms_min"] > 0 and r["gbps"] is None for r in rows.values())
    for k in bench.STEP_ROWS:
        assert rep["summary"][f"{k} [reference]"]["loop_over_grouped"][0] > 0
    out = capsys.readouterr().out
    assert "scao step (refresh)" in out and "loop/grouped" in out


def test_bench_step_grouped_equals_loop():
    """Past the first refresh, one step grouped and per leaf gives the same parameters (fp32
    curvature: int8 curvature draws different stochastic-rounding streams per group)."""
    from scao_fx.bench.kernels import _clone, model_params, scao_stepper

    freq, cpu = 2, torch.device("cpu")
    p0, grads = model_params(1, 32, 64, cpu), model_params(1, 32, 64, cpu, seed=1)
    final = []
    for grouped in (True, False):
        params = _clone(p0)
        step = scao_stepper(params, grads, grouped=grouped, precond_freq=freq,
                            use_int8_ema=False)
        for _ in range(freq + 1):  # through the first refresh, then one step
            step()
        final.append(params)
    for k in p0:
        for n in p0[k]:
            moved = (final[0][k][n] - p0[k][n]).abs().max()
            assert moved > 1e-5, (k, n)
            torch.testing.assert_close(final[0][k][n], final[1][k][n], rtol=1e-6,
                                       atol=1e-3 * moved.item())


def test_bench_model_groups_gpt2_medium():
    from scao_fx.bench.kernels import model_groups

    g = model_groups()
    assert g.factor_groups == {1024: 240, 4096: 48}
    assert g.param_groups == {(1024, 1024): 96, (1024, 4096): 24, (4096, 1024): 24}
    params = sum(m * n * c for (m, n), c in g.param_groups.items())
    assert params == 24 * 12 * 1024 * 1024


def _check_adam8(cshape, pshape, pdt, mkind, vkind, mode, scalars, device, bs=64):
    g = torch.Generator(device=device).manual_seed(7)
    p = torch.randn(pshape, generator=g, device=device).to(dtype=pdt)
    grad = torch.randn(pshape, generator=g, device=device).to(dtype=pdt)
    pc = torch.randn(pshape, generator=g, device=device)

    def state(kind, positive):
        x = torch.randn(cshape, generator=g, device=device)
        x = x.abs() if positive else x * 0.1
        if kind == "int8":
            return R.quantize_blockwise(x, bs)
        return x

    m, v = state(mkind, False), state(vkind, True)
    if scalars == "tensor":
        lr, step, blend = (torch.tensor(0.05, device=device), torch.tensor(4, device=device),
                           torch.tensor(0.3, device=device))
        seed = torch.tensor(11, device=device)
    else:
        lr, step, blend, seed = 0.05, 4, 0.3, 11

    def clone(x):
        return tuple(t.clone() for t in x) if isinstance(x, tuple) else x.clone()

    kw = dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=step,
              blend=blend, precond=pc if mode != "plain" else None, moment_block_size=bs,
              seed=seed)
    ref = (p.clone(), clone(m), clone(v))
    tri = (p.clone(), clone(m), clone(v))
    R.adam_epilogue(ref[0], grad, ref[1], ref[2], **kw)
    out = K.adam_epilogue(tri[0], grad, tri[1], tri[2], backend="triton", **kw)
    assert out[0] is tri[0] and out[1] is tri[1] and out[2] is tri[2]
    rtol, atol = ADAM_TOL[pdt]
    torch.testing.assert_close(tri[0], ref[0], rtol=rtol, atol=atol)
    # the state really moved (v, with beta2 = 0.999, moves less)
    for a, b, old, frac in ((tri[1], ref[1], m, 0.5), (tri[2], ref[2], v, 0.02)):
        if isinstance(a, tuple):
            _exact(a[0], b[0], "codes differ")
            _exact(a[1], b[1], "scales differ")
            assert float((b[0] != old[0]).float().mean()) > frac
        else:
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


@needs_interp
@pytest.mark.parametrize("mkind,vkind", [("int8", "int8"), ("int8", "fp32"), ("fp32", "int8")])
@pytest.mark.parametrize("mode", ["plain", "blend"])
@pytest.mark.parametrize("pdt", [torch.float32, torch.bfloat16])
def test_triton_adam_8bit_moments_match_reference(mkind, vkind, mode, pdt):
    _check_adam8((3, 517), (3, 11, 47), pdt, mkind, vkind, mode, "python", "cpu")


@needs_interp
def test_triton_adam_8bit_tensor_scalars_and_block_100():
    _check_adam8((5, 333), (5, 333), torch.float32, "int8", "int8", "blend", "tensor", "cpu",
                 bs=100)


# --------------------------------------------------------------------------- compile for sm_90


def _nvidia_compiler_available() -> bool:
    if not HAS_TRITON:
        return False
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except Exception:  # pragma: no cover - depends on the installed triton
        return False
    return "nvidia" in backends


_SM90_COMPILE = r"""
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import scao_fx.kernels._triton as mod

target = GPUTarget("cuda", 90, 32)


def compile_(k, sig, consts):
    sig = {**sig, **{c: "constexpr" for c in consts}}
    src = ASTSource(fn=k, signature=sig, constexprs=consts)
    return triton.compile(src, target=target, options=dict(enable_fp_fusion=False, num_warps=8))


codec_int = {"total_blocks": "i32", "nb": "i32", "n": "i32", "bs": "i32"}
kq = compile_(mod._quantize_kernel,
              {"x_ptr": "*bf16", "codes_ptr": "*i8", "scales_ptr": "*fp32", "seed": "*i64",
               **codec_int},
              {"STOCH": True, "SEED_PTR": True, "BPP": 16, "BLOCK": 256, "I64": True})
kd = compile_(mod._dequantize_kernel,
              {"codes_ptr": "*i8", "scales_ptr": "*fp32", "out_ptr": "*bf16", **codec_int},
              {"BPP": 16, "BLOCK": 256, "I64": False})
ke = compile_(mod._ema_kernel,
              {"codes_ptr": "*i8", "scales_ptr": "*fp32", "upd_ptr": "*fp32",
               "out_codes_ptr": "*i8", "out_scales_ptr": "*fp32", "rho": "*fp32",
               "omr": "fp32", "seed": "i64", **codec_int},
              {"RHO_PTR": True, "STOCH": True, "SEED_PTR": False, "BPP": 16, "BLOCK": 256,
               "I64": False})
ka = compile_(mod._adam_kernel,
              {"p_ptr": "*bf16", "g_ptr": "*bf16", "m_ptr": "*fp32", "v_ptr": "*fp32",
               "pc_ptr": "*fp32", "n": "i32", "decay": "*fp32", "step_size": "*fp32",
               "sbc2": "fp32", "blend": "fp32", "omblend": "fp32", "beta1": "fp32",
               "omb1": "fp32", "beta2": "fp32", "omb2": "fp32", "eps": "fp32"},
              {"USE_G": True, "USE_PC": True, "DECAY_PTR": True, "SS_PTR": True,
               "SBC2_PTR": False, "BLEND_PTR": False, "BLOCK": 2048, "I64": False})
k8 = compile_(mod._adam8_kernel,
              {"p_ptr": "*bf16", "g_ptr": "*bf16", "pc_ptr": "*fp32", "m_ptr": "*i8",
               "ms_ptr": "*fp32", "v_ptr": "*i8", "vs_ptr": "*fp32", "seed": "*i64",
               **codec_int, "decay": "fp32", "step_size": "*fp32", "sbc2": "*fp32",
               "blend": "fp32", "omblend": "fp32", "beta1": "fp32", "omb1": "fp32",
               "beta2": "fp32", "omb2": "fp32", "eps": "fp32"},
              {"M8": True, "V8": True, "USE_G": True, "USE_PC": True, "DECAY_PTR": False,
               "SS_PTR": True, "SBC2_PTR": True, "BLEND_PTR": False, "SEED_PTR": True,
               "BPP": 8, "BLOCK": 256, "I64": False})
k8b = compile_(mod._adam8_kernel,
               {"p_ptr": "*fp32", "g_ptr": "*fp32", "pc_ptr": "*fp32", "m_ptr": "*fp32",
                "ms_ptr": "*fp32", "v_ptr": "*i8", "vs_ptr": "*fp32", "seed": "i64",
                **codec_int, "decay": "fp32", "step_size": "fp32", "sbc2": "fp32",
                "blend": "fp32", "omblend": "fp32", "beta1": "fp32", "omb1": "fp32",
                "beta2": "fp32", "omb2": "fp32", "eps": "fp32"},
               {"M8": False, "V8": True, "USE_G": True, "USE_PC": False, "DECAY_PTR": False,
                "SS_PTR": False, "SBC2_PTR": False, "BLEND_PTR": False, "SEED_PTR": False,
                "BPP": 8, "BLOCK": 256, "I64": True})
for k in (kq, kd, ke, ka, k8, k8b):
    ptx = k.asm["ptx"]
    assert not re.search(r"\bfma\.rn\.f32", ptx), "multiply-add contracted"
    assert "div.full.f32" not in ptx and "div.approx.f32" not in ptx, "inexact division"
    assert "sqrt.approx" not in ptx, "inexact sqrt"
assert "div.rn.f32" in kq.asm["ptx"] and "div.rn.f32" in ke.asm["ptx"]
assert "sqrt.rn.f32" in ka.asm["ptx"] and "sqrt.rn.f32" in k8.asm["ptx"]
print("compiled", len(kq.asm["cubin"]), len(kd.asm["cubin"]), len(ke.asm["cubin"]),
      len(ka.asm["cubin"]))
"""


@pytest.mark.skipif(not _nvidia_compiler_available(), reason="Triton's NVIDIA backend missing")
def test_kernels_compile_for_sm90_without_fma_and_with_exact_division():
    """Compile the real (not interpreted) kernels for an H100 target; no GPU needed.

    Catches typing errors the interpreter accepts, and checks that no multiply-add was
    contracted and that division/sqrt are the correctly rounded ones: that is what keeps the
    codes bit-identical to the reference. Runs in a subprocess without TRITON_INTERPRET.
    """
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "compiled" in res.stdout


# --------------------------------------------------------------------------- GPU


@gpu
@needs_gpu
@pytest.mark.parametrize("shape", [(24, 1024 * 1024 + 17), (7, 4096 * 33 + 5), (1_000_003,)])
@pytest.mark.parametrize("bs", [256, 64, 1000])
@pytest.mark.parametrize("dtype", FLOATS)
def test_gpu_codec_matches_reference(shape, bs, dtype):
    for stochastic in (False, True):
        want = _check_quantize(shape, bs, dtype, stochastic, "cuda", seed=2024)
        for odt in FLOATS:
            ref = R.dequantize_blockwise(*want, bs, dtype=odt)
            out = torch.full(shape, float("nan"), dtype=odt, device="cuda")
            _exact(K.dequantize_blockwise(*want, bs, out=out), ref)


@gpu
@needs_gpu
@pytest.mark.parametrize("shape", [(24, 1024 * 1024), (4, 4096 * 4096 - 3)])
@pytest.mark.parametrize("udtype", [torch.float32, torch.bfloat16])
def test_gpu_ema_matches_reference(shape, udtype):
    codes, scales = R.quantize_blockwise(_rand(shape, device="cuda"), 256)
    u = _rand(shape, dtype=udtype, device="cuda", seed=3)
    for stochastic in (False, True):
        want = R.int8_ema_update(codes, scales, u, 0.999, stochastic=stochastic,
                                 seed=torch.tensor(7, device="cuda"))
        out = _poisoned_pair(shape, scales.shape, "cuda")
        got = K.int8_ema_update(codes, scales, u, 0.999, stochastic=stochastic,
                                seed=torch.tensor(7, device="cuda"), out=out)
        _exact(got[0], want[0], "codes differ")
        _exact(got[1], want[1], "scales differ")
    c, s = codes.clone(), scales.clone()
    K.int8_ema_update(c, s, u, torch.tensor(0.999, device="cuda"), seed=7, out=(c, s))
    want = R.int8_ema_update(codes, scales, u, 0.999, seed=7)
    _exact(c, want[0])
    _exact(s, want[1])


@gpu
@needs_gpu
@pytest.mark.parametrize("shape", [(24, 1024, 1024), (6, 4096, 1024), (1_000_003,)])
@pytest.mark.parametrize("pdt", FLOATS)
@pytest.mark.parametrize("mode", ["plain", "blend", "blend1"])
@pytest.mark.parametrize("scalars", ["python", "tensor"])
def test_gpu_adam_matches_reference(shape, pdt, mode, scalars):
    _check_adam(shape, pdt, mode, scalars, "cuda")


@gpu
@needs_gpu
@pytest.mark.parametrize("mkind,vkind", [("int8", "int8"), ("int8", "fp32"), ("fp32", "int8")])
@pytest.mark.parametrize("pdt", FLOATS)
@pytest.mark.parametrize("scalars", ["python", "tensor"])
def test_gpu_adam_8bit_matches_reference(mkind, vkind, pdt, scalars):
    _check_adam8((8, 1024 * 1024 + 7), (8, 1024 * 1024 + 7), pdt, mkind, vkind, "blend",
                 scalars, "cuda", bs=256)


@gpu
@needs_gpu
def test_gpu_auto_dispatch_is_triton_and_no_host_sync():
    assert K.backend(torch.device("cuda")) == "triton" or os.environ.get(K.ENV_VAR)
    dev = "cuda"
    x = _rand((24, 65536 + 3), device=dev)
    p, g, m, v, pc = _adam_inputs((24, 4099), torch.bfloat16, device=dev)
    step = torch.tensor(3, device=dev)
    rho = torch.tensor(0.99, device=dev)
    lr = torch.tensor(1e-3, device=dev)
    blend = torch.tensor(0.5, device=dev)

    def calls():
        codes, scales = K.quantize_blockwise(x, stochastic=True, seed=step)
        K.dequantize_blockwise(codes, scales, dtype=torch.bfloat16)
        K.int8_ema_update(codes, scales, x, rho, seed=step, out=(codes, scales))
        K.adam_epilogue(p, g, m, v, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                        step=step, precond=pc, blend=blend)
        K.adam_epilogue(p, g, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.1, step=4)
        # CPU scalar tensors with CUDA data are read on the host, never copied (no sync)
        K.adam_epilogue(p, g, m, v, lr=torch.tensor(1e-3), beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.1, step=torch.tensor(5), precond=pc,
                        blend=torch.tensor(0.25))
        K.int8_ema_update(codes, scales, x, torch.tensor(0.99), seed=torch.tensor(6),
                          out=(codes, scales))

    calls()  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@gpu
@needs_gpu
def test_gpu_int64_indexing():
    """More than 2**31 elements: the kernels switch to 64-bit offsets."""
    n = 2**31 + 4096 + 77
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    codes, scales = K.quantize_blockwise(x, 256)
    tail = 2**31 - 2**31 % 256 - 256 * 4  # block-aligned start before the 2**31 boundary
    want = R.quantize_blockwise(x[tail:], 256)
    _exact(codes[tail:], want[0])
    _exact(scales[tail // 256:], want[1])
    y = K.dequantize_blockwise(codes, scales, 256, dtype=torch.bfloat16)
    _exact(y[tail:], R.dequantize_blockwise(want[0], want[1], 256, dtype=torch.bfloat16))
    del y
    p = x[: 2**31 + 1001].float() if free > 40 * 2**30 else None
    if p is not None:
        gr = torch.ones_like(p)
        m = torch.zeros_like(p)
        v = torch.zeros_like(p)
        K.adam_epilogue(p, gr, m, v, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.0, step=1)
        # step 1 with g = 1: m_hat / sqrt(v_hat) = 1, so every element moved by -lr
        torch.testing.assert_close(p[-5:], x[2**31 + 1001 - 5: 2**31 + 1001].float() - 0.1,
                                   rtol=1e-6, atol=1e-6)
        assert bool((m[-1000:] == 0.1).all())
