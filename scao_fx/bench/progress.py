"""Progress bars and timers of the benchmarks (one of each, used by every benchmark)."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

import torch

__all__ = ["Progress", "Timer", "synchronize"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Progress:
    """A tqdm bar on stderr when ``enabled`` and tqdm is installed; otherwise silent."""

    def __init__(self, enabled: bool, total: int, desc: str, position: int | None = None, unit: str = "step") -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit=unit, leave=True, dynamic_ncols=True, file=sys.stderr,
                                position=position)
            except ImportError:
                self.bar = None

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Timer:
    """Times a callable: median milliseconds over ``repeats`` runs after ``warmup`` runs."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def once(self, fn: Callable[[], object]) -> float:
        """Milliseconds of one ``fn()``: between CUDA events (waited for) or by ``perf_counter``."""
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def __call__(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of ``fn()`` (the minimum is kept in ``self.last_min``)."""
        for _ in range(self.warmup):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        times = [self.once(fn) for _ in range(self.repeats)]
        self.last_min = min(times)
        return statistics.median(times)
