"""The documented examples run and do what the docs say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def test_functional_loop_example_trains():
    script = EXAMPLES / "functional_loop.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    match = re.search(r"loss went from ([0-9.]+) to ([0-9.]+)", result.stdout)
    assert match, result.stdout
    first, last = float(match.group(1)), float(match.group(2))
    assert last < 0.5 * first, result.stdout
    losses = [float(v) for v in re.findall(r"step +\d+ +loss ([0-9.]+)", result.stdout)]
    assert len(losses) >= 5 and losses[-1] < losses[0]


@pytest.mark.parametrize("form", ["seed", "eigenbasis"])
def test_compare_step_time_runs_two_checkouts_interleaved(form):
    """The A/B step-time script runs the same checkout twice and reports a ratio near 1."""
    repo = EXAMPLES.parent.parent
    script = EXAMPLES / "compare_step_time.py"
    result = subprocess.run([sys.executable, str(script), str(repo), str(repo), "--windows", "2", "--steps", "3",
                             "--form", form], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"old: [0-9.]+ ms/step", result.stdout) and re.search(r"new: [0-9.]+ ms/step", result.stdout)
    ratio = float(re.search(r"new / old: ([0-9.]+)", result.stdout).group(1))
    assert 0.2 < ratio < 5.0, result.stdout  # the same code: only noise separates the two


def test_compare_step_time_takes_the_fine_tuning_shapes_and_a_refresh_period():
    repo = EXAMPLES.parent.parent
    script = EXAMPLES / "compare_step_time.py"
    base = [sys.executable, str(script), str(repo), str(repo), "--windows", "1", "--steps", "2", "--form", "eigenbasis"]
    result = subprocess.run(base + ["--model", "minilm", "--precond-freq", "1"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"new / old: [0-9.]+", result.stdout), result.stdout
    bad = subprocess.run(base + ["--precond-freq", "3"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "divisor" in bad.stderr


def test_least_squares_example_prints_every_optimizer_and_the_preconditioners_win(capsys):
    import least_squares  # docs/examples (on the path: tests/conftest.py)

    least_squares.main(["--seeds", "1", "--steps", "100", "--lrs", "0.03"])
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert set(least_squares.OPTIMIZERS) <= set(rows)
    # 200 steps at lr 0.03 (measured: AdamW 0.0254; sf.soap 7.1e-4, at AdamW's final by step 154;
    # SCAO's default 2.1e-3, by step 124)
    res = least_squares.measure(1, 200, (0.03,), names=("adamw", "sf.soap", "scao (default)"))
    adamw = res["adamw"][0]["final"]
    for name in ("sf.soap", "scao (default)"):
        assert res[name][0]["final"] < 0.2 * adamw, (name, res[name])
        assert res[name][0]["steps"] is not None and res[name][0]["steps"] < 0.85 * 200, (name, res[name])


def test_cpu_profile_step_charges_every_op_to_a_part(capsys, monkeypatch):
    import cpu_profile_step as prof  # docs/examples (on the path: tests/conftest.py)

    assert prof._part_of_frame("scao_fx/precond/curvature.py(43): gram") == "Gram products"
    assert prof._part_of_frame("scao_fx/precond/curvature.py(98): factor") == "refresh (eigh / QR)"
    assert prof._part_of_frame("scao_fx/kernels/reference.py(84): _encode") == "int8 codec"
    assert prof._part_of_frame("scao_fx/precond/eigenbasis.py(30): rotate") == "rotations"
    assert prof._part_of_frame("scao_fx/transforms/eigenbasis.py(300): update") is None  # plumbing: look further out
    assert prof._part_of_frame("torch/nn/modules/module.py(1): forward") is None
    monkeypatch.setattr(sys, "argv", ["cpu_profile_step.py", "--steps", "5"])
    prof.main()
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert set(prof.ORDER) <= set(rows), out
    shares = [float(rows[p].split(" | ")[2].rstrip(" %|")) for p in prof.ORDER]
    assert 95 <= sum(shares) <= 105, out  # the parts and Python make up the step (rounded)
    assert float(rows["refresh (eigh / QR)"].split(" | ")[1]) > 0 and float(rows["int8 codec"].split(" | ")[1]) > 0


def test_step_peak_memory_measures_each_step(capsys):
    import step_peak_memory  # docs/examples (on the path: tests/conftest.py)

    names = ["torch.optim.AdamW (foreach)", "sf.SCAO() (default)"]
    res = step_peak_memory.measure(layers=1, steps=3, names=names, progress=False, d=64, vocab=300, ctx=32)
    assert list(res) == names
    for r in res.values():
        assert len(r["rises"]) == 3 and r["ordinary"] == r["rises"][1] and r["highest"] == max(r["rises"][1:])
        assert r["rises"][0] > r["ordinary"] > 0  # step 1 builds the state (8 bytes/param of moments at least)
    assert res["sf.SCAO() (default)"]["ordinary"] > res["torch.optim.AdamW (foreach)"]["ordinary"]
    with pytest.raises(ValueError, match="steps must be >= 2"):
        step_peak_memory.measure(steps=1, names=names[:1], progress=False)
    with pytest.raises(ValueError, match="model must be one of"):
        step_peak_memory.measure(names=names[:1], progress=False, model="gpt-5")


def test_codec_backends_times_both_backends_with_the_same_bits(capsys):
    import codec_backends  # docs/examples (on the path: tests/conftest.py)

    from scao_fx.kernels import _compiled

    rows = codec_backends.main(["--repeats", "1", "--stacks", "2x4096", "1x4194304"])
    out = capsys.readouterr().out
    large = "compiled" if _compiled.available() else "reference"  # without a C++ compiler: the fallback
    assert [r["automatic"] for r in rows] == ["reference", large], out
    assert all(r[key] > 0 for r in rows for key in r if key.endswith("_ms")), rows
    assert re.search(r"first compiled call \(compiling included\): EMA update [0-9.]+ s, bf16 rounding [0-9.]+ s", out)
    with pytest.raises(SystemExit, match="ROWSxN"):
        codec_backends.main(["--stacks", "8by2"])


def test_factored_fit_reads_every_factorable_core(capsys):
    """The fit of the factored second moment: one row per rotated matrix with both sides >= 128
    (the benchmark model's 17: 4 layers x 4 matrices, and the 128 x 128 head's... per step), shares and
    ratios in range."""
    import factored_fit  # docs/examples (on the path: tests/conftest.py)

    factored_fit.main(["--steps", "2,3"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows and {r.split(" | ")[0] for r in rows} == {"| 2", "| 3"}
    for row in rows:
        cells = row.strip("| ").split(" | ")
        share = float(cells[2])
        q01, q50, q99 = (float(x) for x in cells[3].split(" / "))
        assert 0.0 < share <= 1.0 + 1e-6 and 0.0 <= q01 <= q50 <= q99
    with pytest.raises(SystemExit):
        factored_fit.main(["--steps", "1"])
