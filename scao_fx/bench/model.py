"""A small decoder-only transformer (GPT) for the benchmark, written from scratch.

Pre-norm blocks (LayerNorm -> causal self-attention -> residual, LayerNorm -> GELU MLP ->
residual), learned absolute position embeddings, an untied output head. Initialisation is
drawn from an explicit ``torch.Generator`` so that the same seed gives bit-identical weights for
every optimizer of a paired comparison.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GPTConfig", "GPT", "PRESETS", "preset"]


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model and of a training batch.

    Attributes:
        vocab_size: number of token ids (set from the corpus).
        n_layer: transformer blocks.
        n_head: attention heads (``d_model % n_head == 0``).
        d_model: residual-stream width.
        block_size: context length in tokens.
        batch_size: sequences per training step.
        dropout: dropout probability (0 keeps runs deterministic and comparable).
    """

    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    block_size: int = 128
    batch_size: int = 16
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "block_size", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


#: Named model/batch shapes. ``small`` is the CPU default (the benchmark's workload, docs/benchmarks.md); ``tiny`` is
#: for ``--quick``; ``medium`` and ``large`` are meant for a GPU.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=2, d_model=64, block_size=64, batch_size=8),
    "small": dict(n_layer=4, n_head=4, d_model=128, block_size=128, batch_size=16),
    "medium": dict(n_layer=6, n_head=6, d_model=384, block_size=256, batch_size=32),
    "large": dict(n_layer=12, n_head=12, d_model=768, block_size=512, batch_size=16),
}


def preset(name: str, vocab_size: int, **overrides) -> GPTConfig:
    """The :class:`GPTConfig` of preset ``name`` with ``vocab_size`` and any overrides set."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = dict(PRESETS[name])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return GPTConfig(vocab_size=vocab_size, **fields)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (b, t, c) -> (b, heads, t, c / heads)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    """Decoder-only transformer language model.

    Args:
        cfg: the shape.
        seed: initialisation seed (weights ~ N(0, 0.02), residual output projections scaled by
            ``1/sqrt(2 n_layer)``, biases zero, LayerNorm at identity).

    ``forward(idx, targets=None)`` returns the logits ``(B, T, vocab)`` and, when ``targets`` is
    given, the mean cross-entropy as a second value.
    """

    def __init__(self, cfg: GPTConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Re-initialise every weight deterministically from ``seed`` (independent of global RNG)."""
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln" in name or name.startswith("ln_"):
                p.fill_(1.0)
            else:
                std = resid_std if name.endswith(("attn.proj.weight", "out.weight")) else 0.02
                # draw on the CPU so the weights do not depend on the device
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        _, t = idx.shape
        if t > self.cfg.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss
