"""Measurements for the benchmark: state bytes, time-to-target, memory, timing summaries.

Everything here is plain Python over tensors and lists, testable without training anything.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "tensor_bytes",
    "optimizer_state_bytes",
    "time_to_target",
    "paired_differences",
    "summarize_times",
    "rss_bytes",
    "peak_rss_bytes",
    "reset_peak_rss",
    "trim_heap",
    "PeakMemory",
]


def _storages(tree: object) -> set[tuple[int, int]]:
    """``(data_ptr, nbytes)`` of every distinct, materialised tensor storage reachable from ``tree``.

    Walks dicts, lists, tuples (NamedTuples included), sets and objects exposing ``__dict__``
    (or ``__slots__``); meta tensors and empty storages are skipped.
    """
    keys: set[tuple[int, int]] = set()
    seen_objects: set[int] = set()
    stack = [tree]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            if not obj.is_meta:
                storage = obj.untyped_storage()
                if storage.data_ptr() != 0 or storage.nbytes() != 0:
                    keys.add((storage.data_ptr(), storage.nbytes()))
            continue
        if obj is None or isinstance(obj, (str, bytes, int, float, bool, complex, torch.dtype, torch.device)):
            continue
        if id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not callable(obj):
            stack.extend(vars(obj).values())
        elif hasattr(obj, "__slots__"):
            stack.extend(getattr(obj, s) for s in obj.__slots__ if hasattr(obj, s))
    return keys


def tensor_bytes(tree: object) -> int:
    """Total bytes of the distinct tensor storages reachable from ``tree``.

    Each storage is counted once, so views and shared tensors are not double-counted;
    non-tensor leaves count zero.
    """
    return sum(nbytes for _, nbytes in _storages(tree))


def optimizer_state_bytes(optimizer: object) -> int:
    """Bytes of optimizer state held by a ``torch.optim.Optimizer``-like object.

    Understands ``torch.optim.Optimizer.state`` (per-parameter dicts), ``torchopt.Optimizer``
    (``state_groups``), and any object with a ``state`` attribute holding a tree of tensors.
    Parameters themselves are never counted, even if the state refers to them.
    """
    params: list[torch.Tensor] = []
    for group in getattr(optimizer, "param_groups", []) or []:
        ps = group.get("params", []) if isinstance(group, dict) else []
        params.extend(p for p in ps if isinstance(p, torch.Tensor))
    roots: list[object] = []
    if hasattr(optimizer, "state_groups"):  # torchopt.Optimizer
        roots.append(optimizer.state_groups)
    state = getattr(optimizer, "state", None)
    if state is not None and not callable(state):
        roots.append(dict(state) if isinstance(state, dict) else state)
    if not roots:
        return 0
    # the live parameters do not count even when the state refers to them (copies do count)
    param_keys = {(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in params}
    return sum(nbytes for _, nbytes in _storages(roots) - param_keys)


def time_to_target(
    steps: Sequence[float],
    values: Sequence[float],
    target: float,
    seconds: Sequence[float] | None = None,
    tol: float = 0.0,
) -> tuple[float | None, float | None]:
    """When a decreasing-is-better curve first reaches ``target``, linearly interpolated.

    Args:
        steps: x-coordinates of the curve (increasing).
        values: curve values (e.g. validation loss) at ``steps``.
        target: the level to reach (``value <= target``).
        seconds: optional wall-clock time at each point, interpolated with the same fraction.
        tol: slack: the level actually tested is ``target + tol`` (so that a run equal to the
            target up to rounding counts as reaching it), >= 0.

    Returns:
        ``(step, second)`` of the first crossing, ``(None, None)`` if never reached (``second``
        is ``None`` when ``seconds`` is not given). Non-finite values never count as reached.
    """
    if len(steps) != len(values) or (seconds is not None and len(seconds) != len(steps)):
        raise ValueError("steps, values (and seconds) must have the same length")
    if not tol >= 0.0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    target = float(target) + float(tol)
    for i, v in enumerate(values):
        v = float(v)
        if not (math.isfinite(v) and v <= target):
            continue
        prev = float(values[i - 1]) if i > 0 else math.nan
        if not math.isfinite(prev):  # reached at the first point (or right after a gap)
            return float(steps[i]), (float(seconds[i]) if seconds is not None else None)
        frac = (prev - target) / (prev - v)  # prev > target >= v, so 0 < frac <= 1
        step = float(steps[i - 1]) + frac * (float(steps[i]) - float(steps[i - 1]))
        sec = None
        if seconds is not None:
            sec = float(seconds[i - 1]) + frac * (float(seconds[i]) - float(seconds[i - 1]))
        return step, sec
    return None, None


def paired_differences(ours: Sequence[float], base: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation of ``ours[i] - base[i]`` over paired seeds.

    Pairs where either side is ``None`` or non-finite are dropped. Returns ``(mean, std, n)``;
    ``std`` is 0 for a single pair and ``mean`` is NaN when no pair is left.
    """
    diffs = [
        float(a) - float(b)
        for a, b in zip(ours, base)
        if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))
    ]
    if not diffs:
        return math.nan, math.nan, 0
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return statistics.fmean(diffs), std, len(diffs)


def summarize_times(times: Iterable[float]) -> dict[str, float]:
    """Mean, median and total of a list of durations (seconds); NaN when empty."""
    ts = [float(t) for t in times]
    if not ts:
        return {"mean": math.nan, "median": math.nan, "total": 0.0, "n": 0}
    return {"mean": statistics.fmean(ts), "median": statistics.median(ts), "total": sum(ts), "n": len(ts)}


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process (Linux ``/proc``), or ``None``."""
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024


def peak_rss_bytes() -> int | None:
    """Peak resident set size (``VmHWM``) since start or the last :func:`reset_peak_rss`."""
    kb = _proc_status_kb("VmHWM")
    return None if kb is None else kb * 1024


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so RSS tracks live memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (``/proc/self/clear_refs`` = 5).

    Returns ``False`` where that is not possible (non-Linux, old kernels, restricted sandboxes).
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Peak memory of a stretch of code: CUDA max-allocated on a GPU, else process RSS.

    Use ``start()`` before and ``stop()`` after; ``sample()`` in between keeps a running maximum
    of the current RSS as a fallback where the kernel counter cannot be reset. After ``stop()``,
    ``peak`` is the peak in bytes (``None`` if unmeasurable), ``baseline`` the level at
    ``start()``, and ``kind`` is ``"cuda"`` or ``"rss"``.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.kind = "cuda" if self.device.type == "cuda" else "rss"
        self.peak: int | None = None
        self.baseline: int | None = None
        self._reset_ok = False
        self._sampled = 0

    def start(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            trim_heap()
            self._reset_ok = reset_peak_rss()
            self.baseline = rss_bytes()
            self._sampled = self.baseline or 0

    def sample(self) -> None:
        if self.kind == "rss":
            cur = rss_bytes()
            if cur is not None:
                self._sampled = max(self._sampled, cur)

    def stop(self) -> int | None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.sample()
            hwm = peak_rss_bytes() if self._reset_ok else None
            self.peak = max(hwm, self._sampled) if hwm is not None else (self._sampled or None)
        return self.peak
