"""The kernel benchmark's model: shape groups and parameters of a GPT-2-medium-like stack of
transformer blocks, and one row of results (:class:`BenchResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

__all__ = ["BenchResult", "ModelShapes", "model_groups", "model_params"]


@dataclass
class BenchResult:
    kernel: str
    group: str
    count: int
    elements: int
    backend: str
    mode: str
    ms: Optional[float]
    bytes: int
    gbps: Optional[float]
    pct_copy_bw: Optional[float]
    ms_min: Optional[float] = None
    note: str = ""


@dataclass
class ModelShapes:
    layers: int
    d_model: int
    d_mlp: int
    factor_groups: Dict[int, int] = field(default_factory=dict)   # side -> count
    param_groups: Dict[tuple, int] = field(default_factory=dict)  # (m, n) -> count


def _layer_matrices(d_model: int, d_mlp: int) -> Dict[str, tuple]:
    """Name -> (m, n) of the weight matrices of one transformer block."""
    d = d_model
    return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "mlp_in": (d, d_mlp),
            "mlp_out": (d_mlp, d)}


def _layer_vectors(d_model: int, d_mlp: int) -> Dict[str, int]:
    """Name -> length of the biases and LayerNorm weights of one transformer block."""
    vecs = {f"{n}_bias": d_model for n in ("q", "k", "v", "o", "mlp_out")}
    vecs.update({"mlp_in_bias": d_mlp, "ln1_weight": d_model, "ln1_bias": d_model,
                 "ln2_weight": d_model, "ln2_bias": d_model})
    return vecs


def model_groups(layers: int = 24, d_model: int = 1024, d_mlp: int = 4096) -> ModelShapes:
    """Shape groups of a GPT-2-medium-like stack of transformer blocks.

    Per layer: q, k, v, o projections (d x d), MLP in (d x d_mlp) and out (d_mlp x d). Every
    matrix W (m x n) has Kronecker factors L (m x m) and R (n x n).
    """
    shapes = ModelShapes(layers, d_model, d_mlp)
    for m, n in _layer_matrices(d_model, d_mlp).values():
        shapes.param_groups[(m, n)] = shapes.param_groups.get((m, n), 0) + layers
        for side in (m, n):
            shapes.factor_groups[side] = shapes.factor_groups.get(side, 0) + layers
    return shapes


def model_params(layers: int, d_model: int, d_mlp: int, device: torch.device,
                 seed: int = 0) -> Dict[str, Dict[str, torch.Tensor]]:
    """Random float32 parameter tree ``{"h0": {"q": ..., "q_bias": ...}, ...}`` of the model:
    the matrices of :func:`model_groups` plus every block's biases and LayerNorm weights."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = {**_layer_matrices(d_model, d_mlp),
              **{k: (n,) for k, n in _layer_vectors(d_model, d_mlp).items()}}
    return {f"h{i}": {k: 0.02 * torch.randn(shape, device=device, generator=gen)
                      for k, shape in shapes.items()}
            for i in range(layers)}
