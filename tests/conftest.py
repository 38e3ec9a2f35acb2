"""Session-wide test set-up (loaded by pytest before any test module is imported)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# docs/examples' scripts are importable by the tests that check them (memory_table, least_squares)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs" / "examples"))

if not torch.cuda.is_available():
    # On CPU-only machines the Triton kernels run in Triton's interpreter. The switch must be set
    # before *any* module decorates a @triton.jit function (transformers, torch._inductor and
    # scao_fx.kernels all may): setting it later, in tests/test_kernels.py alone, depended on
    # which test modules pytest happened to import first.
    os.environ.setdefault("TRITON_INTERPRET", "1")
