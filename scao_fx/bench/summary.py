"""Compare the runs of a benchmark: per-seed ratios against the baseline AdamW and the best
optimizer, and per-optimizer aggregates (:func:`summarize`).

The baseline is the better of the AdamW variants (:func:`choose_baseline`); the measurements of
one run are a :class:`RunResult`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

from . import optimizers as optreg
from .metrics import paired_differences, time_to_target

__all__ = ["RunResult", "summarize", "choose_baseline", "best_optimizer", "BASELINE", "TARGET_TOL"]

#: The reference optimizer when no other AdamW variant ran (see :func:`choose_baseline`).
BASELINE = "adamw"


#: Slack (nats) when testing whether a run reached the baseline's final validation loss: runs
#: equal to the baseline up to float rounding (e.g. another AdamW implementation) count as reaching it.
TARGET_TOL = 1e-4


@dataclass
class RunResult:
    """The measurements of one (optimizer, learning rate, seed) run."""

    name: str
    kind: str
    lr: float
    seed: int
    status: str = "ok"  # ok | diverged | error
    error: str | None = None
    steps_done: int = 0
    curve: list[dict] = field(default_factory=list)  # step, tokens, seconds, val_loss, train_loss
    final_val: float = math.nan
    best_val: float = math.nan
    step_time: dict = field(default_factory=dict)  # mean / median / total seconds
    step_seconds: list[float] = field(default_factory=list)  # every training step's time, in order
    opt_time: dict = field(default_factory=dict)
    tokens_per_s: float = math.nan
    state_bytes: int | None = None
    n_params: int = 0
    bytes_per_param: float | None = None
    peak_mem_bytes: int | None = None
    peak_mem_delta_bytes: int | None = None  # peak minus the level before the optimizer existed
    mem_kind: str = "rss"
    final_acc: float | None = None  # held-out accuracy at the end (workloads that report val_acc)
    # filled by summarize(): comparisons with the baseline of the same seed
    target: float | None = None
    steps_to_target: float | None = None
    seconds_to_target: float | None = None
    steps_ratio: float | None = None
    seconds_ratio: float | None = None
    step_time_ratio_mean: float | None = None
    step_time_ratio_median: float | None = None
    val_diff: float | None = None
    baseline: str | None = None
    best_diff: float | None = None  # final validation loss minus the best optimizer's (same seed)

    def to_dict(self) -> dict:
        """The run as a JSON-ready dict."""
        return asdict(self)


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return statistics.fmean(xs) if xs else None


def choose_baseline(runs: list[RunResult]) -> str:
    """The AdamW variant the ratios are taken against.

    Among :data:`optimizers.BASELINE_CANDIDATES` that ran (``adamw``: betas (0.9, 0.999);
    ``adamw-b95``: (0.9, 0.95)), the one with the fewest failed seeds, then the lowest mean final
    validation loss over its seeds (a tie keeps the first listed). :data:`BASELINE` when none ran.
    """
    scored = []
    for order, name in enumerate(optreg.BASELINE_CANDIDATES):
        mine = [r for r in runs if r.name == name]
        ok = [r.final_val for r in mine if r.status == "ok" and math.isfinite(r.final_val)]
        if ok:
            scored.append((len(mine) - len(ok), statistics.fmean(ok), order, name))
    return min(scored)[3] if scored else BASELINE


def _baseline_info(runs: list[RunResult], baseline: str) -> dict:
    candidates = {}
    for name in optreg.BASELINE_CANDIDATES:
        vals = [r.final_val for r in runs if r.name == name and r.status == "ok" and math.isfinite(r.final_val)]
        if vals:
            candidates[name] = statistics.fmean(vals)
    return dict(
        name=baseline,
        candidates=candidates,
        rule="the AdamW variant (adamw: betas 0.9/0.999, adamw-b95: 0.9/0.95) with the lowest mean final "
             "validation loss (fewest failed seeds first)",
    )


def best_optimizer(summary: list[dict]) -> str | None:
    """Name of the summary row with the lowest mean final validation loss among the optimizers
    whose every seed finished (``None`` if none did)."""
    ok = [row for row in summary if row["ok"] == row["seeds"] and row["final_val"] is not None]
    return min(ok, key=lambda row: row["final_val"])["name"] if ok else None


def _seconds_at(step_seconds: list[float], step: float) -> float:
    """Training time of the first ``step`` steps (fractional: the next step's share) from the
    run's own per-step times."""
    whole = int(math.floor(step))
    total = math.fsum(step_seconds[:whole])
    if whole < len(step_seconds) and step > whole:
        total += (step - whole) * step_seconds[whole]
    return total


def summarize(runs: list[RunResult], baseline: str | None = None) -> list[dict]:
    """Fill the per-run comparisons with the baseline and the best, and aggregate per optimizer.

    ``baseline`` defaults to :func:`choose_baseline`. Per run (against the baseline's run of the
    same seed): ``target`` = the baseline's final validation loss; ``steps_to_target`` = when
    this run's curve first reaches it (linear interpolation between evaluations, ``None`` =
    never); ``seconds_to_target`` = this run's own measured training-step times summed up to that
    step; ``steps_ratio`` / ``seconds_ratio`` = those divided by the baseline's whole run (its
    steps, the sum of its step times), so the baseline is 1 and a run's ratio depends only on
    the steps each run timed itself (the baseline's own run is its whole run: 1.00);
    training-step time ratios (mean and median step);
    ``val_diff`` = final validation loss minus the baseline's; ``best_diff`` = minus the best
    optimizer's (:func:`best_optimizer`) of the same seed.

    Per optimizer (one dict each, in run order): mean final/best validation loss over seeds,
    the paired differences ``val_diff`` (against the baseline) and ``best_diff`` (against the
    best) as mean, sample std and n, mean ratios, the number of seeds that reached the target,
    tokens/s, median optimizer-step and training-step times, state bytes per parameter and peak
    memory.
    """
    baseline = baseline or choose_baseline(runs)
    base = {r.seed: r for r in runs if r.name == baseline and r.status == "ok"}
    for r in runs:  # recomputed from scratch: summarize runs again as more runs finish
        r.target = r.steps_to_target = r.seconds_to_target = r.steps_ratio = r.seconds_ratio = None
        r.step_time_ratio_mean = r.step_time_ratio_median = r.val_diff = r.best_diff = None
        r.baseline = baseline
        b = base.get(r.seed)
        if b is None or not r.curve:
            continue
        steps = [p["step"] for p in r.curve]
        vals = [p["val_loss"] for p in r.curve]
        secs = [p["seconds"] for p in r.curve]
        r.target = b.final_val
        r.steps_to_target, r.seconds_to_target = time_to_target(steps, vals, r.target, secs, tol=TARGET_TOL)
        b_steps = b.steps_done or (b.curve[-1]["step"] if b.curve else 0)
        b_secs = math.fsum(b.step_seconds) if b.step_seconds else (b.curve[-1]["seconds"] if b.curve else 0.0)
        if r is b:  # the reference: its whole run, ratio 1 by definition
            r.steps_to_target, r.seconds_to_target = float(b_steps), b_secs
        elif r.steps_to_target is not None and r.step_seconds:
            r.seconds_to_target = _seconds_at(r.step_seconds, r.steps_to_target)
        if r.steps_to_target is not None and b_steps:
            r.steps_ratio = r.steps_to_target / b_steps
        if r.seconds_to_target is not None and b_secs:
            r.seconds_ratio = r.seconds_to_target / b_secs
        if r.step_time.get("n") and b.step_time.get("n"):
            r.step_time_ratio_mean = r.step_time["mean"] / b.step_time["mean"]
            r.step_time_ratio_median = r.step_time["median"] / b.step_time["median"]
        if r.status == "ok":
            r.val_diff = r.final_val - b.final_val

    def row_of(name: str) -> dict:
        mine = [r for r in runs if r.name == name]
        ok = [r for r in mine if r.status == "ok"]
        paired_base = [base[r.seed].final_val if r.seed in base else None for r in mine]
        d_mean, d_std, d_n = paired_differences([r.final_val if r.status == "ok" else None for r in mine], paired_base)
        return dict(
            name=name,
            kind=mine[0].kind,
            lr=mine[0].lr,
            seeds=len(mine),
            ok=len(ok),
            status=",".join(sorted({r.status for r in mine})),
            baseline=baseline,
            final_val=_mean(r.final_val for r in ok),
            best_val=_mean(r.best_val for r in ok),
            final_acc=_mean(r.final_acc for r in ok if r.final_acc is not None),
            val_diff_mean=None if d_n == 0 else d_mean,
            val_diff_std=None if d_n < 2 else d_std,  # no spread from a single pair
            val_diff_n=d_n,
            best=None,
            best_diff_mean=None,
            best_diff_std=None,
            best_diff_n=0,
            reached=sum(1 for r in mine if r.steps_to_target is not None),
            steps_ratio=_mean(r.steps_ratio for r in mine),
            seconds_ratio=_mean(r.seconds_ratio for r in mine),
            step_time_ratio_mean=_mean(r.step_time_ratio_mean for r in mine),
            step_time_ratio_median=_mean(r.step_time_ratio_median for r in mine),
            tokens_per_s=_mean(r.tokens_per_s for r in mine),
            step_ms_median=_mean(1e3 * r.step_time["median"] for r in mine if r.step_time.get("n")),
            opt_ms_median=_mean(1e3 * r.opt_time["median"] for r in mine if r.opt_time.get("n")),
            opt_ms_mean=_mean(1e3 * r.opt_time["mean"] for r in mine if r.opt_time.get("n")),
            bytes_per_param=_mean(r.bytes_per_param for r in mine),
            peak_mem_mb=_mean(r.peak_mem_bytes / 2**20 for r in mine if r.peak_mem_bytes),
            peak_mem_delta_mb=_mean(r.peak_mem_delta_bytes / 2**20 for r in mine if r.peak_mem_delta_bytes is not None),
            mem_kind=mine[0].mem_kind,
        )

    rows = [row_of(name) for name in dict.fromkeys(r.name for r in runs)]
    best = best_optimizer(rows)
    if best is not None:
        best_runs = {r.seed: r for r in runs if r.name == best and r.status == "ok"}
        for r in runs:
            if r.status == "ok" and r.seed in best_runs:
                r.best_diff = r.final_val - best_runs[r.seed].final_val
        for row in rows:
            mine = [r for r in runs if r.name == row["name"]]
            g_mean, g_std, g_n = paired_differences(
                [r.final_val if r.status == "ok" else None for r in mine],
                [best_runs[r.seed].final_val if r.seed in best_runs else None for r in mine],
            )
            row.update(best=best, best_diff_mean=None if g_n == 0 else g_mean,
                       best_diff_std=None if g_n < 2 else g_std, best_diff_n=g_n)
    return rows
