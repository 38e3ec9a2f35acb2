"""What the benchmark trains: a *workload* is data + a model builder + a loss and an evaluation.

The runner (:mod:`scao_fx.bench.runner`) is written against :class:`Workload`: it builds one
model per (optimizer, seed) with :meth:`Workload.build_model`, draws that seed's training
batches from :meth:`Workload.batches`, takes a step on :meth:`Workload.loss` and records
:meth:`Workload.evaluate` on a held-out set that is the same for every run. Interleaving,
seeds, learning-rate sweeps, per-run writes and the comparisons are therefore shared by every
workload.

Two workloads exist: ``gpt`` (:class:`GPTWorkload`, the default: a small GPT trained from
scratch on standard-library text) and ``finetune`` (:class:`scao_fx.bench.finetune.FinetuneWorkload`:
a pretrained MiniLM fine-tuned to classify standard-library docstrings).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from . import optimizers as optreg
from .corpus import BatchStream, Corpus, build_corpus, sample_batch
from .model import GPT, GPTConfig, preset
from .progress import synchronize

__all__ = ["Workload", "GPTWorkload", "WORKLOADS", "make_workload"]

#: The ``--workload`` values.
WORKLOADS: tuple[str, ...] = ("gpt", "finetune")

#: Seed of the GPT workload's fixed validation windows (the same for every run).
EVAL_SEED = 1_000_003


class Workload:
    """The interface the runner trains through (see the module docstring)."""

    #: Short name recorded with results.
    name: str = "workload"
    #: Tokens a training step processes (for tokens/s).
    tokens_per_step: int = 0

    def build_model(self, seed: int) -> torch.nn.Module:
        """A fresh model on the run's device; the same ``seed`` gives the same weights."""
        raise NotImplementedError

    def trainable(self, model: torch.nn.Module, named: bool) -> list:
        """The parameters the optimizer gets (``(name, tensor)`` pairs when ``named``)."""
        if named:
            return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [p for p in model.parameters() if p.requires_grad]

    def batches(self, seed: int) -> Iterator[Any]:
        """The training batches of ``seed`` (the same sequence for every optimizer)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The scalar training loss of ``batch``."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics: ``val_loss`` and any others (e.g. ``val_acc``), in eval mode, no grad."""
        raise NotImplementedError

    def tune_spec(self, spec: optreg.OptimizerSpec) -> optreg.OptimizerSpec:
        """``spec`` as this workload runs it (e.g. with the workload's tuned default learning rate)."""
        return spec

    def warm_up(self) -> None:
        """Untimed passes before the first measured run (thread pools, allocator arenas)."""

    def describe_data(self) -> dict:
        """Recorded as ``results["corpus"]``."""
        return {}

    def describe_model(self) -> dict:
        """Recorded as ``results["model"]``."""
        return {}

    def summary_line(self) -> str:
        """One log line: the data, the model, the batch."""
        return self.name


class GPTWorkload(Workload):
    """The default workload: next-character prediction on a text corpus with :class:`GPT`."""

    name = "gpt"

    def __init__(self, cfg, device: torch.device) -> None:
        from .runner import BenchError

        self.cfg = cfg
        self.device = device
        try:
            self.corpus: Corpus = build_corpus(cfg.data, max_chars=cfg.corpus_chars, tokenizer=cfg.tokenizer)
        except OSError as exc:
            raise BenchError(f"--data {cfg.data}: cannot read it ({exc.strerror or exc}); give a text file") from None
        except ValueError as exc:
            raise BenchError(f"{'--data ' + str(cfg.data) if cfg.data else 'corpus'}: {exc}") from None
        self.model_cfg: GPTConfig = preset(cfg.preset, self.corpus.vocab_size, batch_size=cfg.batch_size,
                                           block_size=cfg.block_size)
        self._check_corpus()
        self.tokens_per_step = self.model_cfg.batch_size * self.model_cfg.block_size
        gen = torch.Generator(device="cpu").manual_seed(EVAL_SEED)
        self.val_batches = []
        for _ in range(cfg.eval_batches):
            x, y = sample_batch(self.corpus.val, self.model_cfg.batch_size, self.model_cfg.block_size, gen)
            self.val_batches.append((x.to(device), y.to(device)))

    def _check_corpus(self) -> None:
        from .runner import BenchError

        need = self.model_cfg.block_size + 2
        n_train, n_val = self.corpus.train.numel(), self.corpus.val.numel()
        if n_train < need or n_val < need:
            where = f"--data {self.cfg.data}" if self.cfg.data else "the corpus"
            raise BenchError(
                f"{where}: {n_train:,} training and {n_val:,} validation tokens (the last 10 %), too few for the "
                f"context of {self.model_cfg.block_size} tokens; each split needs at least {need} "
                f"(use a longer text, a larger --corpus-chars, or a smaller --block-size / --preset)"
            )

    def build_model(self, seed: int) -> torch.nn.Module:
        return GPT(self.model_cfg, seed=seed).to(self.device)

    def batches(self, seed: int) -> Iterator[Any]:
        return BatchStream(self.corpus.train, self.model_cfg.batch_size, self.model_cfg.block_size, seed, self.device)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return model(x, y)[1]

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        total = 0.0
        for x, y in self.val_batches:
            total += float(model(x, y)[1])
        return {"val_loss": total / len(self.val_batches)}

    def warm_up(self, steps: int = 3) -> None:
        model = self.build_model(0)
        stream = self.batches(0)
        for _ in range(steps):
            x, y = next(stream)
            model(x, y)[1].backward()
        with torch.no_grad():
            model(x, y)
        synchronize(self.device)

    def describe_data(self) -> dict:
        return self.corpus.describe()

    def describe_model(self) -> dict:
        return dict(self.model_cfg.to_dict(), n_params=GPT(self.model_cfg).num_params())

    def summary_line(self) -> str:
        c, m = self.corpus, self.model_cfg
        return (f"corpus: {c.n_chars:,} chars, vocab {c.vocab_size} ({c.tokenizer}); "
                f"model: {self.cfg.preset} {m.n_layer}x{m.d_model}, {GPT(m).num_params():,} params; "
                f"{self.cfg.steps} steps x batch {m.batch_size}x{m.block_size}")


def make_workload(cfg, device: torch.device) -> Workload:
    """The workload of ``cfg.workload`` (``gpt`` or ``finetune``), built for ``device``."""
    name = getattr(cfg, "workload", "gpt")
    if name == "gpt":
        return GPTWorkload(cfg, device)
    if name == "finetune":
        from .finetune import FinetuneWorkload

        return FinetuneWorkload(cfg, device)
    from .runner import BenchError

    raise BenchError(f"--workload: unknown workload {name!r}; choose one of: {', '.join(WORKLOADS)}")
