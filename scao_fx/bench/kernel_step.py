"""The whole optimizer step in the kernel benchmark: ``sf.scao``'s ``tx.update`` +
``sf.apply_updates``, grouped vs per-leaf loop, per kernel backend (``scao-fx bench-kernels``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from typing import Callable, Dict, List, Sequence

import torch

from ..kernels import _dispatch
from .kernel_shapes import BenchResult, model_params
from .progress import Progress, Timer

__all__ = ["CPU_STEP_LAYERS", "STEP_ROWS", "scao_stepper", "time_steps", "step_section"]


CPU_STEP_LAYERS = 2  # default --step-layers on the CPU (24 on CUDA): see build_parser
STEP_ROWS = ("scao step (non-refresh)", "scao step (refresh)", "scao step (window mean)")


def scao_stepper(params, grads, *, grouped: bool, precond_freq: int,
                 **scao_kwargs) -> Callable[[], None]:
    """A closure doing one optimizer step per call on ``params`` (in place): ``tx.update`` with
    ``grads`` and ``sf.apply_updates``, for ``sf.scao(1e-4, form="seed", warmup_steps=0, blend_steps=0,
    min_precond_updates=0, precond_freq=precond_freq, grouped=grouped, **scao_kwargs)``."""
    import scao_fx as sf  # not at the top: the package imports its kernels

    tx = sf.scao(1e-4, form="seed", warmup_steps=0, blend_steps=0, min_precond_updates=0,
                 precond_freq=precond_freq, grouped=grouped, **scao_kwargs)
    state = tx.init(params)

    def step() -> None:
        nonlocal state
        updates, state = tx.update(grads, state, params=params)
        sf.apply_updates(params, updates)

    return step


@contextlib.contextmanager
def _kernels_env(backend: str):
    """Set ``SCAO_FX_KERNELS`` (how the optimizer picks its kernels) for the ``with`` block."""
    old = os.environ.get(_dispatch.ENV_VAR)
    os.environ[_dispatch.ENV_VAR] = backend
    try:
        yield
    finally:
        if old is None:
            del os.environ[_dispatch.ENV_VAR]
        else:
            os.environ[_dispatch.ENV_VAR] = old


def time_steps(steps: Dict[str, Callable[[], None]], *, precond_freq: int, windows: int,
               timer: Timer, tick: Callable[[], object] = lambda: None) -> Dict[str, List[float]]:
    """Milliseconds of each step of ``windows`` refresh windows (``precond_freq`` steps, the last
    one a refresh) per stepper, after ``precond_freq`` untimed steps that end with the first
    refresh (a full eigendecomposition). The steppers take turns step by step, so a change of
    machine load hits them alike. ``tick()`` runs after every step."""
    for step in steps.values():
        for _ in range(precond_freq):
            step()
            tick()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(windows * precond_freq):
        for name, step in steps.items():
            times[name].append(timer.once(step))
            tick()
    return times


def _step_rows(times: Sequence[float], precond_freq: int) -> List[tuple]:
    """(row name, median ms, minimum ms) for non-refresh steps, refresh steps and the window
    mean (``ms_min``: the fastest window)."""
    refresh = [t for i, t in enumerate(times) if (i + 1) % precond_freq == 0]
    plain = [t for i, t in enumerate(times) if (i + 1) % precond_freq]
    means = [statistics.fmean(times[i:i + precond_freq])
             for i in range(0, len(times), precond_freq)]
    return [(STEP_ROWS[0], statistics.median(plain), min(plain)),
            (STEP_ROWS[1], statistics.median(refresh), min(refresh)),
            (STEP_ROWS[2], statistics.fmean(times), min(means))]


def step_section(args: argparse.Namespace, device: torch.device, backends: List[str],
                  timer: Timer, emit: Callable[[BenchResult], None]) -> dict:
    """Whole optimizer step, grouped vs per-leaf loop, per backend (Triton only on CUDA)."""

    layers, freq, windows = args.step_layers, args.step_precond_freq, args.step_windows
    backends = [b for b in backends if b == "reference" or device.type == "cuda"]
    modes = ["grouped"] + (["loop"] if not args.no_loop else [])
    params0 = model_params(layers, args.d_model, args.d_mlp, device)
    grads = model_params(layers, args.d_model, args.d_mlp, device, seed=1)
    leaves = [p for block in params0.values() for p in block.values()]
    numel = sum(p.numel() for p in leaves)
    group = f"{layers}L {numel / 1e6:.1f}M params"
    note = f"precond_freq {freq}, {windows * freq} steps"
    print(f"# whole step: sf.scao grouped vs per-leaf loop; layers {layers}, d_model "
          f"{args.d_model}, MLP {args.d_mlp}, {len(leaves)} leaves, {numel} parameters; "
          f"{note}", flush=True)
    bar = Progress(args.progress, len(backends) * len(modes) * (windows + 1) * freq,
                    "scao step")
    info: dict = {"layers": layers, "leaves": len(leaves), "params": numel,
                  "precond_freq": freq, "windows": windows}
    for backend in backends:
        with _kernels_env(backend):
            steps = {mode: scao_stepper(_clone(params0), grads, grouped=mode == "grouped",
                                        precond_freq=freq) for mode in modes}
            times = time_steps(steps, precond_freq=freq, windows=windows, timer=timer,
                               tick=bar.update)
        for mode in modes:
            for name, ms, ms_min in _step_rows(times[mode], freq):
                emit(BenchResult(name, group, len(leaves), numel, backend, mode, ms, 0, None,
                                 None, ms_min, note))
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return info


def _clone(tree: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict[str, torch.Tensor]]:
    return {k: {n: p.clone() for n, p in block.items()} for k, block in tree.items()}
