"""Optimizer-state memory on real model shapes: GPT-2 small, Qwen2.5-0.5B, Llama-3.2-1B.

No weights are loaded: the parameter shapes are written from the public model configs (below),
and each optimizer's state is counted with exact per-leaf formulas. ``check_formulas()`` checks
every formula of a library optimizer byte for byte against ``scao_fx.memory_report`` on real
states of small shapes (it runs first, and ``tests/test_sketch.py`` runs it too); SOAP and Muon
are not in the library, their formulas are the textbook states (stated below). Printed: state
bytes per trained parameter and state GB, for full fine-tuning and for LoRA r = 16 on every
linear layer, and what fits in 16 GB: bf16 weights (every parameter, 2 bytes) + bf16 gradients
(trained parameters, 2 bytes) + the optimizer state. Activations, the CUDA context, allocator
fragmentation, temporary buffers (e.g. the full-factor path's per-step Gram products or a
refresh's eigendecompositions) and mixed-precision fp32 master weights are NOT counted.

Run: ``python docs/examples/memory_table.py`` (a few seconds; ``--check-only`` for the checks).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

import scao_fx as sf

# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class Config:
    """The config values used (from the models' public ``config.json``)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    family: str  # "gpt2" (LayerNorm, biases everywhere, learned positions) or "llama" (RMSNorm, SwiGLU)
    qkv_bias: bool = False
    positions: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


GPT2_SMALL = Config("GPT-2 small", 768, 3072, 12, 12, 12, 50257, True, "gpt2", positions=1024)
QWEN25_05B = Config("Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936, True, "llama", qkv_bias=True)
LLAMA32_1B = Config("Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128256, True, "llama")
MODELS = (GPT2_SMALL, QWEN25_05B, LLAMA32_1B)


def model_shapes(cfg: Config) -> dict[str, tuple[tuple[int, ...], bool]]:
    """``{name: (shape, is_linear_weight)}``; linear weights as ``(out, in)``; a tied head adds nothing."""
    d, f, kv = cfg.hidden, cfg.intermediate, cfg.kv_heads * cfg.head_dim
    p: dict[str, tuple[tuple[int, ...], bool]] = {"embed": ((cfg.vocab, d), False)}
    if cfg.family == "gpt2":
        p["wpe"] = ((cfg.positions, d), False)
    for i in range(cfg.layers):
        h = f"layer{i}"
        if cfg.family == "gpt2":
            for name, (o, n) in {"attn.c_attn": (3 * d, d), "attn.c_proj": (d, d), "mlp.c_fc": (f, d), "mlp.c_proj": (d, f)}.items():
                p[f"{h}.{name}.weight"], p[f"{h}.{name}.bias"] = ((o, n), True), ((o,), False)
            for ln in ("ln_1", "ln_2"):
                p[f"{h}.{ln}.weight"], p[f"{h}.{ln}.bias"] = ((d,), False), ((d,), False)
        else:
            for name, (o, n) in {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d)}.items():
                p[f"{h}.attn.{name}.weight"] = ((o, n), True)
                if cfg.qkv_bias and name != "o_proj":
                    p[f"{h}.attn.{name}.bias"] = ((o,), False)
            for name, (o, n) in {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}.items():
                p[f"{h}.mlp.{name}.weight"] = ((o, n), True)
            p[f"{h}.input_layernorm.weight"] = ((d,), False)
            p[f"{h}.post_attention_layernorm.weight"] = ((d,), False)
    p["final_norm.weight"] = ((d,), False)
    if cfg.family == "gpt2":
        p["final_norm.bias"] = ((d,), False)
    if not cfg.tied:
        p["lm_head"] = ((cfg.vocab, d), True)
    return p


def lora_shapes(cfg: Config, r: int = 16) -> dict[str, tuple[int, ...]]:
    """The trained LoRA parameters: ``A (r, in)`` and ``B (out, r)`` for every linear layer."""
    out = {}
    for name, (shape, linear) in model_shapes(cfg).items():
        if linear:
            out[f"{name}.lora_A"] = (r, shape[1])
            out[f"{name}.lora_B"] = (shape[0], r)
    return out


def gpt2_small_shapes() -> dict[str, tuple[int, ...]]:
    return {k: s for k, (s, _) in model_shapes(GPT2_SMALL).items()}


def make_params(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Uninitialised float32 tensors of these shapes (``torch.empty``: nothing is written)."""
    return {k: torch.empty(s) for k, s in shapes.items()}


# --------------------------------------------------------------------------- the optimizers


def _adam8():
    return sf.quantize_state(sf.scale_by_adam(), sf.int8_adam_codecs())


def _sketch(rank: int, storage: str, **kw):
    return sf.scao_precondition(curvature="sketch", sketch_rank=rank, sketch_storage=storage, **kw)


def optimizers() -> dict:
    """The library's optimizers of the table (factories): AdamW, 8-bit AdamW and SCAO's forms."""
    tail = lambda: (sf.add_decayed_weights(0.01), sf.scale_by_learning_rate(1e-3))  # noqa: E731
    return {
        "AdamW (fp32 moments)": lambda: sf.adamw(),
        "8-bit AdamW": lambda: sf.chain(_adam8(), *tail()),
        "scao default (int8 full factors)": lambda: sf.scao(),
        "scao sketch r128 bf16": lambda: sf.chain(_sketch(128, "bfloat16"), sf.adamw()),
        "scao sketch r64 int8 + 8-bit Adam": lambda: sf.chain(_sketch(64, "int8"), _adam8(), *tail()),
    }


# --------------------------------------------------------------------------- exact formulas

MAX_PRECOND_DIM = 4096  # SCAO's default
SOAP_MAX_PRECOND_DIM = 10000  # the SOAP reference implementation's default


def _sides(shape, max_dim):
    if len(shape) < 2 or math.prod(shape) == 0:
        return []
    m, n = shape[0], math.prod(shape[1:])
    sides = [d for d in (m, n) if 1 < d <= max_dim]
    return sides


def adam_bytes(numel: int) -> int:
    return 8 * numel


def adam8_bytes(numel: int, block: int = 64, min_size: int = 4096) -> int:
    return 2 * (numel + 4 * math.ceil(numel / block)) if numel >= min_size else 8 * numel


def scao_full_side(d: int, k_max: int = 128, block: int = 32) -> int:
    cap = min(d, k_max)
    return d * d + 4 * math.ceil(d * d / block) + 4 * d + 4 * d * cap + 4 * cap + 4 + 8 + 8


def scao_sketch_side(d: int, rank: int, storage: str, k_max: int = 128, block: int = 32) -> int:
    p = min(rank, d)
    cap = min(p, k_max)
    frame = {"float32": 4 * d * p, "bfloat16": 2 * d * p, "int8": d * p + 4 * math.ceil(d * p / block)}[storage]
    basis = (4 if storage == "float32" else 2) * d * cap
    return frame + 4 * p * p + 8 + basis + 4 * cap + 4 + 8 + 8


def method_bytes(method: str, shape: tuple[int, ...], hidden_matrix: bool) -> int:
    """State bytes of one trained leaf (step counters and the blend weight, a few bytes per
    optimizer, are left out)."""
    numel = math.prod(shape)
    if method == "AdamW (fp32 moments)":
        return adam_bytes(numel)
    if method == "8-bit AdamW":
        return adam8_bytes(numel)
    if method == "SOAP (fp32 factors + eigenbases + Adam)":
        return adam_bytes(numel) + sum(8 * d * d for d in _sides(shape, SOAP_MAX_PRECOND_DIM))
    if method == "Muon (fp32 momentum; AdamW on the rest)":
        return 4 * numel if hidden_matrix and len(shape) == 2 else adam_bytes(numel)
    if method == "scao default (int8 full factors)":
        return adam_bytes(numel) + sum(scao_full_side(d) for d in _sides(shape, MAX_PRECOND_DIM))
    if method == "scao sketch r128 bf16":
        return adam_bytes(numel) + sum(scao_sketch_side(d, 128, "bfloat16") for d in _sides(shape, MAX_PRECOND_DIM))
    if method == "scao sketch r64 int8 + 8-bit Adam":
        return adam8_bytes(numel) + sum(scao_sketch_side(d, 64, "int8") for d in _sides(shape, MAX_PRECOND_DIM))
    raise ValueError(method)


METHODS = (
    "AdamW (fp32 moments)",
    "8-bit AdamW",
    "SOAP (fp32 factors + eigenbases + Adam)",
    "Muon (fp32 momentum; AdamW on the rest)",
    "scao default (int8 full factors)",
    "scao sketch r128 bf16",
    "scao sketch r64 int8 + 8-bit Adam",
)


def check_formulas() -> None:
    """Every library method's formula equals ``memory_report`` on real small states: per leaf where
    the report attributes the bytes to leaves, and in total (up to the step counters)."""
    shapes = {"a": (300, 40), "b": (300, 40), "c": (40, 300), "vec": (300,), "tall": (5000, 16), "sq": (96, 96),
              "small": (7, 5), "lora_A": (16, 200), "lora_B": (200, 16)}
    params = make_params(shapes)
    for name, make in optimizers().items():
        rep = sf.memory_report(make().init(params), params)
        per_leaf = {leaf: method_bytes(name, shape, True) for leaf, shape in shapes.items()}
        counters = rep["total_bytes"] - sum(per_leaf.values())
        if not 0 <= counters < 256:  # step counters, the blend weight, the guard's flags
            raise AssertionError(f"{name}: formulas {sum(per_leaf.values())} bytes, memory_report {rep['total_bytes']}")
        if rep["unattributed_bytes"] >= 256:  # an encoded (8-bit) Adam state is not attributed to leaves
            continue
        for leaf, want in per_leaf.items():
            got = rep["per_leaf"][leaf]
            if got != want:
                raise AssertionError(f"{name}, leaf {leaf} {shapes[leaf]}: formula {want} bytes, memory_report {got}")


# --------------------------------------------------------------------------- the table


def rows():
    """One row per (model, regime, method): trained params, state bytes/param, state GB, total GB."""
    out = []
    for cfg in MODELS:
        full = model_shapes(cfg)
        n_model = sum(math.prod(s) for s, _ in full.values())
        regimes = {
            "full": [(s, lin) for s, lin in full.values()],
            "LoRA r=16": [(s, True) for s in lora_shapes(cfg).values()],
        }
        for regime, leaves in regimes.items():
            n_train = sum(math.prod(s) for s, _ in leaves)
            frozen = 0 if regime == "full" else n_model
            for method in METHODS:
                state = sum(method_bytes(method, s, lin) for s, lin in leaves)
                total = 2 * (n_model if regime == "full" else frozen + n_train) + 2 * n_train + state
                out.append(dict(model=cfg.name, regime=regime, method=method, params=n_model, trained=n_train,
                                bytes_per_param=state / n_train, state_gb=state / 1e9, total_gb=total / 1e9))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args(argv)
    check_formulas()
    print("formulas checked against sf.memory_report on small shapes: exact")
    if args.check_only:
        return
    for cfg in MODELS:
        print(f"{cfg.name}: hidden {cfg.hidden}, intermediate {cfg.intermediate}, layers {cfg.layers}, "
              f"heads {cfg.heads}, kv heads {cfg.kv_heads}, vocab {cfg.vocab}, tied embeddings {cfg.tied}")
    print("\n| model | regime | method | trained params | state bytes/param | state GB | weights+grads+state GB | fits 16 GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows():
        fits = "yes" if r["total_gb"] <= 16.0 else "no"
        print(f"| {r['model']} | {r['regime']} | {r['method']} | {r['trained'] / 1e6:.1f}M | {r['bytes_per_param']:.2f} "
              f"| {r['state_gb']:.2f} | {r['total_gb']:.2f} | {fits} |")


if __name__ == "__main__":
    main()
