"""Where SCAO's optimizer step spends its time on the CPU: shares of the step by part.

    python docs/examples/cpu_profile_step.py [--steps 20] [--threads 1] [--opt KEY=VALUE ...]

Builds the benchmark's default GPT (``small``: 4 blocks of width 128, vocabulary 96) and one
fixed gradient per parameter, runs ``sf.SCAO`` (the defaults, plus each ``--opt``) for 20 warm-up
steps, then profiles ``--steps`` optimizer steps with ``torch.profiler`` and Python stacks.
Every PyTorch op's own CPU time (and every call of an Inductor-compiled kernel's, the codec's
``compiled`` backend) is charged to the part of the library whose code called it (the
innermost scao_fx frame on its stack):

- Gram products: ``precond/curvature.py``'s accumulation (``gram``, the diagonal split);
- int8 codec: ``codecs.py`` and ``kernels/`` (encode, decode, stochastic rounding);
- refresh: reading the factors, ``precond/eigen.py`` (``eigh``, QR) and the new bases;
- rotations: ``precond/eigenbasis.py`` (into and out of the eigenbasis, moments at a refresh);
- Adam: ``transforms/adam.py`` and ``_treemath.py``;
- non-finite guard: ``transforms/finite.py``;
- other ops: every other scao_fx module (stacking, normalisation, weight decay, lr);
- Python: the step's wall-clock minus the time of all ops (interpreter, dispatch, pytrees).

Prints one table (ms per step and share of the step) and ``torch.optim.AdamW``'s step for
scale. The profiler adds overhead of its own, so the total is above an unprofiled step's; the
shares are what the table is for. Writes nothing.
"""

from __future__ import annotations

import argparse
import ast
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import scao_fx as sf
from scao_fx.bench.model import GPT, preset

#: The part of the step each scao_fx function belongs to: (part, file fragment, function names or
#: None for every function of the file); the innermost scao_fx frame of an op's call chain that
#: matches a rule decides, first rule first.
RULES = (
    ("int8 codec", "scao_fx/codecs.py", None),
    ("int8 codec", "scao_fx/kernels/", None),
    ("Gram products", "precond/curvature.py", ("gram", "accumulate", "accumulate_outer")),
    ("refresh (eigh / QR)", "precond/curvature.py", ("factor", "top_eigenpairs")),
    ("refresh (eigh / QR)", "precond/eigen.py", None),
    ("refresh (eigh / QR)", "precond/kron.py", ("side_from_eigenpairs",)),
    ("refresh (eigh / QR)", "transforms/eigenbasis.py", ("refresh", "_power_step", "_exact_full")),
    ("rotations", "precond/eigenbasis.py", None),
    ("Adam", "transforms/adam.py", None),
    ("Adam", "scao_fx/_treemath.py", None),
    ("non-finite guard", "transforms/finite.py", None),
)
#: ``_treemath`` helpers shared by several parts (charged to the caller's part, not to Adam).
SHARED = ("abs_max",)
#: The profiler's name of a call of an Inductor-compiled C++ kernel (the ``compiled`` codec backend).
COMPILED_KERNEL = "<built-in function kernel>"
ORDER = ("Gram products", "int8 codec", "refresh (eigh / QR)", "rotations", "Adam", "non-finite guard",
         "other ops", "Python")


def _part_of_frame(name: str) -> str | None:
    """The part of a profiler Python-function event ``"path(line): function"``, None if no rule matches."""
    if "scao_fx/" not in name or "docs/examples" in name:
        return None
    func = name.rsplit(": ", 1)[-1]
    if "scao_fx/_treemath.py" in name and func in SHARED:
        return None  # a helper every part uses: charge it to its caller's part
    for part, file, funcs in RULES:
        if file in name and (funcs is None or func in funcs):
            return part
    return None


def _part(event) -> str:
    """The part of the step an op event belongs to: walk its callers, innermost first."""
    e = event.cpu_parent
    while e is not None:
        part = _part_of_frame(e.name)
        if part is not None:
            return part
        e = e.cpu_parent
    return "other ops"


def _parse_opts(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="profiled optimizer steps (default 20, a multiple of precond_freq)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="an sf.SCAO keyword")
    args = ap.parse_args()
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    torch.set_num_threads(args.threads)
    model = GPT(preset("small", vocab_size=96), seed=0)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in params]
    opt = sf.SCAO(params, **_parse_opts(args.opt))
    adam = torch.optim.AdamW(params, lr=1e-3, foreach=True)

    def steps(o, n):
        for _ in range(n):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            o.step()

    steps(opt, 20)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        t0 = time.perf_counter()
        steps(opt, args.steps)
        wall = (time.perf_counter() - t0) * 1e3 / args.steps
    ms = defaultdict(float)
    for ev in prof.events():
        if (ev.name.startswith("aten::") or ev.name == COMPILED_KERNEL) and ev.self_cpu_time_total > 0:
            ms[_part(ev)] += ev.self_cpu_time_total / 1e3 / args.steps
    ms["Python"] = max(wall - sum(ms.values()), 0.0)
    steps(adam, 20)
    t0 = time.perf_counter()
    steps(adam, args.steps)
    adam_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    print(f"sf.SCAO({', '.join(args.opt)}) optimizer step, profiled: {wall:.1f} ms "
          f"(torch.optim.AdamW, unprofiled: {adam_ms:.1f} ms)")
    print("| part | ms per step | share |")
    print("|---|---|---|")
    for name in ORDER:
        print(f"| {name} | {ms.get(name, 0.0):.1f} | {100 * ms.get(name, 0.0) / wall:.0f} % |")


if __name__ == "__main__":
    main()
