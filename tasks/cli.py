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


SUBCOMMANDS = [add_parity_parser, add_data_parser, add_tokenizer_parser]


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
    ns = parser.parse_args(argv)
    handler: Optional[Handler] = getattr(ns, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(ns) or 0)


if __name__ == "__main__":
    sys.exit(main())
