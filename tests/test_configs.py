"""Every YAML under configs/ parses with the ``mmmoe fit`` parser (LightningCLI, no instantiation);
fragments (configs/model, configs/trainer, any config without class paths) are merged onto a full
config. The tiny pretraining model of every FFN variant is instantiated and the variants are
checked to match in active parameters and FLOPs. Also: ``mmmoe fit --help``, precision ``auto``,
the default atomic checkpoint plugin, and the wrapper script."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from mmmoe.models import VARIANTS, count_costs
from tasks.base import AtomicCheckpointIO
from tasks.fit_cli import MMMoECLI, MMMoETrainer, resolve_precision
from tasks.pretrain import PretrainModule

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
CONFIGS = sorted(p for ext in ("yaml", "yml") for p in CONFIG_DIR.glob(f"**/*.{ext}"))
TINY = CONFIG_DIR / "pretrain" / "tiny.yaml"
#: top-level keys of an ``mmmoe fit`` config
FIT_KEYS = {"model", "data", "trainer", "seed_everything", "builtin_data", "ckpt_path"}


class _Built(Exception):
    pass


class _ParserOnly(MMMoECLI):
    """Stops right after the parser is built (nothing parsed, nothing instantiated)."""

    def parse_arguments(self, parser, args):
        raise _Built(parser)


@pytest.fixture(scope="module")
def parser():
    try:
        _ParserOnly(args=[])
    except _Built as built:
        return built.args[0]
    raise AssertionError("parser was not built")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def is_full(cfg: dict) -> bool:
    return any(isinstance(cfg.get(k), dict) and "class_path" in cfg[k] for k in ("model", "data"))


def base_for(path: Path) -> Path:
    """The full config a fragment is merged onto: a full config of its own folder, else tiny."""
    if path.parent.name not in ("model", "trainer"):
        for other in sorted(path.parent.glob("*.y*ml")):
            if other != path and is_full(load(other) or {}):
                return other
    return TINY


def parse(parser, *configs: Path, extra=()):
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    try:
        return parser.parse_args([*args, *extra]).fit
    except SystemExit as exc:  # jsonargparse reports the problem on stderr and exits
        raise AssertionError(f"{' + '.join(str(c.relative_to(REPO)) for c in configs)} does not parse (exit {exc.code})")


def test_the_expected_configs_exist():
    names = {str(p.relative_to(CONFIG_DIR)) for p in CONFIGS}
    expected = {"pretrain/tiny.yaml", "pretrain/base.yaml"}
    expected |= {f"model/{v}.yaml" for v in VARIANTS}
    expected |= {f"trainer/{t}.yaml" for t in ("cpu", "cpu-ddp", "1gpu", "multi-gpu", "multi-node", "cpu-ep", "multi-gpu-ep")}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_parses(parser, path):
    cfg = load(path)
    assert isinstance(cfg, dict) and cfg, f"{path} is empty or not a mapping"
    unknown = set(cfg) - FIT_KEYS
    if unknown:
        pytest.skip(f"not an `mmmoe fit` config (top-level keys {sorted(unknown)})")
    if is_full(cfg):
        ns = parse(parser, path)
    else:
        ns = parse(parser, base_for(path), path)
    # what the file sets is what the parser holds
    for section in ("model", "data"):
        for key, value in ((cfg.get(section) or {}).get("init_args") or {}).items():
            assert same(ns[section].init_args[key], value), f"{section}.init_args.{key}"
    for key, value in (cfg.get("trainer") or {}).items():
        if key not in ("callbacks", "logger", "plugins"):
            assert same(ns.trainer[key], value), f"trainer.{key}"


def same(got, value) -> bool:
    got = got.as_dict() if hasattr(got, "as_dict") else got
    if isinstance(value, list) and isinstance(got, tuple):
        got = list(got)
    if isinstance(value, str) and isinstance(got, float):  # PyYAML reads 1e-3 as a string
        value = float(value)
    if isinstance(value, dict) and isinstance(got, dict) and "class_path" in value:  # + defaults filled in
        given = value.get("init_args") or {}
        return got.get("class_path") == value["class_path"] and all(
            same((got.get("init_args") or {}).get(k), v) for k, v in given.items())
    if isinstance(value, dict) and isinstance(got, dict):  # a dataclass (backbone, optim): + defaults filled in
        return all(k in got and same(got[k], v) for k, v in value.items())
    return got == value


def test_model_fragments_give_matched_variants(parser):
    costs = {}
    for variant in VARIANTS:
        ns = parse(parser, TINY, CONFIG_DIR / "model" / f"{variant}.yaml")
        assert ns.model.class_path == "tasks.pretrain.PretrainModule"
        args = ns.model.init_args.as_dict()
        assert args["backbone"]["variant"] == variant and args["backbone"]["preset"] == "tiny"
        args["tokenizer"] = None  # data/synth may not exist yet; the default vocabulary is fine here
        module = PretrainModule(**args)
        assert (module.config.moe is None) == (variant == "dense")
        costs[variant] = count_costs(module.config)
    ref = costs["smoe"]
    for variant, c in costs.items():
        assert c["macs_per_token"] == ref["macs_per_token"], variant
        assert math.isclose(c["active_params"], ref["active_params"], rel_tol=0.01), variant
        if variant != "dense":  # the MoE variants also match in total parameters
            assert math.isclose(c["params"], ref["params"], rel_tol=0.05), variant


def test_trainer_fragments(parser):
    want = {"cpu": ("cpu", 1, 1), "cpu-ddp": ("cpu", 2, 1), "1gpu": ("gpu", 1, 1), "multi-gpu": ("gpu", -1, 1),
            "multi-node": ("gpu", 8, 4), "cpu-ep": ("cpu", 2, 1), "multi-gpu-ep": ("gpu", -1, 1)}
    for name, (acc, devices, nodes) in want.items():
        t = parse(parser, TINY, CONFIG_DIR / "trainer" / f"{name}.yaml").trainer
        assert (t.accelerator, t.devices, t.num_nodes, t.precision) == (acc, devices, nodes, "auto"), name


def test_tiny_config_trainer_defaults(parser):
    ns = parse(parser, TINY)
    t = ns.trainer
    assert t.precision == "auto" and t.gradient_clip_val > 0
    classes = [c.class_path.rsplit(".", 1)[1] for c in t.callbacks]
    assert classes.count("ModelCheckpoint") == 2 and "LearningRateMonitor" in classes
    # ours (writes last.ckpt at the end of training too), not the stock one
    assert {c.class_path for c in t.callbacks if c.class_path.endswith("ModelCheckpoint")} == {"tasks.fit_cli.ModelCheckpoint"}
    assert any("ProgressBar" in c for c in classes)
    ckpt = [c.init_args for c in t.callbacks if c.class_path.endswith("ModelCheckpoint")]
    assert any(a.save_last and a.every_n_train_steps for a in ckpt) and any(a.monitor == "val/loss" for a in ckpt)
    assert {lg.class_path.rsplit(".", 1)[1] for lg in t.logger} == {"CSVLogger", "TensorBoardLogger"}
    assert [p.class_path for p in t.plugins] == ["tasks.base.AtomicCheckpointIO"]
    assert ns.data.init_args.image_text.endswith("data/synth/shards/pretrain-image-text.manifest.json")


def test_bad_values_are_rejected(parser):
    with pytest.raises(AssertionError, match="does not parse"):
        parse(parser, TINY, extra=["--model.init_args.no_such_option=1"])
    with pytest.raises(AssertionError, match="does not parse"):
        parse(parser, TINY, extra=["--trainer.precision=float"])


def test_fit_help(capsys):
    from tasks.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--trainer.precision", "--builtin_data", "--ckpt_path", "--model", "--data"):
        assert option in out, option
    # where the model's fields are listed (tests/test_typed_config.py checks that listing)
    text = " ".join(out.split())
    assert "--model.help CLASS" in text and "backbone.moe.*" in text and "optim.*" in text


def test_precision_auto(monkeypatch):
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("16-mixed", "auto") == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "auto") == "bf16-mixed"
    assert resolve_precision("auto", "gpu") == "bf16-mixed"
    assert resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == "16-mixed"


def test_trainer_defaults_to_atomic_checkpoints(tmp_path):
    trainer = MMMoETrainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    assert trainer.precision == "32-true"
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_wrapper_script():
    script = REPO / "scripts" / "pretrain.sh"
    assert script.stat().st_mode & 0o111, "scripts/pretrain.sh is not executable"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert 'fit --config "${CONFIG:-configs/pretrain/tiny.yaml}" "$@"' in text


def test_base_config_placeholders_fail_clearly(capsys):
    from tasks.fit_cli import main

    assert main(["fit", "--config", str(CONFIG_DIR / "pretrain" / "base.yaml")]) == 2
    err = capsys.readouterr().err
    assert "placeholder" in err and "/path/to/tokenizer.model" in err
