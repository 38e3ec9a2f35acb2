"""scao_fx.bench.runner: paired training runs and the comparisons derived from them."""

from __future__ import annotations

import math

import pytest

from scao_fx.bench.runner import (
    BenchConfig,
    BenchError,
    RunResult,
    best_optimizer,
    check_device,
    choose_baseline,
    run_benchmark,
    summarize,
)


def _run(name, seed, vals, secs, kind="ours", step_times=(1.0, 1.0)):
    r = RunResult(name=name, kind=kind, lr=1e-3, seed=seed)
    r.curve = [dict(step=10 * i, tokens=0, seconds=s, val_loss=v, train_loss=v) for i, (v, s) in enumerate(zip(vals, secs))]
    r.final_val = vals[-1]
    r.best_val = min(vals)
    r.step_time = dict(mean=step_times[0], median=step_times[1], total=1.0, n=2)
    r.opt_time = dict(mean=0.1, median=0.1, total=0.1, n=2)
    r.bytes_per_param = 8.0
    r.steps_done = r.curve[-1]["step"]
    return r


def test_summarize_ratios_and_paired_differences():
    runs = [
        _run("adamw", 0, [4.0, 3.0, 2.0], [0, 1, 2], kind="baseline"),
        _run("fast", 0, [4.0, 2.0, 1.5], [0, 2, 4], step_times=(2.0, 1.5)),
        _run("slow", 0, [4.0, 3.5, 3.0], [0, 1, 2]),
        _run("adamw", 1, [4.0, 3.0, 2.5], [0, 1, 2], kind="baseline"),
        _run("fast", 1, [4.0, 2.5, 2.0], [0, 1, 2]),
        _run("slow", 1, [4.0, 3.0, 2.7], [0, 1, 2]),
    ]
    rows = {r["name"]: r for r in summarize(runs)}
    fast0 = runs[1]
    assert fast0.target == 2.0
    # (TARGET_TOL = 1e-4 nats of slack moves the crossings by ~1e-3 steps)
    assert fast0.steps_to_target == pytest.approx(10.0, abs=1e-2) and fast0.steps_ratio == pytest.approx(0.5, abs=1e-3)
    assert fast0.seconds_to_target == pytest.approx(2.0, abs=1e-2) and fast0.seconds_ratio == pytest.approx(1.0, abs=1e-3)
    assert fast0.step_time_ratio_mean == pytest.approx(2.0) and fast0.step_time_ratio_median == pytest.approx(1.5)
    assert runs[2].steps_to_target is None and runs[2].steps_ratio is None
    assert rows["adamw"]["steps_ratio"] == pytest.approx(1.0) and rows["adamw"]["val_diff_mean"] == 0.0
    # fast: diffs -0.5 and -0.5
    assert rows["fast"]["val_diff_mean"] == pytest.approx(-0.5) and rows["fast"]["val_diff_std"] == pytest.approx(0.0)
    assert rows["fast"]["reached"] == 2
    # slow: diffs +1.0 and +0.2 -> mean 0.6, std sqrt(0.32)
    assert rows["slow"]["val_diff_mean"] == pytest.approx(0.6)
    assert rows["slow"]["val_diff_std"] == pytest.approx(math.sqrt(0.32))
    assert rows["slow"]["reached"] == 0 and rows["slow"]["steps_ratio"] is None


def test_config_validation():
    with pytest.raises(ValueError):
        BenchConfig(steps=0)
    with pytest.raises(ValueError):
        BenchConfig(lr_grid=(1.0, -2.0))
    with pytest.raises(ValueError):
        BenchConfig(seeds=0)


def test_tiny_benchmark_is_paired_and_complete(tmp_path):
    cfg = BenchConfig(preset="tiny", steps=6, eval_every=3, eval_batches=1, corpus_chars=60_000,
                      optimizers=("sf-adamw", "adamw"), seeds=2, progress=False)
    res = run_benchmark(cfg, log=lambda m: None)
    runs = res["runs"]
    assert [(r["name"], r["seed"]) for r in runs] == [("adamw", 0), ("sf-adamw", 0), ("adamw", 1), ("sf-adamw", 1)]
    for r in runs:
        assert r["status"] == "ok" and r["steps_done"] == 6
        assert [p["step"] for p in r["curve"]] == [0, 3, 6]
        assert r["tokens_per_s"] > 0 and r["bytes_per_param"] == pytest.approx(8.0, abs=0.01)
        assert r["curve"][-1]["val_loss"] < r["curve"][0]["val_loss"]
    # same seed: same initial weights and data -> same step-0 loss; different seeds differ
    assert runs[0]["curve"][0]["val_loss"] == runs[1]["curve"][0]["val_loss"]
    assert runs[0]["curve"][0]["val_loss"] != runs[2]["curve"][0]["val_loss"]
    # scao_fx's adamw matches torch's AdamW to rounding on the same data
    assert runs[1]["final_val"] == pytest.approx(runs[0]["final_val"], abs=1e-3)
    row = {r["name"]: r for r in res["summary"]}["sf-adamw"]
    assert row["reached"] == 2 and abs(row["val_diff_mean"]) < 1e-3
    from scao_fx.bench.optimizers import REGISTRY

    assert res["lrs"] == {"adamw": REGISTRY["adamw"].default_lr, "sf-adamw": REGISTRY["sf-adamw"].default_lr}
    assert res["corpus"]["n_chars"] == 60_000 and res["environment"]["torch"]


def test_sweep_picks_best_and_ablations_follow_scao_lr():
    cfg = BenchConfig(preset="tiny", steps=4, eval_every=4, eval_batches=1, corpus_chars=60_000,
                      optimizers=("adamw",), lr_sweep=True, lr_grid=(0.01, 1.0), progress=False)
    res = run_benchmark(cfg, log=lambda m: None)
    finals = {s["lr"]: s["final_val"] for s in res["sweep"]}
    assert len(finals) == 2
    assert res["lrs"]["adamw"] == min(finals, key=finals.get)
    cfg = BenchConfig(preset="tiny", steps=2, eval_every=2, eval_batches=1, corpus_chars=60_000,
                      optimizers=("adamw",), ablate=True, lrs={"scao": 5e-3}, progress=False,
                      interleave=True)
    res = run_benchmark(cfg, log=lambda m: None)
    names = [r["name"] for r in res["runs"]]
    assert names[0] == "adamw" and "scao" in names and "scao-no-int8" in names
    assert all(res["lrs"][n] == 5e-3 for n in names if n.startswith("scao"))
    assert all(r["mem_kind"] == "interleaved" and r["peak_mem_bytes"] is None for r in res["runs"])


def test_optimizer_that_cannot_be_built_is_an_error_before_training():
    from scao_fx.bench import optimizers as optreg

    def broken(params, lr, wd):
        raise RuntimeError("boom")

    optreg.register(optreg.OptimizerSpec("broken-peer", broken, 1e-3, "x", kind="peer"), overwrite=True)
    try:
        cfg = BenchConfig(preset="tiny", steps=2, eval_every=2, eval_batches=1, corpus_chars=60_000,
                          optimizers=("adamw", "broken-peer"), progress=False)
        logs = []
        with pytest.raises(BenchError, match=r"'broken-peer' cannot be built.*boom"):
            run_benchmark(cfg, log=logs.append)
        assert not any(m.startswith("seed") for m in logs)  # nothing trained
    finally:
        optreg.REGISTRY.pop("broken-peer")


def test_optimizer_failing_during_training_is_reported_not_fatal():
    import torch

    from scao_fx.bench import optimizers as optreg

    class FailsAtStep2(torch.optim.SGD):
        calls = 0

        def step(self, closure=None):
            type(self).calls += 1
            if type(self).calls == 2:
                raise RuntimeError("boom at step 2")
            return super().step(closure)

    optreg.register(optreg.OptimizerSpec("flaky-peer", lambda p, lr, wd: FailsAtStep2(p, lr=lr), 1e-3, "x",
                                         kind="peer"), overwrite=True)
    try:
        cfg = BenchConfig(preset="tiny", steps=3, eval_every=3, eval_batches=1, corpus_chars=60_000,
                          optimizers=("adamw", "flaky-peer"), progress=False)
        FailsAtStep2.calls = -1  # the preflight build does not step; the run's second step fails
        logs = []
        res = run_benchmark(cfg, log=logs.append)
        runs = {r["name"]: r for r in res["runs"]}
        assert runs["adamw"]["status"] == "ok" and runs["flaky-peer"]["status"] == "error"
        assert "boom" in runs["flaky-peer"]["error"] and any("flaky-peer" in m for m in logs)
    finally:
        optreg.REGISTRY.pop("flaky-peer")


def test_baseline_is_the_better_adamw_and_best_is_named():
    runs = [
        _run("adamw", 0, [4.0, 3.0, 2.2], [0, 1, 2], kind="baseline"),
        _run("adamw-b95", 0, [4.0, 3.0, 2.0], [0, 1, 2], kind="baseline"),
        _run("muon", 0, [4.0, 2.0, 1.5], [0, 1, 2]),
        _run("adamw", 1, [4.0, 3.0, 2.4], [0, 1, 2], kind="baseline"),
        _run("adamw-b95", 1, [4.0, 3.0, 2.5], [0, 1, 2], kind="baseline"),
        _run("muon", 1, [4.0, 2.0, 1.7], [0, 1, 2]),
    ]
    # means: adamw 2.3, adamw-b95 2.25 -> adamw-b95 is the baseline
    assert choose_baseline(runs) == "adamw-b95"
    rows = {r["name"]: r for r in summarize(runs)}
    assert all(r["baseline"] == "adamw-b95" for r in rows.values())
    assert rows["adamw-b95"]["val_diff_mean"] == 0.0
    assert rows["adamw"]["val_diff_mean"] == pytest.approx((0.2 - 0.1) / 2)
    assert rows["muon"]["val_diff_mean"] == pytest.approx((-0.5 - 0.8) / 2)
    assert best_optimizer(list(rows.values())) == "muon"
    assert rows["muon"]["best"] == "muon" and rows["muon"]["best_diff_mean"] == 0.0
    assert rows["adamw"]["best_diff_mean"] == pytest.approx((0.7 + 0.7) / 2) and rows["adamw"]["best_diff_n"] == 2
    assert rows["adamw-b95"]["best_diff_std"] == pytest.approx(math.sqrt(((0.5 - 0.65) ** 2 + (0.8 - 0.65) ** 2)))
    # a failed seed disqualifies a variant before its loss counts
    runs[4].status = "diverged"
    assert choose_baseline(runs) == "adamw"
    assert choose_baseline([_run("scao", 0, [4.0, 3.0], [0, 1])]) == "adamw"


def test_time_to_target_uses_each_runs_own_step_times():
    base = _run("adamw", 0, [4.0, 3.0, 2.0], [0, 1, 2], kind="baseline")
    base.steps_done = 20
    base.step_seconds = [0.1] * 20  # 2.0 s over its whole run
    fast = _run("fast", 0, [4.0, 2.5, 1.5], [0, 1, 2])
    fast.steps_done = 20
    # slow first steps, fast later ones: the crossing at step 15 costs what it paid until then
    fast.step_seconds = [0.3] * 10 + [0.01] * 10
    summarize([base, fast])
    assert fast.steps_to_target == pytest.approx(15.0, abs=1e-2)
    assert fast.seconds_to_target == pytest.approx(3.0 + 5 * 0.01, abs=1e-3)
    assert fast.seconds_ratio == pytest.approx(fast.seconds_to_target / 2.0)
    assert fast.steps_ratio == pytest.approx(15.0 / 20, abs=1e-3)
    assert base.steps_ratio == 1.0 and base.seconds_ratio == 1.0
    # summarizing again with another baseline recomputes everything (no stale ratios)
    other = _run("adamw-b95", 0, [4.0, 3.0, 0.5], [0, 1, 2], kind="baseline")
    summarize([base, fast, other])
    assert base.steps_to_target is None and base.steps_ratio is None and base.baseline == "adamw-b95"


def test_check_device():
    assert check_device("cpu").type == "cpu"
    with pytest.raises(BenchError, match=r"'gpu' is not a device; accepted: cpu, cuda, cuda:N"):
        check_device("gpu")
    with pytest.raises(BenchError, match="not supported"):
        check_device("meta")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(BenchError, match="no CUDA GPU"):
            check_device("cuda")
    else:
        with pytest.raises(BenchError, match="CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_corpus_too_small_for_the_context(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 40)  # 400 tokens: 40 validation tokens < a 64-token context
    cfg = BenchConfig(preset="tiny", steps=2, eval_every=2, eval_batches=1, data=str(text), optimizers=("adamw",),
                      progress=False)
    with pytest.raises(BenchError, match=r"--data .*too few for the context of 64 tokens"):
        run_benchmark(cfg, log=lambda m: None)


def test_on_update_sees_each_finished_run():
    seen = []
    cfg = BenchConfig(preset="tiny", steps=2, eval_every=2, eval_batches=1, corpus_chars=60_000,
                      optimizers=("adamw", "sf-adamw"), progress=False)
    res = run_benchmark(cfg, log=lambda m: None, on_update=lambda r: seen.append(
        ([x["name"] for x in r["runs"]], r["complete"])))
    assert seen == [(["adamw"], False), (["adamw", "sf-adamw"], False)]
    assert res["complete"] is True and res["baseline"]["name"] == "adamw" and res["best"] in ("adamw", "sf-adamw")
