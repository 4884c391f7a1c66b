#!/usr/bin/env python
"""The main job, end to end on the built-in dataset: data -> tokenizer -> masked image-text
pretraining of a tiny multiway MH-MoE -> VQA, NLVR2, captioning and image-text retrieval fine-tuning
from that checkpoint -> official metrics -> expert-activation heatmap -> results table.

Writes under --out (default runs/quickstart):
    results.json                 headline numbers, baselines, expert activation, timings
    activation_heatmap.png       expert activation ratio per MoE layer (rows) and expert (columns)
    pretrain_curves.png          pretraining MLM / MIM losses (one line per variant with --compare)
    <variant>/pretrain.ckpt, <variant>/{vqa,nlvr2,caption,retrieval}/   checkpoints, official result files,
                                 metrics.json, CSV logs
The dataset and tokenizer go to --data (default data/synth, the path the configs under configs/
use), so `mmmoe fit --config configs/finetune/vqa.yaml` and friends find them afterwards.

With --compare (make quickstart COMPARE=1) the dense and SMoE backbones of the same active FLOPs
(mmmoe.models.registry variants, derived with the parity solver) go through the same data and
steps, and the table shows them side by side.

Each stage runs the shipped config (configs/pretrain/tiny.yaml, configs/finetune/<task>.yaml) through
the same entry points as the commands a user types (`mmmoe fit`, `mmmoe evaluate`, in this process),
and prints that exact command first. The configs are copied to <out>/<variant>/configs/ with their run
folders (and --data, when not data/synth) moved, so every printed command runs as shown. Runs on CPU
in about 10 minutes with the defaults (2 cores), on a GPU when present.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANT_LABELS = {"mhmoe-h2": "MH-MoE h=2", "mhmoe-h3": "MH-MoE h=3", "smoe": "SMoE", "fine-grained": "fine-grained",
                  "dense": "dense"}


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def _quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")


def stage_config(shipped: str, run_dir: Path, args: argparse.Namespace) -> Path:
    """A copy of the shipped config ``shipped`` (repository-relative) with its run folder moved to
    ``run_dir`` and the built-in data folder to ``--data``, written to ``<run_dir>/../configs/``."""
    import yaml

    from tasks.fit_cli import replace_in_config

    cfg = yaml.safe_load((ROOT / shipped).read_text(encoding="utf-8"))
    cfg = replace_in_config(cfg, cfg["trainer"]["default_root_dir"], str(run_dir))
    if Path(args.data) != Path("data/synth"):
        cfg = replace_in_config(cfg, "data/synth", str(args.data))
    path = run_dir.parent / "configs" / Path(shipped).name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {shipped}, run folder {run_dir}" + (f", data {args.data}" if Path(args.data) != Path("data/synth")
                    else "") + " (written by scripts/quickstart.py)\n" + yaml.safe_dump(cfg, sort_keys=False),
                    encoding="utf-8")
    return path


def run_command(argv: List[str], label: str, **kwargs: Any) -> Any:
    """Print ``mmmoe <argv>`` and run it in this process; returns what the entry point returns."""
    import shlex

    _say(f"{label}: mmmoe {' '.join(shlex.quote(a) for a in argv)}")
    if argv[0] == "evaluate":
        from tasks.cli import build_parser
        from tasks.evaluate_cli import evaluate

        ns, extra = build_parser().parse_known_args(argv)
        return evaluate(ns.task, ns.ckpt, ns.split, ns.out, ns.configs, extra)
    from tasks.fit_cli import run_cli

    return run_cli(argv, **kwargs)


def common_overrides(args: argparse.Namespace, variant: str, steps: int, lr: float) -> List[str]:
    return ["--seed_everything", str(args.seed), "--trainer.accelerator", args.accelerator,
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--model.init_args.backbone.variant", variant, "--model.init_args.optim.lr", str(lr),
            "--model.init_args.optim.warmup_steps", str(min(100, steps // 10)),
            "--data.init_args.batch_size", str(args.batch_size), "--data.init_args.num_workers", str(args.workers)]


# ---------------------------------------------------------------------------------------- stages
def prepare_data(args: argparse.Namespace) -> Dict[str, Path]:
    from data_pipelines.builtin import make_builtin_dataset
    from data_pipelines.tokenizer import train_tokenizer

    data = Path(args.data)
    _say(f"built-in dataset -> {data}  (mmmoe data synth --out {data} --num-images {args.num_images} "
         f"--seed {args.seed} --image-size {args.image_size})")
    t0 = time.perf_counter()
    index = make_builtin_dataset(data, num_images=args.num_images, seed=args.seed, image_size=args.image_size)
    for name, d in index["datasets"].items():
        if name.startswith(("caption-", "vqa-", "nlvr2-", "pretrain-image-text")):
            _say(f"  {name:<22} {d['total']:>6} samples")
    tok = data / "tokenizer.model"
    stamp = data / "tokenizer.params.json"
    params = {"vocab_size": args.vocab_size, "dataset": index["params"]}
    if not tok.exists() or not stamp.exists() or json.loads(stamp.read_text()) != params:
        _say(f"tokenizer -> {tok}  (mmmoe tokenizer train --input {data}/text {data}/text/multilingual "
             f"--out {data}/tokenizer --vocab-size {args.vocab_size})")
        train_tokenizer([data / "text", data / "text" / "multilingual"], data / "tokenizer", vocab_size=args.vocab_size)
        stamp.write_text(json.dumps(params))
    _say(f"data ready in {time.perf_counter() - t0:.1f}s")
    s = data / "shards"
    return {
        "root": data, "tokenizer": tok, "shards": s, "coco": data / "coco" / "dataset_coco.json",
        "vqa_train_ann": data / "vqav2" / "v2_mscoco_train2014_annotations.json",
        "vqa_val_q": data / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json",
        "vqa_val_ann": data / "vqav2" / "v2_mscoco_val2014_annotations.json",
        "nlvr2_train": data / "nlvr2" / "train.json", "nlvr2_dev": data / "nlvr2" / "dev.json",
    }


def pretrain(variant: str, paths: Dict[str, Path], out: Path, args: argparse.Namespace):
    """Returns the last checkpoint, the trained module and its CSV log."""
    run_dir = out / "pretrain"
    cfg = stage_config("configs/pretrain/tiny.yaml", run_dir, args)
    argv = ["fit", "--config", str(cfg), *common_overrides(args, variant, args.pretrain_steps, args.pretrain_lr),
            "--data.init_args.epoch_samples", str(args.batch_size * max(1, args.pretrain_steps))]
    cli = run_command(argv, f"[{variant}] pretraining {args.pretrain_steps} steps")
    csv = next((lg.log_dir for lg in cli.trainer.loggers if type(lg).__name__ == "CSVLogger"), None)
    return run_dir / "checkpoints" / "last.ckpt", cli.model, Path(csv) / "metrics.csv" if csv else None


def expert_activation(backbone, paths: Dict[str, Path], args: argparse.Namespace, batches: int = 8):
    """Routing statistics of the pretrained backbone on held-out image-text pairs (no masking)."""
    import torch

    from data_pipelines import readers
    from data_pipelines.tokenizer import Tokenizer
    from tasks.base import ExpertActivation

    backbone.eval()
    device = next(backbone.parameters()).device
    tok = Tokenizer(str(paths["tokenizer"]))
    pipe = readers.caption_pipeline(str(paths["shards"] / "caption-val.manifest.json"), tok,
                                    image_size=args.image_size_model, train=False, batch_size=args.batch_size,
                                    max_len=40)
    stats = ExpertActivation()
    with torch.no_grad():
        for i, batch in enumerate(readers.make_loader(pipe)):
            if i >= batches:
                break
            out = backbone.forward_features(batch["image"].to(device), batch["caption_ids"].to(device),
                                            batch["caption_pad_mask"].to(device))
            stats.update(out.moe)
    return stats


FINETUNE_SPLIT = {"vqa": "val", "nlvr2": "val", "caption": "test", "retrieval": "test"}


def finetune(task: str, variant: str, ckpt: Optional[Path], paths: Dict[str, Path], out: Path,
             args: argparse.Namespace) -> Dict[str, float]:
    """``mmmoe fit`` of configs/finetune/<task>.yaml from the pretraining checkpoint, then ``mmmoe
    evaluate`` of its last checkpoint on the held-out split; returns the metrics."""
    run_dir = out / task
    steps = {"vqa": args.vqa_steps, "nlvr2": args.nlvr2_steps, "caption": args.caption_steps,
             "retrieval": args.retrieval_steps}[task]
    lr = {"vqa": args.vqa_lr, "nlvr2": args.nlvr2_lr, "caption": args.caption_lr, "retrieval": args.retrieval_lr}[task]
    cfg = stage_config(f"configs/finetune/{task}.yaml", run_dir, args)
    argv = ["fit", "--config", str(cfg), *common_overrides(args, variant, steps, lr)]
    if ckpt is not None:
        argv += ["--model.init_args.init_from", str(ckpt)]
    run_command(argv, f"[{variant}] fine-tuning {task} {steps} steps")
    split = FINETUNE_SPLIT[task]
    return run_command(["evaluate", task, "--ckpt", str(run_dir / "checkpoints" / "last.ckpt"), "--split", split,
                        "--out", str(run_dir)], f"[{variant}] evaluating {task} on the held-out {split} split")


def run_variant(variant: str, paths: Dict[str, Path], args: argparse.Namespace) -> Dict[str, Any]:
    out = Path(args.out) / variant
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    times: Dict[str, float] = {}
    ckpt, module, csv = pretrain(variant, paths, out, args) if args.pretrain_steps > 0 else (None, None, None)
    times["pretrain_s"] = time.perf_counter() - t0
    res: Dict[str, Any] = {"variant": variant, "pretrain_csv": str(csv) if csv else None}
    if module is not None and variant != "dense":
        stats = expert_activation(module.backbone, paths, args)
        res["activation"] = {k: v.tolist() for k, v in stats.ratios().items()}
        act = stats.activated(args.activation_threshold)
        res["expert_activation_ratio"] = float(sum(act.values()) / len(act))
        res["expert_activation_per_layer"] = act
    for task in args.tasks:
        t = time.perf_counter()
        res[task] = finetune(task, variant, ckpt, paths, out, args)
        times[f"{task}_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0
    res["times"] = times
    return res


# ---------------------------------------------------------------------------------------- report
def summarise(runs: List[Dict[str, Any]], args: argparse.Namespace, wall: float) -> Dict[str, Any]:
    main = runs[0]
    results: Dict[str, Any] = {
        "variant": main["variant"],
        "vqa_accuracy": main.get("vqa", {}).get("vqa_accuracy"),
        "nlvr2_accuracy": main.get("nlvr2", {}).get("nlvr2_accuracy"),
        "nlvr2_consistency": main.get("nlvr2", {}).get("nlvr2_consistency"),
        "caption_cider": main.get("caption", {}).get("caption_cider"),
        "caption_bleu4": main.get("caption", {}).get("caption_bleu4"),
        "retrieval_i2t_r1": main.get("retrieval", {}).get("retrieval_i2t_r1"),
        "retrieval_t2i_r1": main.get("retrieval", {}).get("retrieval_t2i_r1"),
        "baselines": {
            "vqa_majority": main.get("vqa", {}).get("vqa_majority_baseline"),
            "nlvr2_majority": main.get("nlvr2", {}).get("nlvr2_majority_baseline"),
            "caption_constant_cider": main.get("caption", {}).get("caption_baseline_cider"),
            "retrieval_i2t_r1_random": main.get("retrieval", {}).get("retrieval_i2t_r1_random"),
            "retrieval_t2i_r1_random": main.get("retrieval", {}).get("retrieval_t2i_r1_random"),
        },
        "expert_activation_ratio": main.get("expert_activation_ratio"),
        "expert_activation_per_layer": main.get("expert_activation_per_layer"),
        "activation_threshold": args.activation_threshold,
        "heatmap": str(Path(args.out) / "activation_heatmap.png") if main.get("activation") else None,
        "metrics": {t: main.get(t) for t in args.tasks},
        "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "wall_time_s": wall,
        "times": main["times"],
    }
    if len(runs) > 1:
        results["compare"] = [
            {"variant": r["variant"], "vqa_accuracy": r.get("vqa", {}).get("vqa_accuracy"),
             "nlvr2_accuracy": r.get("nlvr2", {}).get("nlvr2_accuracy"),
             "caption_cider": r.get("caption", {}).get("caption_cider"),
             "expert_activation_ratio": r.get("expert_activation_ratio"), "times": r["times"]}
            for r in runs
        ]
    return results


def _fmt(v: Optional[float], scale: float = 1.0, digits: int = 1) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def print_table(results: Dict[str, Any], runs: List[Dict[str, Any]]) -> None:
    b = results["baselines"]
    rows = [
        ("VQA accuracy (val2014, official)", "vqa", "vqa_accuracy", b["vqa_majority"], "majority answer", 1.0),
        ("NLVR2 accuracy (dev)", "nlvr2", "nlvr2_accuracy", b["nlvr2_majority"], "majority class", 1.0),
        ("NLVR2 consistency (dev)", "nlvr2", "nlvr2_consistency", None, "", 1.0),
        ("Caption CIDEr-D (test, x100)", "caption", "caption_cider", b["caption_constant_cider"], "constant caption", 100.0),
        ("Caption BLEU-4 (test, x100)", "caption", "caption_bleu4", None, "", 100.0),
        ("Retrieval image->text R@1 (test)", "retrieval", "retrieval_i2t_r1", b.get("retrieval_i2t_r1_random"),
         "random ranking", 1.0),
        ("Retrieval text->image R@1 (test)", "retrieval", "retrieval_t2i_r1", b.get("retrieval_t2i_r1_random"),
         "random ranking", 1.0),
    ]
    names = [VARIANT_LABELS.get(r["variant"], r["variant"]) for r in runs]
    w = max(12, *(len(n) for n in names))
    head = f"{'metric':<34}" + "".join(f"{n:>{w + 2}}" for n in names) + f"{'baseline':>12}  baseline is"
    print()
    print(head)
    print("-" * len(head))
    for label, task, key, base, what, scale in rows:
        vals = "".join(f"{_fmt(r.get(task, {}).get(key), scale):>{w + 2}}" for r in runs)
        print(f"{label:<34}{vals}{_fmt(base, scale):>12}  {what}")
    acts = "".join(f"{_fmt(r.get('expert_activation_ratio'), 100.0):>{w + 2}}" for r in runs)
    print(f"{'experts activated (%, pretrained)':<34}{acts}")
    mins = "".join(f"{r['times']['total_s'] / 60:>{w + 2}.1f}" for r in runs)
    print(f"{'train + eval time (min)':<34}{mins}")
    print()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    p.add_argument("--data", default="data/synth", help="built-in dataset folder (default data/synth)")
    p.add_argument("--num-images", type=int, default=2000, help="images in the built-in dataset (default 2000)")
    p.add_argument("--image-size", type=int, default=64, help="image side written to disk (default 64)")
    p.add_argument("--seed", type=int, default=0, help="dataset and training seed (default 0)")
    p.add_argument("--vocab-size", type=int, default=1000, help="tokenizer vocabulary (default 1000)")
    p.add_argument("--variant", default="mhmoe-h2", choices=list(VARIANT_LABELS), help="main backbone (default mhmoe-h2)")
    p.add_argument("--compare", action="store_true", help="also train dense and SMoE backbones at matched FLOPs")
    p.add_argument("--compare-variants", nargs="+", default=["smoe", "dense"], choices=list(VARIANT_LABELS),
                   help="what --compare adds (default: smoe dense)")
    p.add_argument("--tasks", nargs="+", default=["vqa", "nlvr2", "caption", "retrieval"],
                   choices=["vqa", "nlvr2", "caption", "retrieval"])
    p.add_argument("--pretrain-steps", type=int, default=800, help="0 = fine-tune from scratch (default 800)")
    p.add_argument("--vqa-steps", type=int, default=600, help="(default 600)")
    p.add_argument("--nlvr2-steps", type=int, default=1000, help="(default 1000)")
    p.add_argument("--caption-steps", type=int, default=600, help="(default 600)")
    p.add_argument("--retrieval-steps", type=int, default=300, help="(default 300)")
    p.add_argument("--batch-size", type=int, default=32, help="(default 32)")
    p.add_argument("--pretrain-lr", type=float, default=2e-3, help="(default 2e-3)")
    p.add_argument("--vqa-lr", type=float, default=1e-3, help="(default 1e-3)")
    p.add_argument("--nlvr2-lr", type=float, default=3e-4, help="(default 3e-4)")
    p.add_argument("--caption-lr", type=float, default=1e-3, help="(default 1e-3)")
    p.add_argument("--retrieval-lr", type=float, default=1e-3, help="(default 1e-3)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (default 1)")
    p.add_argument("--activation-threshold", type=float, default=0.01, help="'activated expert' threshold (default 0.01)")
    p.add_argument("--accelerator", default="auto", help="auto (GPU when present), cpu or gpu (default auto)")
    a = p.parse_args(argv)
    a.image_size_model = 64  # the tiny preset's image_size
    for name in ("num_images", "batch_size", "vocab_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("pretrain_steps", "vqa_steps", "nlvr2_steps", "caption_steps", "retrieval_steps", "workers"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    import pytorch_lightning as pl

    _quiet_lightning()  # after the import, which sets Lightning's own log level

    t0 = time.perf_counter()
    pl.seed_everything(args.seed, workers=True, verbose=False)
    paths = prepare_data(args)
    variants = [args.variant] + ([v for v in args.compare_variants if v != args.variant] if args.compare else [])
    runs = []
    for v in variants:
        pl.seed_everything(args.seed, workers=True, verbose=False)
        runs.append(run_variant(v, paths, args))
    out = Path(args.out)
    results = summarise(runs, args, time.perf_counter() - t0)
    if runs[0].get("activation"):
        import numpy as np

        from tasks.plots import activation_heatmap

        activation_heatmap({k: np.asarray(v) for k, v in runs[0]["activation"].items()}, out / "activation_heatmap.png",
                           threshold=args.activation_threshold,
                           title=f"{VARIANT_LABELS[runs[0]['variant']]}: expert activation ratio after pretraining")
    csvs = {VARIANT_LABELS[r["variant"]]: Path(r["pretrain_csv"]) for r in runs if r.get("pretrain_csv")}
    if csvs and len(csvs) == len(runs) and all(p.is_file() for p in csvs.values()):
        from tasks.plots import loss_curves

        results["pretrain_curves"] = str(loss_curves(
            csvs, ["train/image_text_mlm", "train/image_text_mim", "train/text_mlm"], out / "pretrain_curves.png",
            title="pretraining losses"))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results, runs)
    _say(f"results: {out / 'results.json'}" + (f"; heatmap: {results['heatmap']}" if results["heatmap"] else ""))
    _say(f"wall time {results['wall_time_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
