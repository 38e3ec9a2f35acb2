"""int8 curvature fidelity: preconditioned gradient from int8 vs float32 factor storage.

300 EMA updates (rho = 0.999) of the factors of a 256 x 64 leaf whose gradients have a
decaying spectrum (left covariance eigenvalues logspace(0, -3)), then one refresh; the
preconditioned gradient P(G) (no grafting) of the last step is compared between storages.
Prints cosine, relative error and the kept ranks for several block sizes and gradient scales.
Run: ``python docs/examples/int8_fidelity.py [--blocks 256,64,32] [--scales 1e-4,1,1e4]``.
"""

from __future__ import annotations

import argparse

import torch

import scao_fx as sf


def preconditioned(codec: sf.Codec, scale: float, steps: int = 300, m: int = 256, n: int = 64, seed: int = 0):
    """Run the curvature EMA with ``codec`` storage; return the last P(G) and the left/right ranks."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(m, m, generator=gen))[0]
    mix = basis * torch.logspace(0, -3, m).sqrt()
    tx = sf.kronecker_precondition(
        curvature=sf.curvature_ema(0.999, codec=codec),
        rank=sf.spectral_mass_rank(0.05, 8, 128),
        precond_freq=steps,
        graft="none",
    )
    state = tx.init({"w": torch.zeros(m, n)})
    data = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        g = scale * mix @ torch.randn(m, n, generator=data)
        out, state = tx.update({"w": g}, state)
    group = state.groups[0]
    return out["w"], int(group.left.rank), int(group.right.rank)


def compare(codec: sf.Codec, scale: float) -> dict:
    """Cosine, relative error and ranks of ``codec`` storage against float32 storage."""
    ref, rl, rr = preconditioned(sf.fp32_codec(), scale)
    got, ql, qr = preconditioned(codec, scale)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0).item()
    rel = ((ref - got).norm() / ref.norm()).item()
    return {"cos": cos, "rel": rel, "rank_fp32": (rl, rr), "rank_codec": (ql, qr)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="256,64,32")
    ap.add_argument("--scales", default="1e-4,1e-2,1,1e2,1e4")
    args = ap.parse_args(argv)
    print(f"{'block':>5} {'scale':>7} {'cosine':>8} {'rel err':>8} {'rank fp32 (L,R)':>16} {'rank int8 (L,R)':>16}")
    for block in [int(b) for b in args.blocks.split(",")]:
        for scale in [float(s) for s in args.scales.split(",")]:
            r = compare(sf.int8_blockwise(block), scale)
            print(f"{block:5d} {scale:7.0e} {r['cos']:8.4f} {r['rel']:8.4f} {str(r['rank_fp32']):>16} {str(r['rank_codec']):>16}", flush=True)


if __name__ == "__main__":
    main()
