"""Optimizer-state bytes per parameter on GPT-2-small-shaped leaves (124M parameters).

Builds the parameter shapes of GPT-2 small (12 layers, d=768, vocabulary 50257, context 1024),
initialises each optimizer's state (no training) on the ``meta`` device, so nothing is allocated,
and prints what ``scao_fx.memory_report`` measures (a meta state counts the bytes it would take).
Run: ``python docs/examples/memory_gpt2_small.py`` (a few seconds on a laptop CPU).
"""

from __future__ import annotations

import torch

import scao_fx as sf


def gpt2_small_params(layers: int = 12, d: int = 768, vocab: int = 50257, ctx: int = 1024, device: str = "meta") -> dict:
    """Tensors with GPT-2 small's parameter shapes (Conv1D weights as (out, in)), on the meta
    device by default."""
    torch.set_default_device(device)
    try:
        return _shapes(layers, d, vocab, ctx)
    finally:
        torch.set_default_device(None)


def _shapes(layers: int, d: int, vocab: int, ctx: int) -> dict:
    p = {"wte": torch.empty(vocab, d), "wpe": torch.empty(ctx, d)}
    for i in range(layers):
        h = f"h{i}"
        p[f"{h}.ln_1.weight"], p[f"{h}.ln_1.bias"] = torch.empty(d), torch.empty(d)
        p[f"{h}.attn.c_attn.weight"], p[f"{h}.attn.c_attn.bias"] = torch.empty(3 * d, d), torch.empty(3 * d)
        p[f"{h}.attn.c_proj.weight"], p[f"{h}.attn.c_proj.bias"] = torch.empty(d, d), torch.empty(d)
        p[f"{h}.ln_2.weight"], p[f"{h}.ln_2.bias"] = torch.empty(d), torch.empty(d)
        p[f"{h}.mlp.c_fc.weight"], p[f"{h}.mlp.c_fc.bias"] = torch.empty(4 * d, d), torch.empty(4 * d)
        p[f"{h}.mlp.c_proj.weight"], p[f"{h}.mlp.c_proj.bias"] = torch.empty(d, 4 * d), torch.empty(d)
    p["ln_f.weight"], p["ln_f.bias"] = torch.empty(d), torch.empty(d)
    return p


# the seed form at its earlier defaults (adaptive rank up to 128, float32 bases, float32 moments);
# a sketch stores its basis as sketch_storage says
SEED = dict(form="seed", epsilon_sparse=0.05, k_max=128, basis_storage="float32", moments="float32")
SEED_SKETCH = dict(form="seed", epsilon_sparse=0.05, k_max=128, moments="float32")
INT8_SKETCH = dict(curvature="sketch", sketch_rank=64, sketch_storage="int8", moments="int8")

#: the rows of docs/memory.md's target table, in its order (and two of docs/scao.md's)
CONFIGS = {
    "adamw (fp32 moments)": lambda: sf.adamw(),
    "scao defaults": lambda: sf.scao(),
    "defaults, basis_storage='float32'": lambda: sf.scao(basis_storage="float32"),
    "defaults, moments='bfloat16'": lambda: sf.scao(moments="bfloat16"),
    "defaults, moments='int8'": lambda: sf.scao(moments="int8"),
    "defaults, second_moment='factored'": lambda: sf.scao(second_moment="factored"),
    "defaults, moments='int8', second_moment='factored'": lambda: sf.scao(moments="int8", second_moment="factored"),
    "defaults, sketch rank 64 int8, moments='int8'": lambda: sf.scao(**INT8_SKETCH),
    "defaults, max_precond_dim=4096": lambda: sf.scao(max_precond_dim=4096),
    "defaults, max_precond_dim=4096, moments='bfloat16'": lambda: sf.scao(max_precond_dim=4096, moments="bfloat16"),
    "defaults, max_precond_dim=4096, moments='int8'": lambda: sf.scao(max_precond_dim=4096, moments="int8"),
    "seed form (earlier defaults)": lambda: sf.scao(**SEED),
    "the same, moments='int8'": lambda: sf.scao(**{**SEED, "moments": "int8"}),
    "the same, max_precond_dim=4096": lambda: sf.scao(**SEED, max_precond_dim=4096),
    "the same, use_int8_ema=False": lambda: sf.scao(**SEED, use_int8_ema=False),
    "the same, max_precond_dim=4096, use_int8_ema=False": lambda: sf.scao(**SEED, max_precond_dim=4096,
                                                                         use_int8_ema=False),
    "the same, curvature='sketch' (rank 128, bf16)": lambda: sf.scao(**SEED_SKETCH, curvature="sketch"),
    "the same, sketch rank 64 int8, moments='int8'": lambda: sf.scao(**{**SEED_SKETCH, **INT8_SKETCH}),
}


def main() -> None:
    params = gpt2_small_params()
    n = sum(p.numel() for p in params.values())
    print(f"GPT-2 small shapes: {n / 1e6:.1f}M parameters")
    print(f"{'optimizer':<56} {'state MB':>9} {'bytes/param':>12}")
    for name, make in CONFIGS.items():
        state = make().init(params)
        rep = sf.memory_report(state, params)
        print(f"{name:<56} {rep['total_bytes'] / 1e6:9.1f} {rep['bytes_per_param']:12.2f}")
        del state


if __name__ == "__main__":
    main()
