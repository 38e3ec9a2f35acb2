"""``scao-fx bench``: side-by-side optimizer benchmark on real text (see docs/benchmarks.md).

Modules: :mod:`.corpus` (offline, deterministic text corpus and seeded batches), :mod:`.model`
(a small GPT), :mod:`.workload` (what is trained: data, model builder, loss and evaluation;
the GPT workload), :mod:`.finetune` (the fine-tuning workload: MiniLM on standard-library
docstrings, full and LoRA), :mod:`.optimizers` (the optimizer registry and the SCAO ablation mapping),
:mod:`.metrics` (state bytes, time-to-target, memory), :mod:`.runner` (training and
measurement), :mod:`.report` (JSON/CSV/tables), :mod:`.plots` (PNG figures), :mod:`.cli`.
"""
