"""scao_fx.bench.report on a synthetic result (no training)."""

from __future__ import annotations

import csv
import json
import math

from scao_fx.bench.report import headline, summary_table, sweep_table, write_results
from scao_fx.bench.runner import RunResult, summarize


def _run(name, seed, vals, kind="ours", mem_kind="rss"):
    r = RunResult(name=name, kind=kind, lr=1e-3, seed=seed, mem_kind=mem_kind)
    r.curve = [dict(step=10 * i, tokens=100 * i, seconds=0.5 * i, val_loss=v, train_loss=v) for i, v in enumerate(vals)]
    r.final_val, r.best_val, r.steps_done = vals[-1], min(vals), 10 * (len(vals) - 1)
    r.step_time = dict(mean=0.1, median=0.1, total=1.0, n=10)
    r.opt_time = dict(mean=0.01, median=0.01, total=0.1, n=10)
    r.tokens_per_s, r.state_bytes, r.n_params, r.bytes_per_param = 1000.0, 800, 100, 8.0
    r.peak_mem_bytes, r.peak_mem_delta_bytes = 500 * 2**20, 20 * 2**20
    return r


def _results(sweep=False, mem_kind="rss"):
    runs = [_run("adamw", 0, [4.0, 3.0, 2.5], "baseline", mem_kind), _run("scao", 0, [4.0, 2.6, 2.2], mem_kind=mem_kind),
            _run("bad", 0, [4.0, math.nan], mem_kind=mem_kind)]
    runs[2].status = "diverged"
    res = dict(config=dict(preset="tiny", steps=20), runs=[], summary=summarize(runs), lrs={"adamw": 1e-3},
               sweep=[], skipped={})
    res["runs"] = [r.to_dict() for r in runs]
    if sweep:
        res["sweep"] = [dict(name="adamw", lr=lr, seed=0, status="ok", final_val=v, best_val=v, steps=20,
                             curve=[dict(step=0, tokens=0, seconds=0.0, val_loss=4.0, train_loss=4.0)])
                        for lr, v in ((5e-4, 2.7), (1e-3, 2.5), (2e-3, math.inf))]
        res["sweep"][2]["status"] = "diverged"
    return res


def test_summary_table_text_and_markdown():
    res = _results()
    text = summary_table(res)
    lines = text.splitlines()
    assert lines[0].startswith("optimizer") and len(lines) == 2 + 3
    scao = next(line for line in lines if line.startswith("scao"))
    assert "-0.3000" in scao and "(1/1)" in scao and "8.00" in scao
    bad = next(line for line in lines if line.startswith("bad"))
    assert "[diverged]" in bad and "(0/1)" in bad
    md = summary_table(res, markdown=True)
    assert md.splitlines()[1].startswith("|---") and md.count("\n") == 4


def test_sweep_table_marks_choice_and_failures():
    table = sweep_table(_results(sweep=True))
    row = table.splitlines()[2]
    assert "2.5000 *" in row and "2.7000" in row and "diverged" in row


def test_write_results_files(tmp_path):
    paths = write_results(_results(sweep=True), tmp_path)
    assert set(paths) == {"results.json", "curves.csv", "runs.csv", "summary.csv", "summary.md", "sweep.csv"}
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["runs"][2]["final_val"] is None  # NaN -> null: strict JSON
    with (tmp_path / "curves.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 + 3 + 2 and rows[0]["optimizer"] == "adamw" and float(rows[1]["val_loss"]) == 3.0
    with (tmp_path / "runs.csv").open() as fh:
        runs = list(csv.DictReader(fh))
    assert runs[1]["name"] == "scao" and float(runs[1]["step_time_median"]) == 0.1
    assert "Learning-rate sweep" in (tmp_path / "summary.md").read_text()


def test_headline_names_baseline_and_best():
    runs = [_run("adamw", 0, [4.0, 3.0, 2.5], "baseline"), _run("adamw-b95", 0, [4.0, 3.0, 2.4], "baseline"),
            _run("scao", 0, [4.0, 2.6, 2.2])]
    from scao_fx.bench.runner import _baseline_info, best_optimizer, choose_baseline

    base = choose_baseline(runs)
    summary = summarize(runs, base)
    res = dict(summary=summary, baseline=_baseline_info(runs, base), best=best_optimizer(summary), runs=[], sweep=[])
    text = headline(res)
    assert text.splitlines()[0] == ("baseline: adamw-b95 (lower mean final validation loss of the AdamW variants: "
                                    "adamw-b95 2.4000 vs adamw 2.5000)")
    assert text.splitlines()[1].startswith("best: scao (final validation loss 2.2000)")
    table = summary_table(res)
    adamw = next(line for line in table.splitlines() if line.startswith("adamw "))
    assert "+0.1000" in adamw and "+0.3000" in adamw  # vs the baseline, vs the best
