"""Train the benchmark GPT with each optimizer and measure it.

The unit of work is a :class:`Trainer`: one optimizer, one learning rate, one seed. For a
given seed every trainer starts from the same weights and sees the same batches (paired
comparison); validation always uses the same fixed set of held-out windows.

Measured per run (see :class:`RunResult`): the validation-loss curve (at step 0, every
``eval_every`` steps and at the end), the training loss at those points, the wall-clock time of
every training step (forward + backward + optimizer step, batch sampling and evaluation
excluded) and of the optimizer step alone, tokens per second, optimizer-state bytes (after the
last step) and peak memory (CUDA max-allocated, or the process's peak RSS).

:func:`~scao_fx.bench.summary.summarize` (in :mod:`scao_fx.bench.summary`, its names also
importable from here) then derives, per seed, the ratios against the baseline AdamW of the same run
(training-step time, steps and seconds to reach its final validation loss), the gap to the best
optimizer of the run and, per optimizer, the paired differences across seeds. The baseline is
the better of the AdamW variants (:func:`choose_baseline`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import optimizers as optreg
from .corpus import DEFAULT_CORPUS_BYTES
from .metrics import PeakMemory, summarize_times
from .progress import Progress, synchronize
from .summary import BASELINE, TARGET_TOL, RunResult, _baseline_info, best_optimizer, choose_baseline, summarize  # noqa: F401
from .workload import EVAL_SEED, Workload, make_workload  # noqa: F401 - EVAL_SEED kept importable here

__all__ = [
    "BenchConfig", "BenchError", "Trainer", "RunResult", "run_benchmark", "summarize", "environment", "BASELINE",
    "choose_baseline", "best_optimizer", "check_device", "preflight",
]

class BenchError(ValueError):
    """A problem with the benchmark's input (device, data, an optimizer that cannot be built),
    found before training; its message is one line naming the argument and what is accepted."""


@dataclass
class BenchConfig:
    """Everything a benchmark run depends on (recorded in ``results.json``)."""

    preset: str = "small"
    steps: int = 500
    eval_every: int = 50
    eval_batches: int = 8
    batch_size: int | None = None
    block_size: int | None = None
    device: str = "cpu"
    data: str | None = None
    corpus_chars: int = DEFAULT_CORPUS_BYTES
    tokenizer: str = "char"
    seeds: int = 1
    seed: int = 0
    optimizers: tuple[str, ...] = optreg.DEFAULT_OPTIMIZERS
    lrs: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.01
    scao_options: dict[str, Any] = field(default_factory=dict)
    muon_adamw_lr: float | None = None
    lr_sweep: bool = False
    sweep_only: bool = False
    lr_grid: tuple[float, ...] = optreg.LR_GRID
    sweep_steps: int | None = None
    ablate: bool = False
    interleave: bool = False
    threads: int | None = None
    progress: bool = True
    quick: bool = False
    workload: str = "gpt"  # what is trained: gpt | finetune (scao_fx.bench.workload)
    finetune_mode: str = "full"  # the finetune workload's mode: full | lora

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1, got {self.eval_batches}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.muon_adamw_lr is not None and not (0 < self.muon_adamw_lr < math.inf):
            raise ValueError(f"muon_adamw_lr must be a positive finite learning rate, got {self.muon_adamw_lr}")
        if not self.lr_grid or any(not (m > 0 and math.isfinite(m)) for m in self.lr_grid):
            raise ValueError(f"lr_grid must be positive finite multipliers, got {self.lr_grid}")

    def options_for(self, spec: optreg.OptimizerSpec) -> dict:
        """The keyword options that reach ``spec``'s factory (its ``option_set``)."""
        if spec.option_set == "muon":
            return {} if self.muon_adamw_lr is None else {"adamw_lr": float(self.muon_adamw_lr)}
        return dict(self.scao_options)

    def to_dict(self) -> dict:
        """The configuration as a JSON-ready dict."""
        d = asdict(self)
        d["optimizers"] = list(self.optimizers)
        d["lr_grid"] = list(self.lr_grid)
        return d


class Trainer:
    """One optimizer training one freshly initialised model of ``workload`` on one seed's batches."""

    def __init__(self, spec: optreg.OptimizerSpec, lr: float, seed: int, workload: Workload, cfg: BenchConfig) -> None:
        self.spec = spec
        self.cfg = cfg
        self.workload = workload
        self.device = torch.device(cfg.device)
        self.tokens_per_step = workload.tokens_per_step
        self.result = RunResult(name=spec.name, kind=spec.kind, lr=float(lr), seed=int(seed))
        self.memory = PeakMemory(self.device)
        torch.manual_seed(seed)  # for optimizers that draw from the global RNG (stochastic rounding)
        self.model = workload.build_model(seed)
        self.result.n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.stream = workload.batches(seed)
        self.memory.start()
        params = workload.trainable(self.model, spec.named_params)
        self.optimizer = spec.make(params, lr, cfg.weight_decay, cfg.options_for(spec))
        self.step = 0
        self.elapsed = 0.0
        self._step_times: list[float] = []
        self._opt_times: list[float] = []
        self._last_loss: torch.Tensor | None = None
        self.done = False

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The workload's held-out metrics (``val_loss``, and e.g. ``val_acc``), in eval mode."""
        was_training = self.model.training
        self.model.eval()
        metrics = self.workload.evaluate(self.model)
        self.model.train(was_training)
        return metrics

    def record(self) -> None:
        """Append a curve point (validation and last training loss) at the current step."""
        metrics = self.evaluate()
        val = metrics["val_loss"]
        train = float(self._last_loss) if self._last_loss is not None else math.nan
        self.result.curve.append(
            dict(step=self.step, tokens=self.step * self.tokens_per_step, seconds=self.elapsed, val_loss=val, train_loss=train,
                 **{k: v for k, v in metrics.items() if k != "val_loss"})
        )
        if not math.isfinite(val) or (self._last_loss is not None and not math.isfinite(train)):
            self.result.status = "diverged"
            self.done = True

    def train_step(self) -> None:
        """One timed training step (forward, backward, optimizer step); evaluates when due."""
        batch = next(self.stream)
        synchronize(self.device)
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.workload.loss(self.model, batch)
        loss.backward()
        synchronize(self.device)
        t1 = time.perf_counter()
        self.optimizer.step()
        synchronize(self.device)
        t2 = time.perf_counter()
        self._step_times.append(t2 - t0)
        self._opt_times.append(t2 - t1)
        self.elapsed += t2 - t0
        self._last_loss = loss.detach()
        self.step += 1
        self.memory.sample()
        if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
            self.record()
        if self.step >= self.cfg.steps:
            self.done = True

    def fail(self, exc: BaseException) -> None:
        """Mark the run as failed with ``exc`` (one line) and stop it."""
        self.result.status = "error"
        self.result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        self.done = True

    def finish(self) -> RunResult:
        """Fill the run's summary numbers, free the model and optimizer, return the result."""
        r = self.result
        r.steps_done = self.step
        self.memory.stop()
        r.peak_mem_bytes = self.memory.peak
        if self.memory.peak is not None and self.memory.baseline is not None:
            r.peak_mem_delta_bytes = self.memory.peak - self.memory.baseline
        r.mem_kind = self.memory.kind
        r.step_time = summarize_times(self._step_times)
        r.step_seconds = [float(t) for t in self._step_times]
        r.opt_time = summarize_times(self._opt_times)
        if self._step_times:
            r.tokens_per_s = self.step * self.tokens_per_step / r.step_time["total"]
        try:
            count = self.spec.state_bytes_fn or optreg.state_bytes
            r.state_bytes = int(count(self.optimizer)) if r.status != "error" or self.step else None
        except Exception:  # a report, never a failure
            r.state_bytes = None
        if r.state_bytes is not None and r.n_params:
            r.bytes_per_param = r.state_bytes / r.n_params
        vals = [p["val_loss"] for p in r.curve if math.isfinite(p["val_loss"])]
        if r.curve:
            r.final_val = r.curve[-1]["val_loss"]
            r.final_acc = r.curve[-1].get("val_acc")
        if vals:
            r.best_val = min(vals)
        # free the model and optimizer before the next run
        self.model = None  # type: ignore[assignment]
        self.optimizer = None
        return r


def _start(trainer: Trainer) -> None:
    try:
        trainer.record()  # step 0: identical for every optimizer of a seed
    except Exception as exc:  # noqa: BLE001 - a failing optimizer is reported, not fatal
        trainer.fail(exc)


def _advance(trainer: Trainer) -> None:
    try:
        trainer.train_step()
    except Exception as exc:  # noqa: BLE001
        trainer.fail(exc)


def _postfix(trainer: Trainer) -> dict:
    last = trainer.result.curve[-1] if trainer.result.curve else None
    return {"val": f"{last['val_loss']:.3f}"} if last else {}


def _run_trainers(make: list, cfg: BenchConfig, log, on_done=None) -> list[RunResult]:
    """Run the trainers built by ``make`` (zero-arg callables) sequentially or interleaved;
    ``on_done(result)`` is called as each run finishes."""
    results: list[RunResult] = []
    on_done = on_done or (lambda res: None)
    if not cfg.interleave:
        for label, build in make:
            try:
                trainer = build()
            except Exception as exc:  # noqa: BLE001
                log(f"  {label}: failed to start: {type(exc).__name__}: {exc}")
                continue
            bar = Progress(cfg.progress, cfg.steps, label)
            _start(trainer)
            while not trainer.done:
                _advance(trainer)
                bar.update(1, **_postfix(trainer))
            bar.close()
            res = trainer.finish()
            if res.status != "ok":
                log(f"  {label}: {res.status}" + (f" ({res.error})" if res.error else f" at step {res.steps_done}"))
            results.append(res)
            on_done(res)
        return results
    trainers: list[Trainer] = []
    for label, build in make:
        try:
            trainers.append(build())
        except Exception as exc:  # noqa: BLE001
            log(f"  {label}: failed to start: {type(exc).__name__}: {exc}")
    bars = [Progress(cfg.progress, cfg.steps, f"{t.spec.name} lr={t.result.lr:.3g} seed={t.result.seed}", position=i)
            for i, t in enumerate(trainers)]
    for t in trainers:
        _start(t)
    while any(not t.done for t in trainers):
        for t, bar in zip(trainers, bars):  # round robin: background load hits every optimizer alike
            if not t.done:
                _advance(t)
                bar.update(1, **_postfix(t))
    for bar in bars:
        bar.close()
    for t in trainers:
        res = t.finish()
        # all models lived at once: per-optimizer peak memory is not separable in this mode
        res.peak_mem_bytes = res.peak_mem_delta_bytes = None
        res.mem_kind = "interleaved"
        if res.status != "ok":
            log(f"  {t.spec.name}: {res.status}" + (f" ({res.error})" if res.error else f" at step {res.steps_done}"))
        results.append(res)
        on_done(res)
    return results


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict:
    """Hardware, software versions and time of a run (recorded with every result)."""
    import scao_fx

    env = dict(
        date_utc=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=" ".join(["scao-fx", *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
        python=platform.python_version(),
        platform=platform.platform(),
        cpu=_cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        scao_fx=scao_fx.__version__,
        git_commit=_git_commit(),
        load_average_start=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        packages={
            dist: optreg.package_version(dist)
            for dist in ("torchopt", "scao", "heavyball", "torchao", "bitsandbytes", "optree", "numpy")
        },
    )
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


def _resolve(cfg: BenchConfig, log) -> tuple[list[optreg.OptimizerSpec], dict[str, str]]:
    names = list(dict.fromkeys(cfg.optimizers))
    if cfg.ablate:
        for name in optreg.ABLATIONS:
            if name not in names:
                names.append(name)
        if "scao" not in names:
            names.append("scao")
    # the AdamW variants first (the baseline is one of them): the others are compared against it
    first = [n for n in optreg.BASELINE_CANDIDATES if n in names]
    names = first + [n for n in names if n not in first]
    specs, skipped = [], {}
    for name in names:
        spec = optreg.get(name)
        reason = spec.unavailable_reason(cfg.device)
        if reason is None:
            specs.append(spec)
        else:
            skipped[name] = reason
            log(f"skipping {name}: {reason}")
    return specs, skipped


def check_device(device: str) -> torch.device:
    """The ``torch.device`` of ``--device`` text, or :class:`BenchError` (one line) when it is not
    ``cpu``, ``cuda`` or ``cuda:N`` of a CUDA device that torch sees here."""
    accepted = "accepted: cpu, cuda, cuda:N"
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError, TypeError):
        raise BenchError(f"--device: {device!r} is not a device; {accepted}") from None
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"--device: {device!r} is not supported by the benchmark; {accepted}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {device}: no CUDA GPU is available to torch here "
                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BenchError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here "
                             f"(cuda:0 ... cuda:{torch.cuda.device_count() - 1})")
    return dev


def preflight(specs: list[optreg.OptimizerSpec], workload: Workload, cfg: BenchConfig) -> None:
    """Build every optimizer of ``specs`` once on a throwaway model of ``workload``, before any training.

    ``--scao-opt`` keys are checked first (:func:`optimizers.check_scao_options`); an optimizer
    whose factory raises is a :class:`BenchError` naming it, with the factory's error.
    """
    if cfg.scao_options and any(s.takes_options and s.option_set == "scao" for s in specs):
        try:
            optreg.check_scao_options(cfg.scao_options)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
    model = workload.build_model(0)
    for spec in specs:
        params = workload.trainable(model, spec.named_params)
        try:
            spec.make(params, spec.default_lr, cfg.weight_decay, cfg.options_for(spec))
        except Exception as exc:  # noqa: BLE001 - reported as an input error, before training
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
            opts = cfg.options_for(spec) if spec.takes_options else {}
            given = f" with options {opts}" if opts else ""
            raise BenchError(f"optimizer {spec.name!r} cannot be built{given}: {detail}") from None
    del model


def run_benchmark(cfg: BenchConfig, log=print, on_update=None) -> dict:
    """Run the whole benchmark described by ``cfg``; returns the results as a JSON-ready dict.

    Keys: ``config``, ``environment``, ``corpus``, ``model``, ``skipped`` (name -> reason),
    ``lrs`` (name -> learning rate used), ``sweep`` (list of sweep runs, empty without
    ``--lr-sweep``), ``runs`` (every :class:`RunResult` as a dict, curves included),
    ``summary`` (one row per optimizer, see :func:`summarize`), ``baseline`` (which AdamW the
    ratios use and why), ``best`` (the optimizer with the lowest final validation loss),
    ``complete`` (False in the dicts passed to ``on_update`` before the end), ``wall_seconds``.

    ``on_update(results)``, when given, is called with the results so far each time a run (sweep
    or main) finishes, so that a caller can write them before the benchmark ends.

    Raises:
        BenchError: a bad device, a corpus too small for the context, or an optimizer that
            cannot be built (before any training).
    """
    t_start = time.perf_counter()
    device = check_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    env = environment(cfg.device)
    workload = make_workload(cfg, device)  # data, model builder, loss and evaluation (BenchError on bad input)
    specs, skipped = _resolve(cfg, log)
    specs = [workload.tune_spec(s) for s in specs]
    preflight(specs, workload, cfg)
    workload.warm_up()
    log(f"{workload.summary_line()} on {cfg.device} ({torch.get_num_threads()} threads)")

    lrs: dict[str, float] = {}
    sweep: list[dict] = []
    runs: list[RunResult] = []

    def assemble(complete: bool) -> dict:
        baseline = choose_baseline(runs)
        summary = summarize(runs, baseline)
        best = best_optimizer(summary)
        return dict(
            config=cfg.to_dict(),
            environment=env,
            corpus=workload.describe_data(),
            model=workload.describe_model(),
            skipped=skipped,
            lrs=dict(lrs),
            sweep=list(sweep),
            runs=[r.to_dict() for r in runs],
            summary=summary,
            baseline=_baseline_info(runs, baseline),
            best=best,
            complete=complete,
            wall_seconds=time.perf_counter() - t_start,
        )

    def updated(_res=None) -> None:
        if on_update is not None:
            on_update(assemble(False))

    def trainer_factory(spec, lr, seed, steps_cfg):
        return lambda: Trainer(spec, lr, seed, workload, steps_cfg)

    # learning rates: explicit --lr, else the sweep, else the registry default; ablations
    # follow SCAO's learning rate
    tunable = [s for s in specs if s.kind != "ablation" and s.name not in cfg.lrs]
    if cfg.lr_sweep and tunable:
        sweep_cfg = dataclasses.replace(cfg, steps=cfg.sweep_steps or cfg.steps)
        for spec in tunable:
            log(f"lr sweep: {spec.name} at {', '.join(f'{spec.default_lr * m:.3g}' for m in cfg.lr_grid)}")
            make = [
                (f"sweep {spec.name} lr={spec.default_lr * m:.3g}", trainer_factory(spec, spec.default_lr * m, cfg.seed, sweep_cfg))
                for m in cfg.lr_grid
            ]

            def swept(r: RunResult) -> None:
                sweep.append(dict(name=r.name, lr=r.lr, seed=r.seed, status=r.status, final_val=r.final_val,
                                  best_val=r.best_val, steps=r.steps_done, curve=r.curve))
                updated()

            found = _run_trainers(make, sweep_cfg, log, on_done=swept)
            ok = [r for r in found if r.status == "ok" and math.isfinite(r.final_val)]
            if ok:
                lrs[spec.name] = min(ok, key=lambda r: r.final_val).lr
                log(f"  -> {spec.name}: lr {lrs[spec.name]:.3g}")
    for spec in specs:
        if spec.name in cfg.lrs:
            lrs[spec.name] = float(cfg.lrs[spec.name])
        elif spec.name not in lrs:
            base = spec.extra.get("variant_of", "scao" if spec.kind == "ablation" else None)
            if base is not None:  # ablations and variants run at their base's rate
                lrs[spec.name] = float(cfg.lrs.get(base, lrs.get(base, workload.tune_spec(optreg.get(base)).default_lr)))
            else:
                lrs[spec.name] = spec.default_lr

    def finished(r: RunResult) -> None:
        runs.append(r)
        updated()

    for k in range(0 if cfg.sweep_only else cfg.seeds):
        seed = cfg.seed + k
        log(f"seed {seed} ({k + 1}/{cfg.seeds})")
        make = [(f"{s.name} lr={lrs[s.name]:.3g} seed={seed}", trainer_factory(s, lrs[s.name], seed, cfg)) for s in specs]
        _run_trainers(make, cfg, log, on_done=finished)

    env["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return assemble(True)
