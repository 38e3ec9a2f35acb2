"""The optimizer step's transient memory: how far live memory rises *during* ``step()``.

``memory_report`` counts the state an optimizer holds between steps; a step also allocates
temporaries (rotated gradients, Adam's denominators and directions, the Gram products of the
curvature statistics, a codec's float32 decode, a refresh's eigendecompositions) and frees them
before it returns. On a GPU the step's peak is the held memory plus this rise, so it decides
what fits as much as the state does.

Measured on the CPU with the PyTorch profiler's memory events (``profile_memory=True``: every
allocation and free inside the profiled step, in order): the rise is the highest running sum
of those events, in bytes per trained parameter. Parameters hold GPT-2 small's shapes (124M,
``memory_gpt2_small.py``); gradients are random (the memory does not depend on their values).
Each optimizer takes ``--steps`` steps, each profiled on its own; the table gives step 2 (an
ordinary step: the bases were built at step 1), the highest of steps 2 to ``--steps`` (a refresh
is due at step 5 for SCAO and for SOAP as configured here) and step 1, whose rise includes the
state the optimizer builds then (it is held afterwards, not freed). Allocations on the CPU follow the same code path as
on a GPU, except where a kernel differs (torch's fused Adam, the Triton kernels): read the
numbers as the code path's, not as a GPU measurement.

Run: ``python docs/examples/step_peak_memory.py`` (about ten minutes on a 2-core box; ``--layers
2`` for a quick look, ``--model qwen2.5-0.5b`` for Qwen2.5-0.5B's shapes (494M parameters, about
14 GB of memory), ``--only NAME`` to pick optimizers, ``--json PATH`` to keep the numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch
from memory_gpt2_small import gpt2_small_params  # docs/examples
from memory_table import QWEN25_05B, make_params, model_shapes  # docs/examples
from torch.profiler import ProfilerActivity, profile

import scao_fx as sf
from scao_fx.bench.progress import Progress

#: name -> factory(list of parameters) -> torch.optim.Optimizer
OPTIMIZERS: dict[str, Callable[[list], torch.optim.Optimizer]] = {
    "torch.optim.AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "sf.SCAO(preconditioner_enabled=False, moments='float32') (scao_fx's AdamW)": lambda ps: sf.SCAO(
        ps, preconditioner_enabled=False, moments="float32"),
    "sf.SCAO(preconditioner_enabled=False) (bf16 AdamW)": lambda ps: sf.SCAO(ps, preconditioner_enabled=False),
    "sf.SCAO() (default)": lambda ps: sf.SCAO(ps),
    "sf.SCAO(second_moment='full')": lambda ps: sf.SCAO(ps, second_moment="full"),
    "sf.SCAO(moments='float32')": lambda ps: sf.SCAO(ps, moments="float32"),
    "sf.SCAO(grouped=False)": lambda ps: sf.SCAO(ps, grouped=False),
    "sf.SCAO(moments='int8')": lambda ps: sf.SCAO(ps, moments="int8"),
    "sf.soap(precond_freq=5) (TransformOptimizer)": lambda ps: sf.TransformOptimizer(
        ps, lambda lr: sf.soap(lr=lr, precond_freq=5), {"lr": 3e-3}),
}


def step_rises(make: Callable[[list], torch.optim.Optimizer], params: dict, steps: int, bar: Progress) -> list[float]:
    """The rise of live memory during each of ``steps`` steps, in bytes per parameter."""
    ps = [torch.nn.Parameter(torch.zeros_like(p)) for p in params.values()]
    n = sum(p.numel() for p in ps)
    opt = make(ps)
    gen = torch.Generator().manual_seed(0)
    rises = []
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            opt.step()
        rises.append(peak_rise(prof) / n)
        bar.update()
    return rises


def peak_rise(prof: profile) -> int:
    """The highest running sum of the allocations (+) and frees (-) recorded in ``prof``, in
    bytes (0 if live memory never rose above where the step started)."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


#: the models ``--model`` names (GPT-2 small's shapes take ``--layers``)
MODELS = ("gpt2-small", "qwen2.5-0.5b")


def measure(layers: int = 12, steps: int = 5, names=None, progress: bool = True, *, d: int = 768, vocab: int = 50257,
            ctx: int = 1024, model: str = "gpt2-small") -> dict[str, dict]:
    """``{name: {"params", "rises", "ordinary", "highest"}}``: the rise of each step in bytes
    per parameter (``ordinary``: step 2; ``highest``: the largest from step 2 on)."""
    names = list(OPTIMIZERS) if names is None else list(names)
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (step 2 is the ordinary step), got {steps}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if model == "gpt2-small":
        params = gpt2_small_params(layers=layers, d=d, vocab=vocab, ctx=ctx, device="cpu")
    else:
        params = make_params({k: shape for k, (shape, _) in model_shapes(QWEN25_05B).items()}, device="cpu")
    n = sum(p.numel() for p in params.values())
    bar = Progress(progress, steps * len(names), "step peak memory", unit="step")
    out = {}
    try:
        for name in names:
            rises = step_rises(OPTIMIZERS[name], params, steps, bar)
            out[name] = {"params": n, "rises": rises, "ordinary": rises[1], "highest": max(rises[1:])}
    finally:
        bar.close()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODELS, default="gpt2-small", help="whose parameter shapes")
    ap.add_argument("--layers", type=int, default=12, help="transformer blocks of GPT-2 small's shapes (12)")
    ap.add_argument("--only", action="append", choices=list(OPTIMIZERS), help="measure this optimizer (repeatable)")
    ap.add_argument("--steps", type=int, default=5, help="steps per optimizer, each profiled (>= 2)")
    ap.add_argument("--json", help="write the numbers to this file")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.layers < 1:
        ap.error(f"--layers must be >= 1, got {args.layers}")
    if args.steps < 2:
        ap.error(f"--steps must be >= 2 (step 2 is the ordinary step), got {args.steps}")
    torch.manual_seed(0)
    res = measure(args.layers, args.steps, args.only, progress=not args.no_progress, model=args.model)
    n = next(iter(res.values()))["params"]
    shapes = f"GPT-2 small shapes, {args.layers} blocks" if args.model == "gpt2-small" else "Qwen2.5-0.5B shapes"
    print(f"{shapes}, {n / 1e6:.1f}M parameters; rise of live memory during step() in bytes per parameter "
          f"(torch {torch.__version__}, CPU)\n")
    print(f"| optimizer | step 2 | highest of steps 2-{args.steps} | step 1 (builds the state) | each step |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in res.items():
        each = " / ".join(f"{x:.2f}" for x in r["rises"])
        print(f"| {name} | {r['ordinary']:.2f} | {r['highest']:.2f} | {r['rises'][0]:.2f} | {each} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "torch": torch.__version__, "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
