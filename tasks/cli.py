"""The ``mmmoe`` command: one subcommand per job.

Each subcommand registers its own arguments in an ``add_<name>_parser`` function and imports its
heavy dependencies lazily, so ``mmmoe --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

Handler = Callable[[argparse.Namespace], int]


def add_parity_parser(sub: argparse._SubParsersAction) -> None:
    from tasks.parity_cli import add_arguments, run

    p = sub.add_parser(
        "parity",
        help="Solve Dense / SMoE / fine-grained / MH-MoE configs at matched FLOPs and parameters.",
        description="Print, for one SMoE reference layer, the dense, SMoE, fine-grained SMoE and "
        "MH-MoE variants matched in FLOPs (exactly, where whole numbers allow) and in parameters "
        "(as closely as whole numbers of experts allow), with the residual mismatch.",
    )
    add_arguments(p)
    p.set_defaults(handler=run)


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    from tasks.data_cli import add_data_arguments

    p = sub.add_parser(
        "data",
        help="Prepare datasets: WebDataset shards from COCO/VQAv2/NLVR2/image folders/text.",
        description="Dataset preparation. 'mmmoe data shards <source>' writes WebDataset shards "
        "and a manifest (see data_pipelines/schema.py for the sample contract).",
    )
    add_data_arguments(p)


def add_tokenizer_parser(sub: argparse._SubParsersAction) -> None:
    from tasks.data_cli import add_tokenizer_arguments

    p = sub.add_parser(
        "tokenizer",
        help="Train a SentencePiece tokenizer with the fixed mmmoe special ids.",
        description="SentencePiece tokenizer tools (special ids: pad=0, unk=1, bos=2, eos=3, "
        "<mask>=4).",
    )
    add_tokenizer_arguments(p)


def add_score_parser(sub: argparse._SubParsersAction) -> None:
    from tasks.score_cli import add_arguments

    p = sub.add_parser(
        "score",
        help="Official metrics of a predictions file: VQA accuracy, NLVR2, COCO captions.",
        description="Score predictions with the official benchmark metrics and print JSON: "
        "'mmmoe score vqa' (VQA accuracy), 'mmmoe score nlvr2' (accuracy, consistency), "
        "'mmmoe score caption' (BLEU, METEOR, ROUGE-L, CIDEr via pycocoevalcap).",
    )
    add_arguments(p)


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    from tasks.evaluate_cli import add_evaluate_arguments, run_evaluate

    p = sub.add_parser(
        "evaluate",
        help="Evaluate a fine-tuned checkpoint on a split: official result files + metrics.json.",
        description="LightningCLI 'test' on the run's saved config (config.yaml next to CKPT, written by "
        "'mmmoe fit', so the fit's command-line overrides need not be repeated): the Trainer's test loop "
        "writes the official result file(s) of the split into --out (one file, also on several "
        "processes), scores them when the ground truth is known (the module's eval_* / test_* init "
        "args) and prints the metrics with the task's trivial baseline. Example: mmmoe evaluate vqa "
        "--ckpt runs/finetune-vqa/checkpoints/last.ckpt [--trainer.devices 2 --trainer.strategy ddp]",
    )
    add_evaluate_arguments(p)
    p.set_defaults(handler=run_evaluate, takes_extra_args=True)


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    from tasks.evaluate_cli import add_predict_arguments, run_predict

    p = sub.add_parser(
        "predict",
        help="Run a fine-tuned checkpoint or model folder on one image (vqa: --question; caption; "
        "retrieval: --texts).",
        description="Load a fine-tuned checkpoint (weights-only) or a model folder of 'mmmoe export' "
        "(--model DIR) and predict for one image file: 'mmmoe predict vqa --ckpt C --image I --question Q' "
        "prints the answer and the top-5 answers with scores; 'mmmoe predict retrieval --model DIR "
        "--image I --texts T1 T2 ...' ranks the texts for the image; other tasks print their "
        "predict_one result as JSON.",
    )
    add_predict_arguments(p)
    p.set_defaults(handler=run_predict)


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    from tasks.export import add_arguments, run

    p = sub.add_parser(
        "export",
        help="Export a checkpoint to a self-contained model folder (safetensors, config, tokenizer, card).",
        description="Write model.safetensors (weights only), config.json (model config, task head, "
        "sha256 of every file), the tokenizer and a README.md model card (metrics, parity row, "
        "training data) into --out. Load it with mmmoe.models.from_pretrained(DIR) or "
        "'mmmoe predict TASK --model DIR'. The checkpoint is read weights-only.",
    )
    add_arguments(p)
    p.set_defaults(handler=run)


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    from tasks.compare_cli import add_arguments, run

    p = sub.add_parser(
        "compare",
        help="Train dense / SMoE / fine-grained / MH-MoE at matched FLOPs on your text; compare perplexity.",
        description="Train FFN variants at matched active FLOPs (default: dense smoe fine-grained mhmoe-h2 "
        "mhmoe-h3) for N seeds on any text (files, folders, JSON lines), with identical data order per seed, "
        "through the same Lightning modules as 'mmmoe fit'. Writes OUT/compare.json (per run: held-out "
        "perplexity, expert activation per layer, sub-token divergence, tokens/s, parameters, MACs/token), "
        "OUT/compare.md (mean ± std table, also printed) and OUT/curves.png. Held-out text: --heldout, else "
        "the last --heldout-fraction of the documents. Example: mmmoe compare lm --text corpus/ --preset tiny "
        "--steps 300 --seeds 3 --out runs/compare",
    )
    add_arguments(p)
    p.set_defaults(handler=run)


def add_fit_parser(sub: argparse._SubParsersAction) -> None:
    """``mmmoe fit|validate|test``: everything after the subcommand goes to LightningCLI
    (tasks/fit_cli.py), which is imported only when one of them runs."""

    def handler(name: str) -> Handler:
        def run(ns: argparse.Namespace) -> int:
            from tasks.fit_cli import main as lightning_main

            return lightning_main([name, *ns.lightning_args])

        return run

    for name, text in (
        ("fit", "Train from a YAML config (LightningCLI): mmmoe fit --config configs/pretrain/tiny.yaml"),
        ("validate", "Run the validation loop of a config / checkpoint (LightningCLI)."),
        ("test", "Run the test loop of a config / checkpoint (LightningCLI)."),
    ):
        # prefix_chars that no argument uses: every option (--help included) reaches LightningCLI
        p = sub.add_parser(name, help=text, description=text, add_help=False, prefix_chars="\x00")
        p.add_argument("lightning_args", nargs=argparse.REMAINDER, help="LightningCLI arguments (see --help)")
        p.set_defaults(handler=handler(name))


SUBCOMMANDS = [
    add_parity_parser, add_data_parser, add_tokenizer_parser, add_score_parser, add_evaluate_parser,
    add_predict_parser, add_export_parser, add_compare_parser, add_fit_parser,
]


def build_parser() -> argparse.ArgumentParser:
    from mmmoe import __version__

    parser = argparse.ArgumentParser(
        prog="mmmoe",
        description="Multimodal Multi-Head Mixture-of-Experts: layers, parity tools, training.",
    )
    parser.add_argument("--version", action="version", version=f"mmmoe {__version__}")
    sub = parser.add_subparsers(title="subcommands", metavar="<command>")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(ns, "takes_extra_args", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        ns.extra_args = extra
    handler: Optional[Handler] = getattr(ns, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(ns) or 0)


if __name__ == "__main__":
    sys.exit(main())
