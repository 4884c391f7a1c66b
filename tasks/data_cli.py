"""``mmmoe data ...`` (dataset preparation) and ``mmmoe tokenizer ...``.

``mmmoe data`` is a group: each of its subcommands registers itself through a function in
``DATA_SUBCOMMANDS`` (``add_shards_parser`` today), so more (``synth``) can be appended. Heavy
imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable, Dict, List


def _print_help_handler(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def handler(ns: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return handler


# ---------------------------------------------------------------------------------------------
# mmmoe data shards <source>
# ---------------------------------------------------------------------------------------------


def _add_common_shard_args(p: argparse.ArgumentParser, default_prefix: str) -> None:
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="DIR", help="output folder for shards + manifest")
    out.add_argument("--prefix", default=None, metavar="NAME",
                     help=f"shard name prefix: NAME-000000.tar, NAME.manifest.json "
                     f"(default: {default_prefix})")
    out.add_argument("--shard-size", type=int, default=1000, metavar="N",
                     help="samples per shard (default: %(default)s)")
    out.add_argument("--max-bytes", type=int, default=None, metavar="B",
                     help="also start a new shard before one would exceed B bytes (default: no limit)")
    out.add_argument("--json", action="store_true", help="print the manifest as JSON")


def _add_image_check_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-image-check", dest="check_images", action="store_false",
                   help="do not skip image files whose first bytes are no known image format")


def add_shards_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shards",
        help="Write WebDataset shards (+ manifest) from a source dataset.",
        description="Convert a dataset into <out>/<prefix>-NNNNNN.tar WebDataset shards and "
        "<out>/<prefix>.manifest.json. Records whose image is missing or unreadable, whose path "
        "would leave the image folder, or that are malformed are skipped and counted in the "
        "manifest's 'skipped'; a malformed JSON input file is an error naming it.",
    )
    p.set_defaults(handler=_print_help_handler(p))
    src = p.add_subparsers(title="sources", metavar="<source>")

    k = src.add_parser("karpathy", help="COCO/Flickr captions in the Karpathy split file",
                       description="dataset_coco.json (Karpathy split) -> image_text (one sample "
                       "per caption) or caption (one per image, all captions) shards.")
    k.add_argument("--dataset-json", required=True, metavar="FILE", help="dataset_coco.json")
    k.add_argument("--image-root", required=True, metavar="DIR",
                   help="folder holding <filepath>/<filename> (e.g. train2014/, val2014/)")
    k.add_argument("--splits", nargs="+", default=["train", "restval"], metavar="SPLIT",
                   help="Karpathy splits to include (default: train restval)")
    k.add_argument("--kind", choices=("image_text", "caption"), default="image_text",
                   help="image_text for pretraining, caption for the captioning task "
                   "(default: %(default)s)")
    _add_image_check_arg(k)
    _add_common_shard_args(k, "coco-<kind>-<splits>")
    k.set_defaults(handler=_run_karpathy)

    f = src.add_parser("image-folder", help="a folder of images, optionally with captions",
                       description="Images (+ captions from JSONL {image|file_name|filename, "
                       "caption|text} or TSV filename<TAB>caption) -> image_text shards; without "
                       "--captions -> image shards of every image under the folder.")
    f.add_argument("--image-dir", required=True, metavar="DIR")
    f.add_argument("--captions", default=None, metavar="FILE",
                   help="JSONL / JSON array / TSV captions file (file names relative to --image-dir)")
    _add_image_check_arg(f)
    _add_common_shard_args(f, "images")
    f.set_defaults(handler=_run_image_folder)

    v = src.add_parser("vqa", help="VQAv2 questions (+ annotations)",
                       description="VQAv2 questions joined with annotations by question_id -> "
                       "vqa shards (omit --annotations for test splits).")
    v.add_argument("--questions", required=True, metavar="FILE",
                   help="v2_OpenEnded_mscoco_<split>_questions.json")
    v.add_argument("--annotations", default=None, metavar="FILE",
                   help="v2_mscoco_<split>_annotations.json (none for test splits)")
    v.add_argument("--image-root", required=True, metavar="DIR",
                   help="folder holding <subtype>/COCO_<subtype>_<id>.jpg (or the images directly)")
    v.add_argument("--image-pattern", default="COCO_{subtype}_{image_id:012d}.jpg", metavar="FMT",
                   help="image file name format (default: %(default)s)")
    v.add_argument("--image-subtype", default=None, metavar="NAME",
                   help="image folder/subtype (default: the questions' data_subtype, "
                   "test-dev2015 -> test2015)")
    _add_image_check_arg(v)
    _add_common_shard_args(v, "vqa-<data_subtype>")
    v.set_defaults(handler=_run_vqa)

    n = src.add_parser("nlvr2", help="NLVR2 JSON lines",
                       description="NLVR2 train.json / dev.json / test1.json -> nlvr2 shards "
                       "(left/right image pairs).")
    n.add_argument("--input", required=True, metavar="FILE", help="NLVR2 JSON-lines file")
    n.add_argument("--image-root", required=True, metavar="DIR",
                   help="folder holding <split>/[<directory>/]<split>-<set>-<pair>-img{0,1}.png")
    _add_image_check_arg(n)
    _add_common_shard_args(n, "nlvr2-<input stem>")
    n.set_defaults(handler=_run_nlvr2)

    t = src.add_parser("text", help="plain text files, one sample per line",
                       description="Plain UTF-8 text (one sentence/document per line) -> text "
                       "shards. A folder means all *.txt inside.")
    t.add_argument("--input", required=True, nargs="+", metavar="PATH", help="text files or folders")
    t.add_argument("--lang", default=None,
                   help="language tag for every line (default: each file's stem, de.txt -> de)")
    _add_common_shard_args(t, "text")
    t.set_defaults(handler=_run_text)


def _common(ns: argparse.Namespace) -> Dict[str, Any]:
    return {"prefix": ns.prefix, "shard_size": ns.shard_size, "max_bytes": ns.max_bytes}


def _run_writer(ns: argparse.Namespace, call: Callable[[], Dict[str, Any]]) -> int:
    from pathlib import Path

    log = logging.getLogger("data_pipelines")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    old_level = log.level
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        manifest = call()
    except (OSError, ValueError) as e:  # missing / unreadable / malformed input, unwritable --out
        print(f"mmmoe: error: {e}", file=sys.stderr)
        return 2
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    if ns.json:
        print(json.dumps(manifest, indent=1))
    else:
        out = Path(ns.out)
        print(f"kind:     {manifest['kind']}")
        print(f"samples:  {manifest['total']}")
        print(f"skipped:  {manifest.get('skipped', 0)}")
        if manifest["pattern"]:
            prefix = manifest["pattern"].rsplit("-{", 1)[0]
            print(f"shards:   {len(manifest['shards'])}  {out / manifest['pattern']}")
            print(f"manifest: {out / (prefix + '.manifest.json')}")
        else:
            print("shards:   0 (no samples written)")
    return 0 if manifest["total"] > 0 else 1


def _run_karpathy(ns: argparse.Namespace) -> int:
    from data_pipelines.shards import write_karpathy_shards

    return _run_writer(ns, lambda: write_karpathy_shards(
        ns.dataset_json, ns.image_root, ns.out, splits=tuple(ns.splits), kind=ns.kind,
        check_images=ns.check_images, **_common(ns)))


def _run_image_folder(ns: argparse.Namespace) -> int:
    from data_pipelines.shards import write_image_folder_shards

    return _run_writer(ns, lambda: write_image_folder_shards(
        ns.image_dir, ns.captions, ns.out, check_images=ns.check_images, **_common(ns)))


def _run_vqa(ns: argparse.Namespace) -> int:
    from data_pipelines.shards import write_vqa_shards

    return _run_writer(ns, lambda: write_vqa_shards(
        ns.questions, ns.annotations, ns.image_root, ns.out, image_pattern=ns.image_pattern,
        image_subtype=ns.image_subtype, check_images=ns.check_images, **_common(ns)))


def _run_nlvr2(ns: argparse.Namespace) -> int:
    from data_pipelines.shards import write_nlvr2_shards

    return _run_writer(ns, lambda: write_nlvr2_shards(
        ns.input, ns.image_root, ns.out, check_images=ns.check_images, **_common(ns)))


def _run_text(ns: argparse.Namespace) -> int:
    from data_pipelines.shards import write_text_shards

    return _run_writer(ns, lambda: write_text_shards(ns.input, ns.out, lang=ns.lang, **_common(ns)))


def add_synth_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="Generate the built-in dataset (official formats) and its WebDataset shards.",
        description="Draw procedural scenes and write, under --out: coco/dataset_coco.json (Karpathy), "
        "vqav2/ question and annotation files, nlvr2/ JSON lines and images, text/ corpora "
        "(English and multilingual), and shards/ with pretraining and task shards plus "
        "shards/index.json. Deterministic for a seed; reuses a complete earlier run with the same "
        "parameters.",
    )
    p.add_argument("--out", required=True, help="output folder (e.g. data/synth)")
    p.add_argument("--num-images", type=int, default=300, help="COCO-style images (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--image-size", type=int, default=96, help="image side in pixels (default %(default)s)")
    p.add_argument("--shard-size", type=int, default=500, help="samples per shard (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the shard index as JSON")
    p.set_defaults(handler=_run_synth)


def _run_synth(ns: argparse.Namespace) -> int:
    for name in ("num_images", "image_size", "shard_size"):
        if getattr(ns, name) < 1:
            print(f"mmmoe data synth: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if ns.image_size < 16:
        print("mmmoe data synth: error: --image-size must be >= 16", file=sys.stderr)
        return 2
    from data_pipelines.builtin import make_builtin_dataset

    index = make_builtin_dataset(ns.out, ns.num_images, ns.seed, ns.image_size, ns.shard_size)
    if ns.json:
        print(json.dumps(index, indent=1))
        return 0
    print(f"built-in dataset in {index['root']} (seed {ns.seed}, {ns.num_images} images)")
    for name, d in index["datasets"].items():
        print(f"  {name:<26} {d['kind']:<11} {d['total']:>7} samples  skipped {d['skipped']}")
    return 0


#: ``mmmoe data`` subcommands; append an ``add_<name>_parser(sub)`` function to add one.
DATA_SUBCOMMANDS: List[Callable[[argparse._SubParsersAction], None]] = [add_shards_parser, add_synth_parser]


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``data`` sub-subcommands on ``parser``."""
    parser.set_defaults(handler=_print_help_handler(parser))
    sub = parser.add_subparsers(title="data subcommands", metavar="<data command>")
    for add in DATA_SUBCOMMANDS:
        add(sub)


# ---------------------------------------------------------------------------------------------
# mmmoe tokenizer train
# ---------------------------------------------------------------------------------------------


def add_tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``tokenizer`` sub-subcommands on ``parser``."""
    parser.set_defaults(handler=_print_help_handler(parser))
    sub = parser.add_subparsers(title="tokenizer subcommands", metavar="<tokenizer command>")
    p = sub.add_parser(
        "train",
        help="Train a SentencePiece tokenizer on text files.",
        description="Train a SentencePiece model with the mmmoe special ids (pad=0, unk=1, "
        "bos=2, eos=3, <mask>=4); writes PREFIX.model and PREFIX.vocab.",
    )
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="text files (one sentence per line) or folders of *.txt")
    p.add_argument("--out", required=True, metavar="PREFIX", help="output model prefix")
    p.add_argument("--vocab-size", type=int, default=64000, metavar="N",
                   help="vocabulary size; a soft limit, small corpora may give fewer "
                   "(default: %(default)s)")
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram",
                   help="(default: %(default)s)")
    p.add_argument("--character-coverage", type=float, default=1.0, metavar="C",
                   help="fraction of characters covered; 0.9995 for CJK-heavy corpora "
                   "(default: %(default)s)")
    p.add_argument("--input-sentence-size", type=int, default=1_000_000, metavar="N",
                   help="sample at most N sentences for training (default: %(default)s)")
    p.add_argument("--byte-fallback", action="store_true",
                   help="encode unseen characters as UTF-8 byte pieces instead of <unk>")
    p.add_argument("--num-threads", type=int, default=2, metavar="T", help="(default: %(default)s)")
    p.set_defaults(handler=_run_tokenizer_train)


def _run_tokenizer_train(ns: argparse.Namespace) -> int:
    from data_pipelines.tokenizer import Tokenizer, train_tokenizer

    try:
        model = train_tokenizer(
            ns.input, ns.out, vocab_size=ns.vocab_size, model_type=ns.model_type,
            character_coverage=ns.character_coverage, input_sentence_size=ns.input_sentence_size,
            byte_fallback=ns.byte_fallback, num_threads=ns.num_threads,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"mmmoe: error: {e}", file=sys.stderr)
        return 2
    tok = Tokenizer(model)
    print(f"model:      {model}")
    print(f"vocab size: {tok.vocab_size}")
    print(f"special:    pad={tok.pad_id} unk={tok.unk_id} bos={tok.bos_id} eos={tok.eos_id} "
          f"mask={tok.mask_id}")
    return 0
