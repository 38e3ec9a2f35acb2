"""PNG plots of a benchmark run (matplotlib, Agg backend: no display needed).

* ``val_loss_vs_step.png``: validation loss against training step, one colour per optimizer
  (mean over seeds in bold, individual seeds faint), the baseline AdamW's final loss as a dotted line;
* ``val_loss_vs_time.png``: the same against training wall-clock seconds;
* ``memory.png``: optimizer-state bytes per parameter and peak memory, one bar per optimizer;
* ``lr_sweep.png`` (after ``--lr-sweep``): final validation loss against learning rate.
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["plot_results"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Save ``fig`` as PNG aside, then rename it over ``path`` (an interrupt leaves the old file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)


def _colors(names: list[str]) -> dict[str, str]:
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39"]
    fixed = {"adamw": "#000000", "scao": "#d62728"}
    out, k = {}, 0
    for name in names:
        if name in fixed:
            out[name] = fixed[name]
        else:
            while palette[k % len(palette)] in fixed.values():
                k += 1
            out[name] = palette[k % len(palette)]
            k += 1
    return out


def _mean_curve(curves: list[list[dict]], key: str) -> tuple[list[float], list[float]]:
    """Mean (over seeds) of ``val_loss`` at each evaluation step, x = mean of ``key``."""
    n = min(len(c) for c in curves)
    xs, ys = [], []
    for i in range(n):
        vals = [c[i]["val_loss"] for c in curves]
        if not all(v is not None and math.isfinite(v) for v in vals):
            break
        xs.append(sum(c[i][key] for c in curves) / len(curves))
        ys.append(sum(vals) / len(vals))
    return xs, ys


def _loss_plot(results: dict, key: str, xlabel: str, xname: str, path: Path) -> None:
    plt = _pyplot()
    runs = [r for r in results["runs"] if r["curve"]]
    names = list(dict.fromkeys(r["name"] for r in runs))
    colors = _colors(names)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    all_vals = []
    for name in names:
        mine = [r for r in runs if r["name"] == name]
        for r in mine if len(mine) > 1 else []:
            xs = [p[key] for p in r["curve"]]
            ys = [p["val_loss"] for p in r["curve"]]
            ax.plot(xs, ys, color=colors[name], alpha=0.25, linewidth=0.8)
        xs, ys = _mean_curve([r["curve"] for r in mine], key)
        lr = mine[0]["lr"]
        style = "--" if mine[0]["kind"] == "ablation" else "-"
        ax.plot(xs, ys, style, color=colors[name], linewidth=2.0 if name in ("adamw", "scao") else 1.4,
                label=f"{name} (lr {lr:.3g})", marker="o", markersize=2.5)
        all_vals.extend(ys)
    base = (results.get("baseline") or {}).get("name", "adamw")
    target = [r["final_val"] for r in runs if r["name"] == base and r["final_val"] is not None]
    if target:
        t = sum(target) / len(target)
        ax.axhline(t, color="#000000", linestyle=":", linewidth=1.0, label=f"baseline {base} final ({t:.3f})")
    finite = sorted(v for v in all_vals if v is not None and math.isfinite(v))
    if finite:
        # zoom on the interesting part: the initial loss (log vocab) dwarfs the differences
        lo = finite[0]
        hi = finite[min(len(finite) - 1, int(0.9 * len(finite)))]
        pad = 0.05 * max(hi - lo, 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
    seeds = max((r["seed"] for r in runs), default=0) - min((r["seed"] for r in runs), default=0) + 1
    cfg = results["config"]
    ax.set_title(f"{cfg['preset']} GPT, {cfg['steps']} steps, {seeds} seed(s): validation loss vs {xname}", fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _memory_plot(results: dict, path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in results["summary"] if r.get("bytes_per_param") is not None or r.get("peak_mem_mb")]
    names = [r["name"] for r in rows]
    colors = _colors(names)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    bpp = [r.get("bytes_per_param") or 0.0 for r in rows]
    bars = ax1.barh(names, bpp, color=[colors[n] for n in names])
    ax1.bar_label(bars, labels=[f"{v:.2f}" for v in bpp], fontsize=8, padding=2)
    ax1.axvline(8.0, color="#000000", linestyle=":", linewidth=1.0)
    ax1.set_xlabel("optimizer state, bytes per parameter (dotted: AdamW fp32 = 8)")
    ax1.invert_yaxis()
    ax1.set_xlim(0, max(bpp + [8.0]) * 1.18)
    kind = rows[0].get("mem_kind", "rss") if rows else "rss"
    if kind == "interleaved":
        ax2.text(0.5, 0.5, "peak memory not measured per optimizer\n(--interleave: all runs share the process)",
                 ha="center", va="center", transform=ax2.transAxes, fontsize=9)
        ax2.set_axis_off()
    else:
        if kind == "cuda":  # exact: the allocator's own peak, minus what existed before the optimizer
            mem = [r.get("peak_mem_delta_mb") or 0.0 for r in rows]
            labels = [f"{v:,.1f}" for v in mem]
            ax2.set_xlabel("peak CUDA memory allocated above the pre-optimizer level, MB")
        else:  # RSS of the whole process: runs share one allocator, so only the total is honest
            mem = [r.get("peak_mem_mb") or 0.0 for r in rows]
            labels = [f"{v:,.0f}" for v in mem]
            ax2.set_xlabel("peak resident memory of the whole process, MB")
        bars = ax2.barh(names, mem, color=[colors[n] for n in names])
        ax2.bar_label(bars, labels=labels, fontsize=8, padding=2)
        ax2.invert_yaxis()
        ax2.set_xlim(0, max(mem + [1.0]) * 1.2)
        ax2.set_title("peak memory of the training run")
    ax1.set_title("optimizer state")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _sweep_plot(results: dict, path: Path) -> None:
    plt = _pyplot()
    sweep = results["sweep"]
    names = list(dict.fromkeys(r["name"] for r in sweep))
    colors = _colors(names)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name in names:
        pts = sorted((r["lr"], r["final_val"]) for r in sweep if r["name"] == name)
        xs = [p[0] for p in pts if p[1] is not None and math.isfinite(p[1])]
        ys = [p[1] for p in pts if p[1] is not None and math.isfinite(p[1])]
        ax.plot(xs, ys, "-o", color=colors[name], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title("learning-rate sweep (diverged runs omitted)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_results(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write the PNG plots of ``results`` into ``out_dir``; returns ``{name: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if results.get("sweep"):
        paths["lr_sweep.png"] = out / "lr_sweep.png"
        _sweep_plot(results, paths["lr_sweep.png"])
    if not any(r["curve"] for r in results["runs"]):
        return paths  # --sweep-only
    paths.update({
        "val_loss_vs_step.png": out / "val_loss_vs_step.png",
        "val_loss_vs_time.png": out / "val_loss_vs_time.png",
        "memory.png": out / "memory.png",
    })
    _loss_plot(results, "step", "training step", "step", paths["val_loss_vs_step.png"])
    _loss_plot(results, "seconds", "training wall-clock seconds (evaluation excluded)", "wall-clock",
               paths["val_loss_vs_time.png"])
    _memory_plot(results, paths["memory.png"])
    return paths
