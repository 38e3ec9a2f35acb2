"""Learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import scao_fx as sf
from scao_fx import schedules


def test_constant():
    s = schedules.constant(3e-4)
    for t in (0, 7, torch.tensor(100)):
        out = s(t)
        assert out.dtype == torch.float64 and out.ndim == 0
        assert out.item() == 3e-4


def test_linear_warmup():
    s = schedules.linear_warmup(2.0, 10, init=0.5)
    assert s(0).item() == 0.5
    assert math.isclose(s(5).item(), 1.25)
    assert s(10).item() == 2.0 and s(1000).item() == 2.0
    assert schedules.linear_warmup(1.0, 0)(0).item() == 1.0


def test_cosine_decay():
    s = schedules.cosine_decay(1.0, 100, alpha=0.1)
    assert math.isclose(s(0).item(), 1.0)
    assert math.isclose(s(50).item(), 0.55)
    assert math.isclose(s(100).item(), 0.1)
    assert math.isclose(s(500).item(), 0.1)  # constant after decay_steps


def test_warmup_cosine_decay_shape():
    s = schedules.warmup_cosine_decay(1.0, 10, 110, init=0.0, end=0.01)
    assert s(0).item() == 0.0
    assert math.isclose(s(5).item(), 0.5)
    assert s(10).item() == 1.0
    assert math.isclose(s(60).item(), 0.01 + 0.99 * 0.5)
    assert math.isclose(s(110).item(), 0.01) and math.isclose(s(10_000).item(), 0.01)
    no_warmup = schedules.warmup_cosine_decay(1.0, 0, 10)
    assert no_warmup(0).item() == 1.0


@settings(max_examples=60, deadline=None)
@given(
    peak=st.floats(1e-6, 1.0),
    warmup=st.integers(0, 50),
    extra=st.integers(1, 200),
    t=st.integers(0, 400),
)
def test_warmup_cosine_decay_matches_formula(peak, warmup, extra, t):
    total, init, end = warmup + extra, peak / 10, peak / 100
    s = schedules.warmup_cosine_decay(peak, warmup, total, init=init, end=end)
    if t < warmup:
        expected = init + (peak - init) * t / warmup
    else:
        k = min(t - warmup, extra)
        expected = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * k / extra))
    assert math.isclose(s(t).item(), expected, rel_tol=1e-12, abs_tol=1e-18)
    assert s(torch.tensor(t)).item() == s(t).item()  # int and tensor counts agree


def test_schedules_vectorise_over_counts():
    s = schedules.warmup_cosine_decay(1.0, 3, 10)
    counts = torch.arange(12)
    batched = torch.func.vmap(s)(counts)
    assert torch.equal(batched, torch.stack([s(int(c)) for c in counts]))


# Schedules under torch.compile(fullgraph=True) are covered by the "adamw-schedule" entry of the
# conformance battery (one compile per alias keeps the suite fast).


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: schedules.constant(-1.0), "value"),
        (lambda: schedules.linear_warmup(-1.0, 5), "peak"),
        (lambda: schedules.linear_warmup(1.0, -5), "warmup_steps"),
        (lambda: schedules.cosine_decay(1.0, 0), "decay_steps"),
        (lambda: schedules.cosine_decay(1.0, 10, alpha=1.5), "alpha"),
        (lambda: schedules.warmup_cosine_decay(1.0, 10, 10), "decay_steps"),
        (lambda: schedules.warmup_cosine_decay(1.0, 10, 20, end=-1.0), "end"),
    ],
)
def test_bad_schedule_arguments(build, name):
    with pytest.raises(ValueError, match=name):
        build()


def test_schedule_exported():
    assert sf.schedules is schedules
