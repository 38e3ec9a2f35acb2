"""scao_fx.bench.plots on a synthetic result (no training)."""

from __future__ import annotations

import pytest
from test_bench_report import _results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mem_kind", ["rss", "cuda", "interleaved"])
def test_plots_written(tmp_path, mem_kind):
    pytest.importorskip("matplotlib")
    from scao_fx.bench.plots import plot_results

    paths = plot_results(_results(sweep=True, mem_kind=mem_kind), tmp_path)
    assert set(paths) == {"val_loss_vs_step.png", "val_loss_vs_time.png", "memory.png", "lr_sweep.png"}
    for p in paths.values():
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000


def test_sweep_only_plots_only_the_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    from scao_fx.bench.plots import plot_results

    res = _results(sweep=True)
    res["runs"], res["summary"] = [], []
    assert set(plot_results(res, tmp_path)) == {"lr_sweep.png"}
