"""Side by side on the CPU: the Adam link of sf.SCAO (``scale_by_adam``) as it runs today
(multi-tensor ``torch._foreach_*`` ops, and the per-leaf loop), against torch's fused Adam
kernel (``torch._fused_adam_``) producing the same update into a zeroed buffer, bare and as
``scale_by_adam(kernel="fused")`` (what ``sf.SCAO(fused=True)`` runs).

The shapes are the benchmark GPT's matrices (d_model 128, 4 layers: 128x384, 128x128, 512x128,
128x512 per layer, and the 96x128 embedding). Run::

    python docs/examples/adam_kernels.py [--repeats 200] [--threads N]

It prints the median time per Adam update of each variant, the ratio to the current default
(the foreach path) and the largest relative difference of the updates from it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import scao_fx as sf
from scao_fx.transforms import adam as adam_mod


def shapes(d_model: int = 128, layers: int = 4, vocab: int = 96) -> list[tuple[int, int]]:
    per_layer = [(d_model, 3 * d_model), (d_model, d_model), (4 * d_model, d_model), (d_model, 4 * d_model)]
    return [(vocab, d_model)] + per_layer * layers


def fused_adam_update(b1, b2, eps):
    """Adam's update ``m_hat / (sqrt(v_hat) + eps)`` from torch's fused kernel: the kernel runs
    ``p -= lr * m_hat / (sqrt(v_hat) + eps)`` on a zeroed buffer with ``lr = -1``."""

    def init(leaves):
        return {
            "mu": [torch.zeros_like(p) for p in leaves],
            "nu": [torch.zeros_like(p) for p in leaves],
            "step": [torch.zeros((), dtype=torch.float32) for _ in leaves],
            "out": [torch.empty_like(p) for p in leaves],
        }

    def update(grads, state):
        out = state["out"]
        torch._foreach_zero_(out)
        torch._foreach_add_(state["step"], 1)
        torch._fused_adam_(out, grads, state["mu"], state["nu"], [], state["step"], lr=-1.0, beta1=b1,
                           beta2=b2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
        return out

    return init, update


def time_it(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    leaves = [torch.randn(s) for s in shapes()]
    grads = [torch.randn_like(p) for p in leaves]
    n = sum(p.numel() for p in leaves)
    b1, b2, eps = 0.9, 0.999, 1e-8

    tx = sf.scale_by_adam(b1, b2, eps)
    st = {"s": tx.init(leaves)}

    def current():
        u, st["s"] = tx.update(grads, st["s"], inplace=True)
        return u

    tx_loop = sf.scale_by_adam(b1, b2, eps)
    st_loop = {"s": tx_loop.init(leaves)}

    def per_leaf():
        saved = adam_mod.multi_tensor_ok
        adam_mod.multi_tensor_ok = lambda tensors: False
        try:
            u, st_loop["s"] = tx_loop.update(grads, st_loop["s"], inplace=True)
        finally:
            adam_mod.multi_tensor_ok = saved
        return u

    f_init, f_update = fused_adam_update(b1, b2, eps)
    f_state = f_init(leaves)

    def fused():
        return f_update(grads, f_state)

    tx_fused = sf.scale_by_adam(b1, b2, eps, kernel="fused")  # what SCAO(fused=True) runs
    st_fused = {"s": tx_fused.init(leaves)}

    def link_fused():
        u, st_fused["s"] = tx_fused.update(grads, st_fused["s"], inplace=True)
        return u

    variants = {
        "foreach (current default)": current,
        "per-leaf loop": per_leaf,
        "torch._fused_adam_ (bare)": fused,
        "scale_by_adam(kernel=fused)": link_fused,
    }
    # agreement after the same number of steps from the same start
    outs = {name: [u.clone() for u in fn()] for name, fn in variants.items()}
    ref = outs["foreach (current default)"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(leaves)} matrices, {n} entries")
    base = None
    for name, fn in variants.items():
        t = time_it(fn, args.repeats)
        base = base or t
        diff = max(float(((a - b).abs() / b.abs().clamp_min(1e-12)).max()) for a, b in zip(outs[name], ref))
        print(f"{name:28s} {t * 1e3:8.3f} ms   x{t / base:5.2f} of foreach   max rel diff {diff:.1e}")


if __name__ == "__main__":
    main()
