"""``mmmoe compare``: train FFN variants at matched active FLOPs on the same data and compare them.

    mmmoe compare lm --text corpus/ --preset tiny --steps 300 --seeds 3 --out runs/compare-lm
    mmmoe compare mlm --text de=wiki/de.txt en=wiki/en.txt --steps 300 --out runs/compare-mlm

For every seed and every variant (``mmmoe.models.registry.VARIANTS``: dense, smoe, fine-grained,
mhmoe-h2, mhmoe-h3 by default; all with the active FLOPs of the 8-expert top-1 SMoE reference) it
trains ``tasks.lm.CausalLMModule`` (``lm``) or ``tasks.lm.MaskedLMModule`` (``mlm``) on
``data_pipelines.datamodules.TextDataModule`` with packing (``--context`` tokens per sequence)
through the Lightning Trainer of ``mmmoe fit`` (``tasks.fit_cli.MMMoETrainer``), then scores the
held-out text with ``evaluate_split``:

* causal LM: perplexity over every held-out token (documents joined with EOS, strided windows of
  ``--context`` tokens with ``--stride``, see ``data_pipelines.packing``);
* masked LM: perplexity of the masked tokens (15%, masks drawn with a fixed seed), overall and per
  language.

Runs with the same seed see the same data in the same order (the data module is seeded by the
run's seed; model initialisation too). Held-out data: ``--heldout`` files, else the last
``--heldout-fraction`` (default 5%) of the documents of each language, which training never sees.
The tokenizer: ``--tokenizer``, else a SentencePiece model trained on the training documents only
(``<out>/tokenizer.model``, ``--vocab-size``).

Outputs under ``--out``: ``compare.json`` (every run: held-out perplexity / task metrics,
activation ratio per MoE layer and per expert, sub-token divergence, tokens/s, parameters,
MACs/token; the summary per variant: mean and std over seeds), ``compare.md`` (the table, also
printed), ``curves.png`` (training loss and held-out perplexity per step, mean over seeds) and
``runs/<variant>/seed<k>/`` (Lightning's ``metrics.csv``, ``lm_metrics.json``, ``result.json``).
A finished run (its ``result.json``) is reused when the command is run again with the same
settings, so an interrupted comparison continues where it stopped (``--overwrite`` retrains).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

PAPER_ORDER = ("dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3")
"""arXiv 2411.16205: perplexity dense > SMoE > fine-grained > MH-MoE h=2 > MH-MoE h=3."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=["lm", "mlm"], help="lm: causal LM (perplexity of every held-out token); "
                   "mlm: masked LM (perplexity of the masked tokens, per language)")
    p.add_argument("--text", nargs="+", required=True, metavar="PATH",
                   help="training text: files and/or folders (every *.txt, *.md, *.rst, *.jsonl under them). "
                   "For mlm, LANG=PATH per language (or files named by their language, e.g. de.txt)")
    p.add_argument("--heldout", nargs="+", metavar="PATH",
                   help="held-out text (same forms as --text); default: the last --heldout-fraction of the "
                   "documents of --text, never trained on")
    p.add_argument("--heldout-fraction", type=float, default=0.05,
                   help="share of the documents held out when --heldout is not given (default 0.05)")
    p.add_argument("--doc-unit", choices=["line", "paragraph", "file"], default="line",
                   help="what one document is in plain text files (default line; JSON lines: one record)")
    p.add_argument("--text-field", default="text", help="the field of JSON-lines records (default text)")
    p.add_argument("--preset", default="tiny", help="model preset: tiny, small, base, large (default tiny)")
    p.add_argument("--variants", nargs="+", default=list(PAPER_ORDER), metavar="VARIANT",
                   help=f"FFN variants at matched active FLOPs, any name of mmmoe.models.registry.VARIANTS "
                   f"(default: {' '.join(PAPER_ORDER)})")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    p.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    p.add_argument("--context", type=int, default=128,
                   help="tokens per packed sequence, 64 to 2048 (default 128); the model's max_text_len is set to it")
    p.add_argument("--stride", type=int, default=None,
                   help="causal-LM evaluation stride (default: --context, disjoint windows; smaller = more history)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default: 10%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument("--mlm-ratio", type=float, default=0.15, help="masked share of tokens for mlm (default 0.15)")
    p.add_argument("--val-every", type=int, default=None,
                   help="held-out perplexity every N steps for the curves (default steps/5; 0: only at the end)")
    p.add_argument("--val-batches", type=int, default=20,
                   help="held-out batches of each in-training check (the final score uses all; default 20)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (mmmoe ids); default: trained on --text")
    p.add_argument("--vocab-size", type=int, default=4000, help="vocabulary of the trained tokenizer (default 4000)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (default auto)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="retrain runs whose result.json exists")


# ------------------------------------------------------------------------------ sources
def parse_sources(items: Optional[Sequence[str]], task: str) -> Optional[Dict[str, List[str]]]:
    """{lang: [paths]}: ``lm`` puts everything under "und"; ``mlm`` reads LANG=PATH, else the
    file's stem (or the folder's name) is the language."""
    if not items:
        return None
    out: Dict[str, List[str]] = {}
    for item in items:
        lang, sep, path = item.partition("=")
        if not sep:
            path = item
            lang = "und" if task == "lm" else Path(item.rstrip("/")).stem
        elif task == "lm":
            lang = "und"
        if not Path(path).exists():
            raise FileNotFoundError(f"text file or folder not found: {path}")
        out.setdefault(lang, []).append(path)
    return out


def _flat(sources: Mapping[str, List[str]], task: str) -> Any:
    """The data module's form: one list for lm, {lang: list} for mlm."""
    return sources["und"] if task == "lm" else dict(sources)


def train_tokenizer_on(sources: Mapping[str, List[str]], ranges: Mapping[str, Any], args: argparse.Namespace,
                       out: Path) -> str:
    """A SentencePiece model trained on the training documents only (held-out ones excluded)."""
    from data_pipelines.packing import iter_documents
    from data_pipelines.tokenizer import train_tokenizer

    model = out / "tokenizer.model"
    if model.is_file() and not args.overwrite:
        return str(model)
    corpus = out / "tokenizer_corpus.txt"
    with open(corpus, "w", encoding="utf-8") as f:
        for lang, paths in sources.items():
            stop = ranges.get(lang, (0, None))[1]
            for i, (_, text) in enumerate(iter_documents(paths, args.doc_unit, args.text_field)):
                if stop is not None and i >= stop:
                    break
                f.write(" ".join(text.split()) + "\n")
    _say(f"training a SentencePiece tokenizer ({args.vocab_size} pieces at most) on {corpus}")
    train_tokenizer(corpus, out / "tokenizer", vocab_size=args.vocab_size,
                    input_sentence_size=200_000, num_threads=max(1, args.threads or 1))
    return str(model)


# ------------------------------------------------------------------------------ one run
def _say(msg: str) -> None:
    print(f"mmmoe compare: {msg}", flush=True)


def _progress_callback(tag: str, steps: int):
    import pytorch_lightning as pl

    class Progress(pl.Callback):
        """One line every ~10% of the steps: which run, step, loss, elapsed time."""

        def __init__(self) -> None:
            self.every = max(1, steps // 10)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step % self.every == 0 or step == steps:
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                _say(f"{tag}: step {step}/{steps} loss {float(loss):.3f} ({time.perf_counter() - self.t0:.0f}s)")

    return Progress()


def run_one(variant: str, seed: int, tag: str, data_kwargs: Dict[str, Any], args: argparse.Namespace,
            run_dir: Path, baseline: bool) -> Dict[str, Any]:
    """Train one (variant, seed) and score the held-out split; returns the run's result dict."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from data_pipelines.datamodules import TextDataModule
    from mmmoe.models import BackboneSpec
    from mmmoe.models.registry import count_costs
    from tasks.base import OptimSpec
    from tasks.fit_cli import MMMoETrainer
    from tasks.lm import CausalLMModule, MaskedLMModule
    from tasks.plots import read_csv_metrics

    pl.seed_everything(seed, workers=True, verbose=False)
    cls = CausalLMModule if args.task == "lm" else MaskedLMModule
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 10)
    module = cls(backbone=BackboneSpec(args.preset, variant, max_text_len=args.context), tokenizer=data_kwargs["tokenizer"],
                 optim=OptimSpec(lr=args.lr, weight_decay=args.weight_decay, warmup_steps=warmup, min_lr_ratio=0.1))
    dm = TextDataModule(seed=seed, **data_kwargs)
    val_every = args.val_every if args.val_every is not None else max(1, args.steps // 5)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = MMMoETrainer(
        max_steps=args.steps, accelerator=args.accelerator, devices=1, precision="auto",
        logger=CSVLogger(str(run_dir), name="", version=""), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        val_check_interval=val_every if val_every else None, check_val_every_n_epoch=None,
        limit_val_batches=args.val_batches if val_every else 0, log_every_n_steps=max(1, min(10, args.steps // 20)),
        gradient_clip_val=1.0, callbacks=[_progress_callback(tag, args.steps)], default_root_dir=str(run_dir),
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - t0
    metrics = module.evaluate_split(dm, "val", str(run_dir), seed=0, baseline=baseline)
    cols = read_csv_metrics(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else {}
    tps = cols.get("train/tokens_per_s") or []
    costs = count_costs(module.config, seq_len=args.context)
    result = {
        "variant": variant, "seed": seed, "steps": int(trainer.global_step), "fit_seconds": fit_s,
        "metrics": metrics,
        "perplexity": metrics["lm_perplexity" if args.task == "lm" else "mlm_perplexity"],
        "tokens_per_s": statistics.median(tps) if tps else None,
        "expert_activation": metrics.get("expert_activation"),
        "sub_token_divergence": metrics.get("sub_token_divergence"),
        "activation_per_layer": module.activation_stats.activated(),
        "activation_ratios": {k: [round(float(x), 6) for x in v] for k, v in module.activation_stats.ratios().items()},
        "params": int(costs["params"]), "active_params": int(costs["active_params"]),
        "macs_per_token": int(costs["macs_per_token"]),
        "moe": None if module.config.moe is None else {
            k: getattr(module.config.moe, k) for k in ("num_experts", "expert_hidden", "top_k", "num_heads")},
    }
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------------------ summary
def _mean_std(xs: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarise(runs: List[Dict[str, Any]], variants: Sequence[str]) -> Dict[str, Any]:
    """Per variant: mean / std over seeds (sample std) of the run figures."""
    out: Dict[str, Any] = {}
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        if not rs:
            continue
        s = {key: _mean_std([r.get(key) for r in rs])
             for key in ("perplexity", "expert_activation", "sub_token_divergence", "tokens_per_s")}
        extra = sorted({k for r in rs for k in r["metrics"] if k.startswith("mlm_perplexity_")})
        for k in extra:
            s[k] = _mean_std([r["metrics"].get(k) for r in rs])
        s["seeds"] = sorted(r["seed"] for r in rs)
        s["params"], s["active_params"], s["macs_per_token"] = rs[0]["params"], rs[0]["active_params"], rs[0]["macs_per_token"]
        out[v] = s
    return out


def ordering(summary: Mapping[str, Any]) -> Dict[str, Any]:
    """Variants from the highest to the lowest mean perplexity, and whether the paper's order holds."""
    ranked = sorted((v for v in summary if summary[v]["perplexity"]["mean"] is not None),
                    key=lambda v: -summary[v]["perplexity"]["mean"])
    present = [v for v in PAPER_ORDER if v in ranked]
    holds = [v for v in ranked if v in PAPER_ORDER] == present if len(present) > 1 else None
    return {"worst_to_best": ranked, "paper_order": list(PAPER_ORDER), "paper_order_holds": holds}


def _pm(s: Mapping[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    if s is None or s.get("mean") is None:
        return "-"
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def table(summary: Mapping[str, Any], task: str, title: str) -> str:
    """Markdown table: perplexity (mean ± std), experts activated, sub-token divergence, speed, cost."""
    rows = [f"### {title}", "",
            "| variant | held-out perplexity | experts activated (%) | sub-token divergence | tokens/s | params (M) | MACs/token (M) | seeds |",
            "|---|---|---|---|---|---|---|---|"]
    for v, s in summary.items():
        rows.append(f"| {v} | {_pm(s['perplexity'])} | {_pm(s['expert_activation'], 100, 1)} | "
                    f"{_pm(s['sub_token_divergence'])} | {_pm(s['tokens_per_s'], 1, 0)} | {s['params'] / 1e6:.2f} | "
                    f"{s['macs_per_token'] / 1e6:.3f} | {len(s['seeds'])} |")
    langs = sorted({k for s in summary.values() for k in s if k.startswith("mlm_perplexity_")})
    if langs:
        rows += ["", "| variant | " + " | ".join(l.rsplit("_", 1)[1] for l in langs) + " |",
                 "|---" * (len(langs) + 1) + "|"]
        for v, s in summary.items():
            rows.append(f"| {v} | " + " | ".join(_pm(s.get(l)) for l in langs) + " |")
    o = ordering(summary)
    rows += ["", f"Worst to best (mean perplexity): {' > '.join(o['worst_to_best'])}. "
             f"Paper order ({' > '.join(PAPER_ORDER)}) holds: {o['paper_order_holds']}."]
    return "\n".join(rows) + "\n"


def plot_curves(runs: List[Dict[str, Any]], out_dir: Path, variants: Sequence[str], title: str) -> Optional[Path]:
    """Training loss (smoothed) and held-out perplexity per step, mean over seeds, one line per variant."""
    import numpy as np

    from tasks.plots import _pyplot, read_csv_metrics

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in variants:
        per_seed = [read_csv_metrics(out_dir / "runs" / v / f"seed{r['seed']}" / "metrics.csv")
                    for r in runs if r["variant"] == v and (out_dir / "runs" / v / f"seed{r['seed']}" / "metrics.csv").is_file()]
        for ax, key in zip(axes, ("train/loss", "val/perplexity")):
            series = [dict(zip(c[f"{key}@step"], c[key])) for c in per_seed if key in c]
            if not series:
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            if not steps:
                continue
            y = np.array([[s[t] for t in steps] for s in series]).mean(0)
            if key == "train/loss" and len(y) > 5:  # exponential moving average for readability
                ema, acc = [], y[0]
                for val in y:
                    acc = 0.8 * acc + 0.2 * val
                    ema.append(acc)
                y = np.array(ema)
            ax.plot(steps, y, label=v, marker="o" if key == "val/perplexity" else None, ms=3)
    axes[0].set_title("training loss (EMA, mean over seeds)")
    axes[1].set_title("held-out perplexity (mean over seeds)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = out_dir / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ the command
def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    keys = ("task", "text", "heldout", "heldout_fraction", "doc_unit", "text_field", "preset", "steps", "context",
            "stride", "batch_size", "lr", "warmup_steps", "weight_decay", "mlm_ratio", "tokenizer", "vocab_size")
    return {k: getattr(args, k) for k in keys}


def run(args: argparse.Namespace) -> int:
    from data_pipelines.packing import heldout_split

    if not 64 <= args.context <= 2048:
        raise SystemExit(f"mmmoe compare: error: --context must be in [64, 2048], got {args.context}")
    if args.stride is not None and not 1 <= args.stride <= args.context:
        raise SystemExit(f"mmmoe compare: error: --stride must be in [1, --context={args.context}], got {args.stride}")
    from mmmoe.models.registry import PRESETS, VARIANTS

    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"mmmoe compare: error: unknown variant(s) {bad}: allowed {', '.join(VARIANTS)}")
    if args.preset not in PRESETS:
        raise SystemExit(f"mmmoe compare: error: unknown preset {args.preset!r}: allowed {', '.join(sorted(PRESETS))}")
    if args.seeds < 1 or args.steps < 1:
        raise SystemExit("mmmoe compare: error: --seeds and --steps must be >= 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import warnings

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in ("does not have many workers", "IterableDataset", "pin_memory", "exists and is not empty",
                    "LeafSpec", "on_after_batch_transfer", "smaller than the logging interval"):
        warnings.filterwarnings("ignore", message=f".*{pattern}.*")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = parse_sources(args.text, args.task)
    held = parse_sources(args.heldout, args.task)
    if held is not None and set(held) != set(train):
        raise SystemExit(f"mmmoe compare: error: --heldout languages {sorted(held)} differ from --text {sorted(train)}")
    ranges: Dict[str, Any] = {}
    if held is None:
        for lang, paths in train.items():
            first, total = heldout_split(paths, args.heldout_fraction, args.doc_unit, args.text_field)
            ranges[lang] = (0, first)
            _say(f"held out the last {total - first} of {total} documents ({args.doc_unit}s) of "
                 f"{'the text' if lang == 'und' else lang} (--heldout-fraction {args.heldout_fraction})")
    tokenizer = args.tokenizer or train_tokenizer_on(train, ranges, args, out)
    data_kwargs = dict(
        tokenizer=tokenizer, train=_flat(train, args.task), val=None if held is None else _flat(held, args.task),
        mlm_ratio=args.mlm_ratio if args.task == "mlm" else None, batch_size=args.batch_size, context=args.context,
        stride=args.stride, doc_unit=args.doc_unit, text_field=args.text_field,
        val_fraction=args.heldout_fraction if held is None else 0.0, num_workers=0, pin_memory=False,
        shuffle_buffer=1000,
    )
    settings = _settings(args)
    plan = [(seed, v) for seed in range(args.seeds) for v in args.variants]
    runs: List[Dict[str, Any]] = []
    baseline: Optional[float] = None
    t_all = time.perf_counter()
    for k, (seed, variant) in enumerate(plan, 1):
        tag = f"[run {k}/{len(plan)}] {variant} seed {seed}"
        run_dir = out / "runs" / variant / f"seed{seed}"
        done = run_dir / "result.json"
        settings_file = run_dir / "settings.json"
        if done.is_file() and not args.overwrite and settings_file.is_file() \
                and json.loads(settings_file.read_text()) == json.loads(json.dumps(settings)):
            result = json.loads(done.read_text())
            _say(f"{tag}: reusing {done}")
        else:
            _say(f"{tag}: training {args.steps} steps")
            run_dir.mkdir(parents=True, exist_ok=True)
            for stale in (done, run_dir / "metrics.csv"):
                if stale.exists():
                    stale.unlink()
            settings_file.write_text(json.dumps(settings))
            result = run_one(variant, seed, tag, data_kwargs, args, run_dir, baseline=baseline is None)
        key = "lm_baseline_perplexity" if args.task == "lm" else "mlm_baseline_perplexity"
        baseline = result["metrics"].get(key, baseline)
        _say(f"{tag}: held-out perplexity {result['perplexity']:.3f}"
             + (f", experts activated {100 * result['expert_activation']:.1f}%" if result.get("expert_activation") is not None else "")
             + (f", {result['tokens_per_s']:.0f} tokens/s" if result.get("tokens_per_s") else ""))
        runs.append(result)
        write_outputs(out, runs, args, settings, baseline, time.perf_counter() - t_all, final=False)
    summary = write_outputs(out, runs, args, settings, baseline, time.perf_counter() - t_all, final=True)
    print(summary, flush=True)
    return 0


def write_outputs(out: Path, runs: List[Dict[str, Any]], args: argparse.Namespace, settings: Dict[str, Any],
                  baseline: Optional[float], wall: float, final: bool) -> str:
    """compare.json (rewritten after every run), compare.md and curves.png; returns the table."""
    from tasks.evaluate_cli import write_json

    summary = summarise(runs, args.variants)
    title = (f"{'causal LM' if args.task == 'lm' else 'masked LM'} on {' '.join(args.text)}: {args.preset}, "
             f"{args.steps} steps, context {args.context}, batch {args.batch_size}, seeds {args.seeds}")
    obj = {"settings": settings, "title": title, "complete": final, "wall_seconds": wall,
           "unigram_baseline_perplexity": baseline, "summary": summary, "ordering": ordering(summary), "runs": runs}
    write_json(out / "compare.json", obj)
    md = table(summary, args.task, title)
    if baseline is not None:
        md += f"\nAdd-one unigram baseline (training tokens) on the same held-out tokens: perplexity {baseline:.2f}.\n"
    (out / "compare.md").write_text(md, encoding="utf-8")
    if final:
        try:
            plot_curves(runs, out, args.variants, title)
        except Exception as exc:  # a plot is not worth losing the results for
            _say(f"could not draw curves.png: {exc!r}")
    return md


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="mmmoe compare")
    add_arguments(p)
    sys.exit(run(p.parse_args()))
