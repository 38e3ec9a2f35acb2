"""The ``Example:`` blocks of the public docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import scao_fx

# Every module of the package, found by walking it (a new module is covered without an edit);
# the Triton kernels need a GPU toolchain to import, the command line has no examples.
SKIP = {"scao_fx.__main__", "scao_fx.kernels._triton"}
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(scao_fx.__path__, "scao_fx.") if m.name not in SKIP
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
