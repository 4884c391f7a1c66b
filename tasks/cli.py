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


SUBCOMMANDS = [add_parity_parser]


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
