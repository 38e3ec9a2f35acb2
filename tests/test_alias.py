"""The aliases' defaults: one table (``SCAO_DEFAULTS``) and the signatures that read it."""

from __future__ import annotations

import inspect

import pytest
import torch

import scao_fx as sf
import scao_fx.presets as presets
from scao_fx.alias import SCAO_ADAM_KEYS, SCAO_DEFAULTS, SCAO_FORM_KEYS, SCAO_GUARD_KEYS, SCAO_PRECONDITION_KEYS
from scao_fx.diagnostics import scao_diagnostics


def named_parameters(fn) -> dict[str, inspect.Parameter]:
    """The parameters of ``fn`` that have a name (no ``*args`` / ``**kwargs``)."""
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {n: p for n, p in inspect.signature(fn).parameters.items() if p.kind not in kinds}


def assert_table_default(name: str, param: inspect.Parameter) -> None:
    want = SCAO_DEFAULTS[name]
    assert param.default is not inspect.Parameter.empty, name
    assert param.default == want and isinstance(param.default, type(want)), (name, param.default, want)
    assert repr(param.default) == repr(want), name  # what inspect.signature and the docs show


def test_the_table_is_split_into_its_three_parts_and_is_read_only():
    parts = (SCAO_ADAM_KEYS, SCAO_PRECONDITION_KEYS, SCAO_GUARD_KEYS, SCAO_FORM_KEYS)
    assert sum(len(p) for p in parts) == len(SCAO_DEFAULTS)
    assert set().union(*parts) == set(SCAO_DEFAULTS)
    with pytest.raises(TypeError):
        SCAO_DEFAULTS["rho"] = 0.5  # type: ignore[index]


def test_scao_precondition_signature_is_the_table():
    params = named_parameters(sf.scao_precondition)
    # an alias of epsilon_sparse; not a hyperparameter; the only form this preconditioner is
    not_hyper = {"rank_eps", "process_group", "form"}
    assert set(params) - not_hyper == set(SCAO_PRECONDITION_KEYS)
    assert params["form"].default == "seed"
    for name in SCAO_PRECONDITION_KEYS:
        assert_table_default(name, params[name])
    assert params["rank_eps"].default is None and params["process_group"].default is None


def test_scao_signature_is_the_table():
    params = named_parameters(sf.scao)
    adamw_options = {"mask", "moment_dtype"}  # options of sf.adamw, with its defaults
    assert set(params) - adamw_options == set(SCAO_ADAM_KEYS + SCAO_GUARD_KEYS)
    for name in SCAO_ADAM_KEYS + SCAO_GUARD_KEYS:
        assert_table_default(name, params[name])
    adamw = named_parameters(sf.adamw)
    for name in adamw_options:
        assert params[name].default is adamw[name].default


def test_scao_facade_signature_and_defaults_are_the_table():
    params = named_parameters(sf.SCAO.__init__)
    facade_only = {"self", "params", "preconditioner_enabled", "factor_mode", "process_group"}
    positional = set(params) - facade_only
    assert positional <= set(SCAO_DEFAULTS)
    for name in positional:
        assert_table_default(name, params[name])
    # the other keys are keyword arguments (**compat) whose defaults fill the param groups
    opt = sf.SCAO([torch.nn.Parameter(torch.zeros(3, 2))])
    for name, value in SCAO_DEFAULTS.items():
        assert opt.defaults[name] == value and type(opt.defaults[name]) is type(value), name
        assert opt.param_groups[0][name] == value, name
    assert set(opt.defaults) == set(SCAO_DEFAULTS) | {"preconditioner_enabled", "factor_mode"}


def test_diagnostics_defaults_are_the_table():
    params = named_parameters(scao_diagnostics)
    for name in ("warmup_steps", "blend_steps", "min_precond_updates", "blend_shape", "rho", "stat_freq"):
        assert_table_default(name, params[name])


def test_rank_eps_is_epsilon_sparse(monkeypatch):
    seen = []
    real = presets.spectral_mass_rank

    def spy(epsilon, *args, **kwargs):
        seen.append(epsilon)
        return real(epsilon, *args, **kwargs)

    monkeypatch.setattr(presets, "spectral_mass_rank", spy)
    sf.scao_precondition(k_max=128)  # (epsilon_sparse=0 with k_max=None is full_rank(): no spy call)
    sf.scao_precondition(rank_eps=0.2)
    sf.scao_precondition(epsilon_sparse=0.3)
    sf.scao_precondition(0.999, 20, 100, 50, 10, 0.25)  # positionally
    sf.scao_precondition(epsilon_sparse=0.2, rank_eps=0.2)  # the same value twice is fine
    assert seen == [SCAO_DEFAULTS["epsilon_sparse"], 0.2, 0.3, 0.25, 0.2]
    assert type(seen[0]) is float  # the default reaches the rank rule as a plain float
    # conflicting values are an error, also when epsilon_sparse is passed at its default value
    for given in (0.1, SCAO_DEFAULTS["epsilon_sparse"]):
        with pytest.raises(ValueError, match="give either epsilon_sparse or rank_eps, not both"):
            sf.scao_precondition(epsilon_sparse=given, rank_eps=0.2)
