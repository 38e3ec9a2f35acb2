"""Where an optimizer step synchronises with the host or copies between host and device (CUDA).

Uses the model of ``gpu_step_time.py`` (12 blocks of width 768 unless ``LAYERS D`` are given).
For each optimizer: 5 warm-up steps, then 6 audited steps without a preconditioner refresh
(``precond_freq`` is out of range; SCAO starts blending at once). Every synchronising call
that ``torch.cuda.set_sync_debug_mode("warn")`` reports is counted by its place in
``scao_fx``; ``torch.profiler`` counts the host-device copies (the GPU's ``Memcpy HtoD`` and
``DtoH`` records) and scalar reads (``aten::_local_scalar_dense``) by their place in
``scao_fx``. The deferred guard's one ``DtoH`` flag copy per step is expected; nothing else is.

Run: ``python docs/examples/gpu_sync_audit.py [LAYERS D] [NAMES...]`` (needs CUDA); NAMES from
``adamw scao scao-sync scao-noguard`` (default: ``scao``).
"""
import collections
import os
import sys
import traceback
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_step_time as g  # noqa: E402

import scao_fx as sf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(sf.__file__))))


def where(frames, n=3):
    own = [f for f in frames if "scao_fx" in f.filename]
    return " <- ".join(f"{os.path.relpath(f.filename, ROOT)}:{f.lineno}" for f in own[::-1][:n]) or "(outside scao_fx)"


def make(name, model):
    kw = dict(lr=1e-3, form="seed", warmup_steps=0, blend_steps=1, min_precond_updates=0, precond_freq=10**6)
    if name == "adamw":
        return sf.TransformOptimizer(model.parameters(), lambda lr: sf.adamw(lr), {"lr": 1e-3})
    if name == "scao-sync":
        kw["host_sync"] = True
    if name == "scao-noguard":
        kw["skip_nonfinite"] = False
    return sf.SCAO(model.parameters(), **kw)


names = [a for a in sys.argv[1:] if not a.isdigit()] or ["scao"]
x = torch.randint(0, g.V, (g.B, g.T), device=g.dev)
for name in names:
    torch.manual_seed(0)
    model = g.GPT().to(g.dev)
    opt = make(name, model)
    for _ in range(5):
        g.loss_fn(model, x).backward(); opt.step(); opt.zero_grad(set_to_none=True)
    g.loss_fn(model, x).backward()
    torch.cuda.synchronize()
    syncs = collections.Counter()

    def hook(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            syncs[where(traceback.extract_stack()[:-1])] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
                for _ in range(6):
                    opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    copies = collections.Counter()
    for ev in prof.events():  # host<->device copies: the GPU-side memcpy records of each op
        kinds = {k.name.split(" (")[0] for k in ev.kernels if "HtoD" in k.name or "DtoH" in k.name}
        if ev.name == "aten::_local_scalar_dense":
            kinds.add("scalar read")
        for kind in kinds:
            p = ev
            while p is not None and not any("scao_fx" in s for s in (p.stack or [])):
                p = p.cpu_parent
            stack = [s for s in (p.stack if p is not None else []) if "scao_fx" in s]
            copies[(kind, " <- ".join(s.replace(ROOT + "/", "") for s in stack[:3]) or "(outside scao_fx)")] += 1
    print(f"\n===== {name}: {sum(syncs.values()) / 6:.1f} synchronising calls, "
          f"{sum(copies.values()) / 6:.1f} copies/scalar reads per step", flush=True)
    for k, c in syncs.most_common(25):
        print(f"  sync  x{c / 6:5.1f}/step  {k}")
    for (op, k), c in copies.most_common(25):
        print(f"  {op:26s} x{c / 6:5.1f}/step  {k}")
