"""Codecs (fp32, bf16, int8 block-wise) and the quantize_state combinator (8-bit Adam)."""

from __future__ import annotations

import pytest
import torch
from treeutil import tensor_leaves

import scao_fx as sf

# --------------------------------------------------------------------------- codecs


def test_fp32_codec_is_exact():
    x = torch.randn(3, 50)
    codec = sf.fp32_codec()
    enc = codec.encode(x)
    assert torch.equal(codec.decode(enc), x)
    assert enc.scale.numel() == 0 and codec.bytes_per_entry == 4.0


def test_bf16_codec_rounds_to_bfloat16():
    x = torch.randn(3, 50)
    codec = sf.bf16_codec(stochastic=False)
    enc = codec.encode(x)
    assert enc.data.dtype == torch.bfloat16 and codec.bytes_per_entry == 2.0
    assert torch.equal(codec.decode(enc), x.to(torch.bfloat16).float())
    # stochastic (the default): one of the two bf16 neighbours of x, so within one bf16 step
    y = sf.bf16_codec().decode(sf.bf16_codec().encode(x))
    assert torch.all((y - x).abs() <= 2.0**-7 * x.abs())
    assert not torch.equal(y, x.to(torch.bfloat16).float())  # some entries rounded the other way


@pytest.mark.parametrize("block_size", [8, 64, 256])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_int8_nearest_error_within_half_step(block_size, scale):
    torch.manual_seed(0)
    x = scale * torch.randn(4, 300)
    codec = sf.int8_blockwise(block_size, stochastic=False)
    enc = codec.encode(x)
    nb = -(-300 // block_size)
    assert enc.data.dtype == torch.int8 and enc.data.shape == (4, 300)
    assert enc.scale.shape == (4, nb) and enc.scale.dtype == torch.float32
    # The per-block scale is absmax / 127 and the error is at most half a step.
    pad = torch.nn.functional.pad(x, (0, nb * block_size - 300)).reshape(4, nb, block_size)
    torch.testing.assert_close(enc.scale, pad.abs().amax(-1) / 127, rtol=1e-6, atol=0)
    step = enc.scale.repeat_interleave(block_size, -1)[:, :300]
    err = (codec.decode(enc) - x).abs()
    assert torch.all(err <= 0.5 * step * (1 + 1e-5))
    assert codec.bytes_per_entry == 1 + 4 / block_size


def test_int8_stochastic_rounding_unbiased_and_reproducible():
    x = torch.full((1, 64), 0.3)
    x[0, 0] = 127.0  # scale 1: every other entry sits 0.3 of a step above zero
    codec = sf.int8_blockwise(64)
    decs = torch.stack([codec.decode(codec.encode(x, seed)) for seed in range(400)])
    assert set(decs[:, 0, 1:].unique().tolist()) == {0.0, 1.0}
    assert float(decs[:, 0, 1:].mean()) == pytest.approx(0.3, abs=0.02)
    a, b = codec.encode(x, 7), codec.encode(x, 7)
    assert torch.equal(a.data, b.data)
    assert not torch.equal(codec.encode(x, 8).data, a.data)
    # nearest rounding would always give 0 here
    assert torch.equal(sf.int8_blockwise(64, stochastic=False).decode(sf.int8_blockwise(64, stochastic=False).encode(x))[0, 1:],
                       torch.zeros(63))


@pytest.mark.parametrize("codec", [sf.int8_blockwise(64), sf.int8_blockwise(48, square_root=True), sf.bf16_codec()])
def test_state_tensors_are_encoded_and_decoded_a_slice_at_a_time_with_the_same_bits(codec, monkeypatch):
    """``encode_tensor`` / ``decode_tensor`` work on a large tensor a slice of whole blocks at a
    time (bounding the rounding's temporaries): the codes, scales and decoded values are those
    of the whole tensor at once, also with a last slice shorter than the others."""
    import scao_fx.transforms.quantization as quantization

    x = torch.randn(50, 97, generator=torch.Generator().manual_seed(5)).abs()
    whole = quantization.encode_tensor(codec, x, 7)
    monkeypatch.setattr(quantization, "CODEC_SLICE", 1000)
    sliced = quantization.encode_tensor(codec, x, 7)
    assert torch.equal(sliced.data, whole.data) and torch.equal(sliced.scale, whole.scale)
    assert sliced.data.shape == x.shape
    decoded = quantization.decode_tensor(codec, sliced)
    monkeypatch.setattr(quantization, "CODEC_SLICE", 1 << 22)
    assert torch.equal(decoded, quantization.decode_tensor(codec, whole))


@pytest.mark.parametrize("codec", [sf.int8_blockwise(64), sf.int8_blockwise(64, square_root=True), sf.bf16_codec()])
@pytest.mark.parametrize("seed", [0, 11, torch.tensor(12)])
def test_encode_index_offset_rounds_a_shard_as_the_whole_tensor(codec, seed):
    """A shard encoded on its own with ``index_offset`` = its first flat index gets the whole
    tensor's stochastic-rounding bits: where the shard starts on a block boundary, its codes
    and scales are the whole tensor's."""
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(3)).abs()
    whole = codec.encode(x, seed)
    part = codec.encode(x[2:5], seed, index_offset=2 * 128)
    assert torch.equal(part.data, whole.data[2:5])
    if codec.kind == "int8":
        assert torch.equal(part.scale, whole.scale[2:5])
        assert not torch.equal(codec.encode(x[2:5], seed).data, part.data)  # the offset matters
    with pytest.raises(ValueError, match="index_offset must be a non-negative int"):
        codec.encode(x, seed, index_offset=-1)


def test_int8_ema_does_not_freeze_on_tiny_increments():
    """rho = 0.999 moves an entry by far less than a step per update: stochastic rounding keeps it moving."""
    codec = sf.int8_blockwise(64)
    x = torch.zeros(1, 64)
    x[0, 0] = 127.0
    enc = codec.encode(x)
    target = x.clone()
    target[0, 1:] = 20.0
    ref = x.clone()
    for t in range(1, 301):
        enc = codec.ema(enc, target, 0.999, seed=t)
        ref = 0.999 * ref + 0.001 * target
    got = codec.decode(enc)[0, 1:]
    # the true EMA moved to 20 * (1 - 0.999^300) = 5.2 steps; nearest rounding would stay at 0
    assert float(got.mean()) == pytest.approx(float(ref[0, 1:].mean()), rel=0.1)
    frozen = sf.int8_blockwise(64, stochastic=False)
    enc_n = frozen.encode(x)
    for _ in range(1, 301):
        enc_n = frozen.ema(enc_n, target, 0.999)
    assert float(frozen.decode(enc_n)[0, 1:].abs().max()) == 0.0


def test_codec_ema_matches_decode_lerp_encode():
    torch.manual_seed(1)
    x, u = torch.randn(2, 200), torch.randn(2, 200)
    for codec in (sf.fp32_codec(), sf.int8_blockwise(64, stochastic=False)):
        got = codec.decode(codec.ema(codec.encode(x), u, 0.9))
        ref = codec.decode(codec.encode(0.9 * codec.decode(codec.encode(x)) + 0.1 * u))
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # bf16 nearest lerps in bf16 (u is rounded to bf16 first): the result's rounding plus u's.
    codec = sf.bf16_codec(stochastic=False)
    got = codec.decode(codec.ema(codec.encode(x), u, 0.9))
    exact = 0.9 * codec.decode(codec.encode(x)) + 0.1 * u
    assert torch.all((got - exact).abs() <= 2.0**-8 * (exact.abs() + 0.1 * u.abs()) * 1.01)
    # bf16 stochastic lerps in float32 and rounds once, to one of the two bf16 neighbours.
    codec = sf.bf16_codec()
    start = codec.encode(x)
    got = codec.decode(codec.ema(start, u, 0.9, seed=7))
    exact = 0.9 * codec.decode(start) + 0.1 * u
    assert torch.all((got - exact).abs() <= 2.0**-7 * exact.abs())


def test_bf16_ema_does_not_freeze():
    """Stochastic rounding keeps increments far below a bf16 step (nearest rounding freezes)."""
    frozen = sf.bf16_codec(stochastic=False)
    enc = frozen.encode(torch.ones(1, 64))
    for t in range(1, 301):
        enc = frozen.ema(enc, torch.full((1, 64), 1.5), 0.999, seed=t)
    assert float(frozen.decode(enc).mean()) == 1.0  # every increment (5e-4) is below half a step
    codec = sf.bf16_codec()
    enc = codec.encode(torch.ones(1, 64))
    for t in range(1, 301):
        enc = codec.ema(enc, torch.full((1, 64), 1.5), 0.999, seed=t)
    exact = 1.0 + 0.5 * (1 - 0.999**300)  # 1.13
    assert float(codec.decode(enc).mean()) == pytest.approx(exact, rel=0.02)


def test_zeros_and_bad_codec_arguments():
    z = sf.int8_blockwise(64).zeros((3, 100))
    assert z.data.dtype == torch.int8 and z.scale.shape == (3, 2)
    assert torch.equal(sf.int8_blockwise(64).decode(z), torch.zeros(3, 100))
    with pytest.raises(ValueError, match="block_size"):
        sf.int8_blockwise(4)
    with pytest.raises(TypeError, match="block_size"):
        sf.int8_blockwise(64.0)
    with pytest.raises(TypeError, match="stochastic"):
        sf.int8_blockwise(64, stochastic=1)


# --------------------------------------------------------------------------- quantize_state


def _lsq_run(tx, steps=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 64, generator=g)
    w_true = torch.randn(64, 64, generator=g) * torch.logspace(0, -2, 64)
    y = x @ w_true
    params = {"w": torch.zeros(64, 64), "b": torch.zeros(64)}
    state = tx.init(params)

    def loss(p):
        return ((x @ p["w"] + p["b"] - y) ** 2).mean()

    states = []
    for _ in range(steps):
        grads = torch.func.grad(loss)(params)
        updates, state = tx.update(grads, state, params=params)
        params = sf.apply_updates(params, updates)
        states.append(state)
    return float(loss(params)), params, states


def test_quantize_state_structure_and_dtypes_stable():
    tx = sf.chain(sf.quantize_state(sf.scale_by_adam(), sf.int8_blockwise(64)), sf.scale_by_learning_rate(1e-3))
    _, _, states = _lsq_run(tx, steps=5)
    inner = states[0][0].inner_state
    # the 64x64 moments (4096 entries >= min_size) are int8 codes; the bias moments stay float32
    assert isinstance(inner.mu["w"], sf.EncodedTensor) and inner.mu["w"].data.dtype == torch.int8
    assert isinstance(inner.nu["w"], sf.EncodedTensor) and inner.mu["w"].data.shape == (64, 64)
    assert inner.mu["w"].scale.shape == (64,)  # 4096 / 64 blocks over the flattened tensor
    assert inner.mu["b"].dtype == torch.float32
    sig = [(t.dtype, t.shape) for t in tensor_leaves(states[0])]
    for s in states[1:]:
        assert [(t.dtype, t.shape) for t in tensor_leaves(s)] == sig
    assert [int(s[0].count) for s in states] == [1, 2, 3, 4, 5]  # quantize_state's own counter


def test_quantize_state_fp32_codec_is_transparent():
    base = sf.chain(sf.scale_by_adam(), sf.scale_by_learning_rate(1e-2))
    wrapped = sf.chain(sf.quantize_state(sf.scale_by_adam(), sf.fp32_codec()), sf.scale_by_learning_rate(1e-2))
    l0, p0, _ = _lsq_run(base, steps=20)
    l1, p1, _ = _lsq_run(wrapped, steps=20)
    assert torch.equal(p0["w"], p1["w"]) and torch.equal(p0["b"], p1["b"])


def test_quantize_state_bf16_adam_close_to_fp32():
    lr = 1e-2
    l32, p32, _ = _lsq_run(sf.chain(sf.scale_by_adam(), sf.scale_by_learning_rate(lr)))
    l16, p16, _ = _lsq_run(sf.chain(sf.quantize_state(sf.scale_by_adam(), sf.bf16_codec()), sf.scale_by_learning_rate(lr)))
    assert l16 < 1.05 * l32  # measured: 0.638 vs 0.639
    assert float((p16["w"] - p32["w"]).norm() / p32["w"].norm()) < 0.02  # measured 0.0023


def test_quantize_state_int8_adam_close_to_fp32():
    """8-bit Adam: int8 first moment, square-root int8 second moment (int8_adam_codecs)."""
    for lr, loss_ratio, param_err in ((1e-2, 1.05, 0.1), (1e-3, 1.05, 0.15)):
        l32, p32, _ = _lsq_run(sf.chain(sf.scale_by_adam(), sf.scale_by_learning_rate(lr)))
        l8, p8, states = _lsq_run(
            sf.chain(sf.quantize_state(sf.scale_by_adam(), sf.int8_adam_codecs()), sf.scale_by_learning_rate(lr))
        )
        # measured: 0.644 vs 0.639 (lr 1e-2, parameter error 0.053); 5.109 vs 5.108 (1e-3, 0.090)
        assert l8 < loss_ratio * l32, (lr, l8, l32)
        assert float((p8["w"] - p32["w"]).norm() / p32["w"].norm()) < param_err
        inner = states[-1][0].inner_state
        assert inner.mu["w"].data.dtype == torch.int8 and inner.nu["w"].data.dtype == torch.int8


def test_linear_int8_second_moment_diverges():
    """Why int8_adam_codecs exists: plain linear int8 rounds small v to 0 while m is not, and m/eps explodes."""
    lr = 1e-2
    l32, _, _ = _lsq_run(sf.chain(sf.scale_by_adam(), sf.scale_by_learning_rate(lr)))
    l8, _, _ = _lsq_run(sf.chain(sf.quantize_state(sf.scale_by_adam(), sf.int8_blockwise()), sf.scale_by_learning_rate(lr)))
    assert l8 > 10 * l32  # measured: 1.1e5 vs 0.64


def test_square_root_codec_never_decodes_zero_and_round_trips():
    codec = sf.int8_blockwise(64, square_root=True)
    x = torch.cat([torch.zeros(10), torch.logspace(-8, 0, 118)])
    enc = codec.encode(x)
    y = codec.decode(enc)
    assert bool((y > 0).all())  # a zero code decodes to half a step (squared), never 0
    big = x > 0.1  # >= 40 codes below the block maximum of sqrt(1) = 127 codes: <= 2 x 1/40 relative
    assert float(((y[big] - x[big]) / x[big]).abs().max()) < 0.06
    with pytest.raises(ValueError, match="square_root"):
        codec.ema(enc, x, 0.9)
    with pytest.raises(TypeError, match="square_root"):
        sf.int8_blockwise(64, square_root=1)


def test_quantize_state_codec_prefix_tree():
    params = {"w": torch.zeros(64, 64)}
    tx = sf.quantize_state(sf.scale_by_adam(), sf.ScaleByAdamState(mu=sf.int8_blockwise(), nu=None, count=None))
    st = tx.init(params)
    assert isinstance(st.inner_state.mu["w"], sf.EncodedTensor)
    assert st.inner_state.nu["w"].dtype == torch.float32  # None: kept as it is
    bad = sf.quantize_state(sf.scale_by_adam(), {"mu": sf.int8_blockwise()})
    with pytest.raises(ValueError, match="prefix"):
        bad.init(params)


def test_quantize_state_min_size_and_arguments():
    tx = sf.quantize_state(sf.scale_by_adam(), sf.int8_blockwise(), min_size=10)
    state = tx.init({"a": torch.zeros(3, 4), "b": torch.zeros(9)})
    assert isinstance(state.inner_state.mu["a"], sf.EncodedTensor)
    assert isinstance(state.inner_state.mu["b"], torch.Tensor) and state.inner_state.mu["b"].dtype == torch.float32
    with pytest.raises(TypeError, match="codec"):
        sf.quantize_state(sf.scale_by_adam(), "int8")
    with pytest.raises(TypeError, match="inner"):
        sf.quantize_state(lambda g: g, sf.int8_blockwise())
    with pytest.raises(ValueError, match="min_size"):
        sf.quantize_state(sf.scale_by_adam(), sf.int8_blockwise(), min_size=0)


@pytest.mark.parametrize("codecs", ["bf16", "int8"])
def test_leafwise_quantize_state_gives_the_same_bits_a_chunk_at_a_time(codecs, monkeypatch):
    """``leafwise=True`` runs Adam a chunk of leaves at a time (here: chunks of 5000 entries,
    so several leaves, one leaf alone and a leaf larger than a chunk), decoding only that
    chunk's moments: the same updates and state, bit for bit, as one call over the tree, with
    leaves missing from some steps, in place or not."""
    import scao_fx.transforms.quantization as quantization

    monkeypatch.setattr(quantization, "DECODE_CHUNK", 5000)
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (64, 40), "b": (40, 64), "c": (9000,), "d": (48, 64), "e": (30,)}
    params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    grads = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(4)]
    grads[2]["b"] = None  # a leaf without a gradient on one step
    make = sf.bf16_adam_codecs if codecs == "bf16" else sf.int8_adam_codecs
    for inplace in (True, False):
        runs = []
        for leafwise in (False, True):
            tx = sf.quantize_state(sf.scale_by_adam(0.9, 0.95), make(), leafwise=leafwise)
            state, outs = tx.init(params), []
            for g in grads:
                u, state = tx.update(dict(g), state, inplace=inplace)
                outs.append(u)
            runs.append((outs, state))
        (o1, s1), (o2, s2) = runs
        for x, y in zip(o1, o2):
            assert all((x[k] is None and y[k] is None) or torch.equal(x[k], y[k]) for k in shapes)
        t1, t2 = tensor_leaves(s1), tensor_leaves(s2)
        assert len(t1) == len(t2) and all(torch.equal(a, b) for a, b in zip(t1, t2))
        assert isinstance(s2.inner_state.mu["c"], sf.EncodedTensor) and int(s2.inner_state.count["b"]) == 3


def test_leafwise_quantize_state_decodes_a_chunk_at_a_time(monkeypatch):
    """The step's rise with bfloat16 Adam moments: leafwise, Adam's directions (4 bytes per
    parameter) and one chunk's float32 moments and rounding temporaries (a quarter of the tree
    here); otherwise the whole tree's moments and a second copy of the codes."""
    from treeutil import update_memory_rise

    import scao_fx.transforms.quantization as quantization

    monkeypatch.setattr(quantization, "DECODE_CHUNK", 4 * 4096)
    gen = torch.Generator().manual_seed(0)
    params = {f"w{i}": torch.randn(128, 128, generator=gen) for i in range(4)}
    grads = [{k: torch.randn(128, 128, generator=gen) for k in params} for _ in range(3)]
    whole = update_memory_rise(sf.quantize_state(sf.scale_by_adam(), sf.bf16_adam_codecs()), params, grads)
    chunked = update_memory_rise(sf.quantize_state(sf.scale_by_adam(), sf.bf16_adam_codecs(), leafwise=True),
                                 params, grads)
    assert chunked < 10 < 15 < whole, (chunked, whole)  # measured 9.0 and 17.5


def test_leafwise_quantize_state_needs_a_state_shaped_like_the_updates():
    params = {"w": torch.zeros(64, 64)}
    with pytest.raises(TypeError, match="leafwise"):
        sf.quantize_state(sf.scale_by_adam(), sf.bf16_codec(), leafwise="yes")
    odd = sf.quantize_state(sf.scale_by_adam(), sf.ScaleByAdamState(mu=sf.bf16_codec(), nu=None, count=None),
                            leafwise=True)
    state = odd.init(params)
    state = state._replace(inner_state=state.inner_state._replace(mu={"w": state.inner_state.mu["w"], "x": None}))
    with pytest.raises(ValueError, match="shaped like the updates"):
        odd.update({"w": torch.ones(64, 64)}, state)


def test_bf16_stochastic_rounding_is_unbiased_and_deterministic():
    x = torch.full((1, 4096), 1.001)  # between the bf16 neighbours 1.0 and 1.0078125
    a = sf.bf16_codec().encode(x, seed=3).data
    assert torch.equal(a, sf.bf16_codec().encode(x, seed=3).data)  # same seed, same bits
    assert not torch.equal(a, sf.bf16_codec().encode(x, seed=4).data)
    mean = float(a.float().mean())
    assert mean == pytest.approx(1.001, abs=2e-4)  # nearest rounding would give exactly 1.0
    assert float(sf.bf16_codec(stochastic=False).encode(x).data.float().mean()) == 1.0
    nan = sf.bf16_codec().encode(torch.tensor([[float("nan"), 1.0]])).data
    assert torch.isnan(nan[0, 0]) and float(nan[0, 1]) == 1.0
