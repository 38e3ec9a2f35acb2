"""scao_fx.bench.metrics: state bytes, time-to-target, paired differences, memory."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from scao_fx.bench.metrics import (
    PeakMemory,
    optimizer_state_bytes,
    paired_differences,
    peak_rss_bytes,
    rss_bytes,
    summarize_times,
    tensor_bytes,
    time_to_target,
)


class _State(NamedTuple):
    mu: torch.Tensor
    codes: torch.Tensor
    count: torch.Tensor


def test_tensor_bytes_known_state():
    state = _State(torch.zeros(10), torch.zeros(4, 4, dtype=torch.int8), torch.zeros((), dtype=torch.int64))
    assert tensor_bytes(state) == 40 + 16 + 8
    # nested containers, shared storage and views counted once, non-tensors ignored
    t = torch.zeros(100)
    assert tensor_bytes({"a": [t, t[:10]], "b": (t, "x", 3, None)}) == 400
    assert tensor_bytes({"a": t, "b": torch.zeros(100, dtype=torch.float64)}) == 400 + 800


def test_optimizer_state_bytes_torch_adamw():
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3, foreach=True)
    assert optimizer_state_bytes(opt) == 0  # lazily created
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    n = sum(p.numel() for p in lin.parameters())
    steps = sum(st["step"].untyped_storage().nbytes() for st in opt.state.values())
    assert optimizer_state_bytes(opt) == 8 * n + steps
    assert steps <= 16


def test_optimizer_state_bytes_torchopt():
    torchopt = pytest.importorskip("torchopt")
    lin = torch.nn.Linear(5, 2)
    opt = torchopt.Optimizer(lin.parameters(), torchopt.adamw(1e-3))
    lin(torch.randn(2, 5)).sum().backward()
    opt.step()
    n = sum(p.numel() for p in lin.parameters())
    b = optimizer_state_bytes(opt)
    assert 8 * n <= b <= 8 * n + 64


def test_state_referencing_parameters_does_not_count_them():
    class Holder:
        def __init__(self, p):
            self.param_groups = [{"params": [p]}]
            self.state = {"ref": p, "buf": torch.zeros(3)}

    assert optimizer_state_bytes(Holder(torch.nn.Parameter(torch.zeros(1000)))) == 12


def test_time_to_target_interpolates():
    steps = [0, 10, 20, 30]
    vals = [4.0, 3.0, 2.0, 1.0]
    secs = [0.0, 1.0, 3.0, 6.0]
    step, sec = time_to_target(steps, vals, 2.5, secs)
    assert step == pytest.approx(15.0) and sec == pytest.approx(2.0)
    assert time_to_target(steps, vals, 2.0, secs) == (pytest.approx(20.0), pytest.approx(3.0))
    assert time_to_target(steps, vals, 1.0) == (pytest.approx(30.0), None)


def test_time_to_target_never_reached_and_edge_cases():
    assert time_to_target([0, 10, 20], [4.0, 3.0, 2.5], 2.0, [0, 1, 2]) == (None, None)
    # reached at the very first point
    assert time_to_target([0, 10], [1.0, 0.5], 2.0, [0.0, 1.0]) == (0.0, 0.0)
    # non-finite values never count; a crossing after a NaN is taken at that point
    assert time_to_target([0, 10, 20], [3.0, math.nan, 1.0], 2.0) == (20.0, None)
    assert time_to_target([0, 10], [3.0, math.inf], 2.0) == (None, None)
    # first crossing, not the best point; non-monotone curves
    assert time_to_target([0, 10, 20, 30], [3.0, 1.0, 2.5, 0.5], 2.0)[0] == pytest.approx(5.0)
    # tolerance: equal-up-to-rounding counts
    assert time_to_target([0, 10], [3.0, 2.00001], 2.0) == (None, None)
    assert time_to_target([0, 10], [3.0, 2.00001], 2.0, tol=1e-4)[0] == pytest.approx(10.0, abs=1e-2)
    with pytest.raises(ValueError):
        time_to_target([0, 1], [1.0], 0.5)
    with pytest.raises(ValueError):
        time_to_target([0], [1.0], 0.5, tol=-1.0)


def test_paired_differences():
    mean, std, n = paired_differences([2.0, 2.2, 2.1], [2.1, 2.1, 2.3])
    assert n == 3
    assert mean == pytest.approx((-0.1 + 0.1 - 0.2) / 3)
    assert std == pytest.approx(torch.tensor([-0.1, 0.1, -0.2]).std().item(), rel=1e-6)
    assert paired_differences([1.0], [0.5]) == (0.5, 0.0, 1)
    mean, std, n = paired_differences([None, math.nan], [1.0, 1.0])
    assert n == 0 and math.isnan(mean)


def test_summarize_times():
    s = summarize_times([1.0, 2.0, 6.0])
    assert s == {"mean": 3.0, "median": 2.0, "total": 9.0, "n": 3}
    assert summarize_times([])["n"] == 0


def test_rss_and_peak_memory():
    rss = rss_bytes()
    if rss is None:
        pytest.skip("no /proc/self/status here")
    assert rss > 10 * 2**20
    assert peak_rss_bytes() >= rss
    mem = PeakMemory("cpu")
    mem.start()
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    mem.sample()
    del big
    peak = mem.stop()
    assert mem.kind == "rss"
    assert peak - mem.baseline >= 60 * 2**20
