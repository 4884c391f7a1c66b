"""Data parallelism on CPU, the proxy of multi-GPU DDP: 2 gloo processes.

* N steps of DDP with per-rank batch B end with the parameters of one process with batch 2B on the
  same samples (dense and MH-MoE), and the aux-free balancing biases are equal on both ranks and to
  the single-process ones (loads summed over ranks, one update per optimiser step).
* Gradient accumulation: 2 micro-batches of B give the parameters and biases of one batch of 2B.
* The unused-parameter rule: for every input kind, exactly the parameters that
  ``MultiwayTransformer.unused_parameters`` names get no gradient.
* A shipped fine-tuning config (VQA: its top blocks' vision/language ways get no tokens) trains
  with ``--config configs/trainer/cpu-ddp.yaml``. ``scripts/ddp_smoke.py`` runs every config.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmmoe.parallel import free_port
from mmmoe.models import create_model
from tests.ddp_worker import VARIANTS, train
from tasks.fit_cli import replace_in_config as _swap

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2




def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


@pytest.fixture(scope="module")
def ddp_states(tmp_path_factory):
    """Both ranks' final states for each variant (one launch of 2 processes for the module)."""
    out = tmp_path_factory.mktemp("ddp")
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.ddp_worker", "--out", str(out)], cwd=ROOT,
            env=child_env(LOCAL_RANK=str(r), NODE_RANK="0", WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("DDP workers did not finish in 300 s")
    for p, text in zip(procs, logs):
        assert p.returncode == 0, text[-3000:]
    return {(r, v): torch.load(out / f"rank{r}-{v}.pt", weights_only=True) for r in range(WORLD) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_ddp_matches_one_process_with_the_global_batch(ddp_states, variant):
    ref = train(variant, rank=0, world=1, devices=1)
    r0, r1 = ddp_states[(0, variant)], ddp_states[(1, variant)]
    moved = 0
    for name, want in ref.items():
        if name == "trainable":
            continue
        assert torch.equal(r0[name], r1[name]), f"{name} differs between the ranks"
        torch.testing.assert_close(r0[name], want, rtol=1e-4, atol=2e-5, msg=f"{variant} {name}")
        moved += name.endswith("expert_bias") and bool(want.abs().sum() > 0)
    assert torch.equal(r0["trainable"], ref["trainable"])
    if variant != "dense":
        assert moved > 0, "no aux-free bias moved: the check would pass vacuously"


def test_accumulated_micro_batches_equal_one_batch():
    """A 4-row micro-batch twice with accumulate_grad_batches=2 == one 8-row batch: parameters and
    the aux-free biases (updated once per optimiser step with the summed load)."""
    import tests.ddp_worker as w

    class Micro(torch.utils.data.Dataset):  # global batch i split into its 2 halves, in order
        def __init__(self):
            self.items = [(x[h::2].clone(), y[h::2].clone()) for x, y in w.global_batches() for h in range(2)]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    import pytorch_lightning as pl

    pl.seed_everything(0, verbose=False)
    module = w.RegressionTask("mhmoe-h2")
    trainer = pl.Trainer(max_steps=w.STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2)
    trainer.fit(module, torch.utils.data.DataLoader(Micro(), batch_size=None))
    ref = train("mhmoe-h2", rank=0, world=1, devices=1)
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=1e-4, atol=2e-5, msg=name)
    biases = [k for k in ref if k.endswith("expert_bias")]
    assert any(ref[k].abs().sum() > 0 for k in biases)
    # one update per optimiser step: each bias entry moved by at most rate x steps
    assert max(float(ref[k].abs().max()) for k in biases) <= 0.05 * w.STEPS + 1e-6


@pytest.mark.parametrize("kinds", [("image",), ("text",), ("image_text",), ("image", "text"),
                                   ("image_text", "image", "text")])
@pytest.mark.parametrize("masked", [False, True])
def test_unused_parameters_are_exactly_those_without_gradient(kinds, masked):
    torch.manual_seed(0)
    model = create_model("tiny", "mhmoe-h2", depth=4, vl_layers=2, vocab_size=300)
    gen = torch.Generator().manual_seed(0)
    loss = 0
    for kind in kinds:
        image = torch.randn(2, 3, 64, 64, generator=gen) if kind != "text" else None
        ids = torch.randint(5, 300, (2, 9), generator=gen) if kind != "image" else None
        mask = None
        if image is not None and masked:
            mask = torch.zeros(2, 16, dtype=torch.bool)
            mask[:, ::3] = True
        out = model(image=image, text_ids=ids, image_mask=mask)
        loss = loss + out.hidden.square().mean() + out.aux_loss
    loss.backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert no_grad == sorted(model.unused_parameters(kinds, masked_images=masked))


def test_unused_parameters_rejects_unknown_kinds():
    model = create_model("tiny", "dense", depth=2)
    with pytest.raises(ValueError, match="image_text"):
        model.unused_parameters(["video"])


def test_vqa_config_trains_with_cpu_ddp(tmp_path):
    """`mmmoe fit --config configs/finetune/vqa.yaml --config configs/trainer/cpu-ddp.yaml`: crashed
    with DDP's unused-parameter error before the task froze what image-text input never reaches."""
    from tests.test_vqa import make_task_data

    d = make_task_data(tmp_path, num_images=40)
    cfg = yaml.safe_load((ROOT / "configs/finetune/vqa.yaml").read_text())
    cfg = _swap(_swap(cfg, "data/synth/tokenizer.model", d["tokenizer"]), "data/synth", str(d["data"]))
    cfg = _swap(cfg, "runs/finetune-vqa", str(tmp_path / "runs"))
    args = cfg["model"]["init_args"]
    args["backbone"]["depth"] = 2
    cfg["data"]["init_args"].update(batch_size=8, num_workers=0)
    cfg["trainer"].update(max_steps=3, enable_progress_bar=False, enable_model_summary=False,
                          check_val_every_n_epoch=None, limit_val_batches=0)
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "ModelCheckpoint" in c["class_path"]]
    path = tmp_path / "vqa.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "tasks.cli", "fit", "--config", str(path),
           "--config", str(ROOT / "configs/trainer/cpu-ddp.yaml")]
    res = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-12000:]
    ckpt = tmp_path / "runs" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    # evaluation of that checkpoint on 2 processes (the run's saved config: cpu-ddp) and on one:
    # the same official result file, the same metrics
    runs = {}
    for name, extra in (("two", []), ("one", ["--trainer.devices", "1", "--trainer.strategy", "auto"])):
        cmd = [sys.executable, "-m", "tasks.cli", "evaluate", "vqa", "--ckpt", str(ckpt), "--out", str(tmp_path / name),
               *extra]
        res = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=400)
        assert res.returncode == 0, (res.stdout + res.stderr)[-12000:]
        runs[name] = json.loads(res.stdout)  # rank 0 alone prints: stdout is one JSON object
        assert ("MEMBER: 2/2" in res.stderr) == (name == "two"), res.stderr[-3000:]
    assert runs["two"] == runs["one"] and runs["one"]["vqa_num_questions"] > 0
    for f in ("vqa_results.json", "vqa_scores.json", "metrics.json"):
        assert (tmp_path / "two" / f).read_bytes() == (tmp_path / "one" / f).read_bytes(), f
    questions = json.loads(Path(cfg["model"]["init_args"]["eval_questions"]).read_text())["questions"]
    results = json.loads((tmp_path / "two" / "vqa_results.json").read_text())
    assert sorted(r["question_id"] for r in results) == sorted(q["question_id"] for q in questions)


def _gradient_coverage():
    """A callback that lists, after each backward, the trainable parameters without a gradient
    (what DDP without an unused-parameter search fails on)."""
    import pytorch_lightning as pl

    class GradientCoverage(pl.Callback):
        def __init__(self):
            self.missing = []

        def on_after_backward(self, trainer, module):
            self.missing.append([n for n, p in module.named_parameters() if p.requires_grad and p.grad is None])

    return GradientCoverage()


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    from tests.test_vqa import make_task_data

    return make_task_data(tmp_path_factory.mktemp("tasks"), num_images=40)


@pytest.mark.parametrize("config", ["pretrain/tiny.yaml", "finetune/vqa.yaml", "finetune/nlvr2.yaml",
                                    "finetune/caption.yaml", "finetune/retrieval.yaml", "lm/causal_en.yaml",
                                    "lm/mlm_multilingual.yaml"])
def test_every_config_gives_every_trainable_parameter_a_gradient(config, task_data, tmp_path):
    """The precondition of DDP without find_unused_parameters, for each shipped config's task."""
    from tasks.fit_cli import MMMoECLI

    d = task_data
    cfg = yaml.safe_load((ROOT / "configs" / config).read_text())
    cfg = _swap(_swap(cfg, "data/synth/tokenizer.model", d["tokenizer"]), "data/synth", str(d["data"]))
    cfg = _swap(cfg, "runs/", str(tmp_path / "runs") + "/")
    cfg["builtin_data"] = None
    args = cfg["model"]["init_args"]
    args["backbone"]["depth"] = 4  # the tiny preset's VL block is the top one
    cfg["data"]["init_args"].update(batch_size=4, num_workers=0)
    cfg["trainer"].update(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          limit_val_batches=0, callbacks=[], enable_checkpointing=False)
    for key in ("val_check_interval",):
        cfg["trainer"].pop(key, None)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = MMMoECLI(args=["--config", str(path)], run=False)
    check = _gradient_coverage()
    cli.trainer.callbacks.append(check)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert len(check.missing) == 2 and check.missing == [[], []], check.missing
