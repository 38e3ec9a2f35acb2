"""A recorded run: a few hundred steps of ``sf.SCAO`` and ``sf.scao`` on a small model.

Used to prove that a refactoring changes no number: ``record()`` returns a SHA-256 digest of
the final parameters (and of the final optimizer state) of each configuration; the digests of
a known-good commit are kept in ``tests/data/golden_run.json`` together with the torch version
and CPU capability they were taken on (the bits of a float computation depend on both).

Run ``python tests/golden_run.py --write`` to re-record after an *intended* numerical change.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import torch

import scao_fx as sf

GOLDEN = Path(__file__).parent / "data" / "golden_run.json"
STEPS = 240
# the seed form at the settings the golden file was recorded with (before the default changed)
PRECOND = dict(form="seed", betas=(0.9, 0.999), rho=0.999, epsilon_sparse=0.05, basis_storage="float32",
               warmup_steps=20, blend_steps=20, precond_freq=10, min_precond_updates=5, k_min=2, k_max=12,
               max_precond_dim=40, float32_below=0, moments="float32")


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(),
        torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 3),
    )


def _batches(seed: int):
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(STEPS, 16, 12, generator=g)
    y = torch.randint(0, 3, (STEPS, 16), generator=g)
    return x, y


def _facade(int8: bool) -> dict:
    model = _model(0)
    opt = sf.SCAO(model.parameters(), lr=3e-3, weight_decay=0.05, use_int8_ema=int8, **PRECOND)
    xs, ys = _batches(0)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    state = [t for t in sf._tree.flatten(opt.functional_state(0))[0] if isinstance(t, torch.Tensor)]
    return {"params": _digest(model.parameters()), "state": _digest(state)}


def _functional(int8: bool) -> dict:
    model = _model(1)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tx = sf.scao(lr=2e-3, weight_decay=0.02, use_int8_ema=int8, **PRECOND)
    state = tx.init(params)
    xs, ys = _batches(1)

    def loss_fn(p, x, y):
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    for x, y in zip(xs, ys):
        grads = torch.func.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params=params)
        params = sf.apply_updates(params, updates)
    leaves = [t for t in sf._tree.flatten(state)[0] if isinstance(t, torch.Tensor)]
    return {"params": _digest(params.values()), "state": _digest(leaves)}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere): two CPUs of
    the same instruction set (e.g. an Intel Xeon and an AMD EPYC, both AVX512) round differently."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": cpu_model(), "threads": torch.get_num_threads()}


def record() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions split over threads change bits
    try:
        return {
            "facade-int8": _facade(True),
            "facade-fp32": _facade(False),
            "functional-int8": _functional(True),
            "functional-fp32": _functional(False),
        }
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    runs = record()
    env = environment()
    env["threads"] = 1
    out = {"environment": env, "runs": runs}
    print(json.dumps(out, indent=2))
    if "--write" in sys.argv:
        GOLDEN.write_text(json.dumps(out, indent=2) + "\n")
