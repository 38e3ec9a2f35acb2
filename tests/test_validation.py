"""Bad arguments raise errors that name the argument."""

from __future__ import annotations

import pytest
import torch

import scao_fx as sf
from scao_fx._validation import check_betas, check_choice, check_float, check_int, check_scalar_or_schedule

PARAMS = {"w": torch.ones(2, 2), "b": torch.ones(2)}


@pytest.mark.parametrize("alias", [sf.adam, sf.adamw])
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1e-3), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(betas=(-0.1, 0.999)), r"betas\[0\]"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
        (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
        (dict(betas=(0.9, 1.5)), r"betas\[1\]"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(eps_root=-1.0), "eps_root"),
        (dict(lr=torch.ones(2)), "lr"),
    ],
)
def test_alias_bad_values(alias, kwargs, name):
    with pytest.raises(ValueError, match=name):
        alias(**kwargs)


@pytest.mark.parametrize("alias", [sf.adam, sf.adamw])
def test_alias_bad_types(alias):
    with pytest.raises(TypeError, match="betas"):
        alias(betas=0.9)
    with pytest.raises(TypeError, match="eps"):
        alias(eps="1e-8")
    with pytest.raises(TypeError, match="lr"):
        alias(lr=torch.tensor(1))  # integer tensor


@pytest.mark.parametrize(
    "mask",
    [
        {"w": True},  # a leaf missing
        {"w": True, "b": False, "extra": True},  # a leaf too many
        [True, False],  # wrong container
        lambda p: {"w": True},  # a callable returning the wrong shape
    ],
)
def test_mask_tree_of_wrong_shape(mask):
    tx = sf.adamw(1e-3, weight_decay=0.1, mask=mask)
    with pytest.raises(ValueError, match="mask"):
        tx.init(PARAMS)
    with pytest.raises(ValueError, match="mask"):
        sf.add_decayed_weights(0.1, mask=mask).init(PARAMS)


def test_boundary_values_are_accepted():
    for tx in (sf.adam(lr=0.0, betas=(0.0, 0.0), eps=0.0), sf.adamw(betas=(0.999999, 0.999999), weight_decay=0.0)):
        tx.init(PARAMS)


@pytest.mark.parametrize(
    "build, name, exc",
    [
        (lambda: sf.scale_by_adam(b1=1.0), "b1", ValueError),
        (lambda: sf.scale_by_adam(b2=-0.5), "b2", ValueError),
        (lambda: sf.scale_by_adam(eps=-1.0), "eps", ValueError),
        (lambda: sf.scale_by_adam(eps_root=-1.0), "eps_root", ValueError),
        (lambda: sf.scale_by_learning_rate(-0.1), "lr", ValueError),
        (lambda: sf.scale_by_learning_rate("0.1"), "lr", TypeError),
        (lambda: sf.scale(float("nan")), "step_size", ValueError),
        (lambda: sf.add_decayed_weights(-1.0), "weight_decay", ValueError),
        (lambda: sf.clip_by_global_norm(-1.0), "max_norm", ValueError),
        (lambda: sf.masked(sf.identity(), None), "mask", TypeError),
        (lambda: sf.masked("adam", {"w": True}), "inner", TypeError),
    ],
)
def test_transform_bad_arguments(build, name, exc):
    with pytest.raises(exc, match=name):
        build()


def test_checkers():
    assert check_float("x", 1, low=0.0) == 1.0
    with pytest.raises(ValueError, match=r"x must be in \(0.0, 1.0\)"):
        check_float("x", 0.0, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    with pytest.raises(TypeError, match="x must be a real number"):
        check_float("x", True)
    assert check_float("x", None, allow_none=True) is None
    assert check_int("k", 3, low=1) == 3
    with pytest.raises(ValueError, match="k must be an integer in"):
        check_int("k", 0, low=1)
    with pytest.raises(TypeError, match="k must be an integer"):
        check_int("k", 1.5)
    assert check_choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match="mode"):
        check_choice("mode", "c", ("a", "b"))
    assert check_betas("betas", [0.5, 0.5]) == (0.5, 0.5)
    sched = lambda t: t  # noqa: E731
    assert check_scalar_or_schedule("lr", sched) is sched
    with pytest.raises(ValueError, match="0-d"):
        check_scalar_or_schedule("lr", torch.ones(1))
