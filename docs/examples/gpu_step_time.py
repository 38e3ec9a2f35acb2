"""Whole training-step time (forward + backward + optimizer) of SCAO vs AdamW on a GPU.

A GPT-style model (``LAYERS`` blocks of width ``D``, 12 heads, vocabulary 8192, batch 8 x 512
tokens) is trained for 80 steps on one fixed batch by each optimizer in turn, in one run:
``torch.optim.AdamW(foreach=True)``, ``sf.adamw`` through ``sf.TransformOptimizer``,
``sf.SCAO`` (int8 curvature), ``sf.SCAO(use_int8_ema=False)``, ``sf.SCAO`` with the non-finite
guard reading its flag at once (``host_sync=True``), without the guard
(``skip_nonfinite=False``) and with bfloat16 Gram products (``gram_precision="bfloat16"``),
then AdamW again (a drift check). The first 20 steps are not timed;
SCAO starts preconditioning at once (``warmup_steps=0``) and refreshes every 20 steps, so the
mean includes amortised refreshes. Those steps are synchronised before and after the optimizer
step (to time it alone); each line then also gives the mean step of 40 more steps run the way
training runs, with one synchronisation at the end ("unsynced step": the CPU may queue work
ahead of the GPU), and the peak GPU memory of its run.

Run: ``python docs/examples/gpu_step_time.py 12 768`` (needs CUDA).
"""
import statistics
import sys
import time

import torch

import scao_fx as sf

torch.manual_seed(0)
dev = "cuda"
_dims = [int(a) for a in sys.argv[1:] if a.isdigit()]
L, d = _dims[:2] if len(_dims) >= 2 else (12, 768)  # LAYERS, D from the command line
T, B, V = 512, 8, 8192
class Block(torch.nn.Module):
    def __init__(s):
        super().__init__(); s.ln1 = torch.nn.LayerNorm(d); s.qkv = torch.nn.Linear(d, 3*d); s.proj = torch.nn.Linear(d, d)
        s.ln2 = torch.nn.LayerNorm(d); s.fc = torch.nn.Linear(d, 4*d); s.fc2 = torch.nn.Linear(4*d, d)
    def forward(s, x):
        q, k, v = s.qkv(s.ln1(x)).view(B, T, 3, 12, d//12).permute(2, 0, 3, 1, 4)
        x = x + s.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d))
        return x + s.fc2(torch.nn.functional.gelu(s.fc(s.ln2(x))))
class GPT(torch.nn.Module):
    def __init__(s):
        super().__init__(); s.emb = torch.nn.Embedding(V, d); s.pos = torch.nn.Parameter(torch.zeros(T, d)); s.blocks = torch.nn.ModuleList([Block() for _ in range(L)]); s.lnf = torch.nn.LayerNorm(d); s.head = torch.nn.Linear(d, V, bias=False)
    def forward(s, idx):
        x = s.emb(idx) + s.pos
        for b in s.blocks: x = b(x)
        return s.head(s.lnf(x))
def make(name, model):
    if name == "adamw": return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    if name == "sf.adamw": return sf.TransformOptimizer(model.parameters(), lambda lr, **kw: sf.adamw(lr), dict(lr=1e-3))
    if name == "scao": return sf.SCAO(model.parameters(), form="seed", lr=1e-3, warmup_steps=0, min_precond_updates=0)
    if name == "scao-fp32": return sf.SCAO(model.parameters(), form="seed", lr=1e-3, warmup_steps=0, min_precond_updates=0, use_int8_ema=False)
    if name == "scao-sync": return sf.SCAO(model.parameters(), form="seed", lr=1e-3, warmup_steps=0, min_precond_updates=0, host_sync=True)
    if name == "scao-noguard": return sf.SCAO(model.parameters(), form="seed", lr=1e-3, warmup_steps=0, min_precond_updates=0, skip_nonfinite=False)
    if name == "scao-bf16gram": return sf.SCAO(model.parameters(), form="seed", lr=1e-3, warmup_steps=0, min_precond_updates=0, gram_precision="bfloat16")


def loss_fn(model, x):
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())


if __name__ == "__main__":
    x = torch.randint(0, V, (B, T), device=dev)
    for name in ["adamw", "sf.adamw", "scao", "scao-fp32", "scao-sync", "scao-noguard", "scao-bf16gram", "adamw"]:
        torch.manual_seed(0); model = GPT().to(dev); opt = make(name, model)
        torch.cuda.reset_peak_memory_stats()
        ts, os_ = [], []
        for i in range(80):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            loss = loss_fn(model, x); loss.backward()
            torch.cuda.synchronize(); t1 = time.perf_counter()
            opt.step(); opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(); t2 = time.perf_counter()
            if i >= 20: ts.append(t2 - t0); os_.append(t2 - t1)
        # the same loop without a synchronisation per step (how training runs): 40 steps, one sync
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for i in range(40):
            loss = loss_fn(model, x); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); free = (time.perf_counter() - t0) / 40
        print(f"{name:12s} step mean {1e3*statistics.mean(ts):7.2f} ms median {1e3*statistics.median(ts):7.2f}  opt mean {1e3*statistics.mean(os_):7.2f} median {1e3*statistics.median(os_):7.2f}  unsynced step {1e3*free:7.2f}  peak {torch.cuda.max_memory_allocated() / 2**20:8.0f} MiB  loss {loss.item():.3f}", flush=True)
