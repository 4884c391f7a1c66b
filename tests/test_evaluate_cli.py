"""``mmmoe evaluate`` / ``mmmoe predict`` and ``load_task_module``: round trips through saved
checkpoints (a plain Trainer checkpoint and one written by ``mmmoe fit`` with the repository's
configs/finetune configs), weights-only loading (a pickle that would create a file is refused and
the file never appears), clear errors for missing files and mismatched inputs."""

import json
from pathlib import Path

import pytest
import torch

from tasks.base import UnsafeCheckpointError
from tasks.cli import main
from tasks.evaluate_cli import TaskUnavailableError, load_task_module, read_config, resolve_task
from tasks.nlvr2 import NLVR2Module
from tasks.vqa import VQAModule
from tests.test_vqa import make_task_data, one_thread, quiet_trainer

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(backbone=dict(preset="tiny", variant="dense", depth=1))


# ------------------------------------------------------------------------------ fixtures
def yaml_config(path: Path, model_cls: str, model_args: dict, data_cls: str, data_args: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump({
        "model": {"class_path": model_cls, "init_args": model_args},
        "data": {"class_path": data_cls, "init_args": data_args},
        "trainer": {"max_steps": 2},
    }))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    d = make_task_data(root, num_images=40)
    # a "pretraining" checkpoint to fine-tune from; deleted before evaluation (must not be needed)
    pre = root / "pre.ckpt"
    backbone = VQAModule(answer_vocab=["x"], tokenizer=d["tokenizer"], **SMALL).backbone
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, pre)
    vqa_args = dict(answer_vocab=str(root / "answers.json"), train_annotations=d["train_annotations"],
                    min_answer_freq=1, eval_questions=d["val_questions"], eval_annotations=d["val_annotations"],
                    tokenizer=d["tokenizer"], init_from=str(pre), **SMALL)
    vqa = VQAModule(**vqa_args)
    vqa_dm = dict(tokenizer=d["tokenizer"], answer_vocab=str(root / "answers.json"), train=d["vqa_train"],
                  val=d["vqa_val"], batch_size=16, image_size=64, max_len=24, num_workers=0, pin_memory=False)
    nlvr2_args = dict(eval_data=d["nlvr2_dev_json"], test_data=d["nlvr2_test1_json"], tokenizer=d["tokenizer"], **SMALL)
    nlvr2 = NLVR2Module(**nlvr2_args)
    nlvr2_dm = dict(tokenizer=d["tokenizer"], train=d["nlvr2_train"], val=d["nlvr2_dev"], test=d["nlvr2_test1"],
                    batch_size=16, image_size=64, max_len=24, num_workers=0, pin_memory=False)
    from data_pipelines.datamodules import NLVR2DataModule, VQADataModule

    ckpts = {}
    with one_thread():
        for name, module, dm in (("vqa", vqa, VQADataModule(**vqa_dm)), ("nlvr2", nlvr2, NLVR2DataModule(**nlvr2_dm))):
            trainer = quiet_trainer(3)
            trainer.fit(module, dm)
            ckpts[name] = str(root / f"{name}.ckpt")
            trainer.save_checkpoint(ckpts[name])
    pre.unlink()
    cfg = {
        "vqa": yaml_config(root / "vqa.yaml", "tasks.vqa.VQAModule", vqa_args,
                           "data_pipelines.datamodules.VQADataModule", vqa_dm),
        "nlvr2": yaml_config(root / "nlvr2.yaml", "tasks.nlvr2.NLVR2Module", nlvr2_args,
                             "data_pipelines.datamodules.NLVR2DataModule", nlvr2_dm),
    }
    return {"root": root, "data": d, "ckpt": ckpts, "config": cfg, "modules": {"vqa": vqa, "nlvr2": nlvr2},
            "vqa_dm": vqa_dm, "nlvr2_dm": nlvr2_dm}


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------------------ load_task_module
def test_load_task_module_restores_the_fine_tuned_module(setup):
    for task in ("vqa", "nlvr2"):
        src = setup["modules"][task]
        m = load_task_module(task, setup["ckpt"][task])  # its init_from file is gone: not needed
        assert type(m) is type(src) and not m.training
        assert m.hparams["init_from"] is None
        ref = src.state_dict()
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, ref[k])
    m = load_task_module(VQAModule, setup["ckpt"]["vqa"])
    assert m.answers == setup["modules"]["vqa"].answers and m.hparams["answer_vocab"] == m.answers


def test_load_task_module_checks_class_and_contents(setup, tmp_path):
    obj = torch.load(setup["ckpt"]["vqa"], weights_only=True)
    # keys added by LightningCLI are ignored, and name the class that wrote the checkpoint
    obj["hyper_parameters"] = {**obj["hyper_parameters"], "_class_path": "tasks.vqa.VQAModule",
                               "_instantiator": "pytorch_lightning.cli.instantiate_module"}
    torch.save(obj, tmp_path / "cli.ckpt")
    assert isinstance(load_task_module("vqa", tmp_path / "cli.ckpt"), VQAModule)
    obj["hyper_parameters"]["_class_path"] = "tasks.nlvr2.NLVR2Module"
    torch.save(obj, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="written by tasks.nlvr2.NLVR2Module"):
        load_task_module("vqa", tmp_path / "other.ckpt")
    # a VQA checkpoint is not an NLVR2 one (its hyperparameters say so)
    with pytest.raises(ValueError, match="answer_vocab"):
        load_task_module("nlvr2", setup["ckpt"]["vqa"])
    # weights of the wrong shape / missing weights: strict loading names them
    broken = torch.load(setup["ckpt"]["nlvr2"], weights_only=True)
    del broken["state_dict"]["head.classifier.1.weight"]
    torch.save(broken, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match="missing: head.classifier.1.weight"):
        load_task_module("nlvr2", tmp_path / "broken.ckpt")
    torch.save({"state_dict": broken["state_dict"]}, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="no 'hyper_parameters'"):
        load_task_module("nlvr2", tmp_path / "bare.ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task_module("nlvr2", tmp_path / "nothing.ckpt")


class MakesAFile:
    """Unpickling this would call open(path, "w"): it creates the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_checkpoint_is_refused_and_nothing_runs(setup, tmp_path, capsys):
    obj = torch.load(setup["ckpt"]["vqa"], weights_only=True)
    # the payload is live: loaded the unsafe way, it creates its file
    proof = tmp_path / "proof.txt"
    torch.save({**obj, "payload": MakesAFile(str(proof))}, tmp_path / "proof.ckpt")
    assert not proof.exists()
    torch.load(tmp_path / "proof.ckpt", weights_only=False)
    assert proof.exists()
    # the same kind of file through the project's loaders: refused, never executed
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.ckpt"
    torch.save({**obj, "payload": MakesAFile(str(marker))}, evil)
    with pytest.raises(UnsafeCheckpointError, match="refusing"):
        load_task_module("vqa", evil)
    rc, _, err = run(capsys, "evaluate", "vqa", "--config", setup["config"]["vqa"], "--ckpt", str(evil),
                     "--out", str(tmp_path / "o"))
    assert rc == 2 and "refusing" in err and "Nothing in it was executed" in err
    img = next((setup["data"]["data"] / "coco" / "val2014").glob("*.jpg"))
    rc, _, err = run(capsys, "predict", "vqa", "--ckpt", str(evil), "--image", str(img), "--question", "what?")
    assert rc == 2 and "refusing" in err
    assert not marker.exists()


# ------------------------------------------------------------------------------ mmmoe evaluate
def test_evaluate_round_trip_vqa(setup, tmp_path, capsys):
    out = tmp_path / "eval"
    rc, stdout, err = run(capsys, "evaluate", "vqa", "--config", setup["config"]["vqa"], "--ckpt", setup["ckpt"]["vqa"],
                          "--out", str(out), "--trainer.accelerator", "cpu")
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(stdout) == metrics
    assert {"vqa_accuracy", "vqa_majority_baseline", "vqa_num_questions"} <= set(metrics)
    assert (out / "vqa_results.json").is_file()
    # the same numbers as evaluating the in-memory module on a fresh data module
    from data_pipelines.datamodules import VQADataModule

    direct = setup["modules"]["vqa"].evaluate_split(VQADataModule(**setup["vqa_dm"]), "val", str(tmp_path / "direct"))
    assert metrics == pytest.approx(direct)
    assert json.loads((out / "vqa_results.json").read_text()) == json.loads(
        (tmp_path / "direct" / "vqa_results.json").read_text())


def test_evaluate_round_trip_nlvr2_both_splits(setup, tmp_path, capsys):
    d = setup["data"]
    rc, stdout, err = run(capsys, "evaluate", "nlvr2", "--config", setup["config"]["nlvr2"],
                          "--ckpt", setup["ckpt"]["nlvr2"], "--split", "test", "--out", str(tmp_path / "t"))
    assert rc == 0, err
    test_metrics = json.loads(stdout)
    preds = json.loads((tmp_path / "t" / "nlvr2_predictions.json").read_text())
    from tasks.metrics.nlvr2 import load_labels, nlvr2_scores

    assert {p["identifier"] for p in preds} == set(load_labels(d["nlvr2_test1_json"]))
    assert test_metrics["nlvr2_accuracy"] == pytest.approx(nlvr2_scores(d["nlvr2_test1_json"], preds)["accuracy"])
    # eval_data names the labels of the evaluated split; test1's labels for the dev predictions are
    # the wrong ones -> a clear error naming the mismatch
    rc, _, err = run(capsys, "evaluate", "nlvr2", "--config", setup["config"]["nlvr2"],
                     "--ckpt", setup["ckpt"]["nlvr2"], "--out", str(tmp_path / "v"),
                     "--model.init_args.eval_data", d["nlvr2_test1_json"])
    assert rc == 2 and "no prediction" in err
    rc, stdout, err = run(capsys, "evaluate", "nlvr2", "--config", setup["config"]["nlvr2"],
                          "--ckpt", setup["ckpt"]["nlvr2"], "--out", str(tmp_path / "v"))
    assert rc == 0, err
    assert json.loads(stdout)["nlvr2_num_examples"] == len(load_labels(d["nlvr2_dev_json"]))


def test_lightning_test_subcommand_is_the_same_evaluation(setup, tmp_path, capsys):
    """`mmmoe test --config C --ckpt_path CKPT` (plain LightningCLI test) runs the same loop on the
    test split: the official file next to the checkpoint, the metrics of `mmmoe evaluate --split test`."""
    import shutil

    ckpt = tmp_path / "nlvr2.ckpt"
    shutil.copy(setup["ckpt"]["nlvr2"], ckpt)
    rc, _, err = run(capsys, "test", "--config", setup["config"]["nlvr2"], "--ckpt_path", str(ckpt),
                     "--trainer.accelerator", "cpu", "--trainer.logger", "false")
    assert rc == 0, err
    out = tmp_path / "eval-nlvr2-test"
    assert (out / "nlvr2_predictions.json").is_file()
    rc, stdout, err = run(capsys, "evaluate", "nlvr2", "--config", setup["config"]["nlvr2"], "--ckpt", str(ckpt),
                          "--split", "test", "--out", str(tmp_path / "again"))
    assert rc == 0, err
    assert json.loads((out / "metrics.json").read_text()) == json.loads(stdout)
    assert (out / "nlvr2_predictions.json").read_bytes() == (tmp_path / "again" / "nlvr2_predictions.json").read_bytes()


def test_evaluate_without_ground_truth(setup, tmp_path, capsys):
    rc, stdout, err = run(capsys, "evaluate", "nlvr2", "--config", setup["config"]["nlvr2"], "--ckpt",
                          setup["ckpt"]["nlvr2"], "--split", "test", "--model.init_args.test_data", "null", "--out", str(tmp_path))
    assert rc == 0, err
    assert set(json.loads(stdout)) == {"nlvr2_num_examples"}
    assert (tmp_path / "nlvr2_predictions.json").is_file()


def test_evaluate_errors_are_clear(setup, tmp_path, capsys):
    cfg, ckpt = setup["config"]["vqa"], setup["ckpt"]["vqa"]
    cases = [
        (["--ckpt", str(tmp_path / "none.ckpt")], "none.ckpt' does not exist"),
        (["--model.init_args.eval_questions", str(tmp_path / "q.json")], "q.json"),
        (["--model.init_args.eval_data", "x.json"], "eval_data"),  # an NLVR2 argument, not VQA's
        (["--model.init_args.eval_nothing", "1"], "eval_nothing"),
        (["--split", "test"], "no test split"),
        (["--data.init_args.no_such_arg", "1"], "no_such_arg"),
    ]
    for extra, message in cases:
        argv = ["evaluate", "vqa", "--config", cfg, "--ckpt", ckpt, "--out", str(tmp_path / "o"), *extra]
        rc, _, err = run(capsys, *argv)
        assert rc == 2 and message in err, (extra, err)
    rc, _, err = run(capsys, "evaluate", "vqa", "--config", str(tmp_path / "none.yaml"), "--ckpt", ckpt)
    assert rc == 2 and "none.yaml' does not exist" in err
    rc, _, err = run(capsys, "evaluate", "vqa", "--config", setup["config"]["nlvr2"], "--ckpt", ckpt)
    assert rc == 2 and "model.class_path is tasks.nlvr2.NLVR2Module" in err


def test_resolve_task():
    assert resolve_task("vqa") is VQAModule and resolve_task("tasks.nlvr2:NLVR2Module") is NLVR2Module
    with pytest.raises(ValueError, match="unknown task"):
        resolve_task("vqa2")
    with pytest.raises(TaskUnavailableError, match="not available"):
        resolve_task("tasks.no_such_task:Module")
    with pytest.raises(TaskUnavailableError, match="no class"):
        resolve_task("tasks.vqa:NoSuchModule")


# ------------------------------------------------------------------------------ mmmoe predict
def test_predict_vqa_and_nlvr2(setup, capsys):
    d = setup["data"]
    img = next((d["data"] / "coco" / "val2014").glob("*.jpg"))
    rc, out, err = run(capsys, "predict", "vqa", "--ckpt", setup["ckpt"]["vqa"], "--image", str(img),
                       "--question", "how many shapes are there?", "--device", "cpu")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("answer: ") and len(lines) == 6
    rc, out, _ = run(capsys, "predict", "vqa", "--ckpt", setup["ckpt"]["vqa"], "--image", str(img),
                     "--question", "how many shapes are there?", "--top-k", "2", "--json")
    result = json.loads(out)
    assert result["answer"] == lines[0][len("answer: "):] and len(result["top"]) == 2
    # the same answer as the in-memory module
    assert setup["modules"]["vqa"].predict_one(img, "how many shapes are there?")["answer"] == result["answer"]
    left = sorted((d["data"] / "nlvr2" / "images" / "dev").glob("*img0.png"))[0]
    right = left.with_name(left.name.replace("img0", "img1"))
    rc, out, err = run(capsys, "predict", "nlvr2", "--ckpt", setup["ckpt"]["nlvr2"], "--image", str(left),
                       "--right-image", str(right), "--sentence", "Both images contain a circle.")
    assert rc == 0, err
    assert json.loads(out)["prediction"] in ("True", "False")


def test_predict_errors(setup, tmp_path, capsys):
    img = next((setup["data"]["data"] / "coco" / "val2014").glob("*.jpg"))
    ckpt = setup["ckpt"]["vqa"]
    rc, _, err = run(capsys, "predict", "vqa", "--ckpt", ckpt, "--image", str(img))
    assert rc == 2 and "question" in err
    rc, _, err = run(capsys, "predict", "vqa", "--ckpt", ckpt, "--image", str(img), "--question", "q?",
                     "--sentence", "s")
    assert rc == 2 and "does not take sentence" in err
    rc, _, err = run(capsys, "predict", "vqa", "--ckpt", ckpt, "--image", str(tmp_path / "no.jpg"), "--question", "q?")
    assert rc == 2 and "no.jpg' does not exist" in err
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    rc, _, err = run(capsys, "predict", "vqa", "--ckpt", ckpt, "--image", str(tmp_path / "bad.jpg"), "--question", "q?")
    assert rc == 2 and "could not be decoded" in err


def test_predict_hostile_images_are_clear_errors(setup, tmp_path, capsys):
    """Decompression bombs, truncated, zero-byte and non-image files, a FIFO: exit 2 with one
    "mmmoe predict: error:" line naming the file, no traceback, no hang."""
    import os

    from data_pipelines import hostile as H

    files = {"bomb.png": H.bomb_png(), "bomb.jpg": H.bomb_jpeg(), "cut.jpg": H.jpeg(H.pixels(0, 64, 64))[:400],
             "empty.jpg": b"", "notes.jpg": b"not an image at all"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    os.mkfifo(tmp_path / "pipe.jpg")
    for name in [*files, "pipe.jpg"]:
        rc, out, err = run(capsys, "predict", "vqa", "--ckpt", setup["ckpt"]["vqa"], "--image", str(tmp_path / name),
                           "--question", "q?", "--device", "cpu")
        assert rc == 2 and out == "", name
        assert err.startswith("mmmoe predict: error:") and name in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------ the repository's configs
@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_finetune_config_fit_then_evaluate(task, setup, tmp_path, capsys):
    """configs/finetune/<task>.yaml with data/synth -> this test's tiny dataset: `mmmoe fit` for a
    few steps (LightningCLI), then `mmmoe evaluate` of its last.ckpt with the same config."""
    cfg = finetune_config(task, setup, tmp_path)
    with one_thread():
        rc = main(["fit", "--config", str(cfg), *FAST_FIT, *SMALL_OVERRIDES])
    assert rc == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file() and (last.parent / "config.yaml").is_file()  # the run's config, for evaluate
    rc, out, err = run(capsys, "evaluate", task, "--ckpt", str(last))
    assert rc == 0, err
    metrics = json.loads(out)
    assert f"{task}_majority_baseline" in metrics
    assert json.loads((last.parent / f"eval-{task}-val" / "metrics.json").read_text()) == metrics


FAST_FIT = ["--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--data.init_args.num_workers", "0"]
SMALL_OVERRIDES = ["--model.init_args.backbone.depth", "1", "--model.init_args.backbone.variant", "dense"]


def finetune_config(task: str, setup, tmp_path: Path) -> Path:
    text = (REPO / "configs" / "finetune" / f"{task}.yaml").read_text()
    text = text.replace("data/synth", str(setup["data"]["data"])).replace(f"runs/finetune-{task}", str(tmp_path / "run"))
    cfg = tmp_path / f"{task}.yaml"
    cfg.write_text(text)
    assert read_config(cfg)["model"]["init_args"]["backbone"]["preset"] == "tiny"
    return cfg


def test_evaluate_finds_the_runs_config_with_its_overrides(setup, tmp_path, capsys):
    """A fit whose ground truth and answer vocabulary came from command-line overrides: `mmmoe evaluate vqa --ckpt` (no --config) evaluates with those, as the overrides
    restated would; the config file alone gives other figures."""
    d = setup["data"]
    cfg = finetune_config("vqa", setup, tmp_path)
    # other ground truth: the same questions, every human answer "zzz" (accuracy and baseline 0)
    ann = json.loads(Path(d["val_annotations"]).read_text())
    for a in ann["annotations"]:
        a["multiple_choice_answer"] = "zzz"
        for h in a["answers"]:
            h["answer"] = "zzz"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "ann.json").write_text(json.dumps(ann))
    overrides = ["--model.init_args.eval_annotations", str(elsewhere / "ann.json"),
                 "--model.init_args.answer_vocab", str(elsewhere / "answers.json"),
                 "--data.init_args.answer_vocab", str(elsewhere / "answers.json")]
    with one_thread():
        rc = main(["fit", "--config", str(cfg), *FAST_FIT, *SMALL_OVERRIDES, *overrides])
    assert rc == 0 and (elsewhere / "answers.json").is_file()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    rc, out, err = run(capsys, "evaluate", "vqa", "--ckpt", str(last), "--out", str(tmp_path / "a"))
    assert rc == 0, err
    found = json.loads(out)
    rc, out, err = run(capsys, "evaluate", "vqa", "--config", str(cfg), "--ckpt", str(last), "--out", str(tmp_path / "b"),
                       "--data.init_args.num_workers", "0", *SMALL_OVERRIDES, *overrides)
    assert rc == 0, err
    assert found == json.loads(out)
    assert (tmp_path / "a" / "vqa_results.json").read_bytes() == (tmp_path / "b" / "vqa_results.json").read_bytes()
    assert found["vqa_accuracy"] == 0.0 and found["vqa_majority_baseline"] == 0.0
    rc, out, err = run(capsys, "evaluate", "vqa", "--config", str(cfg), "--ckpt", str(last), "--out", str(tmp_path / "c"),
                       "--data.init_args.num_workers", "0", *SMALL_OVERRIDES, *overrides[2:])
    assert rc == 0, err
    assert json.loads(out)["vqa_majority_baseline"] > 0.0  # the config's own annotations


def test_checkpoint_whose_tokenizer_moved(setup, tmp_path, capsys):
    obj = torch.load(setup["ckpt"]["vqa"], weights_only=True)
    obj["hyper_parameters"]["tokenizer"] = str(tmp_path / "moved" / "tokenizer.model")
    torch.save(obj, tmp_path / "moved.ckpt")
    m = load_task_module("vqa", tmp_path / "moved.ckpt")  # vocab_size comes from the weights
    assert m.config.vocab_size == setup["modules"]["vqa"].config.vocab_size
    img = next((setup["data"]["data"] / "coco" / "val2014").glob("*.jpg"))
    argv = ["predict", "vqa", "--ckpt", str(tmp_path / "moved.ckpt"), "--image", str(img), "--question", "q?", "--json"]
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and "tokenizer model not found" in err
    rc, out, err = run(capsys, *argv, "--tokenizer", setup["data"]["tokenizer"])
    assert rc == 0, err
    assert json.loads(out)["answer"] in m.answers
