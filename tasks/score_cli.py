"""``mmmoe score {vqa,nlvr2,caption}``: official benchmark metrics of a predictions file, as JSON.

Exit status: 0 with the scores as JSON on stdout; 2 with a one-line ``mmmoe score <task>: error:
<file>: <problem>`` on stderr when an input is missing, not JSON or not in the expected format;
1 when a needed tool is missing or fails (Java, pycocoevalcap, SPICE).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Dict

_EPILOG_EXIT = ("exit status: 0 = scores printed as JSON on stdout; 2 = an input file is missing, "
                "not JSON or malformed (one-line message on stderr); 1 = a required tool is missing "
                "or failed.")


def _print_help_handler(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def handler(ns: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return handler


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``vqa``, ``nlvr2`` and ``caption`` under ``parser`` (the ``score`` parser)."""
    parser.set_defaults(handler=_print_help_handler(parser))
    tasks = parser.add_subparsers(title="benchmarks", metavar="<benchmark>")

    v = tasks.add_parser(
        "vqa",
        help="VQA v2 accuracy (official vqaEval.py rules).",
        description="Official VQA accuracy: answers normalised as vqaEval.py does (punctuation, "
        "number words, articles, contractions; only for questions whose 10 human answers "
        "disagree), acc = mean over the 10 leave-one-out annotator subsets of min(1, matches/3). "
        'Prints {"overall", "perAnswerType", "perQuestionType", "num_questions"} in percent, '
        "rounded to 2 decimals like the official script. The results must answer exactly the "
        "questions of the questions file.",
        epilog=_EPILOG_EXIT,
    )
    v.add_argument("--questions", required=True, metavar="Q.json",
                   help="questions file, e.g. v2_OpenEnded_mscoco_val2014_questions.json")
    v.add_argument("--annotations", required=True, metavar="A.json",
                   help="annotations file, e.g. v2_mscoco_val2014_annotations.json")
    v.add_argument("--results", required=True, metavar="R.json",
                   help='predictions: JSON array of {"question_id": int, "answer": str}')
    v.add_argument("--save", metavar="OUT.json", default=None,
                   help="also write the full result, with the accuracy of every question "
                   '("perQuestion"), to OUT.json')
    v.set_defaults(handler=run_vqa)

    n = tasks.add_parser(
        "nlvr2",
        help="NLVR2 accuracy and consistency.",
        description="NLVR2 accuracy and consistency (the share of sentences, i.e. identifiers "
        "without their image-pair field, whose every example is predicted right), in percent, "
        "with the counts behind them. Every example of the data file needs exactly one "
        "prediction.",
        epilog=_EPILOG_EXIT,
    )
    n.add_argument("--data", required=True, metavar="dev.json",
                   help="NLVR2 data file (JSON lines with 'identifier' and 'label' True/False)")
    n.add_argument("--results", required=True, metavar="P",
                   help='predictions: JSON array of {"identifier", "prediction": "True"|"False"}, '
                   "a JSON object identifier -> prediction, or the official CSV "
                   "('identifier,prediction' lines)")
    n.set_defaults(handler=run_nlvr2)

    c = tasks.add_parser(
        "caption",
        help="COCO captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap).",
        description="COCO caption metrics with pycocoevalcap (PTB tokenizer, Bleu, Meteor, Rouge, "
        "Cider = CIDEr-D). References come from the Karpathy split file (sentences[].raw of "
        "the images of --split, image id = cocoid) or from a COCO-format caption file. "
        "Top-level values are pycocoevalcap's raw scores (0-1; CIDEr about 0-10); \"x100\" "
        "holds the same times 100, the scale papers usually report. Needs Java.",
        epilog=_EPILOG_EXIT,
    )
    c.add_argument("--coco", required=True, metavar="dataset_coco.json",
                   help="Karpathy split file (or a COCO-format captions file, then --split is ignored)")
    c.add_argument("--split", default="test", metavar="SPLIT",
                   help="Karpathy split to evaluate: test, val, ... (default: %(default)s)")
    c.add_argument("--results", required=True, metavar="R.json",
                   help='predictions: JSON array of {"image_id": int, "caption": str}, one per image')
    c.add_argument("--subset", action="store_true",
                   help="evaluate only the images that have a caption in R.json instead of "
                   "requiring all images of the split")
    c.add_argument("--spice", action="store_true",
                   help="also compute SPICE (downloads Stanford CoreNLP on first use; needs Java 8)")
    c.set_defaults(handler=run_caption)


def _fail(task: str, message: str, code: int) -> int:
    text = " ".join(str(message).split())
    print(f"mmmoe score {task}: error: {text}", file=sys.stderr)
    return code


def _emit(result: Dict[str, Any]) -> None:
    print(json.dumps(result, indent=2))


def run_vqa(ns: argparse.Namespace) -> int:
    from data_pipelines.formats.io import write_json
    from tasks.metrics import MetricInputError
    from tasks.metrics.vqa import vqa_accuracy

    try:
        result = vqa_accuracy(ns.questions, ns.annotations, ns.results)
    except MetricInputError as err:
        return _fail("vqa", str(err), 2)
    if ns.save:
        try:
            write_json(ns.save, result, indent=2)
        except OSError as err:
            return _fail("vqa", f"{ns.save}: cannot write: {err.strerror or err}", 2)
    _emit({k: result[k] for k in ("overall", "perAnswerType", "perQuestionType", "num_questions")})
    return 0


def run_nlvr2(ns: argparse.Namespace) -> int:
    from tasks.metrics import MetricInputError
    from tasks.metrics.nlvr2 import nlvr2_scores

    try:
        result = nlvr2_scores(ns.data, ns.results)
    except MetricInputError as err:
        return _fail("nlvr2", str(err), 2)
    _emit(result)
    return 0


def run_caption(ns: argparse.Namespace) -> int:
    from tasks.metrics import MetricInputError
    from tasks.metrics.caption import CaptionToolError, caption_scores

    try:
        result = caption_scores(ns.coco, ns.results, split=ns.split, spice=ns.spice,
                                allow_subset=ns.subset)
    except MetricInputError as err:
        return _fail("caption", str(err), 2)
    except CaptionToolError as err:
        return _fail("caption", str(err), 1)
    _emit(result)
    return 0

