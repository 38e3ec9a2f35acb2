"""scale and scale_by_learning_rate (float, 0-d tensor, schedule)."""

from __future__ import annotations

import pytest
import torch
from treeutil import assert_tree_close, clone, versions

import scao_fx as sf


def g():
    return {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1.0, -2.0]), "skip": None}


@pytest.mark.parametrize("inplace", [True, False])
def test_scale(inplace):
    tx = sf.scale(-2.5)
    u, s = tx.update(g(), tx.init(g()), inplace=inplace)
    assert isinstance(s, sf.EmptyState)
    assert u["skip"] is None
    torch.testing.assert_close(u["w"], -2.5 * g()["w"])


@pytest.mark.parametrize("inplace", [True, False])
def test_learning_rate_float_negates(inplace):
    tx = sf.scale_by_learning_rate(0.1)
    u, _ = tx.update(g(), tx.init(g()), inplace=inplace)
    torch.testing.assert_close(u["b"], torch.tensor([-0.1, 0.2]))
    assert u["skip"] is None


def test_learning_rate_tensor_is_read_at_every_step():
    lr = torch.tensor(0.5)
    tx = sf.scale_by_learning_rate(lr)
    state = tx.init(g())
    u1, state = tx.update(g(), state)
    lr.fill_(0.25)  # e.g. a manual LR drop between steps
    u2, state = tx.update(g(), state)
    torch.testing.assert_close(u1["b"], torch.tensor([-0.5, 1.0]))
    torch.testing.assert_close(u2["b"], torch.tensor([-0.25, 0.5]))


def test_learning_rate_schedule_sees_counts_from_zero():
    seen = []

    def schedule(count):
        seen.append(int(count))
        return 0.1 * (count + 1)

    tx = sf.scale_by_learning_rate(schedule)
    state = tx.init(g())
    assert isinstance(state, sf.ScaleByScheduleState) and int(state.count) == 0
    for step in range(3):
        u, state = tx.update(g(), state)
        torch.testing.assert_close(u["b"], -0.1 * (step + 1) * torch.tensor([1.0, -2.0]))
    assert seen == [0, 1, 2]
    assert int(state.count) == 3 and state.count.dtype == torch.int64


def test_schedule_dtype_follows_updates():
    tx = sf.scale_by_learning_rate(sf.schedules.constant(0.5))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        u, _ = tx.update([torch.ones(2, dtype=dtype)], tx.init([torch.ones(2)]))
        assert u[0].dtype == dtype
        torch.testing.assert_close(u[0], torch.full((2,), -0.5, dtype=dtype))


def test_inplace_false_does_not_mutate_and_inplace_true_reuses():
    tx = sf.scale_by_learning_rate(sf.schedules.linear_warmup(1.0, 4))
    updates = g()
    state = tx.init(updates)
    saved, vers = clone((updates, state)), versions((updates, state))
    u, new_state = tx.update(updates, state, inplace=False)
    assert versions((updates, state)) == vers
    assert_tree_close((updates, state), saved)
    assert u["w"].data_ptr() != updates["w"].data_ptr()
    u, _ = tx.update(updates, new_state, inplace=True)
    assert u["w"].data_ptr() == updates["w"].data_ptr()
    torch.testing.assert_close(u["w"], -0.25 * saved[0]["w"])
