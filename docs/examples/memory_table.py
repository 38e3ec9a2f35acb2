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
from scao_fx.presets import SCAO_DEFAULTS
from scao_fx.transforms.adam import FACTORED_MIN_DIM

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


# The published config.json values: hidden size, intermediate (MLP) size, layers, attention heads,
# key/value heads, vocabulary, tied input/output embeddings.
# GPT-2 small (n_embd 768, n_inner None = 4 x 768, n_layer 12, n_head 12, vocab 50257, n_positions 1024):
GPT2_SMALL = Config("GPT-2 small", 768, 3072, 12, 12, 12, 50257, True, "gpt2", positions=1024)
# Qwen2.5-0.5B (hidden 896, intermediate 4864, 24 layers, 14 heads, 2 kv heads, vocab 151936, tied,
# biases on q/k/v):
QWEN25_05B = Config("Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936, True, "llama", qkv_bias=True)
# Llama-3.2-1B (hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 kv heads, vocab 128256, tied):
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


def make_params(shapes: dict[str, tuple[int, ...]], device: str = "meta") -> dict[str, torch.Tensor]:
    """Float32 tensors of these shapes; on the ``meta`` device by default (no memory: an optimizer
    state built from them is counted by ``sf.memory_report`` as the bytes it would take)."""
    return {k: torch.empty(s, device=device) for k, s in shapes.items()}


# --------------------------------------------------------------------------- the optimizers


def _adam8():
    return sf.quantize_state(sf.scale_by_adam(), sf.int8_adam_codecs())


#: The seed form at its earlier defaults (adaptive rank up to 128, float32 bases, float32 moments
#: unless a row says otherwise).
SEED = dict(form="seed", epsilon_sparse=0.05, k_max=128, basis_storage="float32")
SEED_SKETCH = dict(form="seed", epsilon_sparse=0.05, k_max=128)  # (a sketch stores its basis as sketch_storage says)
SKETCH_FP32 = dict(curvature="sketch", sketch_rank=128, sketch_storage="bfloat16")
SKETCH_INT8 = dict(curvature="sketch", sketch_rank=64, sketch_storage="int8")


def optimizers() -> dict:
    """The library's optimizers of the table (factories): AdamW, 8-bit AdamW and SCAO's configurations."""
    tail = lambda: (sf.add_decayed_weights(0.01), sf.scale_by_learning_rate(1e-3))  # noqa: E731
    return {
        "AdamW (fp32 moments)": lambda: sf.adamw(),
        "8-bit AdamW (64-entry blocks)": lambda: sf.chain(_adam8(), *tail()),
        "scao default (eigenbasis, int8 factors, bf16 bases and first moments, factored second moments)":
            lambda: sf.scao(),
        "scao default, max_precond_dim=1024": lambda: sf.scao(max_precond_dim=1024),
        "scao default, max_precond_dim=4096": lambda: sf.scao(max_precond_dim=4096),
        "scao default, moments=float32": lambda: sf.scao(moments="float32"),
        "scao default, moments=int8": lambda: sf.scao(moments="int8"),
        "scao default, max_precond_dim=1024, moments=int8": lambda: sf.scao(max_precond_dim=1024, moments="int8"),
        "scao default, second_moment=full": lambda: sf.scao(second_moment="full"),
        "scao default, second_moment=full, moments=float32": lambda: sf.scao(second_moment="full", moments="float32"),
        "scao default, second_moment=full, moments=int8": lambda: sf.scao(second_moment="full", moments="int8"),
        "scao seed (int8 full factors)": lambda: sf.scao(**SEED, moments="float32"),
        "scao seed, moments=int8": lambda: sf.scao(**SEED, moments="int8"),
        "scao seed, max_precond_dim=1024": lambda: sf.scao(**SEED, max_precond_dim=1024, moments="float32"),
        "scao seed, max_precond_dim=1024, moments=int8": lambda: sf.scao(**SEED, max_precond_dim=1024, moments="int8"),
        "scao seed, sketch r128 bf16": lambda: sf.scao(**SEED_SKETCH, moments="float32", **SKETCH_FP32),
        "scao seed, sketch r64 int8, moments=int8": lambda: sf.scao(**SEED_SKETCH, moments="int8", **SKETCH_INT8),
    }


# --------------------------------------------------------------------------- exact formulas

MAX_PRECOND_DIM = SCAO_DEFAULTS["max_precond_dim"]  # SCAO's default (2048)
FLOAT32_BELOW = SCAO_DEFAULTS["float32_below"]  # sides shorter than this keep float32 factors and bases (64)
# SOAP: the rule used here is "a side is preconditioned if it is at most max_precond_dim long"
# (longer sides, e.g. the vocabulary, are left one-sided), with two limits: 10000 (the SOAP
# paper's reference code and sf.soap) and 2048 (a tighter limit some implementations default to).
SOAP_MAX_PRECOND_DIMS = (10000, 2048)


def _sides(shape, max_dim):
    if len(shape) < 2 or math.prod(shape) == 0:
        return []
    m, n = shape[0], math.prod(shape[1:])
    sides = [d for d in (m, n) if 1 < d <= max_dim]
    return sides


def adam_bytes(numel: int) -> int:
    return 8 * numel


def adam8_bytes(numel: int, block: int = 64, min_size: int = 4096) -> int:
    """Two int8 moments with one float32 scale per ``block`` entries each; tensors under
    ``min_size`` entries keep float32 moments (as ``quantize_state`` and common 8-bit AdamWs do)."""
    return 2 * (numel + 4 * math.ceil(numel / block)) if numel >= min_size else 8 * numel


def _factor(d: int, block: int) -> int:
    """A ``d x d`` factor's off-diagonal storage: int8 codes and block scales, or float32 for a
    side shorter than ``float32_below``."""
    return 4 * d * d if d < FLOAT32_BELOW else d * d + 4 * math.ceil(d * d / block)


def scao_full_side(d: int, k_max: int = 128, block: int = 32) -> int:
    """One side of the seed form with float32 bases: factor, float32 diagonal, basis, gains,
    tail, rank and fallback count."""
    cap = min(d, k_max)
    return _factor(d, block) + 4 * d + 4 * d * cap + 4 * cap + 4 + 8 + 8


def scao_eigen_side(d: int, block: int = 32) -> int:
    """One side of the default form: int8 factor (codes, block scales, float32 diagonal), a
    full-width bfloat16 basis (float32 below ``float32_below``) and its float32 eigenvalues,
    tail, rank and fallback count."""
    basis = (4 if d < FLOAT32_BELOW else 2) * d * d
    return _factor(d, block) + 4 * d + basis + 4 * d + 4 + 8 + 8


def scao_sketch_side(d: int, rank: int, storage: str, k_max: int = 128, block: int = 32) -> int:
    p = min(rank, d)
    cap = min(p, k_max)
    frame = {"float32": 4 * d * p, "bfloat16": 2 * d * p, "int8": d * p + 4 * math.ceil(d * p / block)}[storage]
    basis = (4 if storage == "float32" else 2) * d * cap
    return frame + 4 * p * p + 8 + basis + 4 * cap + 4 + 8 + 8


def adam_bf16_bytes(numel: int, min_size: int = 4096) -> int:
    """Two bfloat16 moments; tensors under ``min_size`` entries keep float32 moments (as
    ``quantize_state`` does)."""
    return 4 * numel if numel >= min_size else 8 * numel


def _moments(numel, moments):
    """Adam's two moments stored as SCAO's ``moments`` keyword says."""
    return {"float32": adam_bytes(numel), "bfloat16": adam_bf16_bytes(numel), "int8": adam8_bytes(numel)}[moments]


def _one_moment(numel, moments, min_size=4096):
    """One moment of ``numel`` entries stored as ``moments`` says (under ``min_size``: float32)."""
    if moments == "float32" or numel < min_size:
        return 4 * numel
    return 2 * numel if moments == "bfloat16" else numel + 4 * math.ceil(numel / 64)


def _factored_moments(numel, shape, moments):
    """``second_moment="factored"``: the first moment, and the second factored (``m + n``
    entries) for a matrix whose sides are both at least 128 (``FACTORED_MIN_DIM``), full
    otherwise, each stored as ``moments`` says."""
    m, n = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (0, 0)
    second = m + n if min(m, n) >= FACTORED_MIN_DIM else numel
    return _one_moment(numel, moments) + _one_moment(second, moments)


def _eigen(numel, shape, *, moments=SCAO_DEFAULTS["moments"], max_dim=MAX_PRECOND_DIM, factored=True):
    """The default (eigenbasis) form: the moments of the rotated core, which has the leaf's size
    (the second moment factored by default, ``second_moment="auto"``)."""
    adam = _factored_moments(numel, shape, moments) if factored else _moments(numel, moments)
    return adam + sum(scao_eigen_side(d) for d in _sides(shape, max_dim))


def _scao(numel, shape, *, moments="float32", max_dim=MAX_PRECOND_DIM, sketch=None):
    adam = _moments(numel, moments)
    if sketch is None:
        return adam + sum(scao_full_side(d) for d in _sides(shape, max_dim))
    return adam + sum(scao_sketch_side(d, sketch["sketch_rank"], sketch["sketch_storage"]) for d in _sides(shape, max_dim))


#: method -> bytes of one trained leaf ``(shape, hidden_matrix) -> int`` (step counters and the
#: blend weight, a few bytes per optimizer, are left out).
FORMULAS = {
    "AdamW (fp32 moments)": lambda shape, hidden: adam_bytes(math.prod(shape)),
    "8-bit AdamW (64-entry blocks)": lambda shape, hidden: adam8_bytes(math.prod(shape)),
    "8-bit AdamW (256-entry blocks)": lambda shape, hidden: adam8_bytes(math.prod(shape), block=256),
    "SOAP, sides <= 10000 (fp32 factors + eigenbases + Adam)": lambda shape, hidden: adam_bytes(math.prod(shape))
    + sum(8 * d * d for d in _sides(shape, SOAP_MAX_PRECOND_DIMS[0])),
    "SOAP, sides <= 2048": lambda shape, hidden: adam_bytes(math.prod(shape))
    + sum(8 * d * d for d in _sides(shape, SOAP_MAX_PRECOND_DIMS[1])),
    "Muon (fp32 momentum; AdamW on the rest)": lambda shape, hidden: 4 * math.prod(shape)
    if hidden and len(shape) == 2 else adam_bytes(math.prod(shape)),
    "scao default (eigenbasis, int8 factors, bf16 bases and first moments, factored second moments)":
        lambda shape, hidden: _eigen(math.prod(shape), shape),
    "scao default, max_precond_dim=1024": lambda shape, hidden: _eigen(math.prod(shape), shape, max_dim=1024),
    "scao default, max_precond_dim=4096": lambda shape, hidden: _eigen(math.prod(shape), shape, max_dim=4096),
    "scao default, moments=float32": lambda shape, hidden: _eigen(math.prod(shape), shape, moments="float32"),
    "scao default, moments=int8": lambda shape, hidden: _eigen(math.prod(shape), shape, moments="int8"),
    "scao default, max_precond_dim=1024, moments=int8": lambda shape, hidden: _eigen(math.prod(shape), shape,
                                                                                    moments="int8", max_dim=1024),
    "scao default, second_moment=full": lambda shape, hidden: _eigen(math.prod(shape), shape, factored=False),
    "scao default, second_moment=full, moments=float32": lambda shape, hidden: _eigen(math.prod(shape), shape,
                                                                                     moments="float32", factored=False),
    "scao default, second_moment=full, moments=int8": lambda shape, hidden: _eigen(math.prod(shape), shape,
                                                                                  moments="int8", factored=False),
    "scao seed (int8 full factors)": lambda shape, hidden: _scao(math.prod(shape), shape),
    "scao seed, moments=int8": lambda shape, hidden: _scao(math.prod(shape), shape, moments="int8"),
    "scao seed, max_precond_dim=1024": lambda shape, hidden: _scao(math.prod(shape), shape, max_dim=1024),
    "scao seed, max_precond_dim=1024, moments=int8": lambda shape, hidden: _scao(math.prod(shape), shape,
                                                                                moments="int8", max_dim=1024),
    "scao seed, sketch r128 bf16": lambda shape, hidden: _scao(math.prod(shape), shape, sketch=SKETCH_FP32),
    "scao seed, sketch r64 int8, moments=int8": lambda shape, hidden: _scao(math.prod(shape), shape, moments="int8",
                                                                           sketch=SKETCH_INT8),
}
METHODS = tuple(FORMULAS)


def method_bytes(method: str, shape: tuple[int, ...], hidden_matrix: bool) -> int:
    """State bytes of one trained leaf under ``method`` (a key of :data:`FORMULAS`)."""
    return FORMULAS[method](tuple(shape), hidden_matrix)


def check_formulas() -> None:
    """Every library method's formula equals ``memory_report`` on real states, up to the step
    counters (8 bytes each): per leaf on small CPU tensors where the report attributes the bytes
    to leaves, and in total there and on GPT-2 small's shapes (meta tensors)."""
    shapes = {"a": (300, 40), "b": (300, 40), "c": (40, 300), "vec": (300,), "tall": (5000, 16), "sq": (96, 96),
              "small": (7, 5), "lora_A": (16, 200), "lora_B": (200, 16), "wide": (1100, 30)}
    gpt2 = gpt2_small_shapes()
    for name, make in optimizers().items():
        for which, leaf_shapes, device in (("small shapes", shapes, "cpu"), ("GPT-2 small", gpt2, "meta")):
            params = make_params(leaf_shapes, device)
            rep = sf.memory_report(make().init(params), params)
            per_leaf = {leaf: method_bytes(name, shape, True) for leaf, shape in leaf_shapes.items()}
            counters = rep["total_bytes"] - sum(per_leaf.values())
            limit = 256 if device == "cpu" else 24 * len(leaf_shapes) + 256  # a step count per leaf at most
            if not 0 <= counters < limit:  # step counters, the blend weight, the guard's flags
                raise AssertionError(f"{name} on {which}: formulas {sum(per_leaf.values())} bytes, memory_report "
                                     f"{rep['total_bytes']}")
            if device != "cpu" or rep["unattributed_bytes"] >= 256:  # encoded (8-bit) Adam states are not per leaf
                continue
            for leaf, want in per_leaf.items():
                got = rep["per_leaf"][leaf]
                if not 0 <= got - want <= 16:  # the leaf's own step counters (int64) on top
                    raise AssertionError(f"{name}, leaf {leaf} {shapes[leaf]}: formula {want} bytes, memory_report {got}")


# --------------------------------------------------------------------------- the table

GB = 1e9


def rows():
    """One row per (model, regime, method): trained params, state bytes/param, state GB, and the
    weights + gradients + state in GB two ways: bf16 weights and gradients (2 + 2 bytes per
    parameter), or float32 trained weights and gradients (4 + 4; a LoRA's frozen base stays bf16)."""
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
                bf16 = 2 * frozen + 4 * n_train + state
                fp32 = 2 * frozen + 8 * n_train + state
                out.append(dict(model=cfg.name, regime=regime, method=method, params=n_model, trained=n_train,
                                bytes_per_param=state / n_train, state_gb=state / GB, total_gb=bf16 / GB,
                                total_fp32_gb=fp32 / GB))
    return out


def fits_16gb(table=None) -> dict[tuple[str, str], dict[str, list[str]]]:
    """``{(model, regime): {"bf16": [methods], "fp32": [methods]}}``: which methods' weights +
    gradients + state fit in 16 GB (10^9 bytes; activations and the rest not counted)."""
    out: dict[tuple[str, str], dict[str, list[str]]] = {}
    for r in table or rows():
        slot = out.setdefault((r["model"], r["regime"]), {"bf16": [], "fp32": []})
        if r["total_gb"] <= 16.0:
            slot["bf16"].append(r["method"])
        if r["total_fp32_gb"] <= 16.0:
            slot["fp32"].append(r["method"])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args(argv)
    check_formulas()
    print("formulas checked against sf.memory_report (small CPU states per leaf, GPT-2 small meta states in total): exact")
    if args.check_only:
        return
    for cfg in MODELS:
        n = sum(math.prod(s) for s, _ in model_shapes(cfg).values())
        print(f"{cfg.name}: hidden {cfg.hidden}, intermediate {cfg.intermediate}, layers {cfg.layers}, "
              f"heads {cfg.heads}, kv heads {cfg.kv_heads}, vocab {cfg.vocab}, tied embeddings {cfg.tied}; "
              f"{n / 1e6:.1f}M parameters, LoRA r=16 {sum(math.prod(s) for s in lora_shapes(cfg).values()) / 1e6:.2f}M")
    table = rows()
    for cfg in MODELS:
        mine = {(r["regime"], r["method"]): r for r in table if r["model"] == cfg.name}
        print(f"\n{cfg.name}: optimizer state in bytes per trained parameter and GB; weights + gradients + state in GB "
              "(bf16 weights and gradients / fp32 trained weights and gradients)\n")
        print("| method | full: B/param | full: state GB | full: total GB bf16 / fp32 | LoRA r=16: B/param | "
              "LoRA: state GB | LoRA: total GB bf16 / fp32 |")
        print("|---|---|---|---|---|---|---|")
        for method in METHODS:
            f, lo = mine[("full", method)], mine[("LoRA r=16", method)]
            print(f"| {method} | {f['bytes_per_param']:.2f} | {f['state_gb']:.2f} | {f['total_gb']:.2f} / "
                  f"{f['total_fp32_gb']:.2f} | {lo['bytes_per_param']:.2f} | {lo['state_gb']:.3f} | "
                  f"{lo['total_gb']:.2f} / {lo['total_fp32_gb']:.2f} |")
    print("\nWhat fits in 16 GB (weights + gradients + optimizer state <= 16e9 bytes; activations not counted):\n")
    for (model, regime), slot in fits_16gb(table).items():
        for prec in ("bf16", "fp32"):
            missing = [m for m in METHODS if m not in slot[prec]]
            verdict = "every method" if not missing else ("none" if not slot[prec] else "all but " + "; ".join(missing))
            print(f"- {model}, {regime}, {prec} weights and gradients: {verdict}")


if __name__ == "__main__":
    main()
