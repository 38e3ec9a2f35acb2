"""The ``Example:`` blocks of the public docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "scao_fx.alias",
    "scao_fx.memory",
    "scao_fx.schedules",
    "scao_fx.update",
    "scao_fx.diagnostics",
    "scao_fx.distributed",
    "scao_fx.transforms.adam",
    "scao_fx.transforms.blend",
    "scao_fx.transforms.clipping",
    "scao_fx.transforms.combinators",
    "scao_fx.transforms.curvature",
    "scao_fx.transforms.kronecker",
    "scao_fx.transforms.quantization",
    "scao_fx.transforms.rank",
    "scao_fx.transforms.scale",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
