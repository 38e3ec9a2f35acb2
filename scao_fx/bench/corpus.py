"""A deterministic, offline text corpus for the benchmark.

The default corpus is the running Python's own standard library: the ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` (``site-packages`` / ``dist-packages`` excluded), sorted by
their POSIX path relative to that directory, read as UTF-8 (undecodable bytes replaced) and
concatenated until a size cap. Nothing is downloaded; the same interpreter gives the same text
(its SHA-256 is recorded with every result). ``--data PATH`` uses any text file instead.

Tokens are characters (vocabulary: the sorted set of characters of the text) or raw bytes
(vocabulary 256). The first ``1 - val_fraction`` of the token stream is the training split, the
rest the validation split. Batches are random windows drawn from an explicit
``torch.Generator``, so two runs with the same seed see the same data in the same order.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "Corpus",
    "stdlib_files",
    "stdlib_text",
    "build_corpus",
    "sample_batch",
    "BatchStream",
    "DEFAULT_CORPUS_BYTES",
]

#: Default cap on the corpus size in characters (about 2 MB of Python source).
DEFAULT_CORPUS_BYTES = 2_000_000

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted by relative POSIX path.

    Args:
        root: directory to scan (default: this interpreter's ``stdlib`` path).

    Returns:
        Absolute paths; third-party package directories and caches are skipped.
    """
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"]).resolve()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(base).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def stdlib_text(max_chars: int = DEFAULT_CORPUS_BYTES, root: str | os.PathLike | None = None) -> tuple[str, int]:
    """Concatenate the sorted standard-library files up to ``max_chars`` characters.

    Files are taken whole in order while the total stays under the cap; the file that crosses
    the cap is cut at it. Returns ``(text, number_of_files_used)``.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    parts: list[str] = []
    total = 0
    used = 0
    for path in stdlib_files(root):
        text = path.read_bytes().decode("utf-8", errors="replace")
        piece = f"# file: {path.name}\n{text}\n"
        take = piece[: max_chars - total]
        parts.append(take)
        total += len(take)
        used += 1
        if total >= max_chars:
            break
    if not parts:
        raise RuntimeError(f"no .py files found under {root or sysconfig.get_paths()['stdlib']}")
    return "".join(parts), used


@dataclass
class Corpus:
    """A tokenised corpus split into training and validation token streams.

    Attributes:
        train: 1-D int64 tensor of token ids.
        val: 1-D int64 tensor of token ids.
        vocab_size: number of distinct ids.
        tokenizer: ``"char"`` or ``"byte"``.
        source: human-readable description of where the text came from.
        sha256: hash of the text, for reproducibility records.
        n_chars: length of the text in characters.
        itos: id -> character (char tokenizer) or ``None`` (byte tokenizer).
    """

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    tokenizer: str
    source: str
    sha256: str
    n_chars: int
    itos: list[str] | None = field(default=None, repr=False)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.itos is not None:
            return "".join(self.itos[i] for i in ids)
        return bytes(ids).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return dict(
            source=self.source,
            tokenizer=self.tokenizer,
            vocab_size=self.vocab_size,
            n_chars=self.n_chars,
            train_tokens=int(self.train.numel()),
            val_tokens=int(self.val.numel()),
            sha256=self.sha256,
        )


def build_corpus(
    data: str | os.PathLike | None = None,
    *,
    max_chars: int = DEFAULT_CORPUS_BYTES,
    tokenizer: str = "char",
    val_fraction: float = 0.1,
    stdlib_root: str | os.PathLike | None = None,
) -> Corpus:
    """Build the benchmark corpus.

    Args:
        data: path of a text file to use; ``None`` builds the standard-library corpus.
        max_chars: cap on the text length in characters (applies to ``data`` too).
        tokenizer: ``"char"`` (vocabulary = sorted characters of the text) or ``"byte"``.
        val_fraction: fraction of the token stream held out (the tail), in (0, 0.5].
        stdlib_root: override the standard-library directory (tests).

    Returns:
        A :class:`Corpus`.
    """
    if tokenizer not in ("char", "byte"):
        raise ValueError(f"tokenizer must be 'char' or 'byte', got {tokenizer!r}")
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    if data is None:
        text, n_files = stdlib_text(max_chars, stdlib_root)
        root = Path(stdlib_root or sysconfig.get_paths()["stdlib"])
        source = f"Python standard library ({root}): first {n_files} .py files in sorted order"
    else:
        path = Path(data)
        text = path.read_bytes().decode("utf-8", errors="replace")[:max_chars]
        source = f"file {path}"
    if tokenizer == "char":
        itos = sorted(set(text))
        stoi = {ch: i for i, ch in enumerate(itos)}
        ids = torch.tensor([stoi[ch] for ch in text], dtype=torch.int64)
        vocab = len(itos)
    else:
        itos = None
        raw = text.encode("utf-8")
        ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)
        vocab = 256
    n_val = max(1, int(round(ids.numel() * val_fraction)))
    if ids.numel() - n_val < 2 or n_val < 2:
        raise ValueError(f"corpus too small ({ids.numel()} tokens) for a train/validation split")
    return Corpus(
        train=ids[:-n_val].clone(),
        val=ids[-n_val:].clone(),
        vocab_size=vocab,
        tokenizer=tokenizer,
        source=source,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        n_chars=len(text),
        itos=itos,
    )


def sample_batch(
    data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``block_size`` tokens and their next-token targets.

    The offsets are drawn from ``generator`` (a CPU generator), so the batch depends only on
    the generator's state.
    """
    if data.numel() <= block_size + 1:
        raise ValueError(f"token stream of {data.numel()} tokens is too short for block_size {block_size}")
    starts = torch.randint(0, data.numel() - block_size - 1, (batch_size,), generator=generator)
    offsets = starts[:, None] + torch.arange(block_size + 1)[None, :]
    windows = data[offsets]
    return windows[:, :-1], windows[:, 1:]


class BatchStream:
    """An endless, seeded stream of training batches (paired across optimizers by seed).

    Args:
        data: token stream.
        batch_size, block_size: batch shape.
        seed: generator seed; the same seed gives the same sequence of batches.
        device: where the batches are moved.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, block_size: int, seed: int, device="cpu") -> None:
        self.data = data
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = sample_batch(self.data, self.batch_size, self.block_size, self.generator)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
