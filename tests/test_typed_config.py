"""The typed configuration path: ``BackboneSpec`` (mmmoe.models.spec) and ``OptimSpec``
(tasks.base) as task-module arguments. Their fields mirror ModelConfig / MoEConfig, show in
``mmmoe fit --model.help``, are checked with errors that name the field (in Python, on the command
line and in YAML), merge field by field across ``--config`` files, and end up in checkpoints as
plain dicts that load weights-only and rebuild the module."""

from __future__ import annotations

import contextlib
import io
from dataclasses import fields
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from mmmoe.models import BackboneSpec, ModelConfig, MoESpec, create_model, get_config
from mmmoe.moe import MoEConfig
from tasks.base import MMMoEModule, OptimSpec, init_parameters, load_state_file, upgrade_hparams
from tasks.fit_cli import MMMoECLI, main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = CONFIGS / "pretrain" / "tiny.yaml"
FULL = [CONFIGS / "pretrain" / "tiny.yaml", CONFIGS / "finetune" / "vqa.yaml", CONFIGS / "finetune" / "nlvr2.yaml",
        CONFIGS / "finetune" / "caption.yaml", CONFIGS / "finetune" / "retrieval.yaml",
        CONFIGS / "lm" / "causal_en.yaml", CONFIGS / "lm" / "mlm_multilingual.yaml"]
SMALL = BackboneSpec("tiny", "dense", depth=1, vocab_size=64)


from tests.test_configs import parser  # noqa: E402,F401 - the fit parser, built once (a fixture)


def parse(parser, *configs, extra=()):
    args = ["fit"] + [a for c in configs for a in ("--config", str(c))] + list(extra)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return parser.parse_args(args).fit
        except SystemExit:
            raise ValueError(err.getvalue()) from None


def run_fit(*args: str, capsys) -> tuple:
    """``mmmoe fit`` on the tiny config with ``args`` (for the ones that stop before training)."""
    rc = main(["fit", "--config", str(TINY), "--builtin_data", "null", *args])
    return rc, capsys.readouterr()


# ------------------------------------------------------------------------------ the dataclasses
def test_specs_mirror_model_and_moe_config():
    assert {f.name for f in fields(BackboneSpec)} == {f.name for f in fields(ModelConfig)} | {"preset", "variant"}
    assert {f.name for f in fields(MoESpec)} == {f.name for f in fields(MoEConfig)} - {"d_model"}
    assert all(getattr(BackboneSpec(), f.name) is None for f in fields(ModelConfig) if f.name != "moe")
    assert not MoESpec().overrides()


def test_spec_builds_what_get_config_builds():
    spec = BackboneSpec("tiny", "smoe", depth=2, drop_path=0.1, moe={"router": "xmoe", "top_k": 2})
    want = get_config("tiny", "smoe", depth=2, drop_path=0.1, moe={"router": "xmoe", "top_k": 2})
    assert spec.config() == want and create_model(spec).config == want
    assert isinstance(spec.moe, MoESpec) and spec.moe.router == "xmoe"
    # the defaults are the preset's and the variant's; extra fills only unset fields
    assert BackboneSpec().config() == get_config("tiny")
    assert spec.config(vocab_size=77, depth=5).vocab_size == 77 and spec.config(depth=5).depth == 2
    # plain types both ways
    d = spec.to_dict()
    assert d["moe"]["router"] == "xmoe" and BackboneSpec.from_dict(d) == spec and BackboneSpec.coerce(d) == spec
    assert OptimSpec.coerce(OptimSpec(lr=5e-4).to_dict()) == OptimSpec(lr=5e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=-3), r"ModelConfig\.dim=-3 is invalid"),
    (dict(dim=90), r"ModelConfig\.num_heads=4 is invalid: must divide dim=90"),
    (dict(variant="mhmoe-h9"), r"variant='mhmoe-h9' is invalid"),
    (dict(preset="huge"), r"unknown model 'huge'"),
    (dict(moe={"top_kk": 1}), r"BackboneSpec\.moe: unknown field\(s\) \['top_kk'\]"),
    (dict(moe={"top_k": 99}), r"MoEConfig\.top_k=99 is invalid"),
    (dict(variant="dense", moe={"router": "xmoe"}), r"variant='dense' has no MoE layers"),
])
def test_spec_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BackboneSpec(**kwargs)


def test_optim_and_dict_errors_name_the_field():
    for kwargs, name in ((dict(lr=0.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(warmup_steps=-1), "warmup_steps"),
                         (dict(min_lr_ratio=2.0), "min_lr_ratio"), (dict(weight_decay=-0.1), "weight_decay")):
        with pytest.raises(ValueError, match=rf"OptimSpec\.{name}="):
            OptimSpec(**kwargs)
    with pytest.raises(ValueError, match=r"OptimSpec: unknown field\(s\) \['learning_rate'\]"):
        OptimSpec.coerce({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match=r"BackboneSpec: unknown field\(s\) \['dimm'\]"):
        BackboneSpec.coerce({"dimm": 8})
    from tasks.vqa import VQAModule  # a module built from dicts validates them the same way

    with pytest.raises(ValueError, match=r"BackboneSpec: unknown field\(s\) \['layers'\]"):
        VQAModule(answer_vocab=["a"], backbone={"layers": 2})


# ------------------------------------------------------------------------------ the command line
def test_model_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--model.help", "tasks.vqa.VQAModule"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--model.backbone.preset", "--model.backbone.variant", "--model.backbone.dim",
                   "--model.backbone.max_text_len", "--model.backbone.moe.router", "--model.backbone.moe.top_k",
                   "--model.optim.lr", "--model.optim.warmup_steps", "--model.tokenizer", "--model.init_from",
                   "--model.answer_vocab"):  # base arguments (forwarded **kwargs) and the task's own
        assert option in text, option
    for f in fields(BackboneSpec):
        assert f"--model.backbone.{f.name}" in text, f.name
    # the field docstrings are the help texts
    assert "Model width D." in text and "Peak learning rate." in text and "Routed experts per MoE layer." in text


@pytest.mark.parametrize("config", FULL, ids=lambda p: p.stem)
def test_every_task_takes_and_checks_the_base_arguments(parser, config):
    """LightningCLI resolves each task's **kwargs to the base arguments: set and checked."""
    ns = parse(parser, config, extra=["--model.init_args.backbone.depth=3", "--model.init_args.optim.lr=4e-4"])
    assert ns.model.init_args.backbone.depth == 3 and ns.model.init_args.optim.lr == 4e-4
    with pytest.raises(ValueError, match=r"optim\.learning_rate"):
        parse(parser, config, extra=["--model.init_args.optim.learning_rate=3"])
    with pytest.raises(ValueError, match=r"backbone\.depth"):
        parse(parser, config, extra=["--model.init_args.backbone.depth=two"])


@pytest.mark.parametrize("option, value, message", [
    ("backbone.dim", "-3", r"model\.init_args\.backbone: ModelConfig\.dim=-3 is invalid"),
    ("backbone.variant", "smoe2", r"model\.init_args\.backbone: variant='smoe2' is invalid"),
    ("backbone.moe.top_k", "0", r"model\.init_args\.backbone: MoEConfig\.top_k=0 is invalid"),
    ("optim.lr", "-1", r"model\.init_args\.optim: OptimSpec\.lr=-1\.0 is invalid"),
])
def test_fit_rejects_invalid_values_naming_the_field(capsys, option, value, message):
    import re

    rc, out = run_fit(f"--model.init_args.{option}", value, capsys=capsys)
    assert rc == 2 and re.search(message, out.err), out.err


def test_fit_rejects_wrong_types_and_unknown_fields(parser, tmp_path):
    with pytest.raises(ValueError, match=r"backbone\.dim"):
        parse(parser, TINY, extra=["--model.init_args.backbone.dim=abc"])
    with pytest.raises(ValueError, match=r"backbone\.dimm"):
        parse(parser, TINY, extra=["--model.init_args.backbone.dimm=3"])
    bad = tmp_path / "bad.yaml"  # an unknown field in YAML
    bad.write_text(yaml.safe_dump({"model": {"init_args": {"backbone": {"moe": {"num_expert": 4}}}}}))
    with pytest.raises(ValueError, match=r"num_expert"):
        parse(parser, TINY, bad)


def test_config_fragments_merge_field_by_field(parser, tmp_path):
    """A later --config changes only the fields it names, in nested dataclasses too."""
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"model": {"init_args": {
        "backbone": {"depth": 2, "drop_path": 0.1, "moe": {"router": "xmoe", "balancing": "aux_free"}},
        "optim": {"warmup_steps": 7}}}}))
    experts = tmp_path / "experts.yaml"
    experts.write_text(yaml.safe_dump({"model": {"init_args": {"backbone": {"moe": {"num_experts": 16}}}}}))
    ns = parse(parser, TINY, mine, CONFIGS / "model" / "smoe.yaml", experts).model.init_args
    b = ns.backbone
    assert (b.preset, b.variant, b.depth, b.drop_path) == ("tiny", "smoe", 2, 0.1)
    assert (b.moe.router, b.moe.balancing, b.moe.num_experts) == ("xmoe", "aux_free", 16)
    assert (ns.optim.lr, ns.optim.warmup_steps, ns.optim.weight_decay) == (2e-3, 7, 0.05)  # lr: tiny.yaml's
    cfg = BackboneSpec.coerce(b.as_dict()).config(vocab_size=64)
    assert (cfg.depth, cfg.moe.num_experts, cfg.moe.router, cfg.moe.num_heads) == (2, 16, "xmoe", 1)


# ------------------------------------------------------------------------------ hyperparameters and checkpoints
def test_hparams_record_every_argument_as_plain_types():
    from tasks.vqa import VQAModule

    m = VQAModule(answer_vocab=["no", "yes"], backbone=SMALL, optim=OptimSpec(lr=5e-4))
    hp = dict(m.hparams)
    assert hp["backbone"] == SMALL.to_dict() and hp["optim"] == OptimSpec(lr=5e-4).to_dict()
    # defaults of the base and of the subclass are recorded too
    assert hp["init_from"] is None and hp["tokenizer"] is None and hp["loss_reduction"] == "beit3"
    assert set(init_parameters(VQAModule)) <= set(hp)
    plain = (str, int, float, bool, type(None), list, dict)

    def check(v):
        assert isinstance(v, plain), type(v)
        for x in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()):
            check(x)

    check(hp)
    assert m.optim_spec.lr == 5e-4 and m.config.depth == 1


def test_a_subclass_that_saves_hyperparameters_itself_records_them_all():
    class Head(MMMoEModule):
        def __init__(self, width: int = 3, **kwargs):
            super().__init__(**kwargs)
            self.save_hyperparameters()  # Lightning's habit: still every argument, still plain

    m = Head(width=5, backbone=SMALL.to_dict())
    assert m.hparams["width"] == 5 and m.hparams["backbone"] == SMALL.to_dict()
    assert m.hparams["optim"] == OptimSpec().to_dict() and "kwargs" not in m.hparams


def test_checkpoint_loads_weights_only_and_rebuilds(tmp_path):
    from tasks.evaluate_cli import load_task_module
    from tasks.vqa import VQAModule

    torch.manual_seed(0)
    m = VQAModule(answer_vocab=["no", "yes"], backbone=BackboneSpec("tiny", "smoe", depth=2, vocab_size=64,
                                                                    moe={"top_k": 2}), optim={"lr": 3e-4})
    path = tmp_path / "m.ckpt"
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.strategy.connect(m)
    trainer.save_checkpoint(path)  # what ModelCheckpoint writes
    obj = load_state_file(path)  # weights-only
    assert obj["hyper_parameters"]["backbone"]["moe"]["top_k"] == 2
    for again in (load_task_module(VQAModule, path), VQAModule.load_from_checkpoint(path, weights_only=True)):
        assert again.config == m.config and again.optim_spec == m.optim_spec
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), m.state_dict().values()))


def test_checkpoint_of_the_old_layout_still_loads(tmp_path):
    from tasks.evaluate_cli import load_task_module
    from tasks.nlvr2 import NLVR2Module

    old = {"model": "tiny", "variant": "smoe", "model_args": {"depth": 1, "vocab_size": 64, "moe": {"router": "xmoe"}},
           "tokenizer": None, "lr": 2e-4, "weight_decay": 0.01, "betas": (0.9, 0.98), "eps": 1e-6,
           "warmup_steps": 5, "min_lr_ratio": 0.1, "init_from": None, "head_style": "beit3"}
    new = upgrade_hparams(old)
    assert new["backbone"] == {"preset": "tiny", "variant": "smoe", "depth": 1, "vocab_size": 64, "moe": {"router": "xmoe"}}
    assert new["optim"]["lr"] == 2e-4 and "lr" not in new and "model" not in new and new["head_style"] == "beit3"
    assert upgrade_hparams(new) == new
    m = NLVR2Module(**new)
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": old}, path)
    again = load_task_module(NLVR2Module, path)
    assert again.config == m.config and again.config.moe.router == "xmoe" and again.optim_spec.lr == 2e-4


def test_cli_built_module_keeps_lightnings_records(tmp_path):
    """Built by LightningCLI, hparams are its config (with ``_class_path``): a checkpoint then
    restores the module with ``load_from_checkpoint``. With ``--ckpt_path`` the module is built from
    the config (the run's saved config.yaml; command-line overrides keep their meaning): the
    checkpoint's hyperparameters are not merged over it, as stock LightningCLI does."""
    from tasks.pretrain import PretrainModule

    class NoRun(MMMoECLI):
        def _run_subcommand(self, subcommand):
            pass

    args = ["--config", str(TINY), "--builtin_data", "null", "--model.init_args.tokenizer", "null",
            "--trainer.logger", "false", "--model.init_args.backbone.depth", "1"]
    m = NoRun(args=["fit", *args, "--model.init_args.optim.lr", "3e-4"]).model
    assert m.hparams["_class_path"] == "tasks.pretrain.PretrainModule"
    assert m.hparams["backbone"] == BackboneSpec("tiny", "mhmoe-h2", depth=1).to_dict()
    assert m.hparams["optim"]["lr"] == 3e-4
    path = tmp_path / "cli.ckpt"
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.strategy.connect(m)
    trainer.save_checkpoint(path)
    again = PretrainModule.load_from_checkpoint(path, weights_only=True)
    assert again.config == m.config and again.optim_spec.lr == 3e-4
    resumed = NoRun(args=["fit", *args, "--ckpt_path", str(path)]).model  # tiny.yaml's lr, not the checkpoint's
    assert resumed.config == m.config and resumed.optim_spec.lr == 2e-3
