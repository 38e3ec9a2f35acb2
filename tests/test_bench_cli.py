"""The ``scao-fx`` command line: ``bench --quick`` smoke run, ``bench-kernels`` delegation."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest

from scao_fx.__main__ import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bench_quick_smoke(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the bench extra (matplotlib) is needed for the plots")
    out = tmp_path / "out"
    rc = main(["bench", "--quick", "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for name in ("results.json", "curves.csv", "runs.csv", "summary.csv", "summary.md",
                 "val_loss_vs_step.png", "val_loss_vs_time.png", "memory.png"):
        assert (out / name).is_file(), name
    for png in ("val_loss_vs_step.png", "val_loss_vs_time.png", "memory.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["quick"] is True and res["config"]["preset"] == "tiny"
    names = [r["name"] for r in res["runs"]]
    assert names[0] == "adamw" and "scao" in names
    for r in res["runs"]:
        if r["kind"] in ("baseline", "ours"):
            assert r["status"] == "ok", r
            assert math.isfinite(r["final_val"]) and r["final_val"] < r["curve"][0]["val_loss"]
            assert r["bytes_per_param"] > 0 and r["tokens_per_s"] > 0
    steps = res["config"]["steps"]
    with (out / "curves.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    adam_rows = [r for r in rows if r["optimizer"] == "adamw"]
    assert [int(r["step"]) for r in adam_rows] == list(range(0, steps + 1, res["config"]["eval_every"]))
    assert all(float(r["val_loss"]) > 0 for r in adam_rows)
    # the summary table was printed, with every run optimizer in it
    assert "state B/param" in printed and "scao" in printed
    for name in names:
        assert name in printed
    # skipped peers are reported, never an error
    for name, reason in res["skipped"].items():
        assert name in printed and reason


def test_bench_list_and_bad_optimizer(capsys):
    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "adamw" in listed and "scao-no-complement" in listed
    assert main(["bench", "--optimizers", "adamw,nonexistent", "--no-progress"]) == 2
    assert "nonexistent" in capsys.readouterr().err


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert "scao-fx" in capsys.readouterr().out


def test_bench_kernels_delegates(monkeypatch, capsys):
    import types

    seen = {}
    fake = types.ModuleType("scao_fx.bench.kernels")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "scao_fx.bench.kernels", fake)
    assert main(["bench-kernels", "--size", "3", "--help-like"]) == 0
    assert seen["argv"] == ["--size", "3", "--help-like"]


def test_bench_kernels_missing_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "scao_fx.bench.kernels", None)  # import raises ModuleNotFoundError
    assert main(["bench-kernels"]) == 2
    assert "not part of this installation" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "scao_fx", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "scao-fx" in proc.stdout
