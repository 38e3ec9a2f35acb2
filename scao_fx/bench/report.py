"""Write benchmark results: JSON, CSV files and a plain-text / Markdown summary table."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

__all__ = ["write_results", "summary_table", "sweep_table", "headline", "SUMMARY_COLUMNS"]

#: (key in a summary row, column title, format)
SUMMARY_COLUMNS: list[tuple[str, str, str]] = [
    ("name", "optimizer", "{}"),
    ("lr", "lr", "{:.3g}"),
    ("final_val", "val loss", "{:.4f}"),
    ("final_acc", "val acc", "{:.3f}"),  # shown only for workloads that report accuracy (finetune)
    ("val_diff_mean", "Δ vs baseline", "{:+.4f}"),
    ("val_diff_std", "± (paired std)", "{:.4f}"),
    ("best_diff_mean", "Δ vs best", "{:+.4f}"),
    ("steps_ratio", "steps to target", "{:.2f}"),
    ("seconds_ratio", "time to target", "{:.2f}"),
    ("step_time_ratio_mean", "step time (mean)", "{:.2f}x"),
    ("step_time_ratio_median", "step time (median)", "{:.2f}x"),
    ("opt_ms_median", "opt step ms (median)", "{:.1f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("bytes_per_param", "state B/param", "{:.2f}"),
    ("peak_mem_mb", "peak mem MB", "{:,.0f}"),
    ("peak_mem_delta_mb", "peak Δ MB", "{:,.1f}"),
]


def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def summary_table(results: dict, markdown: bool = False) -> str:
    """The per-optimizer summary as an aligned text table (or a Markdown table).

    Ratios are against the baseline AdamW of the same seed (see :func:`headline`); "steps/time
    to target" = steps (seconds of the run's own training steps) to reach the baseline's final
    validation loss divided by the baseline's whole run, "-" where never reached (the
    ``reached`` count is appended as ``k/n``); "Δ vs best" = the gap to the optimizer with the
    lowest final validation loss.
    """
    columns = [c for c in SUMMARY_COLUMNS
               if c[0] != "final_acc" or any(row.get("final_acc") is not None for row in results["summary"])]
    rows = []
    for row in results["summary"]:
        cells = []
        for key, _, fmt in columns:
            text = _fmt(row.get(key), fmt)
            if key == "steps_ratio":
                text = f"{text} ({row['reached']}/{row['seeds']})"
            if key == "name" and row.get("status") not in (None, "ok"):
                text = f"{text} [{row['status']}]"
            cells.append(text)
        rows.append(cells)
    headers = [title for _, title, _ in columns]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def headline(results: dict) -> str:
    """Which AdamW is the baseline and which optimizer is the best of the run, in two lines."""
    rows = {row["name"]: row for row in results.get("summary") or []}
    info = results.get("baseline") or {}
    name = info.get("name") or (next(iter(rows.values()))["baseline"] if rows else None)
    cands = info.get("candidates") or {}
    if name is None:
        return "baseline: none ran"
    if len(cands) > 1:
        others = ", ".join(f"{n} {v:.4f}" for n, v in cands.items() if n != name)
        why = f"lower mean final validation loss of the AdamW variants: {name} {cands[name]:.4f} vs {others}"
    elif name in cands:
        why = f"the only AdamW variant run; final validation loss {cands[name]:.4f}"
    else:
        why = "it did not finish: no ratios"
    lines = [f"baseline: {name} ({why})"]
    best = results.get("best")
    if best is not None and best in rows:
        lines.append(f"best: {best} (final validation loss {_fmt(rows[best]['final_val'], '{:.4f}')}); "
                     f"'Δ vs best' is each optimizer's paired gap to it")
    else:
        lines.append("best: none (no optimizer finished every seed)")
    return "\n".join(lines)


def sweep_table(results: dict, markdown: bool = False) -> str:
    """The learning-rate sweep: final validation loss per optimizer and learning rate (* = chosen)."""
    sweep = results.get("sweep") or []
    names = list(dict.fromkeys(r["name"] for r in sweep))
    lrs = sorted({r["lr"] for r in sweep})
    headers = ["optimizer", *[f"lr {lr:.3g}" for lr in lrs]]
    rows = []
    for name in names:
        cells = [name]
        for lr in lrs:
            hit = [r for r in sweep if r["name"] == name and r["lr"] == lr]
            if not hit:
                cells.append("")
                continue
            r = hit[0]
            text = _fmt(r["final_val"], "{:.4f}") if r["status"] == "ok" else r["status"]
            if results.get("lrs", {}).get(name) == lr:
                text += " *"
            cells.append(text)
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(out + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows])


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _replace(path: Path, write) -> None:
    """Write ``path`` through ``write(tmp_path)`` and an atomic rename: an interrupted write
    leaves the previous file intact."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


def write_results(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``curves.csv``, ``runs.csv``, ``summary.csv``, ``summary.md``
    (and ``sweep.csv`` after an LR sweep) into ``out_dir``; returns ``{name: path}``.

    Non-finite floats are written as JSON ``null`` / empty CSV cells. Every file is replaced
    atomically (written aside, then renamed), so the benchmark can rewrite them after each
    finished run and an interrupt never leaves a half-written file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    paths["results.json"] = out / "results.json"
    blob = json.dumps(_json_safe(results), indent=1) + "\n"
    _replace(paths["results.json"], lambda tmp: tmp.write_text(blob, encoding="utf-8"))

    curve_rows = []
    for run in results["runs"]:
        for point in run["curve"]:
            curve_rows.append(dict(optimizer=run["name"], lr=run["lr"], seed=run["seed"], **point))
    paths["curves.csv"] = out / "curves.csv"
    curve_fields = ["optimizer", "lr", "seed", "step", "tokens", "seconds", "val_loss", "train_loss"]
    curve_fields += sorted({k for row in curve_rows for k in row} - set(curve_fields))  # e.g. val_acc
    _replace(paths["curves.csv"], lambda tmp: _write_csv(tmp, curve_rows, curve_fields))

    run_fields = [
        "name", "kind", "lr", "seed", "status", "error", "steps_done", "final_val", "final_acc", "best_val", "baseline", "val_diff",
        "best_diff", "target",
        "steps_to_target", "seconds_to_target", "steps_ratio", "seconds_ratio", "step_time_ratio_mean",
        "step_time_ratio_median", "step_time_mean", "step_time_median", "opt_time_mean", "opt_time_median",
        "tokens_per_s", "state_bytes", "n_params", "bytes_per_param", "peak_mem_bytes", "mem_kind",
    ]
    run_rows = []
    for run in results["runs"]:
        row = dict(run)
        for key in ("step_time", "opt_time"):
            row[f"{key}_mean"] = run[key].get("mean")
            row[f"{key}_median"] = run[key].get("median")
        run_rows.append(_json_safe(row))
    paths["runs.csv"] = out / "runs.csv"
    _replace(paths["runs.csv"], lambda tmp: _write_csv(tmp, run_rows, run_fields))

    summary_fields = list(results["summary"][0].keys()) if results["summary"] else ["name"]
    paths["summary.csv"] = out / "summary.csv"
    summary_rows = [_json_safe(r) for r in results["summary"]]
    _replace(paths["summary.csv"], lambda tmp: _write_csv(tmp, summary_rows, summary_fields))

    paths["summary.md"] = out / "summary.md"
    text = ""
    if results["summary"]:
        text = headline(results).replace("\n", "\n\n") + "\n\n" + summary_table(results, markdown=True) + "\n"
        if results.get("complete") is False:
            text = "(partial: the runs finished so far)\n\n" + text
    if results.get("sweep"):
        text += "\nLearning-rate sweep (final validation loss, * = chosen):\n\n" + sweep_table(results, markdown=True) + "\n"
    _replace(paths["summary.md"], lambda tmp: tmp.write_text(text, encoding="utf-8"))

    if results.get("sweep"):
        sweep_rows = []
        for run in results["sweep"]:
            for point in run["curve"]:
                sweep_rows.append(dict(optimizer=run["name"], lr=run["lr"], seed=run["seed"], status=run["status"], **point))
        paths["sweep.csv"] = out / "sweep.csv"
        sweep_rows = _json_safe(sweep_rows)
        _replace(paths["sweep.csv"], lambda tmp: _write_csv(tmp, sweep_rows, [
            "optimizer", "lr", "seed", "status", "step", "tokens", "seconds", "val_loss", "train_loss"]))
    return paths
