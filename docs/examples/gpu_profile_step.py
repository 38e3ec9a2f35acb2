"""Where the optimizer step's time goes on a GPU: a ``torch.profiler`` table per optimizer.

Uses the model of ``gpu_step_time.py`` (12 blocks of width 768 unless ``LAYERS D`` are given).
For each optimizer: 30 warm-up training steps, one more backward, then 20 profiled
``opt.step()`` calls on those gradients (forward and backward are outside the profile). Prints the ops sorted by their own GPU time and by their own
CPU time, the number of kernel launches per step, and the step's CPU time against its GPU time
(a step whose CPU time is far above its GPU time is bound by launch overhead, not by the GPU).

Run: ``python docs/examples/gpu_profile_step.py [LAYERS D] [NAMES...]`` (needs CUDA); NAMES
are from ``gpu_step_time.make`` (default: ``adamw scao-noguard scao``).
"""
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_step_time as g  # noqa: E402

names = [a for a in sys.argv[1:] if not a.isdigit()] or ["adamw", "scao-noguard", "scao"]
x = torch.randint(0, g.V, (g.B, g.T), device=g.dev)
for name in names:
    torch.manual_seed(0)
    model = g.GPT().to(g.dev)
    opt = g.make(name, model)
    for _ in range(30):
        g.loss_fn(model, x).backward(); opt.step(); opt.zero_grad(set_to_none=True)
    g.loss_fn(model, x).backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        cpu = 0.0
        for _ in range(20):
            t0 = time.perf_counter()
            opt.step()
            cpu += time.perf_counter() - t0  # host time to issue the step
            torch.cuda.synchronize()
    ev = prof.key_averages()
    cuda = torch.autograd.DeviceType.CUDA
    gpu = sum(e.self_device_time_total for e in ev if e.device_type == cuda and not e.is_user_annotation) / 1e3
    launches = sum(e.count for e in ev if e.device_type == cuda)
    print(f"\n===== {name}: host time to issue opt.step() {1e3 * cpu / 20:.2f} ms; GPU busy "
          f"{gpu / 20:.2f} ms; {launches / 20:.0f} kernel launches (per step)", flush=True)
    print(ev.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60))
    print(ev.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
