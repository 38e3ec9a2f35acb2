"""The curvature sketch against the full factors, and its narrow storage against float32 storage.

The problem of ``int8_fidelity.py``: 300 EMA updates (rho = 0.999) of the factors of a 256 x 64
leaf whose left covariance has eigenvalues logspace(0, -3) (a slowly decaying spectrum: the
full-factor path keeps 110 of 256 directions), one refresh, then the last step's preconditioned
gradient P(G) (no grafting). Prints cosine, relative error and the kept ranks of each sketch
configuration against (a) the float32 full-factor EMA and (b) the float32 sketch of the same rank.
Run: ``python docs/examples/sketch_fidelity.py`` (about 10 s on a laptop CPU).
"""

from __future__ import annotations

import torch

import scao_fx as sf


def preconditioned(curvature, scale: float = 1.0, steps: int = 300, m: int = 256, n: int = 64, seed: int = 0,
                   decay: float = -3.0):
    """Run ``kronecker_precondition(curvature=...)``; return the last P(G) and the left/right ranks."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(m, m, generator=gen))[0]
    mix = basis * torch.logspace(0, decay, m).sqrt()
    tx = sf.kronecker_precondition(curvature=curvature, rank=sf.spectral_mass_rank(0.05, 8, 128),
                                   precond_freq=steps, graft="none")
    state = tx.init({"w": torch.zeros(m, n)})
    data = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        g = scale * mix @ torch.randn(m, n, generator=data)
        out, state = tx.update({"w": g}, state)
    group = state.groups[0]
    return out["w"], int(group.left.rank), int(group.right.rank)


def _compare(got, ref) -> tuple[float, float]:
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0).item()
    return cos, ((ref - got).norm() / ref.norm()).item()


CONFIGS = {
    "rank 128, fp32": lambda: sf.curvature_sketch(128, 0.999),
    "rank 128, bf16 frame + bf16 basis": lambda: sf.curvature_sketch(128, 0.999, sf.bf16_codec(), basis_dtype=torch.bfloat16),
    "rank 128, int8 frame + bf16 basis": lambda: sf.curvature_sketch(128, 0.999, sf.int8_blockwise(), basis_dtype=torch.bfloat16),
    "rank 64, fp32": lambda: sf.curvature_sketch(64, 0.999),
    "rank 64, int8 frame + bf16 basis": lambda: sf.curvature_sketch(64, 0.999, sf.int8_blockwise(), basis_dtype=torch.bfloat16),
    "rank 160, fp32": lambda: sf.curvature_sketch(160, 0.999),
}


def main() -> None:
    full, fl, fr = preconditioned(sf.curvature_ema(0.999, codec=sf.fp32_codec()))
    sketch_ref = {}
    print(f"full factors (fp32): ranks ({fl}, {fr})")
    print(f"{'sketch':<36} {'vs full: cos':>12} {'rel':>7} {'vs fp32 sketch: cos':>20} {'ranks (L, R)':>13}")
    for name, make in CONFIGS.items():
        got, gl, gr = preconditioned(make())
        width = name.split(",")[0]
        if width not in sketch_ref:
            sketch_ref[width] = got
        cos, rel = _compare(got, full)
        cos_s, _ = _compare(got, sketch_ref[width])
        print(f"{name:<36} {cos:12.4f} {rel:7.3f} {cos_s:20.5f} {str((gl, gr)):>13}", flush=True)


if __name__ == "__main__":
    main()
